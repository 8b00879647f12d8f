"""`llmpipe server start|stop|status`: a local Prefect server and MLflow UI in the background.

    llmpipe server start [prefect] [mlflow] [--prefect-port 4200] [--mlflow-port 5000] [--workdir .]
    llmpipe server status [--json]
    llmpipe server stop [prefect] [mlflow]

Both services listen on 127.0.0.1 only. Each runs in its own process group; its pid, port and
URL are recorded in `<workdir>/.llmpipe/<service>.pid` and `<service>.json`, and its output goes to
`<workdir>/.llmpipe/<service>.log`. `start` returns once each service answers its health check
(Prefect: GET /api/health, MLflow: GET /health); starting a running service is a no-op that says so;
a pid file whose process is gone (a crash, a reboot) is stale: `status` reports it and `start`/`stop`
clean it up.

- Prefect: `prefect server start --host 127.0.0.1 --port P` with PREFECT_HOME=<workdir>/.llmpipe/prefect
  (its database: flow runs, deployments, automations of this project).
- MLflow: `mlflow server` on the project's default store (flows/tracking.py):
  backend sqlite:///<workdir>/mlruns/mlflow.db, artifacts <workdir>/mlruns/artifacts.

While the Prefect server runs, `llmpipe run` sends its flow runs there (see `prefect_api_url`).
When none runs and PREFECT_API_URL is unset, `llmpipe run` starts this workdir's server itself
(`ensure_prefect`, port 4200 or the next free one), says so in one line, and leaves it running for
the next runs, which then skip Prefect's ~8 s temporary-server start. `LLMPIPE_PREFECT=ephemeral`
turns this off: each run then gets a temporary server (`temporary_prefect`) that dies with the run,
even when the run is killed with -9 (PR_SET_PDEATHSIG). `llmpipe serve` needs a server too.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from flows.errors import UsageError
from flows.tracking import default_tracking_uri
from llm.fsutil import atomic_write_text
from llm.procenv import die_with_parent

STATE_DIR = ".llmpipe"
SERVICES = ("prefect", "mlflow")
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000}
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Service:
    name: str
    port: int
    url: str  # what a person opens in a browser
    health_url: str
    api_url: Optional[str]  # what clients are pointed at (PREFECT_API_URL / MLFLOW_TRACKING_URI)
    cmd: list[str]
    env: dict[str, str]


def state_dir(workdir: str | Path) -> Path:
    return Path(workdir).resolve() / STATE_DIR


def _paths(workdir: str | Path, name: str) -> tuple[Path, Path, Path]:
    d = state_dir(workdir)
    return d / f"{name}.pid", d / f"{name}.json", d / f"{name}.log"


def service_spec(name: str, workdir: str | Path, port: int) -> Service:
    """The command line and environment of one service for a workdir."""
    wd = Path(workdir).resolve()
    base = f"http://{HOST}:{port}"
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if name == "prefect":
        env.update({"PREFECT_HOME": str(state_dir(wd) / "prefect"), "PREFECT_API_URL": f"{base}/api",
                    "PREFECT_UI_API_URL": f"{base}/api"})
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
        return Service(name, port, base, f"{base}/api/health", f"{base}/api", cmd, env)
    if name == "mlflow":
        artifacts = (wd / "mlruns" / "artifacts").resolve()
        # background jobs (GenAI evaluation, trace archival) are not used here: 9 fewer processes
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
               "--backend-store-uri", default_tracking_uri(wd), "--default-artifact-root", artifacts.as_uri()]
        return Service(name, port, base, f"{base}/health", base, cmd, env)
    raise ValueError(f"service: unknown service {name!r}; expected one of {', '.join(SERVICES)}")


# --- process and health checks ------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _cmdline_matches(pid: int, cmd: list[str]) -> bool:
    """Guard against a recycled pid: the process must still run the recorded command (Linux /proc)."""
    try:
        actual = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid
    return [a.decode(errors="replace") for a in actual if a] == cmd


def healthy(url: str, timeout: float = 2.0) -> bool:
    """GET url answers 2xx within `timeout` seconds (no proxies: these are loopback services)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (OSError, urllib.error.URLError, ValueError):
        return False


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port the OS says is free now (for tests and --port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def read_state(workdir: str | Path, name: str) -> Optional[dict]:
    """The recorded state of a service, or None when it has no pid file (or an unreadable one)."""
    pid_file, json_file, _ = _paths(workdir, name)
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return {"name": name, "pid": None, "stale": True}
    try:
        info = json.loads(json_file.read_text())
    except (OSError, json.JSONDecodeError):
        info = {}
    info.update(name=name, pid=pid)
    info["stale"] = not pid_alive(pid) or ("cmd" in info and not _cmdline_matches(pid, info["cmd"]))
    return info


def _remove_state(workdir: str | Path, name: str) -> None:
    for p in _paths(workdir, name)[:2]:
        p.unlink(missing_ok=True)


def prefect_api_url(workdir: str | Path = ".") -> Optional[str]:
    """The API URL of this workdir's running Prefect server (`llmpipe server start`), else None.

    Reads <workdir>/.llmpipe/prefect.json and checks GET /api/health with a short timeout, so it
    costs well under 0.3 s whether or not a server runs. `llmpipe run` calls it to use the server."""
    try:
        info = json.loads((state_dir(workdir) / "prefect.json").read_text())
        pid = int(info["pid"])
        url = info["api_url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not pid_alive(pid):
        return None
    return url if healthy(info.get("health_url", f"{url}/health"), timeout=0.25) else None


# --- start / stop -------------------------------------------------------------------------------------------

def prefect_mode() -> str:
    """LLMPIPE_PREFECT: "server" (default: start and keep this workdir's server) or "ephemeral"."""
    mode = os.environ.get("LLMPIPE_PREFECT", "server").strip().lower() or "server"
    if mode not in ("server", "ephemeral"):
        raise ValueError(f"LLMPIPE_PREFECT: expected server or ephemeral, got {mode!r}")
    return mode


def ensure_prefect(workdir: str | Path, echo: Callable[[str], None] = print) -> str:
    """The API URL of this workdir's Prefect server, starting it first when it does not run."""
    url = prefect_api_url(workdir)
    if url:
        return url
    state_dir(workdir).mkdir(parents=True, exist_ok=True)
    with open(state_dir(workdir) / "prefect.lock", "a") as lock:  # two runs starting at once start one server
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = read_state(workdir, "prefect")
        if info is not None and not info["stale"] and info.get("api_url"):  # it runs: maybe slow to answer
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if healthy(info.get("health_url", ""), timeout=2.0):
                    return info["api_url"]
                time.sleep(0.5)
            raise RuntimeError(f"prefect: this workdir's server (pid {info['pid']}, {info.get('url')}) does not answer; "
                               "`llmpipe server stop` stops it, or set LLMPIPE_PREFECT=ephemeral")
        port = DEFAULT_PORTS["prefect"] if port_free(DEFAULT_PORTS["prefect"]) else free_port()
        info = start_service("prefect", workdir, port, echo=lambda _msg: None)
    echo(f"llmpipe: started a Prefect server for {Path(workdir).resolve()} at {info['url']} (pid {info['pid']}); "
         "it keeps running for the next runs: `llmpipe server status|stop` manages it, "
         "LLMPIPE_PREFECT=ephemeral turns this off")
    return info["api_url"]


@contextlib.contextmanager
def temporary_prefect(workdir: str | Path, timeout: float = 180.0) -> Iterator[str]:
    """A Prefect server for one run: it stops when the block ends and dies with this process."""
    port = free_port()
    spec = service_spec("prefect", workdir, port)
    home = os.environ.get("PREFECT_HOME") or str(Path.home() / ".prefect")
    env = {**os.environ, **spec.env, "PREFECT_HOME": home}
    proc = subprocess.Popen(spec.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, preexec_fn=die_with_parent(signal.SIGKILL))
    try:
        deadline = time.monotonic() + timeout
        while not healthy(spec.health_url, timeout=1.0):
            if proc.poll() is not None:
                err = (proc.stderr.read() or b"").decode(errors="replace").strip().splitlines()
                raise RuntimeError(f"prefect: the temporary server exited with code {proc.returncode}: "
                                   f"{err[-1] if err else '(no output)'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect: the temporary server was not healthy at {spec.health_url} "
                                   f"after {timeout:.0f} s")
            time.sleep(0.2)
        yield spec.api_url
    finally:
        drain_prefect_logs()
        stop_process(proc, grace=10)


def drain_prefect_logs(timeout: float = 10.0) -> None:
    """Send the logs and events Prefect still queues in this process to its server (as Prefect's own
    test harness does before it stops its server), so a temporary server is not stopped under them and
    the run does not end with "Error logging to API: All connection attempts failed"."""
    if "prefect.logging.handlers" not in sys.modules:  # this process never logged to Prefect
        return
    # lazy: only a process that already imported prefect gets here
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    try:
        APILogWorker.instance().drain()
    except RuntimeError:  # the worker never started
        pass
    EventsWorker.drain_all(timeout=timeout)


def stop_process(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM a child we started, wait up to `grace` seconds, then SIGKILL it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_service(name: str, workdir: str | Path, port: int, timeout: float = 180.0,
                  echo: Callable[[str], None] = print) -> dict:
    """Start one service in the background unless it already runs; wait until it is healthy.

    Returns its state dict (pid, port, url, api_url, log, started). Raises RuntimeError when the
    port is busy or the service exits or stays unhealthy for `timeout` seconds (the log's tail is
    in the message)."""
    info = read_state(workdir, name)
    if info is not None and not info["stale"]:
        echo(f"{name}: already running (pid {info['pid']}) at {info.get('url')}; nothing to do")
        return info
    if info is not None:
        echo(f"{name}: removing stale pid file (pid {info['pid']} is gone)")
        _remove_state(workdir, name)
    if not port_free(port):
        flag = f"--{name}-port"
        raise RuntimeError(f"{name}: port {port} on {HOST} is already in use; free it or choose another with {flag}")
    spec = service_spec(name, workdir, port)
    pid_file, json_file, log_file = _paths(workdir, name)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    if name == "mlflow":
        (Path(workdir).resolve() / "mlruns" / "artifacts").mkdir(parents=True, exist_ok=True)
    if name == "prefect":
        Path(spec.env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(spec.env)
    with open(log_file, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(spec.cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(spec.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(Path(workdir).resolve()), start_new_session=True)
    info = {"name": name, "pid": proc.pid, "pgid": proc.pid, "port": port, "url": spec.url,
            "api_url": spec.api_url, "health_url": spec.health_url, "log": str(log_file), "cmd": spec.cmd,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(json_file, json.dumps(info, indent=2))
    atomic_write_text(pid_file, f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            _remove_state(workdir, name)
            raise RuntimeError(f"{name}: exited with code {proc.returncode} during startup; "
                               f"{log_file}: {_tail(log_file)}")
        if healthy(spec.health_url, timeout=2.0):
            break
        if time.monotonic() > deadline:
            _kill_group(proc.pid)
            _remove_state(workdir, name)
            raise RuntimeError(f"{name}: not healthy at {spec.health_url} after {timeout:.0f} s; "
                               f"{log_file}: {_tail(log_file)}")
        time.sleep(0.5)
    echo(f"{name}: running (pid {proc.pid}) at {spec.url}  [log {log_file}]")
    return info


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:]) or "(empty log)"


def _kill_group(pgid: int, grace: float = 15.0) -> None:
    """SIGTERM the process group, wait up to `grace` s for its leader to exit, then SIGKILL the group."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pgid)
        if not pid_alive(pgid):
            break
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)  # leftovers (workers that ignored SIGTERM)
    except ProcessLookupError:
        pass
    _reap(pgid)


def _reap(pid: int) -> None:
    """Collect our own child's exit status so it does not linger as a zombie (no-op otherwise)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_service(name: str, workdir: str | Path, echo: Callable[[str], None] = print) -> bool:
    """Stop a service (its whole process group) and remove its pid files; False if it was not running."""
    info = read_state(workdir, name)
    if info is None:
        echo(f"{name}: not running")
        return False
    if info["stale"] or info.get("pid") is None:
        _remove_state(workdir, name)
        echo(f"{name}: not running (removed stale pid file)")
        return False
    _kill_group(int(info.get("pgid") or info["pid"]))
    _remove_state(workdir, name)
    echo(f"{name}: stopped (pid {info['pid']})")
    return True


def status(workdir: str | Path) -> list[dict]:
    """One row per service: name, state (running | unhealthy | stopped | stale), pid, url, log."""
    rows = []
    for name in SERVICES:
        info = read_state(workdir, name)
        if info is None:
            rows.append({"name": name, "state": "stopped", "pid": None, "url": None})
            continue
        if info["stale"]:
            state = "stale"
        else:
            state = "running" if healthy(info.get("health_url", ""), timeout=2.0) else "unhealthy"
        rows.append({"name": name, "state": state, "pid": info.get("pid"), "url": info.get("url"),
                     "api_url": info.get("api_url"), "port": info.get("port"), "log": info.get("log")})
    return rows


# --- CLI ------------------------------------------------------------------------------------------------------

def _port(value: str) -> int:
    try:
        p = int(value)
    except ValueError:
        p = -1
    if not 0 <= p < 65536:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535 (0: any free port), got {value!r}")
    return p


def _selected(args) -> list[str]:
    return [s for s in SERVICES if s in (args.services or SERVICES)]


def cmd_server(args) -> int:
    for s in args.services or []:
        if s not in SERVICES:
            raise UsageError(f"service: unknown service {s!r}; expected one of {', '.join(SERVICES)}")
    wd = Path(args.workdir)
    if args.action == "start":
        ports = {"prefect": args.prefect_port, "mlflow": args.mlflow_port}
        for name in _selected(args):
            if ports[name] == 0:
                ports[name] = free_port()
        for name in _selected(args):
            start_service(name, wd, ports[name], timeout=args.timeout)
        api = prefect_api_url(wd)
        if api:
            print(f"llmpipe run in {wd.resolve()} now uses the Prefect server; elsewhere: "
                  f"export PREFECT_API_URL={api}")
        return 0
    if args.action == "stop":
        for name in _selected(args):
            stop_service(name, wd)
        return 0
    rows = status(wd)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            extra = f"{r['url']}  pid {r['pid']}" if r["url"] else ""
            if r["state"] == "stale":
                extra += "  (stale pid file: the process is gone; `llmpipe server start` cleans it up)"
            print(f"{r['name']:8s} {r['state']:9s} {extra}".rstrip())
    return 0 if all(r["state"] in ("running", "stopped") for r in rows) else 1


def register(subparsers) -> None:
    """Add `llmpipe server start|stop|status` to the CLI."""
    p = subparsers.add_parser("server", help="start/stop/status of a local Prefect server and MLflow UI",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("services", nargs="*", metavar="SERVICE", help="prefect and/or mlflow (default: both)")
    p.add_argument("--prefect-port", type=_port, default=DEFAULT_PORTS["prefect"], help="default 4200 (0: any free port)")
    p.add_argument("--mlflow-port", type=_port, default=DEFAULT_PORTS["mlflow"], help="default 5000 (0: any free port)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each health check")
    p.add_argument("--workdir", default=".", help="the project folder (state in <workdir>/.llmpipe)")
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_server)

