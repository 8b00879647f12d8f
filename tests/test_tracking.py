"""What users compare in MLflow, read from a real store after real tiny runs (no mocks): metric
histories, run names and override params, descriptions and reserved tags, registered models and their
aliases, pyfunc loading vs `llmpipe generate`, dataset inputs, system metrics, cached children.

    python -m pytest -q tests/test_tracking.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_pipeline import TEST_OVERRIDES, write_fixture_workdir

ROOT = Path(__file__).resolve().parent.parent
# every test reads the two pipeline runs of the `runs` fixture (about a minute on 2 cores)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    """Two pipeline runs on one workdir: the default, then spam.lr changed (only spam runs again)."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from flows.pipeline import pipeline

    wd = write_fixture_workdir(tmp_path_factory.mktemp("tracking"))

    def run(*extra):
        return pipeline(stages=["evaluate", "spam"], preset="tiny", overrides=TEST_OVERRIDES + list(extra),
                        workdir=str(wd), progress=False)

    first = run()
    second = run("spam.lr=1e-4")
    return wd, first, second


def _tracker(wd):
    from flows.tracking import Tracker

    return Tracker(wd)


def _children(tr, parent_id):
    return {r.data.tags["stage"]: r for r in
            tr.client.search_runs([tr.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")}


def test_every_metric_history_has_one_point_per_step_in_time_order(runs):
    wd, first, second = runs
    tr = _tracker(wd)
    checked = 0
    for summary in (first, second):
        run_ids = [summary["pipeline_run_id"]] + [s["run_id"] for s in summary["stages"].values()]
        for run_id in run_ids:
            for key in tr.client.get_run(run_id).data.metrics:
                hist = sorted(tr.client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))
                steps = [m.step for m in hist]
                assert steps == sorted(set(steps)), f"{run_id} {key}: steps {steps}"
                checked += 1
    assert checked > 50
    # the pretrain curve: its last point is the stage's final train_loss, and it starts at the first eval
    pre = first["stages"]["pretrain"]
    hist = tr.client.get_metric_history(pre["run_id"], "train_loss")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [2, 4]
    assert max(hist, key=lambda m: m.step).value == pytest.approx(pre["metrics"]["train_loss"])
    # the parent's headline equals the child's latest value
    parent = tr.client.get_run(first["pipeline_run_id"])
    assert parent.data.metrics["pretrain_train_loss"] == pytest.approx(
        tr.client.get_run(pre["run_id"]).data.metrics["train_loss"])
    assert "stage_seconds" in tr.client.get_run(pre["run_id"]).data.metrics


def test_runs_name_themselves_and_record_overrides(runs):
    wd, first, second = runs
    tr = _tracker(wd)
    p1, p2 = (tr.client.get_run(s["pipeline_run_id"]) for s in (first, second))
    assert p1.info.run_name != p2.info.run_name
    assert p2.info.run_name.startswith("tiny ") and "spam.lr=1e-4" in p2.info.run_name and " @" in p2.info.run_name
    assert p2.data.params["override.spam.lr"] == "1e-4"
    assert "override.spam.lr" not in p1.data.params
    assert p1.data.params["spam.lr"] != p2.data.params["spam.lr"]
    assert p1.data.params["pretrain.lr"] == p2.data.params["pretrain.lr"]
    assert p1.data.params["pretrain.model.n_layers"] == "1"
    for p in (p1, p2):
        assert p.data.tags["mlflow.source.name"].startswith("llmpipe")
        assert "mlflow.source.git.commit" in p.data.tags or p.data.tags["git_commit"] == "unknown"
        note = p.data.tags["mlflow.note.content"]
        assert "**Ran:**" in note and "#/experiments/" in note
    assert "**Cached:** download, clean, shard, pretrain, evaluate" in p2.data.tags["mlflow.note.content"]
    kids = _children(tr, second["pipeline_run_id"])
    assert kids["spam"].info.run_name == "spam" and kids["spam"].data.tags["cached"] == "false"


def test_cached_children_link_the_producing_run_and_its_model(runs):
    wd, first, second = runs
    tr = _tracker(wd)
    kid = _children(tr, second["pipeline_run_id"])["pretrain"]
    producer = tr.client.get_run(first["stages"]["pretrain"]["run_id"])
    assert kid.data.tags["cached_from_run_id"] == producer.info.run_id
    assert kid.data.params["artifact_uri"] == producer.info.artifact_uri
    assert producer.info.run_id in kid.data.tags["mlflow.note.content"]
    assert kid.data.tags["model_uri"] == producer.data.tags["model_uri"] == "models:/llmpipe-tiny-pretrain/1"
    assert kid.data.metrics["train_loss"] == pytest.approx(producer.data.metrics["train_loss"])
    assert second["stages"]["pretrain"]["model"] == "models:/llmpipe-tiny-pretrain/1"


def test_registered_models_and_aliases(runs):
    wd, first, second = runs
    tr = _tracker(wd)
    c = tr.client
    assert [str(v.version) for v in c.search_model_versions("name='llmpipe-tiny-pretrain'")] == ["1"]  # cached: no v2
    pre = c.get_registered_model("llmpipe-tiny-pretrain")
    assert {k: str(v) for k, v in pre.aliases.items()} == {"best": "1"}
    v1 = c.get_model_version("llmpipe-tiny-pretrain", "1")
    assert float(v1.tags["val_perplexity"]) == pytest.approx(first["stages"]["evaluate"]["metrics"]["val_perplexity"])
    spam = {str(v.version): v for v in c.search_model_versions("name='llmpipe-tiny-spam'")}
    assert set(spam) == {"1", "2"}
    aliases = {k: str(v) for k, v in c.get_registered_model("llmpipe-tiny-spam").aliases.items()}
    assert str(c.get_latest_versions("llmpipe-tiny-spam")[0].version) == "2"
    acc = {v: float(spam[v].tags["test_accuracy"]) for v in spam}
    assert acc[aliases["best"]] == max(acc.values())
    if acc["2"] <= acc["1"]:
        assert aliases["best"] == "1"  # best moves only to a better version

    from flows.registry import rate

    ref = {"name": "llmpipe-tiny-spam", "version": "2"}
    assert rate(tr, "spam", ref, 2.0) is True  # a better score moves best ...
    assert str(c.get_registered_model("llmpipe-tiny-spam").aliases["best"]) == "2"
    assert rate(tr, "spam", {"name": "llmpipe-tiny-spam", "version": "1"}, 0.5) is False  # ... a worse one does not
    assert str(c.get_registered_model("llmpipe-tiny-spam").aliases["best"]) == "2"


ONE_CORE = ["taskset", "-c", "0"] if shutil.which("taskset") else []  # same torch threads in every process


def _cli(wd, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI="")
    env.pop("MLFLOW_TRACKING_URI")
    p = subprocess.run([*ONE_CORE, sys.executable, "-m", "flows.cli", *args, "--workdir", str(wd)], capture_output=True,
                       text=True, env=env, cwd=wd, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_pyfunc_in_a_fresh_process_equals_llmpipe_generate(runs):
    wd, first, second = runs
    from flows.tracking import tracking_uri

    cli = json.loads(_cli(wd, "generate", "--prompt", "the quick brown", "--max-new-tokens", "6", "--seed", "1",
                          "--json").strip().splitlines()[-1])
    reg = json.loads(_cli(wd, "generate", "--prompt", "the quick brown", "--max-new-tokens", "6", "--seed", "1",
                          "--model", "models:/llmpipe-tiny-pretrain@best", "--json").strip().splitlines()[-1])
    assert reg == cli
    code = ("import json, sys, mlflow; mlflow.set_tracking_uri(sys.argv[1]); "
            "m = mlflow.pyfunc.load_model('models:/llmpipe-tiny-pretrain/latest'); "
            "out = m.predict({'prompt': ['the quick brown']}, params={'max_new_tokens': 6, 'seed': 1}); "
            "print(json.dumps(list(out['text'])))")
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_DISABLE_TELEMETRY="true")
    p = subprocess.run([*ONE_CORE, sys.executable, "-c", code, tracking_uri(wd)], capture_output=True, text=True, env=env,
                       cwd=wd, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [cli["text"]]

    code = ("import json, sys, mlflow; mlflow.set_tracking_uri(sys.argv[1]); "
            "m = mlflow.pyfunc.load_model('models:/llmpipe-tiny-spam/latest'); "
            "print(json.dumps(m.predict({'text': ['WIN a free prize now']}).to_dict('records')))")
    p = subprocess.run([*ONE_CORE, sys.executable, "-c", code, tracking_uri(wd)], capture_output=True, text=True, env=env,
                       cwd=wd, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    pyf = json.loads(p.stdout.strip().splitlines()[-1])[0]
    cls = json.loads(_cli(wd, "classify", "WIN a free prize now", "--model", "models:/llmpipe-tiny-spam@latest",
                          "--json"))[0]
    assert pyf["label"] == cls["label"] and pyf["probability"] == pytest.approx(cls["probability"])


def test_model_uri_errors_are_one_line(runs):
    wd, _, _ = runs
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-m", "flows.cli", "classify", "hi", "--model",
                        "models:/llmpipe-tiny-pretrain@latest", "--workdir", str(wd)], capture_output=True, text=True,
                       env=env, cwd=wd, timeout=300)
    assert p.returncode == 2 and "a pretrain model; expected a spam model" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_dataset_inputs_carry_content_digests_and_pretrain_has_system_metrics(runs):
    wd, first, _ = runs
    tr = _tracker(wd)
    st = first["stages"]
    pre = tr.client.get_run(st["pretrain"]["run_id"])
    shard_hash = json.loads((Path(st["shard"]["artifact_dir"]) / ".llmpipe-stage.json").read_text())["output_hashes"]
    digests = {d.dataset.name: d.dataset.digest for d in pre.inputs.dataset_inputs}
    assert digests == {"shards": shard_hash["shards"][:32]}
    shard = tr.client.get_run(st["shard"]["run_id"])
    clean_hash = json.loads((Path(st["clean"]["artifact_dir"]) / ".llmpipe-stage.json").read_text())["output_hashes"]
    assert {d.dataset.name: d.dataset.digest for d in shard.inputs.dataset_inputs} == \
        {"documents": clean_hash["documents"][:32]}
    clean = tr.client.get_run(st["clean"]["run_id"])
    assert {d.dataset.name for d in clean.inputs.dataset_inputs} == {"raw/text_a", "raw/text_b"}
    spam = tr.client.get_run(st["spam"]["run_id"])
    assert [d.dataset.name for d in spam.inputs.dataset_inputs] == ["raw/sms"]
    assert any(k.startswith("system/cpu_utilization") for k in pre.data.metrics)
    assert any(k.startswith("system/system_memory_usage") for k in pre.data.metrics)


def test_prefect_names_artifacts_and_progress(runs):
    wd, first, second = runs
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    tr = _tracker(wd)
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(second["prefect_flow_run_id"])
        assert fr.name == tr.client.get_run(second["pipeline_run_id"]).info.run_name == second["name"]

        def latest(key):
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            return [a for a in found if str(a.flow_run_id) in (first["prefect_flow_run_id"],
                                                               second["prefect_flow_run_id"])]

        table = [a for a in latest("llmpipe-summary") if str(a.flow_run_id) == second["prefect_flow_run_id"]]
        assert len(table) == 1 and table[0].type == "table" and "spam" in str(table[0].data)
        md = latest("pretrain-summary")
        assert len(md) == 1 and "MLflow run" in md[0].data and first["stages"]["pretrain"]["run_id"] in md[0].data
        progress = latest("pretrain-progress")
        assert len(progress) == 1 and float(progress[0].data) == 100.0
