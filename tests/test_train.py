"""Tests of llm/train.py: schedule, data order, the book's loop replayed exactly, exact resume
(in-process stop and a real kill -9), atomic checkpoints, short data, DDP == gradient accumulation.

Run: python -m pytest -q tests/test_train.py
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from llm.checkpoint import load_model
from llm.config import PretrainConfig, ShardConfig
from llm.model import GPT, GPTConfig
from llm.shards import TokenWindows, read_tokens, run_shard
from llm.checkpoint import list_checkpoints
from llm.pretrain_data import DataOrder
from llm.pretrain_rules import book_init_, draw_seed
from llm.train import lr_at, run_pretrain
from llm.training import TrainingInterrupted, param_groups

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the a of and to in he she it was his her that with as for had you not be on at by but they "
         "picture painter studio gallery verdict canvas light morning evening house garden letter window "
         "quiet small great old young heard saw said thought looked turned smiled answered asked knew felt "
         "Gisburn Stroud Rickham Jack Mrs never always again once more than only very much still").split()


def write_shards(folder: Path, docs: dict[str, int], seed: int = 0) -> Path:
    """documents.parquet with one document of n pseudo-words per source, sharded with the book's tail split."""
    rng = random.Random(seed)
    rows = {"doc_id": [], "source": [], "text": []}
    for src, n in docs.items():
        words = [rng.choice(WORDS) for _ in range(n)]
        text = " ".join(w + ("." if rng.random() < 0.1 else "") for w in words)
        rows["doc_id"].append(f"{src}-0")
        rows["source"].append(src)
        rows["text"].append(text)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), folder / "documents.parquet")
    run_shard(ShardConfig(val_fraction=0.1, split="tail"), folder / "documents.parquet", folder / "shards",
              progress=False)
    return folder / "shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("corpus"), {"book_a": 1200, "book_b": 600})


TINY = dict(vocab_size=50257, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1,
            qkv_bias=False, tie_weights=False)


def tiny_cfg(**kw) -> PretrainConfig:
    base = dict(model={"name": None, **TINY}, epochs=2, batch_size=4, lr=2e-3, min_lr=1e-4, warmup_steps=3,
                schedule="cosine", eval_every=5, eval_batches=4, checkpoint_every=4, keep_checkpoints=2,
                compile="off", threads=1, seed=7, device="cpu")
    base.update(kw)
    return PretrainConfig.model_validate(base)


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------------------------- units

def test_lr_schedule_warmup_cosine_constant():
    cfg = tiny_cfg(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 14) == 1.0
    assert lr_at(9, cfg, 14) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr_at(14, cfg, 14) == pytest.approx(0.1)
    const = tiny_cfg(lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(s, const, 10) for s in range(10)} == {0.5}


def test_weight_decay_only_on_matrices():
    m = GPT(GPTConfig(**{**TINY, "vocab_size": 50}))
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))
    assert len(param_groups(m, 0.1, decay_all=True)) == 1


def test_data_order_partitions_and_pads():
    o = DataOrder(n=10, batch_size=2, grad_accum=2, world=1)
    assert o.steps_per_epoch == 2  # 10 // 4, the incomplete tail is dropped like drop_last
    perm = o.permutation(3)
    assert sorted(perm.tolist()) == list(range(10))
    got = [o.micro_batch(perm, s, m, 0) for s in range(2) for m in range(2)]
    assert sum(got, []) == perm[:8].tolist()
    # DDP: the same global step consumes the same windows split over ranks
    ddp = DataOrder(n=10, batch_size=2, grad_accum=1, world=2)
    assert ddp.steps_per_epoch == 2
    for s in range(2):
        assert sorted(ddp.micro_batch(perm, s, 0, 0) + ddp.micro_batch(perm, s, 0, 1)) == \
            sorted(o.micro_batch(perm, s, 0, 0) + o.micro_batch(perm, s, 1, 0))
    # fewer windows than one global batch: every rank still gets a full batch (repeats)
    small = DataOrder(n=3, batch_size=2, grad_accum=1, world=4)
    assert small.steps_per_epoch == 1
    p = small.permutation(0)
    batches = [small.micro_batch(p, 0, 0, r) for r in range(4)]
    assert all(len(b) == 2 for b in batches) and set(sum(batches, [])) == {0, 1, 2}


def test_book_shuffle_replays_torch_dataloader():
    ds = list(range(11))
    torch.manual_seed(5)
    dl = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True, drop_last=True)
    first = [b.tolist() for b in dl]
    second = [b.tolist() for b in dl]
    after = torch.get_rng_state()
    torch.manual_seed(5)
    ours = []
    for _ in range(2):
        draw_seed()  # the iterator's base seed
        perm = torch.randperm(11, generator=torch.Generator().manual_seed(draw_seed())).tolist()
        ours.append([perm[i:i + 2] for i in range(0, 10, 2)])
    assert ours == [first, second]
    assert torch.equal(torch.get_rng_state(), after)


def test_book_init_matches_the_books_gptmodel():
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    book_cfg = {**TINY, "vocab_size": 300}
    torch.manual_seed(123)
    book = ch04.GPTModel(book_cfg)
    ours = GPT(GPTConfig(**book_cfg))
    book_init_(ours, 123)
    for i, blk in enumerate(book.trf_blocks):
        a, o = blk.att, ours.trf_blocks[i]
        assert torch.equal(o.att.qkv.weight, torch.cat([a.W_query.weight, a.W_key.weight, a.W_value.weight]))
        assert torch.equal(o.att.out_proj.bias, a.out_proj.bias)
        assert torch.equal(o.ff.fc2.weight, blk.ff.layers[2].weight)
    assert torch.equal(ours.tok_emb.weight, book.tok_emb.weight)
    assert torch.equal(ours.out_head.weight, book.out_head.weight)
    ours_rng = torch.get_rng_state()  # the same number of draws as the book's constructor
    torch.manual_seed(123)
    ch04.GPTModel(book_cfg)
    assert torch.equal(ours_rng, torch.get_rng_state())
    book.eval(), ours.eval()
    x = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(ours(x), book(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- the loop

def test_book_compat_replays_the_books_training_loop(tmp_path):
    """llms_from_scratch's own train_model_simple (chapter 5) and run_pretrain(book_compat) give the same
    losses on the same windows, dropout 0.1 included: same init, shuffles, dropout masks, eval schedule."""
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    ch05 = pytest.importorskip("llms_from_scratch.ch05")
    from llm.tokenizer import get_encoding

    cfg = tiny_cfg(book_compat=True, epochs=2, batch_size=2, lr=4e-4, weight_decay=0.1, schedule="constant",
                   warmup_steps=0, grad_clip=None, betas=(0.9, 0.999), eval_every=5, eval_batches=5,
                   checkpoint_every=1000, seed=123, dtype="float32")
    shards = write_shards(tmp_path / "corpus", {"s": 600}, seed=3)  # ~40 windows: 2 epochs of ~20 steps
    ctx = TINY["context_length"]
    train = TokenWindows(read_tokens(shards, "train"), ctx, ctx)
    val = TokenWindows(read_tokens(shards, "val"), ctx, ctx)
    torch.manual_seed(123)
    book = ch04.GPTModel(dict(TINY))
    opt = torch.optim.AdamW(book.parameters(), lr=0.0004, weight_decay=0.1)
    train_loader = torch.utils.data.DataLoader(train, batch_size=2, shuffle=True, drop_last=True)
    val_loader = torch.utils.data.DataLoader(val, batch_size=2, shuffle=False, drop_last=False)
    torch.set_num_threads(1)
    book_train, book_val, book_tokens = ch05.train_model_simple(
        book, train_loader, val_loader, opt, "cpu", num_epochs=2, eval_freq=5, eval_iter=5,
        start_context="Every effort moves you", tokenizer=get_encoding())

    res = run_pretrain(cfg, shards, tmp_path / "ours", progress=False)
    hist = json.loads((tmp_path / "ours" / "history.json").read_text())
    assert hist["tokens_seen"] == book_tokens
    assert hist["train_loss"] == pytest.approx(book_train, abs=1e-5)
    assert hist["val_loss"] == pytest.approx(book_val, abs=1e-5)
    assert res.metrics["train_loss"] == pytest.approx(book_train[-1], abs=1e-5)


@pytest.mark.parametrize("book", [False, True])
@pytest.mark.slow
def test_stop_and_resume_is_exact(shards, tmp_path, book):
    kw = dict(book_compat=True, weight_decay=0.1) if book else {}
    cfg = tiny_cfg(**kw)
    full = run_pretrain(cfg, shards, tmp_path / "full", progress=False)
    total = int(full.params["total_steps"])
    assert total > 9
    seen = []
    with pytest.raises(TrainingInterrupted):
        run_pretrain(cfg, shards, tmp_path / "cut", progress=False, stop_after=6,
                     on_checkpoint=lambda p, s: seen.append((p.name, s)))
    assert seen == [("step-000004", 4)]  # the kill comes 2 steps after the last checkpoint
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step-000004"]
    resumed = run_pretrain(cfg, shards, tmp_path / "cut", progress=False)
    assert resumed.params["resumed_from_step"] == 4
    h_full = json.loads((tmp_path / "full" / "history.json").read_text())
    h_cut = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert h_cut["step"] == h_full["step"]
    assert h_cut["train_loss"] == pytest.approx(h_full["train_loss"], abs=1e-5)
    assert h_cut["val_loss"] == pytest.approx(h_full["val_loss"], abs=1e-5)
    a, b = weights(tmp_path / "full" / "model"), weights(tmp_path / "cut" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # keep_checkpoints=2: only the newest two remain; the final step is always saved
    names = [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")]
    assert len(names) == 2 and names[-1] == f"step-{total:06d}"


def test_artifacts_metrics_and_callbacks(shards, tmp_path):
    logs, ckpts = [], []
    res = run_pretrain(tiny_cfg(epochs=1), shards, tmp_path, progress=False,
                       log=lambda m, s: logs.append((s, m)), on_checkpoint=lambda p, s: ckpts.append(s))
    total = int(res.params["total_steps"])
    assert [s for s, _ in logs] == sorted({*range(5, total + 1, 5), total})
    assert all({"train_loss", "val_loss", "tokens_seen", "lr", "tokens_per_sec"} <= set(m) for _, m in logs)
    assert ckpts == sorted({*range(4, total + 1, 4), total})
    for k in ("train_loss", "val_loss", "tokens_seen", "tokens_per_sec", "params_total", "params_trainable"):
        assert k in res.metrics
    assert res.metrics["tokens_seen"] == total * 4 * 16
    assert res.metrics["params_total"] == res.metrics["params_trainable"] == GPT(GPTConfig(**TINY)).num_params()
    model = load_model(res.outputs["checkpoint"])
    assert res.outputs["checkpoint"] == tmp_path / "model"
    assert json.loads((tmp_path / "model" / "config.json").read_text())["llmpipe"]["tokenizer"] == "gpt2"
    assert model.cfg == GPTConfig(**TINY)
    names = {p.name for p in res.artifacts}
    assert {"loss.png", "samples.txt"} <= names
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "samples.txt").read_text().startswith("epoch 1 (step")


def test_short_corpus_errors_and_missing_val(tmp_path):
    tiny = write_shards(tmp_path / "c1", {"s": 8})  # ~10 tokens: no window of 17
    with pytest.raises(ValueError, match=r"train split has \d+ tokens, shorter than context_length\+1 = 17"):
        run_pretrain(tiny_cfg(), tiny, tmp_path / "o1", progress=False)
    short_val = write_shards(tmp_path / "c2", {"s": 120})  # val = last 10% of characters: 16 < 17 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # not skipped: scored as one window of 15 targets
        res = run_pretrain(tiny_cfg(epochs=5, max_steps=3), short_val, tmp_path / "o2", progress=False)
    assert "val" not in res.params and res.params["val_windows"] == 1
    assert res.metrics["val_loss"] > 0 and res.metrics["steps"] == 3


def test_resume_refuses_a_different_model(shards, tmp_path):
    run_pretrain(tiny_cfg(max_steps=4), shards, tmp_path, progress=False)
    other = tiny_cfg(max_steps=4, model={"name": None, **TINY, "emb_dim": 64})
    with pytest.raises(ValueError, match="checkpoint model config .* differs"):
        run_pretrain(other, shards, tmp_path, progress=False)


@pytest.mark.slow
def test_kill_9_leaves_no_partial_checkpoint_and_resume_ends_identically(shards, tmp_path):
    cfg = tiny_cfg(epochs=3, max_steps=40, checkpoint_every=1, keep_checkpoints=3, eval_every=1000)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "llm.train", "--config", str(tmp_path / "cfg.json"), "--shards", str(shards),
           "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ck = out / "checkpoints"
    deadline = time.time() + 180
    killed_mid_write = False
    try:
        while time.time() < deadline and proc.poll() is None:
            names = [p.name for p in ck.iterdir()] if ck.is_dir() else []
            done = [n for n in names if n.startswith("step-")]
            if len(done) >= 2 and any(n.startswith(".step-") for n in names):
                killed_mid_write = True  # a save is in progress right now
                break
            if len(done) >= 6:
                break
            time.sleep(0.0005)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    complete = list_checkpoints(ck)
    assert complete, "no checkpoint was written before the kill"
    for p in ck.iterdir():  # every visible step folder is complete and loadable
        if not p.name.startswith("."):
            assert p in complete
            load_model(p)
    print("killed while a checkpoint was being written:", killed_mid_write)
    resumed = run_pretrain(cfg, shards, out, progress=False)
    assert resumed.params["resumed_from_step"] == int(complete[-1].name.split("-")[1])
    assert not any(p.name.startswith(".") for p in ck.iterdir())  # stale temp folders are removed
    ref = run_pretrain(cfg, shards, tmp_path / "ref", progress=False)
    a, b = weights(tmp_path / "ref" / "model"), weights(out / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["train_loss"] == pytest.approx(ref.metrics["train_loss"], abs=1e-5)


@pytest.mark.slow
def test_ddp_two_processes_equal_gradient_accumulation(shards, tmp_path):
    base = dict(epochs=1, max_steps=6, batch_size=2, eval_every=3, checkpoint_every=3)
    model = {"name": None, **TINY, "drop_rate": 0.0}
    single = run_pretrain(tiny_cfg(**{**base, "grad_accum": 2, "model": model}), shards, tmp_path / "one",
                          progress=False)
    logs = []
    ddp = run_pretrain(tiny_cfg(**{**base, "grad_accum": 1, "nproc": 2, "model": model}), shards, tmp_path / "two",
                       progress=False, log=lambda m, s: logs.append(s))
    assert ddp.params["world_size"] == 2 and ddp.params["global_batch"] == 4
    assert logs == [3, 6]
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert h1["tokens_seen"] == h2["tokens_seen"]
    assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=1e-5)
    assert h2["val_loss"] == pytest.approx(h1["val_loss"], abs=1e-5)
    a, b = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_token_ids_outside_the_vocabulary_are_a_clear_error(shards, tmp_path):
    # up front: a vocabulary smaller than the GPT-2 tokenizer's is a config error naming the field
    with pytest.raises(ValueError, match=r"vocab_size: expected >= 50257 \(the GPT-2 tokenizer's vocabulary\), got 1000"):
        tiny_cfg(model={"name": None, **TINY, "vocab_size": 1000})
    # behind it, the data check (shards written by another tokenizer): ids are checked against the model
    small = tiny_cfg()
    object.__setattr__(small.model, "vocab_size", 1000)  # past the validator, as such shards would be
    with pytest.raises(ValueError, match=r"train token id \d+ is outside the model's vocabulary .*vocab_size = 1000"):
        run_pretrain(small, shards, tmp_path, progress=False)
