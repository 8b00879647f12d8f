"""`llmpipe sweep`: run the cartesian product of config values as pipeline runs under one MLflow sweep run.

    llmpipe sweep spam --preset tiny --grid spam.lr=1e-5,5e-5,1e-4 [--grid spam.train_mode=last_block,all]
                  [--set key=value ...] [--mirror DIR] [--parallel N] [--name NAME] [--json]

Each variant is an ordinary pipeline run (flows/pipeline.py) with the variant's values as extra `--set`
overrides, nested under one sweep parent run in MLflow (each keeps its stage children). Unchanged
upstream stages are shared through the stage cache: in the example pretrain runs once (or not at all
when it is already cached). Every variant's config is resolved before anything runs, so a bad grid key
or value fails at once with the one-line error `--set` gives.

Variants run one after the other by default. `--parallel N` runs N at once, each as its own
`llmpipe run` process (torch's global RNG and thread settings stay per process, so results are the
same either way); two variants that need the same missing upstream stage wait on its lock, and the
second re-uses what the first built.

Printed: a table of variants x headline metrics, best first. With --json the last stdout line is
`{"sweep_run_id": ..., "variants": [{"overrides": {...}, "pipeline_run_id": ..., "stages": {...}}]}`.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from flows import timing
from flows.errors import UsageError
from flows.report import fmt, headline
from flows.server import ensure_prefect, prefect_mode, temporary_prefect
from flows.tracking import get_tracker, pipeline_run_name, process_tags, run_url, short_commit
from llm.procenv import child_env

# the metric variants are ranked by: the first of these whose stage every variant has
RANK_BY = (("judge", "judge_mean_score", "max"), ("spam", "test_accuracy", "max"),
           ("evaluate", "val_perplexity", "min"), ("instruct", "val_loss", "min"), ("pretrain", "val_loss", "min"))


def split_values(text: str) -> list[str]:
    """`a,b,[c, d],"e,f"` -> ["a", "b", "[c, d]", '"e,f"']: commas inside brackets or quotes stay."""
    out, cur, depth, quote = [], "", 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def parse_grid(grid: list[str]) -> list[tuple[str, list[str]]]:
    axes: list[tuple[str, list[str]]] = []
    for g in grid:
        key, sep, values = g.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise UsageError(f"--grid {g!r}: expected key.path=value1,value2[,...]")
        vals = split_values(values)
        if any(v == "" for v in vals):
            raise UsageError(f"--grid {g!r}: empty value in the list")
        if key in dict(axes):
            raise UsageError(f"--grid {key}: given twice; put all its values in one --grid")
        axes.append((key, vals))
    if not axes:
        raise UsageError("--grid: give at least one key.path=value1,value2")
    return axes


def variants(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*[v for _, v in axes])]


def rank(results: list[dict]) -> tuple[Optional[tuple[str, str, str]], list[dict]]:
    """Results best first by the first RANK_BY metric every variant has; unranked order otherwise."""
    for stage, metric, direction in RANK_BY:
        if results and all(metric in r["stages"].get(stage, {}).get("metrics", {}) for r in results):
            key = (lambda r: r["stages"][stage]["metrics"][metric])
            return (stage, metric, direction), sorted(results, key=key, reverse=(direction == "max"))
    return None, list(results)


def table_lines(axes: list[tuple[str, list[str]]], ranked: list[dict], by) -> list[str]:
    keys = [k for k, _ in axes]
    # the metrics of the stages the grid changes and of the stage the variants are ranked by
    wanted = {k.split(".")[0] for k in keys} | ({by[0]} if by else set())
    metric_cols: list[str] = []
    for r in ranked:
        for stage, s in r["stages"].items():
            if wanted & set(r["stages"]) and stage not in wanted:
                continue
            for m, _ in headline(stage, s["metrics"]):
                col = f"{stage}.{m}"
                if col not in metric_cols:
                    metric_cols.append(col)
    if by:
        first = f"{by[0]}.{by[1]}"
        metric_cols = [first] + [c for c in metric_cols if c != first]
    metric_cols = metric_cols[:6]
    header = keys + metric_cols + ["ran"]
    rows = []
    for r in ranked:
        row = [r["overrides"][k] for k in keys]
        for col in metric_cols:
            stage, m = col.split(".", 1)
            v = r["stages"].get(stage, {}).get("metrics", {}).get(m)
            row.append(fmt(v) if v is not None else "-")
        row.append(",".join(s for s, v in r["stages"].items() if not v["cached"]) or "-")
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    title = f"sweep: {len(ranked)} variants" + (f", best first by {by[0]} {by[1]} ({by[2]})" if by else "")
    return [title, line(header), *[line(r) for r in rows]]


def _one_subprocess(args, overrides: list[str], parent_run_id: str, name: str) -> dict:
    cmd = [sys.executable, "-m", "flows.cli", "run", *args.stages, "--preset", args.preset, "--workdir",
           args.workdir, "--json", "--name", name, "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    if args.config_file:
        cmd += ["--config", args.config_file]
    if args.mirror:
        cmd += ["--mirror", args.mirror]
    if args.corpus:
        cmd += ["--corpus", *args.corpus]
    env = child_env({"LLMPIPE_PARENT_RUN_ID": parent_run_id})  # this checkout's flows.cli, installed or not
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"sweep variant {' '.join(overrides)}: {tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_sweep(args, axes: list[tuple[str, list[str]]]) -> dict:
    from flows.pipeline import checkout_commit, pipeline  # lazy: prefect; `llmpipe --help` imports this module

    wd = Path(args.workdir).resolve()
    tracker = get_tracker(wd)
    commit = checkout_commit()
    grid_desc = " ".join(f"{k}={','.join(v)}" for k, v in axes)
    name = args.name or f"sweep {args.preset} {grid_desc} @{short_commit(commit)}"
    sweep_id = tracker.start_run(name, {"stage": "sweep", "preset": args.preset, "git_commit": commit,
                                        "mlflow.source.name": "llmpipe sweep", "mlflow.source.type": "LOCAL",
                                        **({"mlflow.source.git.commit": commit.removesuffix("-dirty")}
                                           if commit != "unknown" else {}), **process_tags()})
    tracker.log_params(sweep_id, {"preset": args.preset, "stages": ",".join(args.stages),
                                  "variants": len(variants(axes)), "parallel": args.parallel,
                                  **{f"grid.{k}": ",".join(v) for k, v in axes},
                                  **{f"override.{k}": v for k, v in
                                     (o.partition("=")[::2] for o in args.overrides)}})
    todo = variants(axes)
    results: list[Optional[dict]] = [None] * len(todo)
    try:
        def one(i: int) -> None:
            ov = [f"{k}={v}" for k, v in todo[i].items()]
            vname = pipeline_run_name(args.preset, args.overrides + ov, commit, args.config_file)
            if args.parallel > 1:
                s = _one_subprocess(args, args.overrides + ov, sweep_id, vname)
            else:
                s = pipeline(stages=args.stages, preset=args.preset, config_file=args.config_file,
                             overrides=args.overrides + ov, mirror=args.mirror, corpus=args.corpus,
                             workdir=str(wd), progress=not args.no_progress and sys.stderr.isatty(),
                             name=vname, command=f"llmpipe sweep (variant {' '.join(ov)})",
                             parent_run_id=sweep_id)
            results[i] = {"overrides": todo[i], "pipeline_run_id": s["pipeline_run_id"], "name": vname,
                          "stages": s["stages"]}

        if args.parallel > 1:
            with ThreadPoolExecutor(args.parallel) as pool:
                list(pool.map(one, range(len(todo))))
        else:
            for i in range(len(todo)):
                one(i)
        done = [r for r in results if r is not None]
        by, ranked = rank(done)
        lines = table_lines(axes, ranked, by)
        if by:
            best = ranked[0]["stages"][by[0]]["metrics"][by[1]]
            tracker.log_metrics(sweep_id, {f"best_{by[1]}": best, "variants": len(done)})
        tracker.set_tags(sweep_id, {"mlflow.note.content": "**Sweep** " + grid_desc + "\n\n```\n" +
                                    "\n".join(lines) + "\n```\n\n" + "\n".join(
                                        f"- [{r['name']}](#/experiments/{tracker.experiment_id}/runs/"
                                        f"{r['pipeline_run_id']})" for r in ranked)})
        tracker.log_text(sweep_id, json.dumps(ranked, indent=2), "sweep.json")
        tracker.end_run(sweep_id)
    except BaseException:
        tracker.end_run(sweep_id, "FAILED")
        raise
    return {"sweep_run_id": sweep_id, "name": name, "mlflow_url": run_url(tracker, sweep_id), "table": lines,
            "variants": [{"overrides": r["overrides"], "pipeline_run_id": r["pipeline_run_id"], "stages": r["stages"]}
                         for r in done]}


def cmd_sweep(args) -> int:
    from flows import cli  # lazy: flows.cli imports this module
    from flows.stages import resolve  # lazy: keeps `llmpipe --help` from importing the stage table

    cli._validate_stages(args.stages)
    if args.parallel < 1:
        raise UsageError(f"--parallel: expected a positive integer, got {args.parallel}")
    axes = parse_grid(args.grid)
    for v in variants(axes):  # every variant's config must resolve before anything runs
        resolve(args.preset, args.config_file, args.overrides + [f"{k}={x}" for k, x in v.items()], args.mirror,
                args.corpus)
    cli.check_writable_paths(Path(args.workdir))
    with contextlib.ExitStack() as stack:
        if not os.environ.get("PREFECT_API_URL"):
            if prefect_mode() == "server":
                os.environ["PREFECT_API_URL"] = ensure_prefect(args.workdir, echo=cli._err)
            else:
                os.environ["PREFECT_API_URL"] = stack.enter_context(temporary_prefect(args.workdir))
        if not args.debug:
            cli._quiet_prefect_errors()
        out = run_sweep(args, axes)
    print("\n".join(out.pop("table") + [f"  MLflow: {out.pop('mlflow_url')}"]), file=sys.stderr, flush=True)
    out.pop("name", None)
    if args.json:
        print(json.dumps(out), flush=True)
    timing.report()
    return 0


def register(subparsers) -> None:
    from flows import cli  # lazy: flows.cli imports this module

    p = subparsers.add_parser("sweep", help="run a grid of config values as pipeline runs under one MLflow run")
    p.add_argument("stages", nargs="*", default=["all"], metavar="STAGE",
                   help=f"one or more of {', '.join(cli.STAGE_CHOICES)} (default all)")
    cli._add_config_args(p)
    p.add_argument("--grid", action="append", default=[], metavar="key.path=v1,v2",
                   help="values to try for one config key (YAML syntax each); repeat for a cartesian product")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="run N variants at once (default 1)")
    p.add_argument("--name", help="name of the sweep's MLflow run")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)
