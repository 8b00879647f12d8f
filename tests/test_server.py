"""`llmpipe server start|status|stop` with real Prefect and MLflow server processes on free ports.

Each test uses its own temporary workdir (state in <workdir>/.llmpipe, Prefect database there too,
MLflow store in <workdir>/mlruns); every process a test starts is stopped before it ends.

    python -m pytest -q tests/test_server.py
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from flows.server import SERVICES, free_port, pid_alive, prefect_api_url, read_state, status, stop_service

pytestmark = pytest.mark.server


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def llmpipe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI as the `llmpipe` console script does (flows.cli:main) in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, timeout=timeout, env=_env())


def _get(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return r.read().decode()


def _two_free_ports() -> tuple[int, int]:
    a = free_port()
    b = free_port()
    while b == a:
        b = free_port()
    return a, b


def test_start_status_stop_with_real_processes(tmp_path):
    wd = tmp_path / "work"
    wd.mkdir()
    pport, mport = _two_free_ports()
    try:
        r = llmpipe("server", "start", "--prefect-port", str(pport), "--mlflow-port", str(mport), "--workdir", str(wd))
        assert r.returncode == 0, r.stderr + r.stdout
        assert f"prefect: running (pid" in r.stdout and f"at http://127.0.0.1:{pport}" in r.stdout
        assert f"mlflow: running (pid" in r.stdout and f"at http://127.0.0.1:{mport}" in r.stdout
        state = wd / ".llmpipe"
        pids = {}
        for name, port in (("prefect", pport), ("mlflow", mport)):
            pid = int((state / f"{name}.pid").read_text())
            info = json.loads((state / f"{name}.json").read_text())
            assert info["pid"] == pid and info["port"] == port and pid_alive(pid)
            pids[name] = pid
        # the health endpoints answer; MLflow serves the project's default store
        assert _get(f"http://127.0.0.1:{pport}/api/health").strip() == "true"
        assert _get(f"http://127.0.0.1:{mport}/health").strip() == "OK"
        assert (wd / "mlruns" / "mlflow.db").is_file()
        assert (state / "prefect" / "prefect.db").is_file()  # the server's own PREFECT_HOME

        r = llmpipe("server", "status", "--json", "--workdir", str(wd))
        assert r.returncode == 0, r.stderr
        rows = {row["name"]: row for row in json.loads(r.stdout)}
        assert rows["prefect"]["state"] == "running" and rows["prefect"]["url"] == f"http://127.0.0.1:{pport}"
        assert rows["prefect"]["api_url"] == f"http://127.0.0.1:{pport}/api"
        assert rows["mlflow"]["state"] == "running" and rows["mlflow"]["url"] == f"http://127.0.0.1:{mport}"
        r = llmpipe("server", "status", "--workdir", str(wd))
        assert r.stdout.splitlines() == [f"prefect  running   http://127.0.0.1:{pport}  pid {pids['prefect']}",
                                         f"mlflow   running   http://127.0.0.1:{mport}  pid {pids['mlflow']}"]

        # reading the URL of the running server neither waits on the start lock nor starts anything
        assert _without_the_start_lock(wd, prefect_api_url) == f"http://127.0.0.1:{pport}/api"
        assert _server_pids(wd) == [pids["prefect"]]

        # starting twice is a no-op that says so (same processes, even with other ports asked for)
        r = llmpipe("server", "start", "--prefect-port", str(pport + 1), "--mlflow-port", str(mport + 1),
                    "--workdir", str(wd))
        assert r.returncode == 0, r.stderr
        assert f"prefect: already running (pid {pids['prefect']})" in r.stdout
        assert f"mlflow: already running (pid {pids['mlflow']})" in r.stdout
        assert int((state / "prefect.pid").read_text()) == pids["prefect"]

        r = llmpipe("server", "stop", "--workdir", str(wd))
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [f"prefect: stopped (pid {pids['prefect']})",
                                         f"mlflow: stopped (pid {pids['mlflow']})"]
        for name in SERVICES:
            assert not (state / f"{name}.pid").exists() and not (state / f"{name}.json").exists()
            deadline = time.monotonic() + 10
            while pid_alive(pids[name]) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not pid_alive(pids[name])
        assert prefect_api_url(wd) is None
        assert [r["state"] for r in status(wd)] == ["stopped", "stopped"]
        r = llmpipe("server", "stop", "--workdir", str(wd))
        assert r.stdout.splitlines() == ["prefect: not running", "mlflow: not running"]
    finally:
        for name in SERVICES:
            stop_service(name, wd, echo=lambda s: None)


def test_busy_port_is_a_clear_error(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = llmpipe("server", "start", "prefect", "--prefect-port", str(port), "--workdir", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip() == (f"llmpipe: error: prefect: port {port} on 127.0.0.1 is already in use; "
                                f"free it or choose another with --prefect-port")
    assert not (tmp_path / ".llmpipe" / "prefect.pid").exists()


def test_stale_pid_file_is_reported_and_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = tmp_path / ".llmpipe"
    state.mkdir()
    (state / "prefect.pid").write_text(f"{dead.pid}\n")
    (state / "prefect.json").write_text(json.dumps({"pid": dead.pid, "port": 1, "url": "http://127.0.0.1:1",
                                                    "api_url": "http://127.0.0.1:1/api",
                                                    "health_url": "http://127.0.0.1:1/api/health"}))
    assert read_state(tmp_path, "prefect")["stale"] is True
    assert prefect_api_url(tmp_path) is None
    r = llmpipe("server", "status", "--workdir", str(tmp_path))
    assert r.returncode == 1
    assert r.stdout.splitlines()[0].startswith(f"prefect  stale     http://127.0.0.1:1  pid {dead.pid}  (stale pid file")
    assert r.stdout.splitlines()[1] == "mlflow   stopped"
    r = llmpipe("server", "stop", "prefect", "--workdir", str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "prefect: not running (removed stale pid file)"
    assert not (state / "prefect.pid").exists() and not (state / "prefect.json").exists()


def _without_the_start_lock(wd: Path, call):
    """call(wd) while another open file holds <wd>/.llmpipe/prefect.lock (as a `llmpipe run` starting
    the server does): its result, or a failure if it waits on that lock."""
    state = wd / ".llmpipe"
    state.mkdir(exist_ok=True)
    result: list = []
    with open(state / "prefect.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: result.append(call(wd)), daemon=True)
        worker.start()
        worker.join(timeout=60)  # a hang detector, not a speed limit
        assert not worker.is_alive(), "waited on the server start lock"
    return result[0]


def _server_pids(wd: Path) -> list[int]:
    """`prefect server start` processes whose working directory is wd (how flows.server starts them)."""
    return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if _cmd(pid).startswith(f"{sys.executable} -m prefect server start") and _cwd(pid) == str(wd)]


def test_prefect_api_url_without_a_server_is_none_and_starts_nothing(tmp_path):
    assert prefect_api_url(tmp_path) is None
    assert list(tmp_path.iterdir()) == []  # no state written, so no server started
    assert _without_the_start_lock(tmp_path, prefect_api_url) is None
    assert _server_pids(tmp_path) == []


def test_prefect_api_url_of_a_server_that_does_not_answer_is_none(tmp_path):
    """A live pid whose port accepts but never answers /api/health: None (the health check gives up)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}/api"
        (tmp_path / ".llmpipe").mkdir()
        (tmp_path / ".llmpipe" / "prefect.json").write_text(json.dumps(
            {"pid": os.getpid(), "port": port, "url": url[:-4], "api_url": url, "health_url": f"{url}/health"}))
        assert _without_the_start_lock(tmp_path, prefect_api_url) is None
    assert _server_pids(tmp_path) == []


def test_bad_port_and_service_names(tmp_path):
    r = llmpipe("server", "start", "--prefect-port", "http", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "expected a port number 1-65535 (0: any free port), got 'http'" in r.stderr
    r = llmpipe("server", "start", "redis", "--workdir", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip() == "llmpipe: error: service: unknown service 'redis'; expected one of prefect, mlflow"


def test_run_starts_one_kept_server_per_workdir_and_reuses_it(tmp_path):
    """Default setup: the first `llmpipe run` starts this workdir's Prefect server (one line says so), two
    runs starting at once start one server between them, and later runs reuse it."""
    from tests.test_pipeline import TEST_OVERRIDES, write_fixture_workdir

    wd = write_fixture_workdir(tmp_path)
    env = {k: v for k, v in _env().items() if k != "LLMPIPE_PREFECT"}
    args = [sys.executable, "-m", "flows.cli", "run", "download", "--workdir", str(wd), "--no-progress",
            *[a for o in TEST_OVERRIDES for a in ("--set", o)]]
    try:
        procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
        started = [o[1] for o in outs if "llmpipe: started a Prefect server for" in o[1]]
        assert len(started) == 1, [o[1][-500:] for o in outs]
        info = read_state(wd, "prefect")
        assert info is not None and not info["stale"] and pid_alive(info["pid"])
        again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert again.returncode == 0, again.stderr
        assert "started a Prefect server" not in again.stderr
        assert read_state(wd, "prefect")["pid"] == info["pid"]
        assert _server_pids(wd) == [info["pid"]]
    finally:
        stop_service("prefect", wd, echo=lambda _m: None)
    assert read_state(wd, "prefect") is None


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""
