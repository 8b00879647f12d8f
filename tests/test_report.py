"""What users read, without running a pipeline: plain-notation numbers, the terminal summary, where
end-of-stage summaries land on the curves, run names, one point per step in the metric logger.

    python -m pytest -q tests/test_report.py
"""
from __future__ import annotations

from flows.report import fmt, headline_text, summary_lines
from flows.tracking import pipeline_run_name, summary_points


def test_numbers_are_plain():
    assert [fmt(v) for v in (6.37123, 0.0004, 1e-5, 12345.0, 97.3, 0.97345, 3.0, 0.0)] == \
        ["6.371", "0.0004", "0.00001", "12,345", "97.3", "0.9735", "3", "0"]
    assert "e" not in fmt(1.234e-7) and "e" not in fmt(3.2e8)


def test_judge_line_shows_mean_reference_wrong_empty():
    m = {"judge_scored": 3, "judge_mean_score": 12.5, "judge_reference_score": 85.0, "judge_wrong_score": 43.0,
         "judge_empty_score": 0.0, "judge_auc": 0.9}
    assert headline_text("judge", m) == "mean 12.5  reference 85  wrong 43  empty 0"


def test_summary_is_aligned_with_times_and_links():
    s = {"pipeline_run_id": "abc", "name": "tiny spam.lr=1e-4 @5157131", "stages": {
        "pretrain": {"cached": True, "seconds": 0.1, "metrics": {"train_loss": 6.37, "val_loss": 6.5}},
        "spam": {"cached": False, "seconds": 12.34, "metrics": {"test_accuracy": 0.97, "test_f1": 0.9}}}}
    lines = summary_lines(s, "http://127.0.0.1:5000/#/experiments/1/runs/abc", "http://127.0.0.1:4200/runs/flow-run/x")
    assert lines[0] == "pipeline run abc  tiny spam.lr=1e-4 @5157131"
    assert lines[1].split() == ["pretrain", "cached", "train_loss", "6.37", "val_loss", "6.5"]
    assert lines[2].split() == ["spam", "ran", "12.3s", "test_accuracy", "0.97", "test_f1", "0.9"]
    assert lines[1].index("train_loss") == lines[2].index("test_accuracy")  # aligned columns
    assert lines[-2].endswith("/runs/abc") and lines[-1].endswith("/flow-run/x")


def test_summaries_land_on_the_curve_or_under_final_names():
    curve = {"train_loss": (90, 6.37), "tokens_per_sec": (90, 1200.0), "lr": (90, 1e-4)}
    pts = summary_points({"train_loss": 6.37, "tokens_per_sec": 1000.0, "steps": 90, "stage_seconds": 85.0}, curve)
    assert sorted(pts) == [("final_tokens_per_sec", 1000.0, 90), ("stage_seconds", 85.0, 90), ("steps", 90.0, 90)]
    assert summary_points({"documents_out": 2}, {}) == [("documents_out", 2.0, 0)]


def test_run_names_say_what_changed():
    assert pipeline_run_name("tiny", ["spam.lr=1e-4"], "5157131abcdef") == "tiny spam.lr=1e-4 @5157131"
    assert pipeline_run_name("tiny", [], "5157131abcdef-dirty", "my.yaml") == "tiny my.yaml @5157131-dirty"
    assert pipeline_run_name("tiny", ["spam.lr=1e-4"], "x", name="mine") == "mine"


def test_metric_logger_keeps_one_point_per_step(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from flows.tracking import Tracker

    tr = Tracker(tmp_path)
    run_id = tr.start_run("x", {})
    log = tr.metric_logger(run_id)
    log({"docs": 1}, 1)
    log({"docs": 2}, 1)  # same step again before a flush: the newer value replaces it
    log({"docs": 3}, 2)
    log.flush()
    log({"docs": 4}, 2)  # same step after the flush: dropped (the step already has its point)
    log({"docs": 5}, 1)  # an older step: dropped
    log.flush()
    hist = sorted((m.step, m.value) for m in tr.client.get_metric_history(run_id, "docs"))
    assert hist == [(1, 2.0), (2, 3.0)]
    assert log.curve["docs"] == (2, 3.0) and log.last_step == 2
    assert tr.client.get_experiment(tr.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
