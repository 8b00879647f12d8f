"""The pipeline flow end to end on fixtures it writes itself: caching, single-stage re-runs, MLflow runs.

Runs the real Prefect flow (against the session's temporary Prefect server, conftest's prefect_harness) with a
real SQLite MLflow store in a temporary workdir whose data/sources.yaml points at small local files.

    python -m pytest -q tests/test_pipeline.py
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum old songs about "
         "rivers mountains bread and lanterns in the evening light").split()


def _text(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + ".")
    return "\n\n".join(" ".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4)) + "\n"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_fixture_workdir(root: Path) -> Path:
    """A workdir with its own sources.yaml: two small texts, an SMS file, instruction and preference records."""
    src = root / "upstream"
    src.mkdir(parents=True)
    (src / "a.txt").write_text(_text(1, 1500))
    (src / "b.txt").write_text(_text(2, 800))
    rng = random.Random(3)
    lines = []
    for i in range(60):
        if i % 3 == 0:
            lines.append(f"spam\tWIN a free prize {i}! call 0800 {rng.randint(1000, 9999)} now, txt STOP")
        else:
            lines.append(f"ham\t{_text(100 + i, 8).strip()}")
    (src / "sms.tsv").write_text("\n".join(lines))
    records = [{"instruction": f"Repeat the word {w}.", "input": "" if i % 2 else f"word {i}", "output": f"{w}."}
               for i, w in enumerate(WORDS * 2)]
    (src / "instr.json").write_text(json.dumps(records))
    prefs = [{**r, "chosen": r["output"], "rejected": f"No. {r['output']}"} for r in records]
    (src / "pref.json").write_text(json.dumps(prefs))
    wd = root / "work"
    (wd / "data").mkdir(parents=True)
    entries = []
    for name, f, kind in (("text_a", "a.txt", "text"), ("text_b", "b.txt", "text"), ("sms", "sms.tsv", "sms_spam"),
                          ("instr", "instr.json", "instructions"), ("pref", "pref.json", "preferences")):
        entries.append({"name": name, "url": str(src / f), "file": f, "sha256": _sha(src / f), "kind": kind})
    import yaml

    (wd / "data" / "sources.yaml").write_text(yaml.safe_dump({"sources": entries}))
    return wd


TEST_OVERRIDES = [
    "clean.sources=[text_a, text_b]", "clean.min_chars=50", "spam.source=sms", "instruct.data=instr", "dpo.data=pref",
    "pretrain.model.context_length=16", "pretrain.model.emb_dim=16", "pretrain.model.n_heads=2",
    "pretrain.model.n_layers=1", "pretrain.max_steps=4", "pretrain.batch_size=4", "pretrain.eval_every=2",
    "pretrain.eval_batches=2", "pretrain.checkpoint_every=2",
    "evaluate.max_new_tokens=4", "evaluate.max_batches=2",
    "spam.max_steps=3", "spam.batch_size=4", "spam.eval_every=2", "spam.eval_batches=1", "spam.max_length=16",
    "spam.baseline=true",
]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return write_fixture_workdir(tmp_path)


def run(wd: Path, stages, *extra, force=()):
    from flows.pipeline import pipeline

    return pipeline(stages=list(stages), preset="tiny", overrides=TEST_OVERRIDES + list(extra), force=list(force),
                    workdir=str(wd), progress=False)


def ran(summary) -> list[str]:
    return [s for s, info in summary["stages"].items() if not info["cached"]]


def test_data_stages_cache_rerun_and_force(prefect_harness, workdir):
    first = run(workdir, ["shard"])
    assert list(first["stages"]) == ["download", "clean", "shard"]
    assert ran(first) == ["download", "clean", "shard"]
    shard_dir = Path(first["stages"]["shard"]["artifact_dir"])
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["tokenizer"] == "gpt2"
    assert first["stages"]["clean"]["metrics"]["documents_out"] == 2

    again = run(workdir, ["shard"])
    assert ran(again) == []  # the same command twice re-uses every stage
    assert again["stages"]["shard"]["artifact_dir"] == str(shard_dir)

    # A clean setting re-runs clean; shard re-runs only when clean's output bytes changed.
    same_output = run(workdir, ["shard"], "clean.min_chars=60")
    assert ran(same_output) == ["clean"]
    edited = run(workdir, ["shard"], "clean.min_chars=6000")  # drops the shorter document
    assert ran(edited) == ["clean", "shard"]
    assert edited["stages"]["clean"]["metrics"]["documents_out"] == 1
    assert edited["stages"]["clean"]["metrics"]["dropped_too_short"] == 1

    # Deleting a stage's artifacts re-runs that stage (and nothing whose inputs did not change).
    shutil.rmtree(shard_dir)
    rebuilt = run(workdir, ["shard"])
    assert ran(rebuilt) == ["shard"]
    assert (shard_dir / "manifest.json").exists()

    # --force re-runs exactly that stage; byte-identical output leaves the next stage cached.
    forced = run(workdir, ["shard"], force=["clean"])
    assert ran(forced) == ["clean"]
    assert not list(shard_dir.parent.glob("*.partial"))


def test_mlflow_parent_and_child_runs(prefect_harness, workdir):
    from flows.tracking import Tracker

    first = run(workdir, ["clean"])
    second = run(workdir, ["clean"])
    tr = Tracker(workdir)
    parent = tr.client.get_run(second["pipeline_run_id"])
    assert parent.data.params["preset"] == "tiny"
    assert len(parent.data.params["config_hash"]) == 64
    children = tr.client.search_runs([tr.experiment_id],
                                     f"tags.mlflow.parentRunId = '{second['pipeline_run_id']}'")
    by_stage = {r.data.tags["stage"]: r for r in children}
    assert set(by_stage) == {"download", "clean"}
    for stage, r in by_stage.items():
        tags = r.data.tags
        assert tags["cached"] == "true"
        assert tags["cached_from_run_id"] == first["stages"][stage]["run_id"]
        assert tags["cache_key"] == second["stages"][stage]["cache_key"]
        assert {"prefect.flow_run_id", "git_commit"} <= set(tags)
        assert r.info.status == "FINISHED"
    produced = tr.client.get_run(first["stages"]["clean"]["run_id"])
    assert produced.data.tags["cached"] == "false"
    assert produced.data.metrics["documents_out"] == 2
    assert produced.data.params["min_chars"] == "50"
    assert by_stage["clean"].data.metrics["documents_out"] == 2


def test_stage_error_names_the_source_and_leaves_no_partial_output(prefect_harness, workdir):
    (workdir.parent / "upstream" / "a.txt").write_text("changed upstream bytes\n")
    with pytest.raises(Exception, match=r"text_a.*sha256|sha256.*text_a"):
        run(workdir, ["download"])
    assert not (workdir / "data" / "raw" / "a.txt").exists()


@pytest.mark.slow
def test_which_stages_run_for_three_edits(prefect_harness, workdir):
    """spam.lr re-runs only spam; a clean edit re-runs what its changed output feeds;
    byte-identical shards (shard forced) leave pretrain cached."""
    first = run(workdir, ["evaluate", "spam"])
    assert ran(first) == ["download", "clean", "shard", "pretrain", "evaluate", "spam"]
    assert 0.0 <= first["stages"]["spam"]["metrics"]["test_accuracy"] <= 1.0
    assert first["stages"]["evaluate"]["metrics"]["val_perplexity"] > 1.0

    assert ran(run(workdir, ["evaluate", "spam"], "spam.lr=1e-4")) == ["spam"]

    edited = run(workdir, ["evaluate", "spam"], "spam.lr=1e-4", "clean.min_chars=6000")
    assert ran(edited) == ["clean", "shard", "pretrain", "evaluate", "spam"]

    forced = run(workdir, ["evaluate", "spam"], "spam.lr=1e-4", "clean.min_chars=6000", force=["shard"])
    assert ran(forced) == ["shard"]
    assert forced["stages"]["pretrain"]["artifact_dir"] == edited["stages"]["pretrain"]["artifact_dir"]


@pytest.mark.slow
def test_dpo_stage_after_instruct_cached_and_keyed(prefect_harness, workdir):
    """The dpo stage: its plan (instruct's model + the preference source), the reward margin rising from 0
    (policy == reference at step 0), a fully cached second run, and a dpo setting re-running dpo alone."""
    from flows.stages import plan
    from llm.config import load_config

    cfg = load_config("tiny", overrides=TEST_OVERRIDES)
    assert plan(cfg, ["judge"])[-3:] == ["instruct", "dpo", "judge"]
    assert plan(cfg.model_copy(update={"judge": cfg.judge.model_copy(update={"dpo": False})}), ["judge"])[-2:] == \
        ["instruct", "judge"]
    extra = ["pretrain.model.context_length=96", "instruct.max_steps=3", "dpo.max_steps=4", "dpo.eval_every=2",
             "dpo.lr=1e-3", "dpo.test_limit=2"]
    first = run(workdir, ["dpo"], *extra)
    assert ran(first) == ["download", "clean", "shard", "pretrain", "instruct", "dpo"]
    m = first["stages"]["dpo"]["metrics"]
    assert m["val_reward_margin_start"] == 0.0 and m["val_reward_margin"] > 0.0 and m["steps"] == 4
    assert {"dpo_train_loss", "dpo_val_loss", "train_reward_margin", "val_reward_accuracy"} <= set(m)
    out = Path(first["stages"]["dpo"]["artifact_dir"])
    assert (out / "reward_margin.png").is_file() and (out / "responses.parquet").is_file()
    assert ran(run(workdir, ["dpo"], *extra)) == []
    assert ran(run(workdir, ["dpo"], *extra, "dpo.beta=0.5")) == ["dpo"]
