"""`llmpipe sweep`: a grid of spam.lr values on the tiny fixture shares pretrain through the cache and
nests its pipeline runs under one sweep run; bad grids fail before anything runs.

    python -m pytest -q tests/test_sweep.py
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_pipeline import TEST_OVERRIDES, write_fixture_workdir

ROOT = Path(__file__).resolve().parent.parent


def test_split_values_keeps_brackets_and_quotes():
    from flows.sweep import split_values

    assert split_values('1e-5, 5e-5,1e-4') == ["1e-5", "5e-5", "1e-4"]
    assert split_values('[a, b],[c],"x,y"') == ["[a, b]", "[c]", '"x,y"']


@pytest.mark.slow
def test_sweep_of_three_spam_lrs_shares_pretrain(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from flows.sweep import parse_grid, run_sweep
    from flows.tracking import Tracker

    wd = write_fixture_workdir(tmp_path)
    args = argparse.Namespace(stages=["spam"], preset="tiny", config_file=None, overrides=list(TEST_OVERRIDES),
                              mirror=None, corpus=[], workdir=str(wd), name=None, parallel=1, no_progress=True)
    out = run_sweep(args, parse_grid(["spam.lr=1e-5,5e-5,1e-4"]))
    variants = out["variants"]
    assert len(variants) == 3
    assert sorted(v["overrides"]["spam.lr"] for v in variants) == ["1e-4", "1e-5", "5e-5"]
    ran_pretrain = [v for v in variants if not v["stages"]["pretrain"]["cached"]]
    assert len(ran_pretrain) <= 1
    assert all(not v["stages"]["spam"]["cached"] for v in variants)
    assert len({v["stages"]["spam"]["run_id"] for v in variants}) == 3
    # the printed table: best first by test_accuracy
    from flows.sweep import rank

    by, ranked = rank(variants)
    assert by == ("spam", "test_accuracy", "max")
    accs = [v["stages"]["spam"]["metrics"]["test_accuracy"] for v in ranked]
    assert accs == sorted(accs, reverse=True)
    rows = out["table"][2:]
    assert [r.split()[0] for r in rows] == [v["overrides"]["spam.lr"] for v in ranked]

    tr = Tracker(wd)
    sweep = tr.client.get_run(out["sweep_run_id"])
    assert sweep.data.tags["stage"] == "sweep" and sweep.data.params["grid.spam.lr"] == "1e-5,5e-5,1e-4"
    kids = tr.client.search_runs([tr.experiment_id], f"tags.mlflow.parentRunId = '{out['sweep_run_id']}'")
    assert sorted(r.info.run_id for r in kids) == sorted(v["pipeline_run_id"] for v in variants)
    assert all(r.data.tags["stage"] == "pipeline" for r in kids)
    for v in variants:  # each pipeline run keeps its stage children
        stages = {r.data.tags["stage"] for r in tr.client.search_runs(
            [tr.experiment_id], f"tags.mlflow.parentRunId = '{v['pipeline_run_id']}'")}
        assert {"pretrain", "spam"} <= stages
    names = {r.info.run_name for r in kids}
    assert len(names) == 3 and all("spam.lr=" in n for n in names)


@pytest.mark.slow
def test_parallel_sweep_gives_the_sequential_results(prefect_harness, tmp_path, monkeypatch):
    """--parallel 2 (each variant its own `llmpipe run` process) vs one after the other, in two workdirs."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from flows.sweep import parse_grid, run_sweep

    out = {}
    for parallel in (1, 2):
        wd = write_fixture_workdir(tmp_path / f"p{parallel}")
        # the same thread counts in both (automatic ones follow the machine's load, and the last bits with them)
        overrides = list(TEST_OVERRIDES) + ["pretrain.threads=1", "spam.threads=1"]
        args = argparse.Namespace(stages=["spam"], preset="tiny", config_file=None, overrides=overrides,
                                  mirror=None, corpus=[], workdir=str(wd), name=None, parallel=parallel,
                                  no_progress=True)
        monkeypatch.setenv("LLMPIPE_PREFECT", "ephemeral")
        out[parallel] = run_sweep(args, parse_grid(["spam.lr=1e-4,1e-3"]))
    for a, b in zip(out[1]["variants"], out[2]["variants"]):
        assert a["overrides"] == b["overrides"]
        for stage in ("pretrain", "spam"):
            assert a["stages"][stage]["cache_key"] == b["stages"][stage]["cache_key"]
            keep = ("test_accuracy", "test_f1", "val_accuracy", "train_loss", "val_loss")
            assert {k: v for k, v in a["stages"][stage]["metrics"].items() if k in keep} == \
                {k: v for k, v in b["stages"][stage]["metrics"].items() if k in keep}
    assert sum(not v["stages"]["pretrain"]["cached"] for v in out[2]["variants"]) == 1  # built once, then shared


def _cli(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "flows.cli", "sweep", *args, "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("grid, expect", [
    ("spam.nope=1,2", "spam.nope"),
    ("spam.lr=1e-4,abc", "spam.lr"),
    ("spam.lr", "--grid"),
])
def test_bad_grid_fails_before_anything_runs_with_one_line(tmp_path, grid, expect):
    p = _cli(tmp_path, "spam", "--grid", grid)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmpipe: error:") and expect in lines[0]
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "data").exists()
