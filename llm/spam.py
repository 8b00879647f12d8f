"""Spam classification finetune (the book's chapter 6, with appendix E's LoRA as an option).

The stage reads the UCI SMS Spam Collection (`label<TAB>text` lines), balances it by
undersampling ham, splits it 70/10/20 like the book, and finetunes a GPT backbone whose
vocabulary head is replaced by a 2-class Linear head read at each message's LAST REAL token.

    from pathlib import Path
    from llm.config import SpamConfig
    from llm.spam import run_spam, load_classifier
    res = run_spam(SpamConfig(init="gpt2"), Path("SMSSpamCollection"), Path("out/spam"))
    clf = load_classifier(res.outputs["classifier"])
    clf.predict(["You won a free prize, call now"])     # [("spam", 0.98)]

Run as a script on the real data (pretrain checkpoint folder or gpt2*/HF folder as the backbone):

    python -m llm.spam SMSSpamCollection OUT_DIR --checkpoint CKPT_DIR [--set train_mode=all ...]
    python -m llm.spam SMSSpamCollection OUT_DIR --set init=gpt2

The recipe (run_spam) reads top to bottom: prepare_data → encode_splits → prepare_model →
train (train_step, eval_running) → final_metrics → write_outputs → export_classifier.
The data side lives in llm/spam_data.py, the classifier head and inference (Classifier,
load_classifier, classify_file) in llm/spam_infer.py; this module re-exports their names.

Details that differ from the book on purpose:
- Parsing splits each line on its FIRST tab, so stray quote characters cannot merge lines
  (pandas' default quoting gives 5572 rows on the real file; this gives all 5574).
- Each message is truncated to L tokens (L = cfg.max_length or the longest training message,
  capped by the model's context length) and padded with <|endoftext|> (50256). The class is
  read from the hidden state at the message's true last token, not at position -1 (which is
  a pad for every message shorter than the longest). With right padding and causal attention
  the real tokens never see the pads, so a batch is padded only up to its own longest
  message: the logits are the same as with padding to L, at a fraction of the compute.
- Book mode (cfg.book_compat) replays the chapter instead: pandas read_csv parsing (5572 rows),
  every message padded to L and the class read at position -1, appendix E's LoRA. Every such
  choice of the recipe is in the "Book mode" section below.
- train_loss / train_accuracy logged during training are running means over the training
  batches since the previous evaluation; val_* are evaluated on up to cfg.eval_batches batches.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llm.checkpoint import save_model
from llm.config import LORA_TARGETS, SpamConfig, section_from_overrides
from llm.fsutil import atomic_write_bytes
from llm.lora import apply_lora, merge_lora
from llm.model import GPT
from llm.result import MetricLogger, StageResult, log_or_null
from llm.spam_data import (LABELS, MALFORMED_REASONS, PAD_ID, Batches, SmsData, balance_and_split,
                           encode_texts, pad_batch, read_sms_collection, read_sms_pandas)
from llm.spam_infer import (BOOK_READOUT, Classifier, add_classification_head, classify_file,
                            classify_logits, last_token_hidden, load_classifier)
from llm.spam_plots import plot_confusion, plot_curves
from llm.tokenizer import get_encoding
from llm.training import (TrainingInterrupted, TrainState, load_base, make_adamw, pick_device, stop_hook,
                          torch_threads)


__all__ = [  # this module's API, including what it re-exports from llm.spam_data and llm.spam_infer
    "LABELS", "MALFORMED_REASONS", "PAD_ID", "Batches", "SmsData", "balance_and_split", "encode_texts", "pad_batch",
    "read_sms_collection", "read_sms_pandas", "Classifier", "add_classification_head", "classify_file",
    "classify_logits", "last_token_hidden", "load_classifier", "run_spam", "set_train_mode", "evaluate",
    "tfidf_baseline", "TrainingInterrupted", "main"]


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------

def run_spam(cfg: SpamConfig, data_file: Path, out_dir: Path, base_checkpoint: Optional[Path] = None,
             progress: bool = True, log: Optional[MetricLogger] = None,
             stop_after: Optional[int] = None) -> StageResult:
    """Finetune a GPT backbone as a ham/spam classifier; write splits, plots, predictions, classifier.

    Returns metrics (accuracies, test F1/precision/recall, the TF-IDF baseline, split counts),
    artifacts (split parquets, test_predictions.parquet, loss/accuracy/confusion PNGs) and
    outputs {"classifier": out_dir/"classifier"} (load it with load_classifier).
    Runs with cfg.threads torch threads (0 = the cores this process may use: its CPU affinity),
    restored afterwards.
    Every cfg.checkpoint_every steps the run saves out_dir/checkpoints/step-N (weights, optimizer,
    RNG, position in the data); running again with the same out_dir resumes from the newest one
    and ends exactly where the uninterrupted run would have (the checkpoints are deleted at the end).
    `stop_after` (tests) raises TrainingInterrupted after that optimizer step, as a kill would.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log_or_null(log)
    t_start = time.time()
    with torch_threads(cfg.threads):
        data, frames, artifacts = prepare_data(cfg, data_file, out_dir)
        backbone = load_base(cfg.init, base_checkpoint, "spam")
        device = pick_device("auto")
        ids, L = encode_splits(frames, cfg.max_length, backbone.cfg.context_length)
        net, wrapped = prepare_model(cfg, backbone, device)
        batches = make_batches(cfg, frames, ids, L)
        # weight decay on every trainable parameter, one group (the book's AdamW; as spam always did)
        opt = make_adamw(net, cfg.lr, cfg.weight_decay, decay_all=True)
        identity = resume_identity(cfg, ids["train"], frames["train"], net)
        run = train(cfg, net, opt, batches, device, out_dir / "checkpoints", identity, log, progress, stop_after)
        metrics, test_pred, test_prob = final_metrics(cfg, net, frames, batches, device)
        metrics.update(data_metrics(data, frames, L))
        metrics.update(model_metrics(net, run))
        if cfg.baseline:
            acc, f1 = tfidf_baseline(frames["train"], frames["test"], cfg.seed)
            metrics["baseline_test_accuracy"], metrics["baseline_test_f1"] = acc, f1
        artifacts += write_outputs(cfg, run.history, frames["test"], test_pred, test_prob,
                                   metrics["test_accuracy"], out_dir)
        clf_dir = export_classifier(cfg, net, wrapped, L, metrics["test_accuracy"], out_dir)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # only for resuming; the classifier is the result
        threads = torch.get_num_threads()
    metrics["stage_seconds"] = time.time() - t_start
    params = {"max_length": L, "train_mode": cfg.train_mode, "lora_modules": len(wrapped), "backbone": cfg.init,
              "device": str(device), "threads": threads, "resumed_from_step": run.resumed_from}
    return StageResult(metrics=metrics, params=params, artifacts=artifacts, outputs={"classifier": clf_dir})


# --------------------------------------------------------------------------------------------
# Book mode (cfg.book_compat): every place the recipe replays the chapter instead of our choice
# --------------------------------------------------------------------------------------------

def read_data(cfg: SpamConfig, data_file: Path) -> SmsData:
    """Book mode: the book's pandas read_csv parse (5572 rows of the real file).
    Ours: each line split on its first tab (all 5574), malformed lines an error or skipped."""
    if cfg.book_compat:
        return read_sms_pandas(data_file)
    return read_sms_collection(data_file, skip_malformed=cfg.skip_malformed)


def pad_length(cfg: SpamConfig, max_length: int) -> Optional[int]:
    """Book mode: every message padded to L and the class read at position -1 (a pad for every
    shorter message). Ours (None): each batch padded to its longest, read at the last real token."""
    return max_length if cfg.book_compat else None


def readout_name(cfg: SpamConfig) -> str:
    """How the classifier reads the class (config.json llmpipe.readout; load_classifier follows it)."""
    return BOOK_READOUT if cfg.book_compat else "last token"


def lora_book(cfg: SpamConfig) -> bool:
    """Book mode: appendix E's LoRA (alpha scaling, separate Q/K/V adapters; llm.lora book=True)."""
    return cfg.book_compat


# --------------------------------------------------------------------------------------------
# Data and model preparation
# --------------------------------------------------------------------------------------------

def prepare_data(cfg: SpamConfig, data_file: Path, out_dir: Path
                 ) -> tuple[SmsData, dict[str, pd.DataFrame], list[Path]]:
    """Parse, balance and split 70/10/20 (seeded); write train/val/test.parquet."""
    data = read_data(cfg, data_file)
    train, val, test = balance_and_split(data.texts, data.labels, seed=cfg.seed)
    frames = {"train": train, "val": val, "test": test}
    return data, frames, [_write_parquet(df, out_dir / f"{name}.parquet") for name, df in frames.items()]


def encode_splits(frames: dict[str, pd.DataFrame], max_length: Optional[int], context_length: int
                  ) -> tuple[dict[str, list[list[int]]], int]:
    """Token ids of each split truncated to L (max_length or the longest training message, at
    most the context length), and L."""
    enc = get_encoding()
    train_ids = encode_texts(enc, frames["train"]["text"])
    L = min(max_length or max(len(s) for s in train_ids), context_length)
    return {"train": [s[:L] for s in train_ids],
            "val": encode_texts(enc, frames["val"]["text"], L),
            "test": encode_texts(enc, frames["test"]["text"], L)}, L


def prepare_model(cfg: SpamConfig, backbone: GPT, device: torch.device) -> tuple[GPT, list[str]]:
    """The backbone with a fresh (seeded) 2-class head and cfg.train_mode's trainable parameters,
    on device; also the names of the modules wrapped with LoRA adapters."""
    torch.manual_seed(cfg.seed)
    net = add_classification_head(backbone, len(LABELS))
    wrapped = set_train_mode(net, cfg.train_mode, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                             book=lora_book(cfg))
    net.to(device)
    return net, wrapped


def set_train_mode(model: GPT, mode: str, lora_rank: int = 16, lora_alpha: float = 16.0,
                   lora_targets: Sequence[str] = LORA_TARGETS, book: bool = False) -> list[str]:
    """Choose what trains: head | last_block (last block + final_norm + head) | all | lora.

    For lora every base weight is frozen and the targeted Linear layers get LoRA adapters;
    if out_head is not a target the (new) head itself trains. Returns wrapped module names.
    """
    wrapped: list[str] = []
    if mode == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return wrapped
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "head":
        trainable = [model.out_head]
    elif mode == "last_block":
        trainable = [model.trf_blocks[-1], model.final_norm, model.out_head]
    elif mode == "lora":
        wrapped = apply_lora(model, lora_rank, lora_alpha, lora_targets, book=book)
        trainable = [] if "out_head" in wrapped else [model.out_head]
    else:
        raise ValueError(f"train_mode {mode!r}: expected one of head, last_block, all, lora")
    for m in trainable:
        for p in m.parameters():
            p.requires_grad_(True)
    return wrapped


def make_batches(cfg: SpamConfig, frames: dict[str, pd.DataFrame], ids: dict[str, list[list[int]]],
                 L: int) -> dict[str, Batches]:
    """Training batches shuffled per epoch (seeded, last partial batch dropped); val and test in order."""
    pad_to = pad_length(cfg, L)
    return {"train": Batches(ids["train"], frames["train"]["label"], cfg.batch_size, shuffle=True,
                             drop_last=True, seed=cfg.seed, pad_to=pad_to),
            "val": Batches(ids["val"], frames["val"]["label"], cfg.batch_size, pad_to=pad_to),
            "test": Batches(ids["test"], frames["test"]["label"], cfg.batch_size, pad_to=pad_to)}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def resume_identity(cfg: SpamConfig, train_ids: list[list[int]], train_df: pd.DataFrame, net: GPT) -> dict:
    """What a checkpoint must match to be resumed: the config (minus knobs that do not change the
    result), the training data and the model config (TrainState.load also checks the state version)."""
    return {"config": cfg.model_dump(mode="json", exclude={"threads", "checkpoint_every", "keep_checkpoints",
                                                           "baseline"}),
            "data": hashlib.sha256(json.dumps([train_ids, train_df["label"].tolist()]).encode()).hexdigest(),
            "model_config": net.cfg.to_dict()}


def total_steps(cfg: SpamConfig, steps_per_epoch: int) -> int:
    """cfg.epochs full epochs, at most cfg.max_steps optimizer steps."""
    total = cfg.epochs * steps_per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps is not None else total


def train(cfg: SpamConfig, net: GPT, opt: torch.optim.Optimizer, batches: dict[str, Batches],
          device: torch.device, ckpt_root: Path, identity: dict, log: MetricLogger, progress: bool,
          stop_after: Optional[int]) -> TrainState:
    """The finetune loop, resumed from the newest checkpoint in ckpt_root if there is one: an
    evaluation every cfg.eval_every steps (and after the last), a checkpoint every cfg.checkpoint_every."""
    st = TrainState.load(ckpt_root, net, opt, device, identity, "spam") or TrainState(history=[], sums=_zero_sums())
    train_b, total = batches["train"], total_steps(cfg, len(batches["train"]))
    net.train()
    t_mark = time.time()
    bar = tqdm(total=total, initial=st.step, desc="spam finetune", disable=not progress, unit="step")
    while st.step < total:
        order = train_b.epoch_order(st.epoch)  # the same batches as an uninterrupted run's
        for b in range(st.epoch_step, len(train_b)):
            train_step(net, opt, train_b.batch(order, b), device, st)
            st.epoch_step = b + 1
            bar.update(1)
            if st.step % cfg.eval_every == 0:
                rec = eval_running(net, batches["val"], device, cfg.eval_batches, st, log)
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val_acc=f"{rec['val_accuracy']:.3f}")
            if st.step % cfg.checkpoint_every == 0 and st.step < total:
                st.train_time, t_mark = st.train_time + (time.time() - t_mark), time.time()
                st.save(ckpt_root, net, opt, cfg.keep_checkpoints, identity, "spam", device)
            stop_hook(stop_after, st.step, total, "spam")
            if st.step >= total:
                break
        else:
            st.epoch, st.epoch_step = st.epoch + 1, 0
    if st.sums["n"]:
        eval_running(net, batches["val"], device, cfg.eval_batches, st, log)
    bar.close()
    st.train_time += time.time() - t_mark
    return st


def _zero_sums() -> dict:
    """The running sums since the last evaluation: summed loss, correct predictions, examples."""
    return {"loss": 0.0, "correct": 0, "n": 0}


def train_step(net: GPT, opt: torch.optim.Optimizer, batch, device: torch.device, st: TrainState) -> None:
    """One optimizer step on one batch; adds its loss and correct predictions to the running sums."""
    ids, lengths, y = (t.to(device) for t in batch)
    logits = classify_logits(net, ids, lengths)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    st.step += 1
    st.sums["loss"] += loss.item() * len(y)
    st.sums["correct"] += int((logits.argmax(-1) == y).sum())
    st.sums["n"] += len(y)


def eval_running(net: GPT, val_b: Batches, device: torch.device, max_batches: Optional[int],
                 st: TrainState, log: MetricLogger) -> dict:
    """Log the running training means and the validation loss/accuracy, then reset the running sums."""
    val_loss, val_pred, _ = evaluate(net, val_b, device, max_batches)
    n = max(st.sums["n"], 1)
    rec = {"train_loss": st.sums["loss"] / n, "train_accuracy": st.sums["correct"] / n,
           "val_loss": val_loss, "val_accuracy": _accuracy(val_pred, val_b.labels.numpy())}
    st.history.append({"step": st.step, **rec})
    log(rec, st.step)
    st.sums = _zero_sums()
    return rec


@torch.no_grad()
def evaluate(model: GPT, batches, device, max_batches: Optional[int] = None
             ) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, predicted classes and spam probabilities over (up to max_batches) batches, in order."""
    was_training = model.training
    model.eval()
    loss_sum, n, preds, probs = 0.0, 0, [], []
    for i, (ids, lengths, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        logits = classify_logits(model, ids.to(device), lengths.to(device)).float()
        y = y.to(device)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
        p = torch.softmax(logits, dim=-1)
        preds.append(p.argmax(-1).cpu().numpy())
        probs.append(p[:, 1].cpu().numpy())
    model.train(was_training)
    if n == 0:
        return float("nan"), np.zeros(0, dtype=np.int64), np.zeros(0)
    return loss_sum / n, np.concatenate(preds), np.concatenate(probs)


def _accuracy(preds: np.ndarray, labels: Sequence[int]) -> float:
    labels = np.asarray(labels)[: len(preds)]
    return float((preds == labels).mean()) if len(preds) else float("nan")


# --------------------------------------------------------------------------------------------
# Final evaluation, baseline, outputs
# --------------------------------------------------------------------------------------------

def final_metrics(cfg: SpamConfig, net: GPT, frames: dict[str, pd.DataFrame], batches: dict[str, Batches],
                  device: torch.device) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Accuracy on every split (all batches), test loss/F1/precision/recall; also the test predictions
    and spam probabilities."""
    from sklearn.metrics import f1_score, precision_score, recall_score  # lazy: ~1.4 s, `llmpipe classify` skips it

    net.eval()
    # the training split again, in order and padded per batch: in book mode too (then read at the last
    # real token, not at -1, unlike val and test) -- kept as the stage has always done it
    _, train_pred, _ = evaluate(net, Batches(batches["train"].seqs, frames["train"]["label"], cfg.batch_size), device)
    _, val_pred, _ = evaluate(net, batches["val"], device)
    test_loss, test_pred, test_prob = evaluate(net, batches["test"], device)
    y_test = frames["test"]["label"].to_numpy()
    return {"train_accuracy": _accuracy(train_pred, frames["train"]["label"]),
            "val_accuracy": _accuracy(val_pred, frames["val"]["label"]),
            "test_accuracy": _accuracy(test_pred, y_test),
            "test_loss": test_loss,
            "test_f1": float(f1_score(y_test, test_pred, zero_division=0)),
            "test_precision": float(precision_score(y_test, test_pred, zero_division=0)),
            "test_recall": float(recall_score(y_test, test_pred, zero_division=0))}, test_pred, test_prob


def data_metrics(data: SmsData, frames: dict[str, pd.DataFrame], L: int) -> dict[str, float]:
    """Split sizes, raw class counts, dropped lines per reason, the message length L."""
    return {"n_train": len(frames["train"]), "n_val": len(frames["val"]), "n_test": len(frames["test"]),
            "n_ham_raw": int(sum(1 for v in data.labels if v == 0)),
            "n_spam_raw": int(sum(1 for v in data.labels if v == 1)),
            **{f"dropped_{r}": data.dropped[r] for r in MALFORMED_REASONS},
            "max_length": L}


def model_metrics(net: GPT, run: TrainState) -> dict[str, float]:
    """Optimizer steps, parameter counts (all, trainable), training seconds (over resumed runs too)."""
    return {"steps": run.step,
            "params_total": sum(p.numel() for p in {id(p): p for p in net.parameters()}.values()),
            "params_trainable": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "train_seconds": run.train_time}


def tfidf_baseline(train: pd.DataFrame, test: pd.DataFrame, seed: int = 123) -> tuple[float, float]:
    """TF-IDF + LogisticRegression trained on train, scored on test: (accuracy, F1 of spam)."""
    # lazy: sklearn takes ~1.4 s to import and only the end of the stage needs it
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    vec = TfidfVectorizer()
    clf = LogisticRegression(max_iter=1000, random_state=seed)
    clf.fit(vec.fit_transform(train["text"]), train["label"])
    pred = clf.predict(vec.transform(test["text"]))
    return float(accuracy_score(test["label"], pred)), float(f1_score(test["label"], pred, zero_division=0))


def write_outputs(cfg: SpamConfig, history: list[dict], test_df: pd.DataFrame, test_pred: np.ndarray,
                  test_prob: np.ndarray, test_accuracy: float, out_dir: Path) -> list[Path]:
    """test_predictions.parquet and the loss, accuracy and confusion-matrix figures."""
    from sklearn.metrics import confusion_matrix  # lazy: see final_metrics

    y_test = test_df["label"].to_numpy()
    preds = test_df.assign(pred=test_pred.astype(np.int64), prob_spam=test_prob.astype(np.float64),
                           correct=test_pred == y_test)
    cm = confusion_matrix(y_test, test_pred, labels=[0, 1])
    return [_write_parquet(preds, out_dir / "test_predictions.parquet"),
            plot_curves(history, "loss", "Loss", cfg.batch_size, out_dir / "loss_curve.png"),
            plot_curves(history, "accuracy", "Accuracy", cfg.batch_size, out_dir / "accuracy_curve.png"),
            plot_confusion(cm, f"test accuracy {test_accuracy:.2%}", out_dir / "confusion_matrix.png")]


def export_classifier(cfg: SpamConfig, net: GPT, wrapped: list[str], L: int, test_accuracy: float,
                      out_dir: Path) -> Path:
    """out_dir/classifier: plain GPT weights (LoRA merged into the Linear layers) + what load_classifier needs."""
    if wrapped:
        merge_lora(net)
    net.cpu()
    return save_model(net, out_dir / "classifier", extra={
        "task": "spam", "labels": list(LABELS), "tokenizer": "gpt2", "max_length": L,
        "readout": readout_name(cfg), "train_mode": cfg.train_mode, "test_accuracy": test_accuracy})


def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())
    return path


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data_file", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--checkpoint", type=Path, default=None, help="pretrain checkpoint folder (init=pretrain)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="SpamConfig field override")
    args = ap.parse_args(argv)
    try:
        cfg = section_from_overrides(SpamConfig, args.set)
        res = run_spam(cfg, args.data_file, args.out_dir, args.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for k, v in res.metrics.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
