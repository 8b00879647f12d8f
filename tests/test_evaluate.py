"""Tests of llm/evaluate.py on tiny untrained and trained checkpoints over shards the test writes.

Run: python -m pytest -q tests/test_evaluate.py
"""
import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from llm.checkpoint import save_model
from llm.config import EvaluateConfig, PretrainConfig, ShardConfig
from llm.evaluate import metric_name, run_evaluate
from llm.generate import generate
from llm.model import GPT, GPTConfig
from llm.shards import TokenWindows, read_tokens, run_shard
from llm.tokenizer import get_encoding

WORDS = ("the a of and to in he she it was his her that with as for had you not be on at by but they "
         "picture painter studio gallery verdict canvas light morning evening house garden letter window "
         "quiet small great old young heard saw said thought looked turned smiled answered asked").split()
CFG = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=2, n_layers=2)


def write_shards(folder: Path, docs: dict[str, int], seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = {"doc_id": [], "source": [], "text": []}
    for src, n in docs.items():
        rows["doc_id"].append(f"{src}-0")
        rows["source"].append(src)
        rows["text"].append(" ".join(rng.choice(WORDS) for _ in range(n)))
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), folder / "documents.parquet")
    run_shard(ShardConfig(val_fraction=0.1), folder / "documents.parquet", folder / "shards", progress=False)
    return folder / "shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # "tiny src" has ~10 val tokens: fewer than one 17-token window
    return write_shards(tmp_path_factory.mktemp("c"), {"book_a": 1500, "book_b": 800, "tiny src": 60})


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(GPT(CFG), tmp_path_factory.mktemp("m") / "model", extra={"tokenizer": "gpt2"})


def reference_loss(model: GPT, tokens, ctx: int) -> float:
    ds = TokenWindows(tokens, ctx, ctx)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    with torch.no_grad():
        logits = model(torch.stack(xs))
    return float(F.cross_entropy(logits.flatten(0, 1), torch.stack(ys).flatten()))


def test_untrained_model_scores_about_ln_vocab(shards, untrained, tmp_path):
    logs = []
    res = run_evaluate(EvaluateConfig(max_new_tokens=5), shards, untrained, tmp_path, progress=False,
                       log=lambda m, s: logs.append(m))
    m = res.metrics
    assert abs(m["val_loss"] - math.log(50257)) < 0.05
    assert m["val_perplexity"] == math.exp(m["val_loss"])
    model = GPT(CFG)
    from llm.checkpoint import load_model
    model = load_model(untrained)
    assert m["val_loss"] == pytest.approx(reference_loss(model, read_tokens(shards, "val"), 16), abs=1e-5)
    assert m["val_loss_book_a"] == pytest.approx(
        reference_loss(model, read_tokens(shards, "val", source="book_a"), 16), abs=1e-5)
    assert m["val_perplexity_book_b"] == math.exp(m["val_loss_book_b"])
    assert "val_loss_tiny_src" in m  # shorter than a window: scored as one shorter window
    assert logs and logs[0]["val_loss"] == m["val_loss"]
    assert {p.name for p in res.artifacts} >= {"samples.md", "samples.json", "val_loss_by_source.png"}
    assert (tmp_path / "val_loss_by_source.png").read_bytes()[:4] == b"\x89PNG"
    table = json.loads((tmp_path / "val_by_source.json").read_text())
    assert set(table) == {"all", "book_a", "book_b", "tiny src"}


def test_samples_are_greedy_and_seeded(shards, untrained, tmp_path):
    cfg = EvaluateConfig(prompts=["Every effort moves you"], max_new_tokens=6, temperature=1.0, top_k=5, seed=3)
    run_evaluate(cfg, shards, untrained, tmp_path / "a", progress=False)
    run_evaluate(cfg, shards, untrained, tmp_path / "b", progress=False)
    a = json.loads((tmp_path / "a" / "samples.json").read_text())
    b = json.loads((tmp_path / "b" / "samples.json").read_text())
    assert a == b  # seeded
    from llm.checkpoint import load_model
    model = load_model(untrained)
    ids = get_encoding().encode("Every effort moves you")
    s = a["samples"][0]
    assert s["greedy_tokens"] == generate(model, ids, 6)
    assert s["sampled_tokens"] == generate(model, ids, 6, temperature=1.0, top_k=5, seed=3)
    md = (tmp_path / "a" / "samples.md").read_text()
    assert "**greedy:** Every effort moves you" in md and "top-k 5, seed 3" in md


def test_max_batches_caps_the_scored_tokens(shards, untrained, tmp_path):
    res = run_evaluate(EvaluateConfig(max_batches=1, batch_size=2, max_new_tokens=1), shards, untrained, tmp_path,
                       progress=False)
    assert res.metrics["val_tokens"] == 2 * 16


def test_trained_checkpoint_beats_uniform(shards, tmp_path):
    from llm.train import run_pretrain
    pcfg = PretrainConfig.model_validate(dict(
        model={"name": None, **CFG.to_dict()}, epochs=20, max_steps=40, batch_size=8, lr=5e-3, warmup_steps=0,
        eval_every=40, checkpoint_every=100, compile="off", threads=1, device="cpu"))
    pre = run_pretrain(pcfg, shards, tmp_path / "pre", progress=False)
    res = run_evaluate(EvaluateConfig(max_new_tokens=3), shards, pre.outputs["checkpoint"], tmp_path / "ev",
                       progress=False)
    assert res.metrics["val_loss"] < math.log(50257) - 3
    assert res.metrics["val_loss"] == pytest.approx(pre.metrics["val_loss"], abs=1e-4)  # same windows, same model
    assert res.metrics["val_perplexity"] == math.exp(res.metrics["val_loss"])


def test_errors_and_names(tmp_path, untrained):
    assert metric_name("Pride & Prejudice") == "Pride_Prejudice"
    with pytest.raises(FileNotFoundError, match="manifest.json: shard manifest not found"):
        run_evaluate(EvaluateConfig(), tmp_path / "nowhere", untrained, tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run_evaluate(EvaluateConfig(), tmp_path, tmp_path / "missing_ckpt", tmp_path / "o", progress=False)
