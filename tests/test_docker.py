"""docker/: the image's commands and the compose file's wiring, checked by what they do (no Docker engine here).

- The image: its ENTRYPOINT + CMD and the `llmpipe ...` steps of its build run here, from this checkout,
  as the console script the image installs (`llmpipe` = flows.cli:main = `python -m flows.cli`);
  every COPY source exists and the build context filter lets it through.
- compose.yaml: services reference only defined services, volumes and networks; bind-mounted files
  exist; every ${VARIABLE} it reads is documented in its header, and every $$VARIABLE its commands
  read inside a container is set in that service's environment; POSTGRES_PASSWORD is required with
  no default; the UIs are published on 127.0.0.1 unless LLMPIPE_PUBLISH_ADDRESS says otherwise;
  clients point at the servers' names and ports; the databases match; the deploy step's
  `llmpipe serve` line, expanded by a real `sh`, parses with the real CLI parser.
- The Dask services' commands (host and port made local) form a cluster the data stages use.

    python -m pytest -q tests/test_docker.py
"""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import build_parser
from flows.scaleout import DataRunner
from flows.serve import load_schedule_file
from llm.config import OrchestrationConfig, ShardConfig
from llm.shards import run_shard
from llm.tokenizer import EncoderPool

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE_TEXT = (DOCKER / "compose.yaml").read_text()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_TEXT)


def _command(service: dict) -> list[str]:
    entry = service.get("entrypoint") or []
    cmd = service.get("command") or []
    return [*entry, *(cmd if isinstance(cmd, list) else shlex.split(cmd))]


def _flag(cmd: list[str], name: str) -> str:
    assert name in cmd, f"{name} missing from {cmd}"
    return cmd[cmd.index(name) + 1]


def _mount(volume: str) -> tuple[str, str]:
    """(source, target) of a short-syntax volume; the source may be one ${VAR:-default} token."""
    m = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(?:ro|rw))?", volume)
    assert m, f"unexpected volume syntax {volume!r}"
    return m.group(1), m.group(2)


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _run_here(argv: list[str]) -> subprocess.CompletedProcess:
    """An `llmpipe ...` command line as the image runs it, on this checkout."""
    assert argv[0] == "llmpipe", argv
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv[1:]], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


# --- the image ------------------------------------------------------------------------------------------------------

def test_the_images_command_and_build_steps_run_here():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["llmpipe"] == "flows.cli:main"  # what `python -m flows.cli` runs
    steps = _instructions((DOCKER / "Dockerfile").read_text())
    entrypoint = [json.loads(a) for k, a in steps if k == "ENTRYPOINT"][-1]
    cmd = [json.loads(a) for k, a in steps if k == "CMD"][-1]
    r = _run_here(entrypoint + cmd)  # `docker run llmpipe`
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: llmpipe")
    commands = re.search(r"^ +\{([a-z,]+)\}$", r.stdout, flags=re.M).group(1).split(",")
    assert {"run", "presets", "server", "serve"} <= set(commands)
    build_checks = [shlex.split(part) for k, a in steps if k == "RUN" for part in a.split("&&")
                    if part.strip().startswith("llmpipe ")]
    assert build_checks == [["llmpipe", "presets"]]
    for argv in build_checks:
        r = _run_here(argv)
        assert r.returncode == 0, r.stderr
        assert "tiny" in r.stdout.split()


def test_the_build_context_has_what_the_dockerfile_copies():
    ignore = [ln.strip() for ln in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()]
    assert "*" in ignore  # everything not let through below stays out of the context
    copies = [a.split()[:-1] for k, a in _instructions((DOCKER / "Dockerfile").read_text()) if k == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            assert (REPO / src).exists(), f"COPY source {src} missing"
            assert f"!{src}" in ignore or f"!{src}/**" in ignore, f"{src} is not let through the build context"


# --- compose.yaml ---------------------------------------------------------------------------------------------------

def test_services_reference_only_defined_services_volumes_and_networks(compose):
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})
    networks = set(compose.get("networks") or {}) | {"default"}
    used = set()
    for name, svc in services.items():
        assert set(svc.get("depends_on", {})) <= set(services), name
        nets = svc.get("networks", [])
        assert set(nets) <= networks, f"{name}: undefined network(s) {set(nets) - networks}"
        for vol in svc.get("volumes", []):
            source, target = _mount(vol)
            assert target.startswith("/"), (name, vol)
            default = re.fullmatch(r"\$\{[A-Za-z_]\w*:-([^}]*)\}", source)
            if default:  # ${VAR:-./path}: a bind mount whose default path must exist
                source = default.group(1)
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: bind source {source} missing in docker/"
            else:
                assert source in volumes, f"{name}: volume {source} not declared"
                used.add(source)
        if "build" in svc:
            assert (DOCKER / svc["build"]["context"]).resolve() == REPO
            assert (REPO / svc["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert used == volumes  # and nothing declared goes unused


def test_every_variable_is_documented_and_container_variables_are_set(compose):
    body = "\n".join(ln for ln in COMPOSE_TEXT.splitlines() if not ln.lstrip().startswith("#"))
    documented = set(re.findall(r"^#   ([A-Z][A-Z0-9_]+)\s", COMPOSE_TEXT, flags=re.M))
    read = set(re.findall(r"(?<!\$)\$\{?([A-Za-z_]\w*)", body))  # $$ is compose's escape for a literal $
    assert read == documented, f"undocumented: {read - documented}; documented but unused: {documented - read}"
    for name, svc in compose["services"].items():
        in_container = set(re.findall(r"\$\$\{?([A-Za-z_]\w*)", " ".join(_command(svc))))
        assert in_container <= set(svc.get("environment", {})), f"{name}: {in_container - set(svc['environment'])}"


def test_postgres_password_is_required_and_has_no_default(compose):
    uses = re.findall(r"(?<!\$)\$\{POSTGRES_PASSWORD([^}]*)\}", COMPOSE_TEXT)
    assert uses and all(u == "" or u.startswith(":?") for u in uses), uses  # no :- or - default anywhere
    assert compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_uis_are_published_on_localhost_by_default(compose):
    published = {name: svc["ports"] for name, svc in compose["services"].items() if svc.get("ports")}
    assert sorted(published) == ["mlflow", "prefect-server"]
    for name, ports in published.items():
        for port in ports:
            assert re.fullmatch(r"\$\{LLMPIPE_PUBLISH_ADDRESS:-127\.0\.0\.1\}:(\d+):\1", port), (name, port)


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
        assert "/work" in {_mount(v)[1] for v in services[name]["volumes"]}
    assert services["prefect-server"]["ports"] == [f"${{LLMPIPE_PUBLISH_ADDRESS:-127.0.0.1}}:{prefect_port}:{prefect_port}"]
    assert services["mlflow"]["ports"] == [f"${{LLMPIPE_PUBLISH_ADDRESS:-127.0.0.1}}:{mlflow_port}:{mlflow_port}"]
    assert f"mlflow:{mlflow_port}" in _flag(mlflow_cmd, "--allowed-hosts").split(",")
    assert f"localhost:{prefect_port}/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])
    assert f"localhost:{mlflow_port}/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert services["worker"]["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    for svc in ("prefect-server", "mlflow"):
        assert services["worker"]["depends_on"][svc]["condition"] == "service_healthy"


def test_databases_and_artifact_store(compose):
    services = compose["services"]
    pg = services["postgres"]["environment"]
    store = urlsplit(_flag(_command(services["mlflow"]), "--backend-store-uri"))
    assert (store.scheme, store.username, store.password, store.hostname, store.port, store.path) == (
        "postgresql", pg["POSTGRES_USER"], "${POSTGRES_PASSWORD}", "postgres", 5432, "/" + pg["POSTGRES_DB"])
    prefect_db = urlsplit(services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    assert (prefect_db.scheme, prefect_db.username, prefect_db.password, prefect_db.hostname) == (
        "postgresql+asyncpg", pg["POSTGRES_USER"], "${POSTGRES_PASSWORD}", "postgres")
    init = next(source for source, target in map(_mount, services["postgres"]["volumes"]) if "initdb" in target)
    assert f"CREATE DATABASE {prefect_db.path.lstrip('/')};" in (DOCKER / init).read_text()
    cmd = _command(services["mlflow"])
    assert "--serve-artifacts" in cmd and _flag(cmd, "--default-artifact-root") == "mlflow-artifacts:/"
    mounts = {target: source for source, target in map(_mount, services["mlflow"]["volumes"])}
    assert mounts[_flag(cmd, "--artifacts-destination")] in compose["volumes"]  # artifacts land on a named volume


def _expand_in_sh(words: str, env: dict) -> list[str]:
    """The argv a real `sh` makes of `words` with this environment (as the deploy container does)."""
    r = subprocess.run(["sh", "-c", f'set -- {words}; printf "%s\\0" "$@"'], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], **env}, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split("\0")[:-1]


def test_work_pool_and_deploy_step(compose):
    from flows.pipeline import resolve  # imports prefect: kept lazy so collecting this module stays light

    services = compose["services"]
    worker = _command(services["worker"])
    assert worker[:3] == ["prefect", "worker", "start"] and _flag(worker, "--type") == "process"
    pool = _flag(worker, "--pool")
    deploy = _command(services["deploy"])
    assert deploy[:2] == ["sh", "-c"]
    script = deploy[2].replace("$$", "$")  # compose's escape: the container's shell sees one $
    assert f"prefect work-pool create {pool} --type process" in script
    serve_words = script[script.index("llmpipe serve"):]
    dask = "tcp://dask-scheduler:8786"
    # compose's defaults (environment: empty mirror and Dask address), then every option set
    argv = _expand_in_sh(serve_words, {"LLMPIPE_PRESET": "tiny", "LLMPIPE_MIRROR_DIR": "", "LLMPIPE_DASK_ADDRESS": ""})
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.pool, args.workdir, args.preset, args.mirror, args.overrides) == (
        "serve", pool, "/work", "tiny", None, [])
    argv = _expand_in_sh(serve_words, {"LLMPIPE_PRESET": "gutenberg", "LLMPIPE_MIRROR_DIR": "/srv/m",
                                       "LLMPIPE_DASK_ADDRESS": dask})
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.pool, args.workdir, args.preset, args.mirror) == (
        "serve", pool, "/work", "gutenberg", "/mirror")
    assert args.overrides == ["orchestration.task_runner=dask", f"orchestration.dask_address={dask}"]
    assert resolve("tiny", None, args.overrides, None, []).orchestration.dask_address == dask
    host, port = urlsplit(dask).hostname, urlsplit(dask).port
    scheduler = _command(services["dask-scheduler"])
    assert host == "dask-scheduler" and int(_flag(scheduler, "--port")) == port
    assert _command(services["dask-worker"])[:3] == ["dask", "worker", dask]
    mounts = {target: source for source, target in map(_mount, services["deploy"]["volumes"])}
    default = re.fullmatch(r"\$\{LLMPIPE_SCHEDULES_FILE:-([^}]*)\}", mounts[args.schedules]).group(1)
    assert load_schedule_file(DOCKER / default).schedules == {}  # the default schedule file is valid
    assert services["worker"]["working_dir"] == args.workdir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dask_services_commands_run_outside_docker(compose, tmp_path):
    """The compose file's scheduler and worker commands (host and port made local) form a cluster
    that the data stages use through orchestration.dask_address."""
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
