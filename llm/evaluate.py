"""Evaluate stage: validation loss and perplexity (overall and per source) plus sample generations.

    from llm.evaluate import run_evaluate
    result = run_evaluate(cfg.evaluate, Path("data/shards"), Path("out/pretrain/model"), Path("out/eval"))
    result.metrics["val_loss"], result.metrics["val_perplexity"], result.metrics["val_loss_the_verdict"]

    python -m llm.evaluate SHARD_DIR CHECKPOINT_DIR OUT_DIR      # prints the metrics as JSON

Loss is the mean next-token cross-entropy over every token of non-overlapping context-length
windows of the val split (the book's calc_loss_loader, token-weighted), capped at cfg.max_batches
batches; perplexity = exp(loss). Each source is also scored on its own val tokens
(val_loss_<source>). The windows are llm.shards.TokenWindows (stride = context), the same as
pretrain's val_loss: a split or source shorter than one full window is scored as a single shorter
window rather than skipped. Samples: each prompt continued greedily and with temperature/top-k
sampling (seeded), written to samples.md and samples.json; a bar plot compares the sources.
The checkpoint may be an llmpipe checkpoint or a Hugging Face GPT-2 folder.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from llm.config import EvaluateConfig
from llm.fsutil import atomic_write_text, save_figure
from llm.generate import generate
from llm.procenv import allowed_cores
from llm.result import MetricLogger, StageResult, log_or_null
from llm.shards import TokenWindows, read_tokens, sources
from llm.tokenizer import get_encoding
from llm.pretrain_data import loss_sums
from llm.weights import load_pretrained


def metric_name(source: str) -> str:
    """A source name as an MLflow-safe metric suffix."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", source).strip("_") or "source"


def _score(model, windows: TokenWindows, cfg: EvaluateConfig, device, bar) -> tuple[float, int]:
    n = len(windows) if cfg.max_batches is None else min(len(windows), cfg.max_batches * cfg.batch_size)
    total, count = 0.0, 0
    for i in range(0, n, cfg.batch_size):  # batch by batch so the progress bar moves
        s, c = loss_sums(model, windows, list(range(i, min(n, i + cfg.batch_size))), cfg.batch_size, device)
        total, count = total + s, count + c
        bar.update(1)
    return total, count


def _plot(per_source: dict[str, float], overall: float, path: Path) -> Path:
    import matplotlib  # lazy: only this plot needs it, and the Agg backend must be chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_source)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.5))
    bars = ax.bar(names, [per_source[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.3f")
    ax.axhline(overall, color="tab:red", linestyle="--", label=f"all val: {overall:.3f}")
    ax.set_ylabel("Validation loss")
    ax.set_title("Validation loss by source")
    ax.legend(loc="lower right")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    return save_figure(fig, path)


def run_evaluate(cfg: EvaluateConfig, shard_dir: Path, checkpoint_dir: Path, out_dir: Path, progress: bool = True,
                 log: Optional[MetricLogger] = None) -> StageResult:
    """Score the val split (all and per source) and write sample generations; see the module docstring."""
    log = log_or_null(log)
    shard_dir, checkpoint_dir, out_dir = Path(shard_dir), Path(checkpoint_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(allowed_cores())  # the cores this process may use, never the load
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(str(checkpoint_dir)).to(device).eval()
    ctx = model.cfg.context_length

    # 1. loss and perplexity over the val windows: all sources together, then each source
    all_tokens = read_tokens(shard_dir, "val")  # checks the shard hashes once
    if len(all_tokens) < 2:
        raise ValueError(f"{shard_dir}: the val split has {len(all_tokens)} tokens; at least 2 are needed to score "
                         "a next-token loss (raise shard.val_fraction or add text)")
    if int(all_tokens.max()) >= model.cfg.vocab_size:
        raise ValueError(f"{shard_dir}: val token id {int(all_tokens.max())} is outside the model's vocabulary "
                         f"({model.cfg.vocab_size}) in {checkpoint_dir}")
    sets = {"": TokenWindows(all_tokens, ctx, ctx)}
    for src in sources(shard_dir):
        toks = read_tokens(shard_dir, "val", source=src, verify=False)
        if len(toks) >= 2:
            sets[src] = TokenWindows(toks, ctx, ctx)
    n_batches = sum(-(-(len(w) if cfg.max_batches is None else min(len(w), cfg.max_batches * cfg.batch_size))
                      // cfg.batch_size) for w in sets.values())
    metrics: dict[str, float] = {}
    per_source: dict[str, float] = {}
    with tqdm(total=n_batches, desc="evaluate", unit="batch", disable=not progress) as bar:
        for src, windows in sets.items():
            total, count = _score(model, windows, cfg, device, bar)
            loss = total / count
            if src == "":
                metrics.update(val_loss=loss, val_perplexity=math.exp(loss), val_tokens=float(count))
            else:
                name = metric_name(src)
                per_source[src] = loss
                metrics[f"val_loss_{name}"] = loss
                metrics[f"val_perplexity_{name}"] = math.exp(loss)
    log(metrics, 0)

    # 2. samples: greedy and sampled continuations of every prompt
    enc = get_encoding()
    samples = []
    for prompt in cfg.prompts:
        ids = enc.encode(prompt, allowed_special={"<|endoftext|>"})
        if not ids:
            raise ValueError(f"evaluate.prompts: prompt {prompt!r} encodes to no tokens")
        ids = ids[-ctx:]
        greedy = generate(model, ids, cfg.max_new_tokens, temperature=0.0)
        sampled = generate(model, ids, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                           seed=cfg.seed)
        samples.append({"prompt": prompt, "greedy": enc.decode(greedy), "sampled": enc.decode(sampled),
                        "greedy_tokens": greedy, "sampled_tokens": sampled})
    settings = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_k": cfg.top_k,
                "seed": cfg.seed}
    atomic_write_text(out_dir / "samples.json", json.dumps({"settings": settings, "samples": samples}, indent=2))
    md = [f"# Samples from {checkpoint_dir}", "",
          f"val loss {metrics['val_loss']:.4f}, perplexity {metrics['val_perplexity']:.2f}", ""]
    for s in samples:
        md += [f"## {s['prompt']!r}", "", f"**greedy:** {s['prompt']}{s['greedy']}", "",
               f"**temperature {cfg.temperature}, top-k {cfg.top_k}, seed {cfg.seed}:** {s['prompt']}{s['sampled']}", ""]
    atomic_write_text(out_dir / "samples.md", "\n".join(md))

    # 3. per-source plot and table
    table = {"all": {"val_loss": metrics["val_loss"], "val_perplexity": metrics["val_perplexity"]},
             **{s: {"val_loss": v, "val_perplexity": math.exp(v)} for s, v in per_source.items()}}
    atomic_write_text(out_dir / "val_by_source.json", json.dumps(table, indent=2))
    artifacts = [out_dir / "samples.md", out_dir / "samples.json", out_dir / "val_by_source.json"]
    if per_source:
        artifacts.append(_plot(per_source, metrics["val_loss"], out_dir / "val_loss_by_source.png"))
    return StageResult(metrics=metrics,
                       params={"checkpoint": str(checkpoint_dir), "context_length": ctx,
                               "val_windows": len(sets[""]), "sources": ",".join(per_source)},
                       artifacts=artifacts, outputs={"samples": out_dir / "samples.json"})


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m llm.evaluate SHARD_DIR CHECKPOINT_DIR OUT_DIR")
    res = run_evaluate(EvaluateConfig(), Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    print(json.dumps(res.metrics, indent=2))
