"""`llmpipe serve`: Prefect deployments of the pipeline with cron schedules and event triggers.

    llmpipe server start                                   # a Prefect server for this project
    llmpipe serve --preset tiny --mirror ../shared/data \\
        [--schedules schedules.yaml] [--cron pretrain="0 3 * * *" ...] [--timezone Europe/Berlin] \\
        [--no-triggers] [--limit 1] [--register-only | --pool llmpipe]

Deployments (flow "llmpipe" = flows.pipeline.pipeline):
  llmpipe/pipeline         the whole chain (stages=["all"])
  llmpipe/<stage>          one per stage (stages=[stage]): download, clean, shard, pretrain,
                           evaluate, spam, instruct, dpo, judge; a stage's run reuses the cached
                           artifacts of the stages it needs, exactly like `llmpipe run <stage>`.
Every deployment carries the same parameters: preset, config_file, overrides (--set), mirror,
corpus, workdir (absolute) and progress=false; change them per run in the UI or with
`prefect deployment run llmpipe/pretrain --param preset=verdict`.

Schedules: none by default. A schedule file (YAML) maps deployment names to cron expressions,
and may replace the default event triggers:

    timezone: UTC                    # optional, for every cron below (IANA name)
    schedules:
      pipeline: "0 2 * * 0"          # Sundays 02:00
      download: ["0 1 * * *"]        # a list: several schedules
    triggers:                        # optional; a deployment listed here gets exactly these
      evaluate: [llmpipe.checkpoint.saved]
      pipeline:
        - event: llmpipe.source.changed
          resource: llmpipe.stage.download     # optional (default: the event's usual resource)
          parameters: {force: [download]}      # optional; strings may use {{ event.payload.x }}
      download: []                   # no trigger

`--cron NAME=EXPR` (repeatable) adds or replaces NAME's schedule from the file.

Default event triggers (Prefect automations owned by the deployments):
  llmpipe.checkpoint.saved (resource llmpipe.stage.pretrain)  -> llmpipe/evaluate
  llmpipe.source.changed   (resource llmpipe.stage.download)  -> llmpipe/pipeline

How runs execute:
- `llmpipe serve` (default): this process registers the deployments and runs their flow runs
  itself (Prefect's `serve`), at most --limit at a time (default 1: runs of the same workdir
  share artifact folders, so one at a time also makes an evaluate run triggered during
  pretraining wait for pretraining to finish and then reuse its checkpoint). Ctrl-C stops
  serving and pauses the schedules; the next `llmpipe serve` resumes them.
- `llmpipe serve --pool llmpipe`: the deployments go to a process work pool (created if missing)
  and this command exits; workers run them: `prefect worker start --pool llmpipe` on any machine
  with llmpipe installed and the same PREFECT_API_URL (and MLFLOW_TRACKING_URI). Limit the pool
  to one run at a time: `prefect work-pool set-concurrency-limit llmpipe 1`.
  `prefect deploy --all` with the repository's prefect.yaml registers the same deployments
  (generated from this module: `llmpipe serve --write-prefect-yaml`).

Needs a Prefect server: the one `llmpipe server start` runs for --workdir, or PREFECT_API_URL.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from flows.errors import UsageError
from flows.server import healthy, prefect_api_url
from llm.config import STAGES, yaml_error_message
from llm.fsutil import atomic_write_text
# prefect and flows.pipeline are imported inside the functions that use them (deliberately lazy):
# `llmpipe serve --help` and `--write-prefect-yaml` should not pay Prefect's multi-second import.

# prefect, flows.pipeline and flows.stages are imported inside the functions that use them, deliberately:
# `llmpipe --help` imports this module and must stay fast (prefect alone takes about a second).

FLOW_NAME = "llmpipe"
DEPLOYMENTS = ("pipeline",) + tuple(STAGES)
EVENT_RESOURCES = {
    "llmpipe.checkpoint.saved": "llmpipe.stage.pretrain",
    "llmpipe.source.changed": "llmpipe.stage.download",
    "llmpipe.stage.completed": "llmpipe.stage.*",
}


@dataclass(frozen=True)
class TriggerSpec:
    """Run a deployment when `event` arrives from a resource matching `resource` (trailing * ok)."""

    event: str
    resource: str = "llmpipe.*"
    parameters: Optional[dict] = None  # None: the deployment's own defaults; strings may be Jinja templates


DEFAULT_TRIGGERS: dict[str, list[TriggerSpec]] = {
    "evaluate": [TriggerSpec("llmpipe.checkpoint.saved", "llmpipe.stage.pretrain")],
    "pipeline": [TriggerSpec("llmpipe.source.changed", "llmpipe.stage.download")],
}


@dataclass
class ServeSpec:
    """Schedules and triggers per deployment name (short names: pipeline, download, ...)."""

    schedules: dict[str, list[str]] = field(default_factory=dict)
    timezone: Optional[str] = None
    triggers: dict[str, list[TriggerSpec]] = field(default_factory=lambda: dict(DEFAULT_TRIGGERS))


# --- schedule file and flags ------------------------------------------------------------------------------------

def _check_deployment(name: Any, where: str) -> str:
    if name not in DEPLOYMENTS:
        raise ValueError(f"{where}: unknown deployment {name!r}; expected one of {', '.join(DEPLOYMENTS)}")
    return name


def check_cron(expr: Any, where: str, timezone: Optional[str] = None) -> str:
    """A valid cron expression (5 fields or @daily-style), else ValueError naming `where`."""
    from prefect.client.schemas.schedules import CronSchedule

    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"{where}: expected a cron expression such as \"0 3 * * *\", got {expr!r}")
    try:
        CronSchedule(cron=expr.strip(), timezone=timezone)
    except Exception as e:  # pydantic ValidationError: keep its one useful line
        msg = next((ln.strip() for ln in str(e).splitlines() if "Invalid" in ln), str(e).splitlines()[0])
        msg = msg.split(" [type=")[0].replace("Value error, ", "")
        raise ValueError(f"{where}: {msg}") from None
    return expr.strip()


def _trigger_from(item: Any, where: str) -> TriggerSpec:
    if isinstance(item, str) and item.strip():
        return TriggerSpec(item.strip(), EVENT_RESOURCES.get(item.strip(), "llmpipe.*"))
    if isinstance(item, dict) and isinstance(item.get("event"), str) and item["event"].strip():
        unknown = set(item) - {"event", "resource", "parameters"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; expected event, resource, parameters")
        resource = item.get("resource", EVENT_RESOURCES.get(item["event"], "llmpipe.*"))
        if not isinstance(resource, str) or not resource.strip():
            raise ValueError(f"{where}: field 'resource': expected a resource id such as llmpipe.stage.pretrain, "
                             f"got {resource!r}")
        params = item.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"{where}: field 'parameters': expected a mapping of flow parameters, got {params!r}")
        if params:
            from flows.pipeline import pipeline

            allowed = set(pipeline.parameters.properties)
            bad = sorted(set(params) - allowed)
            if bad:
                raise ValueError(f"{where}: field 'parameters': unknown parameter(s) {bad}; expected some of "
                                 f"{', '.join(sorted(allowed))}")
        return TriggerSpec(item["event"].strip(), resource.strip(), params)
    raise ValueError(f"{where}: expected an event name or a mapping with 'event' (and optional resource, "
                     f"parameters), got {item!r}")


def load_schedule_file(path: str | Path) -> ServeSpec:
    """Parse a schedule file (see the module docstring); errors name the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: schedule file not found") from None
    except yaml.YAMLError as e:
        raise ValueError(yaml_error_message(path, e)) from None
    spec = ServeSpec()
    if data is None:
        return spec
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with 'schedules', 'timezone' and/or 'triggers', got "
                         f"{type(data).__name__}")
    unknown = set(data) - {"schedules", "timezone", "triggers"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; expected schedules, timezone, triggers")
    tz = data.get("timezone")
    if tz is not None:
        if not isinstance(tz, str):
            raise ValueError(f"{path}: timezone: expected an IANA name such as Europe/Berlin, got {tz!r}")
        check_cron("0 0 * * *", f"{path}: timezone", tz)
        spec.timezone = tz
    schedules = data.get("schedules") or {}
    if not isinstance(schedules, dict):
        raise ValueError(f"{path}: schedules: expected a mapping of deployment name to cron, got {schedules!r}")
    for name, value in schedules.items():
        where = f"{path}: schedules.{name}"
        _check_deployment(name, f"{path}: schedules")
        values = value if isinstance(value, list) else [value]
        spec.schedules[name] = [check_cron(v, where, spec.timezone) for v in values]
    triggers = data.get("triggers")
    if triggers is not None:
        if not isinstance(triggers, dict):
            raise ValueError(f"{path}: triggers: expected a mapping of deployment name to a list of events, "
                             f"got {triggers!r}")
        for name, items in triggers.items():
            _check_deployment(name, f"{path}: triggers")
            items = [] if items is None else items
            if not isinstance(items, list):
                items = [items]
            spec.triggers[name] = [_trigger_from(it, f"{path}: triggers.{name}[{i}]") for i, it in enumerate(items)]
    return spec


def parse_cron_flags(items: list[str], timezone: Optional[str] = None) -> dict[str, list[str]]:
    """`--cron NAME=EXPR` values as {deployment: [cron, ...]} (repeating a NAME adds schedules)."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, expr = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"--cron {item!r}: expected NAME=\"CRON\", e.g. pretrain=\"0 3 * * *\"")
        _check_deployment(name, f"--cron {item!r}")
        out.setdefault(name, []).append(check_cron(expr.strip().strip("'\""), f"--cron {item!r}", timezone))
    return out


# --- deployments ----------------------------------------------------------------------------------------------

def _abs_local(value: Optional[str]) -> Optional[str]:
    """A local path made absolute (served runs may start elsewhere); URLs unchanged."""
    if not value or "://" in value:
        return value
    return str(Path(value).expanduser().resolve())


def deployment_parameters(name: str, preset: str = "tiny", config_file: Optional[str] = None,
                          overrides: Optional[list[str]] = None, mirror: Optional[str] = None,
                          corpus: Optional[list[str]] = None, workdir: str | Path = ".") -> dict[str, Any]:
    """The default parameters of deployment `name` (pipeline or a stage)."""
    return {"stages": ["all"] if name == "pipeline" else [name], "preset": preset,
            "config_file": _abs_local(config_file), "overrides": list(overrides or []),
            "mirror": _abs_local(mirror), "corpus": [_abs_local(c) if not any(ch in c for ch in "*?[") else
                                                     str(Path(c).expanduser().absolute()) for c in corpus or []],
            "workdir": str(Path(workdir).resolve()), "progress": False}


def _prefect_trigger(deployment: str, t: TriggerSpec):
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"{FLOW_NAME}/{deployment} on {t.event}",
        description=f"Run {FLOW_NAME}/{deployment} when {t.event} arrives from {t.resource}",
        expect={t.event}, match={"prefect.resource.id": t.resource}, parameters=t.parameters)


def build_deployments(spec: ServeSpec, preset: str = "tiny", config_file: Optional[str] = None,
                      overrides: Optional[list[str]] = None, mirror: Optional[str] = None,
                      corpus: Optional[list[str]] = None, workdir: str | Path = ".", triggers: bool = True,
                      work_pool: Optional[str] = None, paused: Optional[bool] = False) -> list:
    """One RunnerDeployment per name in DEPLOYMENTS, with the spec's schedules and triggers."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from flows.pipeline import pipeline

    out = []
    for name in DEPLOYMENTS:
        desc = ("The whole llmpipe chain" if name == "pipeline" else
                f"The {name} stage (reusing the cached artifacts of the stages it needs)")
        out.append(pipeline.to_deployment(
            name=name,
            schedules=[Cron(c, timezone=spec.timezone) for c in spec.schedules.get(name, [])],
            parameters=deployment_parameters(name, preset, config_file, overrides, mirror, corpus, workdir),
            triggers=[_prefect_trigger(name, t) for t in spec.triggers.get(name, [])] if triggers else [],
            description=desc, tags=["llmpipe", name], paused=paused, work_pool_name=work_pool,
            entrypoint_type=EntrypointType.MODULE_PATH))
    return out


def sync_schedules(deployments: list) -> None:
    """Make each registered deployment's schedules exactly the given ones (a cron removed from the
    schedule file disappears from the server too; Prefect's apply keeps old ones on an empty list)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for d in deployments:
            if d.schedules:
                continue
            current = client.read_deployment_by_name(f"{FLOW_NAME}/{d.name}")
            for s in current.schedules:
                client.delete_deployment_schedule(current.id, s.id)


def ensure_work_pool(name: str) -> bool:
    """Create the process work pool `name` unless it exists; True if it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True


def register_deployments(deployments: list) -> dict[str, str]:
    """Create or update the deployments (and their trigger automations) on the server: {name: id}."""
    for pool in sorted({d.work_pool_name for d in deployments if d.work_pool_name}):
        if ensure_work_pool(pool):
            print(f"created process work pool {pool!r}", flush=True)
    ids = {d.name: str(d.apply()) for d in deployments}
    sync_schedules(deployments)
    return ids


_KEEP: list = []


def use_server(workdir: str | Path) -> Optional[str]:
    """PREFECT_API_URL, or this workdir's `llmpipe server` (then exported for this process), or None."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    url = prefect_api_url(workdir)
    if url is None:
        return None
    os.environ["PREFECT_API_URL"] = url  # read when prefect is first imported
    if "prefect" in sys.modules:  # already imported (in-process callers): switch its settings too, for good
        from prefect.settings import PREFECT_API_URL, temporary_settings

        _KEEP.append(temporary_settings({PREFECT_API_URL: url}))
        _KEEP[-1].__enter__()
    return url


PREFECT_YAML_HEADER = '# Prefect deployments of llmpipe for `prefect deploy --all` (the same ones `llmpipe serve` registers).\n# Generated by `llmpipe serve --write-prefect-yaml` from flows/serve.py: edit that, not this file.\n#\n# From the repository root, with PREFECT_API_URL pointing at a Prefect server:\n#   prefect work-pool create llmpipe --type process\n#   prefect work-pool set-concurrency-limit llmpipe 1   # runs of one workdir share artifact folders\n#   prefect --no-prompt deploy --all\n#   prefect worker start --pool llmpipe                 # runs the flow runs (anywhere llmpipe is installed)\n#   prefect deployment run llmpipe/pretrain --param preset=verdict\n#\n# Runs start in this folder (the pull step) and use it as their workdir (data/, mlruns/), like\n# `llmpipe run` started here. Schedules: none by default; add e.g.\n#     schedules:\n#       - cron: "0 3 * * *"\n#         timezone: UTC\n# to a deployment, or use `llmpipe serve --schedules FILE --cron NAME=CRON`.\n# Triggers: llmpipe.checkpoint.saved -> llmpipe/evaluate, llmpipe.source.changed -> llmpipe/pipeline.\n'


def prefect_yaml_text() -> str:
    """prefect.yaml for `prefect deploy --all`, from the same deployment list and triggers as `llmpipe serve`."""
    defaults = {k: v for k, v in deployment_parameters("pipeline").items() if k != "stages"}
    defaults["workdir"] = "."  # the folder `prefect deploy` runs in (the pull step)
    lines = [PREFECT_YAML_HEADER.rstrip("\n"), "name: llmpipe", "",
             "build: null", "push: null", "pull:", "  - prefect.deployments.steps.set_working_directory:",
             '      directory: "{{ $PWD }}"', "", "definitions:", "  work_pools:", "    llmpipe: &llmpipe_pool",
             "      name: llmpipe", "      work_queue_name: default", "  parameters: &defaults"]
    for k, v in defaults.items():
        lines.append(f"    {k}: {yaml.safe_dump(v, default_flow_style=True).strip().removesuffix(chr(10) + '...')}")
    lines += ["", "deployments:"]
    for name in DEPLOYMENTS:
        what = "The whole llmpipe chain" if name == "pipeline" else \
            f"The {name} stage (reusing the cached artifacts of the stages it needs)"
        stages = "all" if name == "pipeline" else name
        lines += [f"  - name: {name}", f"    description: {what}", "    entrypoint: flows/pipeline.py:pipeline",
                  f"    tags: [llmpipe, {name}]", "    parameters:", "      <<: *defaults", f"      stages: [{stages}]",
                  "    work_pool: *llmpipe_pool"]
        if DEFAULT_TRIGGERS.get(name):
            lines.append("    triggers:")
            for t in DEFAULT_TRIGGERS[name]:
                lines += ["      - type: event", "        enabled: true", f"        name: llmpipe/{name} on {t.event}",
                          f"        expect: [{t.event}]", "        match:", f"          prefect.resource.id: {t.resource}"]
    return "\n".join(lines) + "\n"


def cmd_serve(args) -> int:
    if args.write_prefect_yaml:
        atomic_write_text(Path(args.write_prefect_yaml), prefect_yaml_text())
        print(f"wrote {args.write_prefect_yaml}")
        return 0
    url = use_server(args.workdir)  # before anything imports prefect
    if args.limit < 1:
        raise ValueError(f"--limit: expected a positive number of concurrent flow runs, got {args.limit}")
    spec = load_schedule_file(args.schedules) if args.schedules else ServeSpec()
    if args.timezone:
        check_cron("0 0 * * *", "--timezone", args.timezone)
        spec.timezone = args.timezone
    spec.schedules.update(parse_cron_flags(args.cron, spec.timezone))
    if url is None:
        raise UsageError(f"serve needs a running Prefect server: run `llmpipe server start --workdir {args.workdir}` "
                         "or set PREFECT_API_URL")
    if not healthy(f"{url.rstrip('/')}/health", timeout=10.0):
        raise RuntimeError(f"PREFECT_API_URL={url}: no Prefect server answers GET {url.rstrip('/')}/health")
    register_only = args.register_only or bool(args.pool)  # a work pool's workers run them, not this process
    from flows.stages import resolve

    resolve(args.preset, args.config_file, args.overrides, args.mirror, args.corpus)  # fail fast on bad config
    deployments = build_deployments(spec, args.preset, args.config_file, args.overrides, args.mirror, args.corpus,
                                    args.workdir, triggers=not args.no_triggers, work_pool=args.pool,
                                    paused=None if register_only else False)
    register_deployments(deployments)
    for d in deployments:
        crons = ", ".join(spec.schedules.get(d.name, [])) or "-"
        trig = ", ".join(t.event for t in spec.triggers.get(d.name, [])) if not args.no_triggers else ""
        print(f"{FLOW_NAME}/{d.name:9s} schedules: {crons}" + (f"  triggers: {trig}" if trig else ""))
    print(f"registered {len(deployments)} deployments at {url}" + (f" in work pool {args.pool!r}" if args.pool
                                                                      else ""), flush=True)
    if register_only:
        print(f"start a worker: prefect worker start --pool {args.pool}" if args.pool else
              "nothing runs them until `llmpipe serve` (without --register-only) runs", flush=True)
        return 0
    from prefect import serve

    serve(*deployments, limit=args.limit, pause_on_shutdown=True)
    return 0


def register(subparsers) -> None:
    """Add `llmpipe serve` to the CLI."""
    p = subparsers.add_parser("serve", help="register deployments (schedules, event triggers) and run them",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--config", dest="config_file", metavar="FILE.yaml", help="YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key.path=value")
    p.add_argument("--mirror", metavar="DIR_OR_URL")
    p.add_argument("--corpus", nargs="+", default=[], metavar="PATH")
    p.add_argument("--workdir", default=".", help="where data/ and mlruns/ live (default: current folder)")
    p.add_argument("--schedules", metavar="FILE.yaml", help="schedule file: {schedules: {deployment: cron}, "
                   "timezone, triggers}")
    p.add_argument("--cron", action="append", default=[], metavar='NAME="CRON"',
                   help='schedule a deployment, e.g. --cron pretrain="0 3 * * *" (repeatable)')
    p.add_argument("--timezone", help="IANA time zone of the cron schedules (default UTC)")
    p.add_argument("--no-triggers", action="store_true", help="register no event triggers")
    p.add_argument("--limit", type=int, default=1, help="flow runs at a time (default 1)")
    p.add_argument("--pool", metavar="WORK_POOL", help="register into this (process) work pool and exit; "
                   "`prefect worker start --pool NAME` runs them")
    p.add_argument("--register-only", action="store_true", help="register the deployments and exit")
    p.add_argument("--write-prefect-yaml", nargs="?", const="prefect.yaml", metavar="PATH",
                   help="write prefect.yaml (for `prefect deploy --all`) from these deployments and exit")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_serve)


if __name__ == "__main__":
    from flows.cli import main  # lazy: flows.cli imports this module

    sys.exit(main(["serve", *sys.argv[1:]]))
