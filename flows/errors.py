"""Errors that the `llmpipe` command line prints as one line (no traceback unless --debug).

    from flows.errors import UsageError
    raise UsageError("--top-k: expected a positive integer, got 0")   # exit code 2
"""


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""
