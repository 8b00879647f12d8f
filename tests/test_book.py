"""Book mode (`book_compat: true`) against the book's own functions from the installed `llms_from_scratch`
package, on the same inputs: appendix D's warmup from initial_lr with clipping only after the warmup
(per-step learning rates, and a whole training loop).

Run: python -m pytest -x -q tests/test_book.py
"""
from __future__ import annotations

import json

import pytest
import torch

from llm.shards import TokenWindows, read_tokens
from llm.train import lr_at, run_pretrain
from test_train import TINY, tiny_cfg, write_shards


def test_appendix_d_learning_rates_per_step():
    """Our book-mode schedule equals appendix D's formula at every step; the default warmup stays ours."""
    cfg = tiny_cfg(book_compat=True, lr=4e-4, initial_lr=3e-5, min_lr=1e-6, warmup_steps=4)
    total = 20
    inc = (4e-4 - 3e-5) / 4
    ours = [lr_at(s, cfg, total) for s in range(total)]
    assert ours[:4] == [3e-5 + s * inc for s in range(4)]
    assert ours[0] == 3e-5 and ours[4] == pytest.approx(4e-4, abs=1e-18)
    default = tiny_cfg(lr=4e-4, warmup_steps=4)
    assert [lr_at(s, default, total) for s in range(4)] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4], abs=1e-18)


def test_appendix_d_training_loop_replayed_within_1e6(tmp_path):
    """llms_from_scratch.appendix_d.train_model (warmup from initial_lr, cosine to min_lr, clipping from the
    end of the warmup) and run_pretrain(book_compat) give the same learning rates and the same losses."""
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    app_d = pytest.importorskip("llms_from_scratch.appendix_d")
    from llm.tokenizer import get_encoding

    cfg = tiny_cfg(book_compat=True, epochs=2, batch_size=2, lr=4e-3, initial_lr=3e-5, min_lr=1e-6,
                   weight_decay=0.1, schedule="cosine", warmup_steps=6, grad_clip=1.0, betas=(0.9, 0.999),
                   eval_every=5, eval_batches=5, checkpoint_every=1000, seed=123, dtype="float32")
    shards = write_shards(tmp_path / "corpus", {"s": 600}, seed=3)  # ~40 windows: 2 epochs of ~20 steps
    ctx = TINY["context_length"]
    train = TokenWindows(read_tokens(shards, "train"), ctx, ctx)
    val = TokenWindows(read_tokens(shards, "val"), ctx, ctx)
    torch.manual_seed(123)
    book = ch04.GPTModel(dict(TINY))
    opt = torch.optim.AdamW(book.parameters(), lr=4e-3, weight_decay=0.1)
    train_loader = torch.utils.data.DataLoader(train, batch_size=2, shuffle=True, drop_last=True)
    val_loader = torch.utils.data.DataLoader(val, batch_size=2, shuffle=False, drop_last=False)
    torch.set_num_threads(1)
    book_train, book_val, book_tokens, book_lrs = app_d.train_model(
        book, train_loader, val_loader, opt, "cpu", n_epochs=2, eval_freq=5, eval_iter=5,
        start_context="Every effort moves you", tokenizer=get_encoding(), warmup_steps=6, initial_lr=3e-5,
        min_lr=1e-6)

    total = len(train_loader) * 2
    assert [lr_at(s, cfg, total) for s in range(total)] == pytest.approx(book_lrs, abs=1e-12)
    run_pretrain(cfg, shards, tmp_path / "ours", progress=False)
    hist = json.loads((tmp_path / "ours" / "history.json").read_text())
    assert hist["tokens_seen"] == book_tokens
    assert hist["train_loss"] == pytest.approx(book_train, abs=1e-6)
    assert hist["val_loss"] == pytest.approx(book_val, abs=1e-6)
