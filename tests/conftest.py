"""Shared pytest configuration: markers.

    server: the test starts real local Prefect / MLflow server processes (slower; still run by default).
            Skip them with `python -m pytest -m "not server"`.
    cuda:   the test needs a CUDA GPU (bf16, torch.compile, NCCL); it skips itself without one.
            benchmarks/gpu_check.sh runs them: `python -m pytest -m cuda`.
"""


def pytest_configure(config):
    config.addinivalue_line("markers", "server: starts real local Prefect/MLflow server processes (slower; run by "
                                       "default, deselect with -m 'not server')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skips itself without one); run with -m cuda")


def pytest_sessionstart(session):
    # `llmpipe run` keeps a Prefect server running per workdir by default; the tests' subprocesses
    # use a temporary one per run instead, so nothing outlives the test that started it.
    import os

    os.environ.setdefault("LLMPIPE_PREFECT", "ephemeral")
