"""The `llmpipe` command line.

    llmpipe run [STAGE ...] [--preset NAME] [--config FILE.yaml] [--set key.path=value ...]
                [--mirror DIR_OR_URL] [--corpus PATH ...] [--force STAGE ...] [--json] [--debug]
    llmpipe stages [--preset NAME] [--verify] [...]  cache state of every stage (and why stale)
    llmpipe generate --prompt TEXT [--run-id ID | --checkpoint DIR | --init gpt2|DIR] [...]
    llmpipe classify TEXT ... [--file F] [--run-id ID | --checkpoint DIR]
    llmpipe ask INSTRUCTION [--input TEXT] [--run-id ID | --checkpoint DIR]
    llmpipe presets                               list shipped presets
    llmpipe judge score FILE.json --field F       score any responses with the configured judge
    llmpipe judge prepare|check                   install / check the embedded judge model
    llmpipe server start|stop|status              this workdir's Prefect server and MLflow UI
    llmpipe serve [...]                           deployments with schedules and triggers

Bad input (unknown stage or preset, malformed config value, missing or malformed data file)
exits non-zero with one line naming the file/field and what was expected; `--debug` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Optional

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# No telemetry and no first-use banner from Prefect or MLflow (each costs ~0.5 s per command, too);
# set DO_NOT_TRACK=0 / MLFLOW_DISABLE_TELEMETRY=false to allow it.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm frames for model up/downloads

STAGE_CHOICES = ("download", "clean", "shard", "pretrain", "evaluate", "spam", "instruct", "dpo", "judge", "all")


from flows import timing  # noqa: E402
from flows.errors import UsageError  # noqa: E402
from llm.config import ConfigError, list_presets  # noqa: E402  (light: pydantic + yaml only)
from llm.procenv import allowed_cores  # noqa: E402  (light: os only)

# The stage modules, flows.pipeline (prefect), flows.registry (mlflow), torch and the llm/ recipes are
# imported inside the command that needs them (deliberately lazy): `llmpipe --help`, `presets` or
# `stages` must not pay seconds of imports they never use.

PLUGIN_MODULES = ("flows.server", "flows.serve", "flows.judge_cli", "flows.sweep", "flows.ui")


class _DropErrors(logging.Filter):
    """Without --debug, Prefect's failure logs (tracebacks) are replaced by our one-line error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _quiet_prefect_errors() -> None:
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.engine", "prefect.server"):
        logging.getLogger(name).addFilter(_DropErrors())
    root = logging.getLogger()
    for h in root.handlers:
        h.addFilter(_DropErrors())


# --- argument parsing ----------------------------------------------------------------------------------

def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="shipped preset: tiny, verdict, gutenberg, spam, instruct, gpt2")
    p.add_argument("--config", dest="config_file", metavar="FILE.yaml", help="YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key.path=value",
                   help="override one config value (YAML syntax), e.g. --set pretrain.lr=1e-3; repeatable")
    p.add_argument("--mirror", metavar="DIR_OR_URL", help="fetch every source from this folder or base URL")
    p.add_argument("--corpus", nargs="+", default=[], metavar="PATH",
                   help="pretrain on your own text: files, folders or globs (.jsonl: field 'text')")
    p.add_argument("--workdir", default=".", help="where data/ and mlruns/ live (default: current folder)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmpipe", description="Build a GPT-style LLM from scratch as one tracked, "
                                 "cached Prefect + MLflow pipeline.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run pipeline stages (default: all)")
    p.add_argument("stages", nargs="*", default=["all"], metavar="STAGE",
                   help=f"one or more of {', '.join(STAGE_CHOICES)} (default all)")
    _add_config_args(p)
    p.add_argument("--force", nargs="+", default=[], metavar="STAGE", help="re-run these stages even if cached")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (without a terminal they are "
                   "replaced by a log line every LLMPIPE_LOG_EVERY seconds, default 10)")
    p.add_argument("--name", help="name of the MLflow parent run and the Prefect flow run "
                   "(default: '<preset> <overrides> @<commit>')")
    p.add_argument("--task-runner", choices=("threads", "dask"),
                   help="where clean and shard do their parallel work: threads here (default) or a Dask "
                   "cluster (prefect-dask); the artifacts are identical (= --set orchestration.task_runner=...)")
    p.add_argument("--dask-address", metavar="ADDR",
                   help="scheduler of an existing Dask cluster, e.g. tcp://10.0.0.5:8786 (implies --task-runner "
                   "dask; default: a local cluster of worker processes for the run)")

    p = sub.add_parser("stages", help="show each stage's cache key, state and artifact folder")
    p.add_argument("stages", nargs="*", default=["all"], metavar="STAGE")
    _add_config_args(p)
    p.add_argument("--verify", action="store_true",
                   help="re-hash every recorded output file (default: only those whose size or mtime changed)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("presets", help="list the shipped presets")

    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("--prompt", required=True)
    _add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("classify", help="classify SMS messages as ham/spam with the spam stage's model")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--file", help="a text file (one message per line) or CSV/TSV with a 'text' column")
    _add_model_args(p, init=False)
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("ask", help="answer an instruction with the instruct stage's model")
    p.add_argument("instruction")
    p.add_argument("--input", default="")
    _add_model_args(p, init=False)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")

    # Subcommands that live in their own modules: each has register(subparsers) that adds its
    # parser(s) and sets `func` (a callable(args) -> int) with set_defaults.
    import importlib
    import importlib.util

    for mod in PLUGIN_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod).register(sub)
    return ap


def _add_model_args(p: argparse.ArgumentParser, init: bool = True) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--run-id", help="an MLflow run id: a stage run, or a pipeline run (its newest matching stage)")
    g.add_argument("--checkpoint", metavar="DIR", help="a checkpoint folder (model.safetensors + config.json)")
    g.add_argument("--model", metavar="URI", help="a registered model, e.g. models:/llmpipe-tiny-pretrain@best "
                   "(or models:/NAME/VERSION)")
    if init:
        g.add_argument("--init", help="gpt2, gpt2-medium, ... or a Hugging Face GPT-2 folder")
    p.add_argument("--workdir", default=".")


# --- commands ---------------------------------------------------------------------------------------------

def _validate_stages(stages: list[str], field: str = "STAGE") -> None:
    for s in stages:
        if s not in STAGE_CHOICES:
            raise UsageError(f"{field}: unknown stage {s!r}; expected one of {', '.join(STAGE_CHOICES)}")


def cmd_run(args) -> int:
    _validate_stages(args.stages)
    _validate_stages(args.force, "--force")
    if args.dask_address and args.task_runner == "threads":
        raise UsageError("--dask-address: needs --task-runner dask (or leave --task-runner out)")
    if args.task_runner or args.dask_address:
        args.overrides = [*args.overrides, f"orchestration.task_runner={args.task_runner or 'dask'}"]
    if args.dask_address:
        args.overrides = [*args.overrides, f"orchestration.dask_address={json.dumps(args.dask_address)}"]
    from flows.stages import resolve

    with timing.phase("config"):
        cfg = resolve(args.preset, args.config_file, args.overrides, args.mirror, args.corpus)  # fail fast
    if cfg.clean.corpus:
        from llm.clean import resolve_corpus

        resolve_corpus(cfg.clean.corpus)  # a path that matches nothing is an error before anything runs
    check_writable_paths(Path(args.workdir))
    from flows.trackproc import start_side_tracker

    start_side_tracker(Path(args.workdir))  # MLflow imports and connects on the other core meanwhile
    with contextlib.ExitStack() as stack:
        if not os.environ.get("PREFECT_API_URL"):  # this workdir's server, started on first use
            from flows.server import ensure_prefect, prefect_mode, temporary_prefect

            with timing.phase("prefect_server"):
                if prefect_mode() == "server":
                    os.environ["PREFECT_API_URL"] = ensure_prefect(args.workdir, echo=_err)
                else:
                    os.environ["PREFECT_API_URL"] = stack.enter_context(temporary_prefect(args.workdir))
        if not args.debug:
            _quiet_prefect_errors()
        with timing.phase("import_prefect_and_flow"):
            from flows.pipeline import pipeline

        with timing.phase("flow_run"):
            summary = pipeline(stages=args.stages, preset=args.preset, config_file=args.config_file,
                               overrides=args.overrides, mirror=args.mirror, corpus=args.corpus, force=args.force,
                               workdir=args.workdir, progress=show_progress(args), name=args.name,
                               command=command_line(),
                               parent_run_id=os.environ.get("LLMPIPE_PARENT_RUN_ID") or None)
        prefect_url = _prefect_url(summary)
    _print_summary(summary, prefect_url)
    if args.json:
        print(json.dumps(summary), flush=True)
    timing.report()
    return 0


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_writable(path: Path, what: str, fix: str) -> None:
    """One clear line when `path` cannot be created or written (before anything starts)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".llmpipe-write-check.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"{what} {path}: not writable ({e.strerror or e}); {fix}") from None


def check_writable_paths(workdir: Path) -> None:
    """The workdir (data/), the MLflow store and PREFECT_HOME must be writable before a run starts."""
    wd = workdir.resolve()
    _check_writable(wd / "data", "workdir: data folder", "run llmpipe in a writable folder or pass --workdir")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        _check_writable(wd / "mlruns", "MLflow store", "run llmpipe in a writable folder or set MLFLOW_TRACKING_URI")
    elif uri.startswith("sqlite:///"):
        _check_writable(Path(uri[len("sqlite:///"):]).parent, "MLFLOW_TRACKING_URI: folder",
                        "point MLFLOW_TRACKING_URI at a writable place")
    elif uri.startswith("file:") or "://" not in uri:
        _check_writable(Path(uri.removeprefix("file://").removeprefix("file:")), "MLFLOW_TRACKING_URI:",
                        "point MLFLOW_TRACKING_URI at a writable place")
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    _check_writable(home, "PREFECT_HOME:", "point PREFECT_HOME at a writable folder")


def show_progress(args) -> bool:
    """tqdm bars only on a terminal: in cron/CI logs they would be carriage-return frames (the stages'
    progress lines go through the run logger instead)."""
    return not args.no_progress and sys.stderr.isatty()


def command_line() -> str:
    return shlex.join(["llmpipe", *sys.argv[1:]])


def _prefect_url(summary: dict) -> str:
    """The flow run's page, when it ran on a Prefect server that outlives this command."""
    if os.environ.get("LLMPIPE_PREFECT", "") == "ephemeral" and not os.environ.get("LLMPIPE_KEEP_PREFECT_URL"):
        return ""
    from flows.report import prefect_flow_run_url

    return prefect_flow_run_url(summary.get("prefect_flow_run_id", ""))


def _print_summary(summary: dict, prefect_url: str = "") -> None:
    """One aligned line per stage (ran/cached, seconds, 2-4 headline metrics), then the links."""
    from flows.report import summary_lines

    print("\n".join(summary_lines(summary, summary.get("mlflow_url", ""), prefect_url)), file=sys.stderr, flush=True)


def cmd_stages(args) -> int:
    _validate_stages(args.stages)
    from flows.status import stage_table

    rows = stage_table(args.stages, args.preset, args.config_file, args.overrides, args.mirror, args.corpus,
                       Path(args.workdir), verify=args.verify)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['stage']:9s} {r['state']:8s} {r['key'][:16] if r['key'] else '-':16s} {r['artifact_dir']}")
            if r["state"] == "stale" and r.get("reason"):
                print(f"          why: {r['reason']}")
    return 0


def cmd_presets(args) -> int:
    print("\n".join(list_presets()))
    return 0


def _model_dir(args, stage: str) -> Path:
    """--model URI (the registry), else --run-id / --checkpoint / the newest artifact (flows/models.py)."""
    if getattr(args, "model", None):
        from flows.registry import download_model

        return download_model(args.model, Path(args.workdir), stage)
    from flows.models import resolve_model_dir

    return resolve_model_dir(args.run_id, args.checkpoint, Path(args.workdir), stage)


def check_sampling_args(args) -> None:
    """generate's sampling flags, before any model is loaded: --max-new-tokens >= 0 (0: the prompt's
    tokens only), --temperature >= 0 (0 = greedy), --top-k >= 1 (leave it out for no top-k filter),
    0 < --top-p <= 1."""
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens: expected a non-negative integer, got {args.max_new_tokens}")
    if not 0.0 <= args.temperature < math.inf:
        raise UsageError(f"--temperature: expected a number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k: expected an integer >= 1 (leave --top-k out for no top-k filter), "
                         f"got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p: expected a number in (0, 1], got {args.top_p}")


def cmd_generate(args) -> int:
    check_sampling_args(args)  # before torch and the model load
    import torch  # lazy: torch costs seconds of startup that other commands do not need

    from llm.generate import generate
    from llm.tokenizer import get_encoding

    enc = get_encoding()
    prompt_ids = enc.encode(args.prompt, allowed_special={"<|endoftext|>"})
    if not prompt_ids:
        raise UsageError("--prompt: expected a non-empty prompt")
    torch.set_num_threads(allowed_cores())  # as the pyfunc model does, so both give the same tokens
    if args.init:
        from llm.weights import load_pretrained

        model = load_pretrained(args.init)
    else:
        from llm.checkpoint import load_model

        model = load_model(_model_dir(args, "pretrain"))
    with torch.no_grad():
        new = generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed)
    text = enc.decode(new)
    if args.json:
        print(args.prompt + text, file=sys.stderr)
        print(json.dumps({"prompt_tokens": prompt_ids, "tokens": new, "text": text}))
    else:
        print(args.prompt + text)
    return 0


def cmd_classify(args) -> int:
    from llm.spam import classify_file, load_classifier

    if not args.texts and not args.file:
        raise UsageError("classify: give one or more TEXT arguments or --file F")
    for i, text in enumerate(args.texts, start=1):
        if not text.strip():
            raise UsageError(f"TEXT {i}: expected a non-empty message")
    if args.file:
        f = Path(args.file)
        if not f.exists():
            raise UsageError(f"--file {args.file}: file not found")
        if not f.is_file():
            raise UsageError(f"--file {args.file}: expected a file, got a folder")
    clf = load_classifier(_model_dir(args, "spam"))
    rows = []
    if args.texts:
        for text, (label, prob) in zip(args.texts, clf.predict(args.texts)):
            rows.append({"text": text, "label": label, "probability": prob})
    if args.file:
        df = classify_file(clf, Path(args.file))
        if df.empty:
            raise UsageError(f"--file {args.file}: no messages to classify (expected one message per line, "
                             "or a 'text' column)")
        rows.extend(df.to_dict("records"))
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['label']}\t{r['probability']:.4f}\t{r['text']}")
    return 0


def cmd_ask(args) -> int:
    if not args.instruction.strip():
        raise UsageError("INSTRUCTION: expected a non-empty instruction")
    if args.max_new_tokens < 1:  # 0 would answer nothing at all
        raise UsageError(f"--max-new-tokens: expected an integer >= 1, got {args.max_new_tokens}")
    from llm.instruct import answer

    text = answer(_model_dir(args, "instruct"),
                  args.instruction, args.input, max_new_tokens=args.max_new_tokens)
    print(json.dumps({"instruction": args.instruction, "input": args.input, "response": text}) if args.json
          else text)
    return 0


COMMANDS = {"run": cmd_run, "stages": cmd_stages, "presets": cmd_presets, "generate": cmd_generate,
            "classify": cmd_classify, "ask": cmd_ask}


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        func = getattr(args, "func", None) or COMMANDS[args.command]
        return func(args) or 0
    except KeyboardInterrupt:
        print("llmpipe: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ConfigError) as e:
        if debug:
            raise
        print(f"llmpipe: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # one clear line; the traceback only with --debug
        if debug:
            raise
        print(f"llmpipe: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        msg = f"missing key {msg}"
    if isinstance(e, (FileNotFoundError,)) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    first = msg.splitlines()[0]
    return first if type(e) in (ValueError, FileNotFoundError, RuntimeError) or type(e).__module__.startswith(
        ("llm", "flows")) else f"{type(e).__name__}: {first}"


if __name__ == "__main__":
    from flows import cli  # the installed module, so its exception classes are the ones raised

    sys.exit(cli.main())
