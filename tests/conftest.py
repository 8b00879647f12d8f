"""Shared pytest configuration: markers, and the one Prefect test harness of the session.

Markers (all of them run by default: `python -m pytest -q` runs the whole suite):

    server: the test starts real local Prefect / MLflow server processes (slower).
            Skip them with `python -m pytest -m "not server"`.
    slow:   the test takes more than ~20 s on a 2-core machine (real tiny pipeline runs, real servers,
            subprocess pipelines). A fast loop: `python -m pytest -m "not slow"`.
    cuda:   the test needs a CUDA GPU (bf16, torch.compile, NCCL); it skips itself without one.
            benchmarks/gpu_check.sh runs them: `python -m pytest -m cuda`.

Fixture `prefect_harness` (session scope): Prefect's `prefect_test_harness` (a temporary Prefect API
server on a temporary SQLite database), started the first time a test asks for it and stopped at the
end of the session, so the flows that tests run in this process share one server. Subprocesses
(`llmpipe run ...`) do not see it: they run with LLMPIPE_PREFECT=ephemeral (a temporary server per run).

    python -m pytest -q                      # everything
    python -m pytest -q -m "not slow"        # the fast loop
"""
from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "server: starts real local Prefect/MLflow server processes (slower; run by "
                                       "default, deselect with -m 'not server')")
    config.addinivalue_line("markers", "slow: takes more than ~20 s (run by default; deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skips itself without one); run with -m cuda")


def pytest_sessionstart(session):
    # `llmpipe run` keeps a Prefect server running per workdir by default; the tests' subprocesses
    # use a temporary one per run instead, so nothing outlives the test that started it.
    os.environ.setdefault("LLMPIPE_PREFECT", "ephemeral")


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API server for the flows that tests run in this process (started lazily)."""
    # prefect is imported here, not at the top: the tests that need no flow never pay for its import
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
