"""`llmpipe serve` and prefect.yaml: deployments, cron schedules and event triggers on a real Prefect server.

A session fixture starts `prefect server start` on 127.0.0.1 (a free port, a temporary PREFECT_HOME,
analytics off) through flows.server and stops it at the end. Against it:
- `llmpipe serve --register-only` creates the 9 deployments with the schedule file's and --cron's
  schedules and the default trigger automations; registering again without them clears them;
- `llmpipe serve` (a subprocess) runs the download deployment when a llmpipe.source.changed
  event is emitted, on a fixture workdir whose data/sources.yaml points at small files;
- `prefect deploy --all` with the repository's prefect.yaml creates the same deployments in the
  "llmpipe" process work pool, and `prefect worker start --pool llmpipe --run-once` runs one.
The schedule-file parsing tests need no server.

    python -m pytest -q tests/test_serve.py
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.serve import (DEFAULT_TRIGGERS, DEPLOYMENTS, ServeSpec, TriggerSpec, build_deployments,
                         deployment_parameters, load_schedule_file, parse_cron_flags)

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]


# --- schedule files and flags (no server) -------------------------------------------------------------------------

def test_schedule_file_parses_crons_timezone_and_triggers(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("timezone: Europe/Berlin\n"
                 "schedules:\n  pipeline: '0 2 * * 0'\n  download: ['0 1 * * *', '@weekly']\n"
                 "triggers:\n  pipeline: []\n  download: [llmpipe.source.changed]\n"
                 "  spam:\n    - event: my.data.arrived\n      resource: my.bucket\n"
                 "      parameters: {overrides: ['spam.epochs={{ event.payload.epochs }}']}\n")
    spec = load_schedule_file(f)
    assert spec.timezone == "Europe/Berlin"
    assert spec.schedules == {"pipeline": ["0 2 * * 0"], "download": ["0 1 * * *", "@weekly"]}
    assert spec.triggers == {
        "evaluate": [TriggerSpec("llmpipe.checkpoint.saved", "llmpipe.stage.pretrain")],  # default kept
        "pipeline": [],
        "download": [TriggerSpec("llmpipe.source.changed", "llmpipe.stage.download")],
        "spam": [TriggerSpec("my.data.arrived", "my.bucket", {"overrides": ["spam.epochs={{ event.payload.epochs }}"]})],
    }
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_schedule_file(empty) == ServeSpec()
    assert ServeSpec().triggers == DEFAULT_TRIGGERS and ServeSpec().schedules == {}


@pytest.mark.parametrize("text, message", [
    ("schedules:\n  pretrian: '0 3 * * *'\n",
     "{f}: schedules: unknown deployment 'pretrian'; expected one of pipeline, download, clean, shard, pretrain, "
     "evaluate, spam, instruct, dpo, judge"),
    ("schedules:\n  pretrain: '61 3 * * *'\n", '{f}: schedules.pretrain: Invalid cron string: "61 3 * * *"'),
    ("schedules:\n  pretrain: 3\n", "{f}: schedules.pretrain: expected a cron expression such as \"0 3 * * *\", got 3"),
    ("timezone: Mars/Olympus\n", '{f}: timezone: Invalid timezone: "Mars/Olympus" (specify in IANA tzdata format, '
                                 'for example, America/New_York)'),
    ("schedule:\n  pretrain: '0 3 * * *'\n", "{f}: unknown key(s) ['schedule']; expected schedules, timezone, triggers"),
    ("- 1\n", "{f}: expected a mapping with 'schedules', 'timezone' and/or 'triggers', got list"),
    ("schedules: [\n", "{f}:2: invalid YAML (expected the node content, but found '<stream end>')"),
    ("triggers:\n  evaluate: [{event: x, when: y}]\n",
     "{f}: triggers.evaluate[0]: unknown field(s) ['when']; expected event, resource, parameters"),
    ("triggers:\n  evaluate: [{event: x, parameters: {stagez: [a]}}]\n",
     "{f}: triggers.evaluate[0]: field 'parameters': unknown parameter(s) ['stagez']; expected some of command, "
     "config_file, corpus, force, mirror, name, overrides, parent_run_id, preset, progress, stages, workdir"),
])
def test_schedule_file_errors_name_the_file_and_key(tmp_path, text, message):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        load_schedule_file(f)
    assert str(e.value) == message.format(f=f)


def test_missing_schedule_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml: schedule file not found"):
        load_schedule_file(tmp_path / "nope.yaml")


def test_cron_flags():
    assert parse_cron_flags(['pretrain=0 3 * * *', 'pretrain="30 4 * * 1"', "pipeline=@daily"]) == {
        "pretrain": ["0 3 * * *", "30 4 * * 1"], "pipeline": ["@daily"]}
    with pytest.raises(ValueError, match=r"--cron 'pretrain': expected NAME=\"CRON\""):
        parse_cron_flags(["pretrain"])
    with pytest.raises(ValueError, match=r"--cron 'x=0 3 \* \* \*': unknown deployment 'x'"):
        parse_cron_flags(["x=0 3 * * *"])


def test_build_deployments_parameters_schedules_triggers(tmp_path):
    spec = ServeSpec(schedules={"pretrain": ["0 3 * * *"]}, timezone="UTC")
    deps = build_deployments(spec, preset="tiny", overrides=["pretrain.epochs=1"], mirror=str(tmp_path),
                             workdir=tmp_path / "wd")
    assert [d.name for d in deps] == list(DEPLOYMENTS)
    by = {d.name: d for d in deps}
    assert by["pretrain"].parameters == {
        "stages": ["pretrain"], "preset": "tiny", "config_file": None, "overrides": ["pretrain.epochs=1"],
        "mirror": str(tmp_path.resolve()), "corpus": [], "workdir": str((tmp_path / "wd").resolve()), "progress": False}
    assert by["pipeline"].parameters["stages"] == ["all"]
    assert [(s.schedule.cron, s.schedule.timezone) for s in by["pretrain"].schedules] == [("0 3 * * *", "UTC")]
    assert all(not by[n].schedules for n in DEPLOYMENTS if n != "pretrain")
    assert by["pretrain"].entrypoint == "flows.pipeline.pipeline"
    trig = {n: [(sorted(t.expect), t.match.model_dump()) for t in by[n].triggers] for n in DEPLOYMENTS if by[n].triggers}
    assert trig == {"pipeline": [(["llmpipe.source.changed"], {"prefect.resource.id": "llmpipe.stage.download"})],
                    "evaluate": [(["llmpipe.checkpoint.saved"], {"prefect.resource.id": "llmpipe.stage.pretrain"})]}
    assert all(not d.triggers for d in build_deployments(spec, workdir=tmp_path, triggers=False))


# --- prefect.yaml (no server) -------------------------------------------------------------------------------------

def test_prefect_yaml_declares_the_same_deployments():
    data = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in data["deployments"]}
    assert list(deps) == list(DEPLOYMENTS)
    for name, d in deps.items():
        path, func = d["entrypoint"].split(":")
        assert (REPO / path).is_file() and func == "pipeline"
        assert d["work_pool"]["name"] == "llmpipe"
        assert d["parameters"] == deployment_parameters(name, workdir=REPO) | {"workdir": "."}
        assert "schedules" not in d  # none by default (and a redeploy keeps schedules set in the UI)
        triggers = [TriggerSpec(t["expect"][0], t["match"]["prefect.resource.id"]) for t in d.get("triggers", [])]
        assert triggers == DEFAULT_TRIGGERS.get(name, [])
        assert all(t["type"] == "event" and len(t["expect"]) == 1 for t in d.get("triggers", []))


# --- against a real Prefect server ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free port with its own PREFECT_HOME; yields the API URL."""
    from flows.server import free_port, start_service, stop_service

    home = tmp_path_factory.mktemp("prefect-server")
    info = start_service("prefect", home, free_port(), timeout=300, echo=lambda s: None)
    CLIENT_HOME.append(str(home / "client-home"))  # PREFECT_HOME of the client subprocesses
    try:
        yield info["api_url"]
    finally:
        stop_service("prefect", home, echo=lambda s: None)


@pytest.fixture
def api(prefect_server):
    """Point this process's Prefect client at the test server (for this test only)."""
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Prefect's events worker is one per process and keeps the server it first connected to (the session
    # harness, when an earlier test used it): stop it so events of this test go to this test's server
    EventsWorker.drain_all()
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server
        EventsWorker.drain_all()


CLIENT_HOME: list[str] = []


def _env(api_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_URI")}
    env.update(PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=CLIENT_HOME[-1])
    return env


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


FIXTURE_FILES = {  # the source names the tiny preset reads: name -> (file, kind, content)
    "the_verdict": ("verdict.txt", "text", "I had always thought Jack Gisburn rather a cheap genius. " * 20),
    "sms_spam": ("sms.tsv", "sms_spam", "ham\tSee you at the station at six\nspam\tWIN a free prize, txt NOW\n"),
    "instruction_data": ("instr.json", "instructions",
                         json.dumps([{"instruction": "Repeat the word fox.", "input": "", "output": "fox."}])),
    "instruction_preference": ("pref.json", "preferences",
                               json.dumps([{"instruction": "Repeat the word fox.", "input": "", "output": "fox.",
                                            "chosen": "fox.", "rejected": "fox, obviously."}])),
}


def write_workdir(root: Path) -> tuple[Path, Path]:
    """A workdir whose data/sources.yaml pins three small files kept in a mirror folder."""
    mirror = root / "mirror"
    mirror.mkdir(parents=True)
    entries = []
    for name, (f, kind, text) in FIXTURE_FILES.items():
        (mirror / f).write_text(text)
        entries.append({"name": name, "url": f"https://example.invalid/llmpipe/{f}", "file": f, "sha256": _sha(text),
                        "kind": kind})
    wd = root / "work"
    (wd / "data").mkdir(parents=True)
    (wd / "data" / "sources.yaml").write_text(yaml.safe_dump({"sources": entries}))
    return wd, mirror


def _deployments(client) -> dict:
    return {d.name: d for d in client.read_deployments() if d.name in DEPLOYMENTS}


def _automations_by_deployment(client) -> dict:
    out: dict = {}
    for a in client.read_automations():
        for action in a.actions:
            if getattr(action, "deployment_id", None):
                out.setdefault(action.deployment_id, []).append(a)
    return out


@pytest.mark.server
def test_serve_registers_deployments_with_schedules_and_triggers(api, tmp_path):
    from prefect import get_client

    wd, mirror = write_workdir(tmp_path)
    sched = tmp_path / "schedules.yaml"
    sched.write_text("timezone: Europe/Berlin\nschedules:\n  pipeline: '0 2 * * 0'\n  download: ['0 1 * * *', '@weekly']\n")
    r = subprocess.run([*CLI, "serve", "--register-only", "--schedules", str(sched), "--cron", "pretrain=0 3 * * *",
                        "--mirror", str(mirror), "--set", "pretrain.epochs=1", "--workdir", str(wd)],
                       capture_output=True, text=True, timeout=300, env=_env(api))
    assert r.returncode == 0, r.stderr
    assert f"registered 10 deployments at {api}" in r.stdout
    assert "llmpipe/pretrain  schedules: 0 3 * * *" in r.stdout

    with get_client(sync_client=True) as client:
        deps = _deployments(client)
        assert sorted(deps) == sorted(DEPLOYMENTS)
        crons = {n: sorted((s.schedule.cron, s.schedule.timezone) for s in d.schedules) for n, d in deps.items()}
        assert crons == {"pipeline": [("0 2 * * 0", "Europe/Berlin")],
                         "download": [("0 1 * * *", "Europe/Berlin"), ("@weekly", "Europe/Berlin")],
                         "pretrain": [("0 3 * * *", "Europe/Berlin")],
                         "clean": [], "shard": [], "evaluate": [], "spam": [], "instruct": [], "dpo": [], "judge": []}
        assert deps["pretrain"].parameters == {
            "stages": ["pretrain"], "preset": "tiny", "config_file": None, "overrides": ["pretrain.epochs=1"],
            "mirror": str(mirror), "corpus": [], "workdir": str(wd), "progress": False}
        assert deps["pretrain"].entrypoint == "flows.pipeline.pipeline"
        autos = _automations_by_deployment(client)
        got = {n: [(sorted(a.trigger.expect), a.trigger.match.model_dump(), a.name) for a in autos.get(d.id, [])]
               for n, d in deps.items()}
        assert got == {
            "pipeline": [(["llmpipe.source.changed"], {"prefect.resource.id": "llmpipe.stage.download"},
                          "llmpipe/pipeline on llmpipe.source.changed")],
            "evaluate": [(["llmpipe.checkpoint.saved"], {"prefect.resource.id": "llmpipe.stage.pretrain"},
                          "llmpipe/evaluate on llmpipe.checkpoint.saved")],
            **{n: [] for n in DEPLOYMENTS if n not in ("pipeline", "evaluate")}}

    # the schedule file is the source of truth: registering without schedules removes them
    r = subprocess.run([*CLI, "serve", "--register-only", "--no-triggers", "--workdir", str(wd)],
                       capture_output=True, text=True, timeout=300, env=_env(api))
    assert r.returncode == 0, r.stderr
    with get_client(sync_client=True) as client:
        deps = _deployments(client)
        assert all(not d.schedules for d in deps.values())
        autos = _automations_by_deployment(client)
        assert all(not autos.get(d.id) for d in deps.values())


def _wait_for(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # `serve` shuts down gracefully on SIGTERM (pauses schedules)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.server
@pytest.mark.slow
def test_source_changed_event_runs_the_triggered_deployment(api, tmp_path):
    """emit llmpipe.source.changed -> the automation creates a run of llmpipe/download -> `serve` runs it."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    wd, mirror = write_workdir(tmp_path)
    sched = tmp_path / "schedules.yaml"
    sched.write_text("triggers:\n  pipeline: []\n  download: [llmpipe.source.changed]\n")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, "serve", "--schedules", str(sched), "--mirror", str(mirror), "--workdir", str(wd)],
                                stdout=out, stderr=subprocess.STDOUT, env=_env(api), start_new_session=True)
    try:
        _wait_for(lambda: "polling for scheduled runs" in log.read_text() or proc.poll() is not None, 240,
                  "llmpipe serve to start")
        assert proc.poll() is None, log.read_text()
        with get_client(sync_client=True) as client:
            download = client.read_deployment_by_name("llmpipe/download")
            assert not download.paused  # being served
            autos = _automations_by_deployment(client)
            assert [sorted(a.trigger.expect) for a in autos[download.id]] == [["llmpipe.source.changed"]]

            def runs():
                return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[download.id])))

            assert runs() == []
            emit_event(event="llmpipe.source.changed", resource={"prefect.resource.id": "llmpipe.stage.download"},
                       payload={"cache_key": "test"})
            EventsWorker.drain_all()
            run = _wait_for(lambda: (runs() or [None])[0], 120, "the automation to create a flow run")
            assert run.created_by is not None and run.created_by.type == "AUTOMATION"
            final = _wait_for(lambda: (lambda r: r if r.state and r.state.is_final() else None)(
                client.read_flow_run(run.id)), 300, "the triggered flow run to finish", every=2.0)
            assert final.state.is_completed(), f"{final.state}\n{log.read_text()[-3000:]}"
            assert final.parameters["stages"] == ["download"] and final.parameters["workdir"] == str(wd)
            assert len(runs()) == 1
        for name, (f, kind, text) in FIXTURE_FILES.items():
            assert (wd / "data" / "raw" / f).read_text() == text
        # the run was tracked like `llmpipe run download`: an MLflow child run tagged with the flow run id
        from mlflow.tracking import MlflowClient

        from flows.tracking import default_tracking_uri

        ml = MlflowClient(tracking_uri=default_tracking_uri(wd))
        exp = ml.get_experiment_by_name("llmpipe")
        stage_runs = ml.search_runs([exp.experiment_id], "tags.stage = 'download'")
        assert [r.data.tags["prefect.flow_run_id"] for r in stage_runs] == [str(run.id)]
        assert stage_runs[0].data.tags["cached"] == "false"
    finally:
        _stop(proc)
    # SIGTERM is a graceful shutdown (exit status 0, not the SIGKILL fallback) that pauses what it served
    assert proc.returncode == 0, log.read_text()[-3000:]
    with get_client(sync_client=True) as client:
        assert {n: d.paused for n, d in _deployments(client).items()} == {n: True for n in DEPLOYMENTS}


@pytest.mark.server
def test_prefect_yaml_deploy_and_worker_route(api, tmp_path):
    """`prefect deploy --all` (repository prefect.yaml) -> work pool deployments; a process worker runs one."""
    from prefect import get_client

    env = _env(api)
    # `llmpipe serve --pool` creates the process work pool when missing and registers into it
    r = subprocess.run([*CLI, "serve", "--pool", "llmpipe", "--workdir", str(tmp_path)], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "created process work pool 'llmpipe'" in r.stdout
    assert "registered 10 deployments at " in r.stdout and "start a worker: prefect worker start --pool llmpipe" in r.stdout
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("llmpipe").type == "process"
        assert {d.work_pool_name for d in _deployments(client).values()} == {"llmpipe"}
    r = subprocess.run(["prefect", "--no-prompt", "deploy", "--all"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with get_client(sync_client=True) as client:
        deps = _deployments(client)
        assert sorted(deps) == sorted(DEPLOYMENTS)
        for name, d in deps.items():
            assert d.work_pool_name == "llmpipe" and d.entrypoint == "flows/pipeline.py:pipeline"
            assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
            assert d.parameters["stages"] == (["all"] if name == "pipeline" else [name])
        autos = _automations_by_deployment(client)
        assert [sorted(a.trigger.expect) for a in autos[deps["evaluate"].id]] == [["llmpipe.checkpoint.saved"]]
        assert [sorted(a.trigger.expect) for a in autos[deps["pipeline"].id]] == [["llmpipe.source.changed"]]

    # the worker route: a run of llmpipe/download (into a temporary workdir), picked up by a process worker
    wd, mirror = write_workdir(tmp_path)
    from prefect.deployments import run_deployment

    run = run_deployment("llmpipe/download", parameters={"workdir": str(wd), "mirror": str(mirror)}, timeout=0)
    r = subprocess.run(["prefect", "worker", "start", "--pool", "llmpipe", "--run-once"], capture_output=True,
                       text=True, timeout=400, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with get_client(sync_client=True) as client:
        final = client.read_flow_run(run.id)
    assert final.state.is_completed(), f"{final.state}\n{r.stdout[-3000:]}"
    for name, (f, kind, text) in FIXTURE_FILES.items():
        assert (wd / "data" / "raw" / f).read_text() == text


# --- CLI errors (no server) ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, env_url, rc, message", [
    ([], None, 2, "llmpipe: error: serve needs a running Prefect server: run `llmpipe server start --workdir {wd}` "
                  "or set PREFECT_API_URL"),
    (["--cron", "pretrain=0 3 * *"], None, 1, "llmpipe: error: --cron 'pretrain=0 3 * *': Invalid cron string: "
                                              "\"0 3 * *\""),
    (["--limit", "0"], None, 1, "llmpipe: error: --limit: expected a positive number of concurrent flow runs, got 0"),
    (["--register-only"], "http://127.0.0.1:9/api", 1,
     "llmpipe: error: PREFECT_API_URL=http://127.0.0.1:9/api: no Prefect server answers GET "
     "http://127.0.0.1:9/api/health"),
])
def test_serve_cli_errors(tmp_path, args, env_url, rc, message):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if env_url:
        env["PREFECT_API_URL"] = env_url
    r = subprocess.run([*CLI, "serve", "--workdir", str(tmp_path), *args], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == rc
    assert r.stderr.strip().splitlines()[-1] == message.format(wd=tmp_path)


def test_prefect_yaml_is_generated_from_serve():
    """One source of truth: the committed prefect.yaml is exactly what `llmpipe serve --write-prefect-yaml` writes."""
    from flows.serve import prefect_yaml_text

    assert (REPO / "prefect.yaml").read_text() == prefect_yaml_text()
