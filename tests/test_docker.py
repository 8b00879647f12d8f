"""docker/: the compose file is consistent and the image's entrypoint works (no Docker engine needed).

- compose.yaml parses; every service's volumes, dependencies, build context and bind-mounted files
  exist; the worker and deploy step point PREFECT_API_URL / MLFLOW_TRACKING_URI at the services'
  names and ports; MLflow's Postgres URI matches the postgres service's user, password and database,
  Prefect's database is the one postgres-init.sql creates; MLflow proxies artifacts to a volume;
  the deploy step's `llmpipe serve` arguments parse with the real CLI parser.
- Dockerfile: python:3.11-slim, the CPU torch 2.13.0 wheel before `pip install .`, entrypoint llmpipe.
- The entrypoint command outside Docker: `llmpipe --help` and `llmpipe presets` in a subprocess.

    python -m pytest -q tests/test_docker.py
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"


def interpolate(value: str) -> str:
    """Compose variable interpolation with every optional variable unset: ${VAR:-default} -> default,
    $$ -> $; a required ${VAR:?message} becomes <VAR>."""
    value = re.sub(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*):\?[^}]*\}", r"<\1>", value)
    value = re.sub(r"(?<!\$)\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", value)
    value = re.sub(r"(?<!\$)\$\{[A-Za-z_][A-Za-z0-9_]*\}", "", value)
    return value.replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _command(service: dict) -> list[str]:
    entry = service.get("entrypoint") or []
    cmd = service.get("command") or []
    return [*entry, *(cmd if isinstance(cmd, list) else shlex.split(cmd))]


def _flag(cmd: list[str], name: str) -> str:
    assert name in cmd, f"{name} missing from {cmd}"
    return cmd[cmd.index(name) + 1]


def test_services_volumes_and_dependencies(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "mlflow", "deploy", "worker", "dask-scheduler",
                             "dask-worker"}
    assert [n for n, svc in services.items() if svc.get("profiles")] == ["dask-scheduler", "dask-worker"]
    declared = set(compose["volumes"])
    used = set()
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            source, target = interpolate(vol).split(":")[:2]
            assert target.startswith("/")
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: bind source {source} missing in docker/"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
                used.add(source)
        if "build" in svc:
            assert (DOCKER / svc["build"]["context"]).resolve() == REPO
            assert (REPO / svc["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
            assert svc["image"] == "llmpipe:latest"
    assert used == declared
    assert services["worker"]["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    for svc in ("prefect-server", "mlflow"):
        assert services["worker"]["depends_on"][svc]["condition"] == "service_healthy"
        assert "healthcheck" in services[svc]


def test_clients_point_at_the_services(compose):
    services = compose["services"]
    prefect_cmd = _command(services["prefect-server"])
    assert prefect_cmd[:3] == ["prefect", "server", "start"] and _flag(prefect_cmd, "--host") == "0.0.0.0"
    prefect_port = int(_flag(prefect_cmd, "--port"))
    mlflow_cmd = _command(services["mlflow"])
    assert mlflow_cmd[:2] == ["mlflow", "server"] and _flag(mlflow_cmd, "--host") == "0.0.0.0"
    mlflow_port = int(_flag(mlflow_cmd, "--port"))
    for name in ("worker", "deploy"):
        env = services[name]["environment"]
        api = urlsplit(env["PREFECT_API_URL"])
        assert (api.hostname, api.port, api.path) == ("prefect-server", prefect_port, "/api"), name
        ml = urlsplit(env["MLFLOW_TRACKING_URI"])
        assert (ml.hostname, ml.port) == ("mlflow", mlflow_port), name
        assert {"/work"} <= {interpolate(v).split(":")[1] for v in services[name]["volumes"]}
    # published on this machine only unless LLMPIPE_PUBLISH_ADDRESS says otherwise
    assert [interpolate(p) for p in services["prefect-server"]["ports"]] == [f"127.0.0.1:{prefect_port}:{prefect_port}"]
    assert [interpolate(p) for p in services["mlflow"]["ports"]] == [f"127.0.0.1:{mlflow_port}:{mlflow_port}"]
    assert f"mlflow:{mlflow_port}" in _flag(mlflow_cmd, "--allowed-hosts").split(",")
    health = " ".join(services["prefect-server"]["healthcheck"]["test"])
    assert f"localhost:{prefect_port}/api/health" in health
    assert f"localhost:{mlflow_port}/health" in " ".join(services["mlflow"]["healthcheck"]["test"])


def test_databases_and_artifact_store(compose):
    services = compose["services"]
    pg = services["postgres"]["environment"]
    assert interpolate(pg["POSTGRES_PASSWORD"]) == "<POSTGRES_PASSWORD>"  # required, never a built-in password
    pg = {k: v.replace(pg["POSTGRES_PASSWORD"], "${POSTGRES_PASSWORD}") for k, v in pg.items()}
    store = urlsplit(_flag(_command(services["mlflow"]), "--backend-store-uri"))
    assert (store.scheme, store.username, store.password, store.hostname, store.port, store.path) == (
        "postgresql", pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], "postgres", 5432, "/" + pg["POSTGRES_DB"])
    prefect_db = urlsplit(services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    assert (prefect_db.scheme, prefect_db.username, prefect_db.password, prefect_db.hostname) == (
        "postgresql+asyncpg", pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], "postgres")
    init = [interpolate(v).split(":") for v in services["postgres"]["volumes"] if "initdb" in v][0]
    assert f"CREATE DATABASE {prefect_db.path.lstrip('/')};" in (DOCKER / init[0]).read_text()
    cmd = _command(services["mlflow"])
    assert "--serve-artifacts" in cmd and _flag(cmd, "--default-artifact-root") == "mlflow-artifacts:/"
    dest = _flag(cmd, "--artifacts-destination")
    mounts = {interpolate(v).split(":")[1]: interpolate(v).split(":")[0] for v in services["mlflow"]["volumes"]}
    assert mounts[dest] in compose["volumes"]  # artifacts land on a named volume


def test_work_pool_and_deploy_step(compose):
    from flows.cli import build_parser
    from flows.serve import load_schedule_file

    services = compose["services"]
    worker = _command(services["worker"])
    assert worker[:3] == ["prefect", "worker", "start"] and _flag(worker, "--type") == "process"
    pool = _flag(worker, "--pool")
    deploy = _command(services["deploy"])
    assert deploy[:2] == ["sh", "-c"]
    script = interpolate(deploy[2])
    assert f"prefect work-pool create {pool} --type process" in script
    serve_line = script[script.index("llmpipe serve"):]
    dask = "tcp://dask-scheduler:8786"
    argv = shlex.split(serve_line.replace("${LLMPIPE_PRESET:-tiny}", "tiny")
                       .replace("${LLMPIPE_MIRROR_DIR:+--mirror /mirror}", "--mirror /mirror")
                       .replace("${LLMPIPE_DASK_ADDRESS:+", "").replace("$LLMPIPE_DASK_ADDRESS}", dask))[1:]
    args = build_parser().parse_args(argv)
    assert (args.command, args.pool, args.workdir, args.preset, args.mirror) == ("serve", pool, "/work", "tiny", "/mirror")
    assert args.overrides == ["orchestration.task_runner=dask", f"orchestration.dask_address={dask}"]
    from flows.pipeline import resolve

    assert resolve("tiny", None, args.overrides, None, []).orchestration.dask_address == dask
    host, port = urlsplit(dask).hostname, urlsplit(dask).port
    scheduler = _command(services["dask-scheduler"])
    assert host == "dask-scheduler" and int(_flag(scheduler, "--port")) == port
    assert _command(services["dask-worker"])[:3] == ["dask", "worker", dask]
    mounts = {interpolate(v).split(":")[1]: interpolate(v).split(":")[0] for v in services["deploy"]["volumes"]}
    spec = load_schedule_file(DOCKER / mounts[args.schedules])  # the default schedule file is valid
    assert spec.schedules == {}
    assert services["worker"]["working_dir"] == args.workdir


def test_dockerfile():
    text = (DOCKER / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    torch = next(i for i, ln in enumerate(lines) if "torch==2.13.0" in ln)
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch]
    install = next(i for i, ln in enumerate(lines) if ln.startswith("RUN pip install ."))
    assert torch < install
    assert lines[-2:] == ['ENTRYPOINT ["llmpipe"]', 'CMD ["--help"]']
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for ln in lines:
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                assert (REPO / src).exists(), f"COPY source {src} missing"
                assert any(pat.strip() in (f"!{src}", f"!{src}/**") for pat in ignore), f"{src} not let through"


def test_entrypoint_command_works_outside_docker():
    exe = shutil.which("llmpipe")
    assert exe, "the llmpipe console script is not installed: pip install -e '.[dev]'"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for sub in ("run", "presets", "server", "serve"):
        assert sub in r.stdout
    r = subprocess.run([exe, "presets"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tiny" in r.stdout.split()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dask_services_commands_run_outside_docker(compose, tmp_path):
    """The compose file's scheduler and worker commands (host and port made local) form a cluster
    that the data stages use through orchestration.dask_address."""
    import time

    from flows.scaleout import DataRunner
    from llm.config import OrchestrationConfig, ShardConfig
    from llm.shards import run_shard
    from llm.tokenizer import EncoderPool

    port = _free_port()
    services = compose["services"]
    sched = _command(services["dask-scheduler"])
    sched[sched.index("--host") + 1], sched[sched.index("--port") + 1] = "127.0.0.1", str(port)
    work = [a.replace("tcp://dask-scheduler:8786", f"tcp://127.0.0.1:{port}") for a in _command(services["dask-worker"])]
    work[work.index("--nworkers") + 1] = "1"
    procs = [subprocess.Popen(sched, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    try:
        time.sleep(2)
        procs.append(subprocess.Popen(work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        import pyarrow as pa
        import pyarrow.parquet as pq

        docs = tmp_path / "documents.parquet"
        texts = [f"Line {i} of a small document.\n" * (50 + i) for i in range(6)]
        pq.write_table(pa.table({"doc_id": [str(i) for i in range(6)], "source": ["s"] * 6, "text": texts}), docs)
        with DataRunner(OrchestrationConfig(task_runner="dask", dask_address=f"tcp://127.0.0.1:{port}")) as runner:
            deadline = time.time() + 60
            executor, slots = runner.executor()
            while runner._runner.client.nthreads() == {} and time.time() < deadline:  # the worker registers
                time.sleep(0.5)
            assert runner._runner.client.nthreads(), "the dask-worker command did not join the scheduler"
            with EncoderPool(2, executor=executor) as pool:
                run_shard(ShardConfig(), docs, tmp_path / "dask", progress=False, pool=pool)
        run_shard(ShardConfig(), docs, tmp_path / "threads", progress=False)
        for name in ("train-00000.parquet", "val-00000.parquet", "manifest.json"):
            assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "threads" / name).read_bytes()
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
