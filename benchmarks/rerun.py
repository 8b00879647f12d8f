"""First run vs fully cached re-runs of the tiny pipeline, as a user gets them, each part timed.

Runs `llmpipe run` as a subprocess in a fresh temporary workdir (nothing started or warmed by hand,
unless a setup says so) and prints wall seconds plus where a cached run spends them (the
`llmpipe-timings` line that LLMPIPE_TIMINGS=1 makes llmpipe print: config, Prefect server, importing
Prefect and the flow, MLflow import/connect, MLflow calls, cache keys, verification, the flow run).

Setups:
  default     no server started by hand: the first run starts this workdir's Prefect server and
              leaves it running; later runs reuse it
  by-hand     `llmpipe server start prefect` first (its start time is reported separately)
  ephemeral   LLMPIPE_PREFECT=ephemeral: every run starts and stops a temporary Prefect server

    python benchmarks/rerun.py --mirror ../shared/data [--setups default,by-hand,ephemeral] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def llmpipe(args: list[str], wd: Path, env: dict) -> tuple[float, dict, str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--workdir", str(wd)], capture_output=True,
                       text=True, env=env, cwd=wd)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"llmpipe {' '.join(args)} failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    phases = {}
    for line in p.stderr.splitlines():
        if line.startswith("llmpipe-timings "):
            phases = json.loads(line.split(" ", 1)[1])
    return wall, phases, p.stdout


def summary_cached(stdout: str) -> bool:
    last = json.loads(stdout.strip().splitlines()[-1])
    return all(s["cached"] for s in last["stages"].values())


def bench(setup: str, mirror: str, repeat: int) -> dict:
    env = dict(os.environ, LLMPIPE_TIMINGS="1")
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    if setup == "ephemeral":
        env["LLMPIPE_PREFECT"] = "ephemeral"
    else:
        env.pop("LLMPIPE_PREFECT", None)
    wd = Path(tempfile.mkdtemp(prefix=f"llmpipe-rerun-{setup}-"))
    out: dict = {"setup": setup, "workdir": str(wd)}
    try:
        if setup == "by-hand":
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "flows.cli", "server", "start", "prefect", "--prefect-port", "0",
                            "--workdir", str(wd)], check=True, capture_output=True, env=env)
            out["server_start"] = time.perf_counter() - t
        base = ["run", "--mirror", mirror, "--no-progress", "--json"]
        out["first"], out["first_phases"], _ = llmpipe(base, wd, env)
        walls, phases = [], []
        for _ in range(repeat):
            wall, ph, stdout = llmpipe(base, wd, env)
            assert summary_cached(stdout), "a re-run was not fully cached"
            walls.append(wall)
            phases.append(ph)
        out["cached"] = statistics.median_low(walls)
        out["cached_all"] = walls
        out["cached_phases"] = phases[walls.index(out["cached"])]
        single = [llmpipe(["run", "spam", "--mirror", mirror, "--no-progress", "--json"], wd, env)[0]
                  for _ in range(repeat)]
        out["cached_single_stage"] = statistics.median(single)
    finally:
        subprocess.run([sys.executable, "-m", "flows.cli", "server", "stop", "--workdir", str(wd)],
                       capture_output=True, env=env)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mirror", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--setups", default="default,by-hand,ephemeral")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = [bench(s, args.mirror, args.repeat) for s in args.setups.split(",")]
    load = os.getloadavg()[0]
    print(f"tiny pipeline (all stages), {os.cpu_count()} cores, load {load:.1f}; medians of {args.repeat}")
    print(f"{'setup':10s} {'first run':>10s} {'all cached':>11s} {'ratio':>6s} {'1 stage cached':>15s}")
    for r in rows:
        print(f"{r['setup']:10s} {r['first']:9.1f}s {r['cached']:10.1f}s {r['cached'] / r['first']:6.2f} "
              f"{r['cached_single_stage']:14.1f}s" + (f"   (server start by hand {r['server_start']:.1f}s)"
                                                     if "server_start" in r else ""))
    for r in rows:
        print(f"{r['setup']}: where a cached run's seconds go: {json.dumps(r['cached_phases'])}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
