"""spam and instruct side by side, each in a process of its own (orchestration.concurrent_finetunes).

- When the machine allows it (exact table of cores/GPUs -> shares).
- A real pipeline run with both finetunes concurrent gives byte-identical classifier, model and
  responses to a run with them one after the other (same thread counts), and records it in MLflow.
- A failure inside the stage's process reaches the flow with its type and one-line message.

    python -m pytest -q tests/test_isolate.py
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from flows.isolate import Share, finetune_shares
from llm.config import load_config


@pytest.mark.parametrize("mode, cores, gpus, expected", [
    ("auto", 2, 0, None),                                      # this machine: one after the other
    ("auto", 3, 0, None),
    ("auto", 4, 0, {"spam": Share(2), "instruct": Share(2)}),
    ("auto", 9, 0, {"spam": Share(4), "instruct": Share(5)}),
    ("auto", 16, 1, None),                                     # one GPU: they would queue on it
    ("auto", 16, 2, {"spam": Share(8, gpu=0), "instruct": Share(8, gpu=1)}),
    ("auto", 2, 4, {"spam": Share(1, gpu=0), "instruct": Share(1, gpu=1)}),
    (True, 2, 0, {"spam": Share(1), "instruct": Share(1)}),    # forced on
    (True, 1, 1, {"spam": Share(1), "instruct": Share(1)}),
    (False, 64, 8, None),
])
def test_when_finetunes_run_concurrently(mode, cores, gpus, expected):
    cfg = load_config("tiny", overrides=[f"orchestration.concurrent_finetunes={str(mode).lower()}"])
    assert finetune_shares(cfg, cores=cores, gpus=gpus) == expected


def test_each_finetune_process_gets_its_own_cpus():
    """finetune_shares splits allowed_cores() (the CPU affinity); share_cpus gives spam the first part of
    the CPU list and instruct the rest, so the two child processes never share a core."""
    import os

    from flows.isolate import share_cpus

    cpus = sorted(os.sched_getaffinity(0))
    cfg = load_config("tiny", overrides=["orchestration.concurrent_finetunes=true"])
    shares = finetune_shares(cfg, gpus=0)
    half = max(1, len(cpus) // 2)
    assert shares == {"spam": Share(half), "instruct": Share(max(1, len(cpus) - half))}
    spam, instruct = share_cpus("spam", shares["spam"]), share_cpus("instruct", shares["instruct"])
    assert spam == cpus[:half] and instruct == cpus[len(cpus) - len(instruct):]
    if len(cpus) >= 2:
        assert spam + instruct == cpus
    assert share_cpus("spam", Share(4)) == cpus[:4] and share_cpus("pretrain", Share(1)) is None


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.suffix not in (".png", ".json")}


# fixed thread counts: results differ in the last bits between thread counts, and with threads 0 a
# concurrent finetune gets its half of the cores while the sequential one gets them all
FINETUNES = ["pretrain.threads=1", "spam.threads=1", "instruct.threads=1", "instruct.max_records=40",
             "instruct.max_length=32", "instruct.test_limit=2", "instruct.max_new_tokens=4", "instruct.eval_every=2",
             "instruct.max_steps=3"]


@pytest.mark.slow
def test_concurrent_finetunes_match_one_after_the_other(prefect_harness, tmp_path, monkeypatch):
    from flows.pipeline import pipeline
    from flows.tracking import Tracker
    from tests.test_pipeline import TEST_OVERRIDES, write_fixture_workdir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    wd_seq, wd_con = write_fixture_workdir(tmp_path / "seq"), write_fixture_workdir(tmp_path / "con")
    base = TEST_OVERRIDES + FINETUNES
    seq = pipeline(stages=["spam", "instruct"], preset="tiny", workdir=str(wd_seq), progress=False,
                   overrides=base + ["orchestration.concurrent_finetunes=false"])
    con = pipeline(stages=["spam", "instruct"], preset="tiny", workdir=str(wd_con), progress=False,
                   overrides=base + ["orchestration.concurrent_finetunes=true"])
    again = pipeline(stages=["spam", "instruct"], preset="tiny", workdir=str(wd_con), progress=False,
                     overrides=base + ["orchestration.concurrent_finetunes=true"])
    for stage in ("spam", "instruct"):
        assert con["stages"][stage]["cache_key"] == seq["stages"][stage]["cache_key"]
        a, b = _tree(Path(seq["stages"][stage]["artifact_dir"])), _tree(Path(con["stages"][stage]["artifact_dir"]))
        assert a == b and any(n.endswith(".safetensors") for n in a), stage
        skip = {"stage_seconds", "seconds", "train_seconds", "examples_per_sec", "tokens_per_sec"}
        ma = {k: v for k, v in seq["stages"][stage]["metrics"].items() if k not in skip and "seconds" not in k}
        mb = {k: v for k, v in con["stages"][stage]["metrics"].items() if k not in skip and "seconds" not in k}
        assert ma == mb, stage
        assert again["stages"][stage]["cached"]

    assert Tracker(wd_seq).client.get_run(seq["pipeline_run_id"]).data.params["concurrent_finetunes"] == "none"
    tr = Tracker(wd_con)
    assert tr.client.get_run(con["pipeline_run_id"]).data.params["concurrent_finetunes"] == "spam,instruct"
    assert tr.client.get_run(again["pipeline_run_id"]).data.params["concurrent_finetunes"] == "none"  # all cached
    spam_run = tr.client.get_run(con["stages"]["spam"]["run_id"])
    assert spam_run.data.tags["concurrent_with"] == "instruct"
    assert spam_run.data.metrics["test_accuracy"] == con["stages"]["spam"]["metrics"]["test_accuracy"]
    history = tr.client.get_metric_history(con["stages"]["instruct"]["run_id"], "train_loss")
    assert len(history) >= 2  # metrics logged from the stage's process arrive step by step
    assert tr.client.get_run(con["stages"]["instruct"]["run_id"]).data.tags["concurrent_with"] == "spam"


def test_error_in_the_stage_process_keeps_its_type_and_message(tmp_path):
    from flows.isolate import run_body
    from flows.stages import StageContext

    bad = tmp_path / "instr.json"
    bad.write_text('[{"instruction": "x", "output": "y"}, {"instruction": 3}]')
    cfg = load_config("tiny", overrides=[f"instruct.data={bad}", "instruct.init=pretrain"])
    logged = []
    ctx = StageContext(workdir=tmp_path, progress=False, log=lambda m, s: logged.append((m, s)))
    with pytest.raises(Exception) as info:
        run_body("instruct", cfg, {"pretrain": {"outputs": {"checkpoint": str(tmp_path / "none")}}}, tmp_path / "w",
                 ctx, Share(1))
    direct = None
    try:
        from flows.stages import STAGE_DEFS

        STAGE_DEFS["instruct"].body(cfg, {"pretrain": {"outputs": {"checkpoint": str(tmp_path / "none")}}},
                                    tmp_path / "w2", ctx)
    except Exception as e:  # the same failure in this process
        direct = e
    assert direct is not None
    assert type(info.value) is type(direct)
    assert str(info.value) == str(direct).replace(str(tmp_path / "w2"), str(tmp_path / "w"))


PARENT = r'''
import sys, random
from pathlib import Path
import torch
from flows.isolate import Share, run_body
from flows.stages import StageContext
from llm.checkpoint import save_model
from llm.config import load_config
from llm.model import GPT, GPTConfig

tmp = Path(sys.argv[1])
torch.manual_seed(0)
save_model(GPT(GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1)), tmp / "ckpt")
rng = random.Random(0)
lines = [("spam\tWIN a prize now call " if i % 3 == 0 else "ham\tsee you at lunch ") + str(rng.random())
         for i in range(60)]
(tmp / "sms.tsv").write_text("\n".join(lines))
cfg = load_config("tiny", overrides=[f"spam.source={tmp / 'sms.tsv'}", "spam.epochs=100000", "spam.max_steps=null",
                                     "spam.eval_every=1000000000", "spam.eval_batches=1", "spam.batch_size=2",
                                     "spam.max_length=16", "spam.baseline=false"])
ctx = StageContext(workdir=tmp, progress=False, log=lambda m, s: print("LOG", s, flush=True))
print("STARTING", flush=True)
run_body("spam", cfg, {"pretrain": {"outputs": {"checkpoint": str(tmp / "ckpt")}}}, tmp / "work", ctx, Share(1))
'''


def test_stage_process_ends_when_the_flow_process_is_killed(tmp_path):
    """kill -9 of the flow's process must not leave the finetune running on as an orphan, even when
    it is between two reports (nothing written to the pipe, so nothing breaks it)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        line = parent.stdout.readline()
        assert line.startswith("STARTING"), (line, parent.stderr.read() if parent.poll() is not None else "")

        def children() -> list[int]:
            out = []
            for status in Path("/proc").glob("[0-9]*/status"):
                try:
                    fields = dict(ln.split(":\t", 1) for ln in status.read_text().splitlines() if ":\t" in ln)
                except OSError:
                    continue
                if fields.get("PPid", "").strip() == str(parent.pid):
                    out.append(int(status.parent.name))
            return out

        deadline = time.time() + 30
        while not (kids := children()) and time.time() < deadline:
            time.sleep(0.2)
        assert kids, "the stage process was not found"
        time.sleep(4)  # past start-up, into training (which reports nothing before step 10^9)
        assert parent.poll() is None, parent.stderr.read()
        # the spam process is pinned to its share: the first of this process's allowed CPUs
        assert os.sched_getaffinity(kids[0]) == {sorted(os.sched_getaffinity(0))[0]}
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.time() + 20
        alive = kids
        while alive and time.time() < deadline:
            time.sleep(0.2)
            alive = [k for k in alive if Path(f"/proc/{k}").exists()
                     and "zombie" not in Path(f"/proc/{k}/status").read_text().lower()]
        assert not alive, f"stage process {alive} still runs after its flow process was killed"
    finally:
        if parent.poll() is None:
            parent.kill()
