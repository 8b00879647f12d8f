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
  every message padded to L and the class read at position -1, appendix E's LoRA.
- train_loss / train_accuracy logged during training are running means over the training
  batches since the previous evaluation; val_* are evaluated on up to cfg.eval_batches batches.
"""
from __future__ import annotations

import argparse
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from llm.checkpoint import atomic_write_bytes, load_model, read_config, save_model
from llm.config import SpamConfig
from llm.model import EOT_ID, GPT, GPTConfig
from llm.result import MetricLogger, StageResult, log_or_null
from llm.train import free_cores

LABELS = ("ham", "spam")
PAD_ID = EOT_ID
MALFORMED_REASONS = ("no_tab", "bad_label", "empty_text")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

@dataclass
class SmsData:
    """Parsed messages: texts[i] with labels[i] (0 ham, 1 spam); dropped counts per reason."""

    texts: list[str]
    labels: list[int]
    dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in MALFORMED_REASONS})
    blank_lines: int = 0


def read_sms_collection(path: str | Path, skip_malformed: bool = False) -> SmsData:
    """Parse a `label<TAB>text` file (UCI SMS Spam Collection format).

    Each line is split on its first tab only; quotes are ordinary characters; CRLF and a
    missing final newline are fine; blank lines are ignored (counted in `blank_lines`). A line
    without a tab, with a label other than "ham"/"spam", or with empty text raises ValueError
    naming the file and 1-based line number, unless `skip_malformed`, in which case it is
    counted in `dropped` under no_tab / bad_label / empty_text.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: SMS spam data file not found")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
    if content.startswith("\ufeff"):
        content = content[1:]
    data = SmsData(texts=[], labels=[])
    for lineno, line in enumerate(content.split("\n"), start=1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line.strip():
            data.blank_lines += 1
            continue
        label, tab, text = line.partition("\t")
        label = label.strip()
        if not tab:
            reason, msg = "no_tab", f"{path}:{lineno}: expected 'label<TAB>text', found no tab"
        elif label not in LABELS:
            reason, msg = "bad_label", f"{path}:{lineno}: unknown label {label!r}, expected 'ham' or 'spam'"
        elif not text.strip():
            reason, msg = "empty_text", f"{path}:{lineno}: empty message text after label {label!r}"
        else:
            data.texts.append(text)
            data.labels.append(LABELS.index(label))
            continue
        if not skip_malformed:
            raise ValueError(msg)
        data.dropped[reason] += 1
    if data.blank_lines and content.endswith("\n"):
        data.blank_lines -= 1  # the final newline is not a blank line
    return data


def read_sms_pandas(path: str | Path) -> SmsData:
    """Book mode: the book's parse, ``pd.read_csv(path, sep="\\t", header=None, names=["Label", "Text"])``.

    Default CSV quoting merges lines at stray quote characters: the real file gives 5572 rows (4825 ham,
    747 spam) where read_sms_collection gives 5574. A row whose label is not ham/spam, or whose text is
    missing, raises ValueError naming the file and the 0-based row."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: SMS spam data file not found")
    try:
        df = pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"])
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot parse as the book's tab-separated file ({e})") from None
    data = SmsData(texts=[], labels=[])
    for i, (label, text) in enumerate(zip(df["Label"], df["Text"])):
        if label not in LABELS:
            raise ValueError(f"{path}: row {i}: unknown label {label!r}, expected 'ham' or 'spam'")
        if not isinstance(text, str):
            raise ValueError(f"{path}: row {i}: missing message text after label {label!r}")
        data.texts.append(text)
        data.labels.append(LABELS.index(label))
    return data


def balance_and_split(texts: Sequence[str], labels: Sequence[int], seed: int = 123,
                      train_frac: float = 0.7, val_frac: float = 0.1
                      ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The book's create_balanced_dataset + random_split, seeded.

    The majority class is undersampled (pandas .sample, random_state=seed) to the minority
    count, the union is shuffled (random_state=seed), then cut at train_end = int(n*0.7) and
    val_end = train_end + int(n*0.1). Returns (train, val, test) frames with columns text, label.
    """
    df = pd.DataFrame({"text": list(texts), "label": np.asarray(labels, dtype=np.int64)})
    counts = df["label"].value_counts()
    if len(counts) < 2:
        raise ValueError(f"need both ham and spam messages to balance, found only {LABELS[int(counts.index[0])] if len(counts) else 'none'}")
    minority = int(counts.idxmin())
    n = int(counts.min())
    major = df[df["label"] != minority].sample(n, random_state=seed)
    # the book concatenates the ham subset first, then all spam
    parts = [major, df[df["label"] == minority]] if minority == 1 else [df[df["label"] == minority], major]
    balanced = pd.concat(parts)
    balanced = balanced.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(balanced) * train_frac)
    val_end = train_end + int(len(balanced) * val_frac)
    train, val, test = (balanced[:train_end].reset_index(drop=True),
                        balanced[train_end:val_end].reset_index(drop=True),
                        balanced[val_end:].reset_index(drop=True))
    for name, part in (("train", train), ("val", val), ("test", test)):
        if len(part) == 0:
            raise ValueError(f"too few messages to split: {len(balanced)} after balancing leaves the {name} split empty")
    return train, val, test


def encode_texts(enc, texts: Sequence[str], max_length: Optional[int] = None) -> list[list[int]]:
    """GPT-2 BPE ids of each text (special-token text is encoded as ordinary text), truncated."""
    out = []
    for t in texts:
        ids = enc.encode_ordinary(t)
        out.append(ids[:max_length] if max_length is not None else ids)
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_to: Optional[int] = None, pad_id: int = PAD_ID
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to one length (their longest, or pad_to); returns (ids, lengths)."""
    lengths = [len(s) for s in seqs]
    if min(lengths) < 1:
        raise ValueError("cannot classify an empty message (0 tokens)")
    width = max(lengths) if pad_to is None else pad_to
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s[:width], dtype=torch.long)
    return ids, torch.tensor([min(n, width) for n in lengths], dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def add_classification_head(model: GPT, num_classes: int = 2) -> GPT:
    """Replace the vocabulary head by Linear(emb_dim, num_classes) (with bias, as the book)."""
    w = model.tok_emb.weight
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes, device=w.device, dtype=w.dtype)
    return model


def last_token_hidden(model: GPT, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden state at each sequence's true last token: (batch, emb_dim)."""
    h = model.hidden(ids)
    return h[torch.arange(ids.shape[0], device=ids.device), lengths.to(ids.device) - 1]


def classify_logits(model: GPT, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Class logits (batch, num_classes) read at each sequence's true last token."""
    return model.out_head(last_token_hidden(model, ids, lengths))


def set_train_mode(model: GPT, mode: str, lora_rank: int = 16, lora_alpha: float = 16.0,
                   lora_targets: Sequence[str] = ("att", "ff", "out_head"), book: bool = False) -> list[str]:
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
        from llm.lora import apply_lora

        wrapped = apply_lora(model, lora_rank, lora_alpha, lora_targets, book=book)
        trainable = [] if "out_head" in wrapped else [model.out_head]
    else:
        raise ValueError(f"train_mode {mode!r}: expected one of head, last_block, all, lora")
    for m in trainable:
        for p in m.parameters():
            p.requires_grad_(True)
    return wrapped


def make_adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where torch supports it (on CPU ~10x faster over a 50257-row embedding)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _encoding():
    from llm.tokenizer import get_encoding

    return get_encoding()


class _Batches:
    """Batches of (ids, lengths, labels), each padded to its own longest message."""

    def __init__(self, seqs: list[list[int]], labels: Sequence[int], batch_size: int,
                 shuffle: bool = False, drop_last: bool = False, seed: int = 123, pad_to: Optional[int] = None):
        self.seqs, self.labels = seqs, torch.as_tensor(list(labels), dtype=torch.long)
        self.pad_to = pad_to  # book mode: every message padded to L, the class read at position -1
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.seqs)
        if self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def __iter__(self):
        n = len(self.seqs)
        order = torch.randperm(n, generator=self.gen).tolist() if self.shuffle else list(range(n))
        for b in range(len(self)):
            yield self.batch(order, b)

    def epoch_order(self, epoch: int) -> list[int]:
        """The order `__iter__` gives in epoch `epoch` (0-based) of a fresh instance: the seeded
        generator's (epoch+1)-th permutation, so a resumed run sees the same batches."""
        n = len(self.seqs)
        if not self.shuffle:
            return list(range(n))
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch):
            torch.randperm(n, generator=gen)
        return torch.randperm(n, generator=gen).tolist()

    def batch(self, order: list[int], b: int):
        idx = order[b * self.batch_size:(b + 1) * self.batch_size]
        ids, lengths = pad_batch([self.seqs[i] for i in idx], pad_to=self.pad_to)
        if self.pad_to is not None:
            lengths = torch.full_like(lengths, self.pad_to)
        return ids, lengths, self.labels[idx]


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
# Using a trained classifier
# --------------------------------------------------------------------------------------------

class Classifier:
    """A trained spam classifier: `predict(texts) -> [(label, probability of that label)]`."""

    def __init__(self, model: GPT, max_length: int, labels: Sequence[str] = LABELS, encoding=None,
                 device: str | torch.device = "cpu", batch_size: int = 32, read_last_position: bool = False):
        self.model = model.to(device).eval()
        self.max_length = min(int(max_length), model.cfg.context_length)
        self.labels = tuple(labels)
        self.enc = encoding if encoding is not None else _encoding()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.read_last_position = read_last_position  # book mode: pad to max_length, read position -1

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities (len(texts), num_classes)."""
        if isinstance(texts, str):
            raise TypeError("predict expects a list of texts, got a single str")
        seqs = encode_texts(self.enc, texts, self.max_length)
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"text {i} is empty; expected a non-empty message")
        out = []
        for b in range(0, len(seqs), self.batch_size):
            pad_to = self.max_length if self.read_last_position else None
            ids, lengths = pad_batch(seqs[b:b + self.batch_size], pad_to=pad_to)
            if pad_to is not None:
                lengths = torch.full_like(lengths, pad_to)
            logits = classify_logits(self.model, ids.to(self.device), lengths.to(self.device))
            out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)))

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        probs = self.predict_proba(texts)
        return [(self.labels[int(p.argmax())], float(p.max())) for p in probs]


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """Load a classifier folder written by run_spam (config.json's llmpipe.task == "spam")."""
    from safetensors.torch import load_file

    directory = Path(directory)
    raw = read_config(directory)
    meta = raw.get("llmpipe") or {}
    if "llmpipe_model" not in raw or meta.get("task") != "spam":
        raise ValueError(f"{directory / 'config.json'}: not a spam classifier checkpoint "
                         f"(expected llmpipe.task == 'spam', got {meta.get('task')!r})")
    labels = meta.get("labels") or list(LABELS)
    if "max_length" not in meta:
        raise ValueError(f"{directory / 'config.json'}: missing llmpipe.max_length")
    model = add_classification_head(GPT(GPTConfig.from_dict(raw["llmpipe_model"])), len(labels))
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: missing model weights")
    sd = load_file(str(weights))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights}: weights do not match config.json with a {len(labels)}-class head ({e})") from None
    return Classifier(model, meta["max_length"], labels, device=device,
                      read_last_position=meta.get("readout") == "position -1 (book)")


def classify_file(classifier: Classifier, path: str | Path) -> pd.DataFrame:
    """Classify every message of a file: .csv/.tsv with a "text" column, else one message per line.

    Returns a DataFrame with columns text, label, probability (of that label). Blank lines of
    a text file are skipped.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file to classify not found")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        try:
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot parse as {suffix[1:].upper()} ({e})") from None
        if "text" not in df.columns:
            raise ValueError(f"{path}: expected a 'text' column, found {list(df.columns)}")
        texts = df["text"].tolist()
        for i, t in enumerate(texts):
            if not t.strip():
                raise ValueError(f"{path}: row {i + 1}: empty 'text' value")
    else:
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
        texts = [ln.rstrip("\r") for ln in content.split("\n") if ln.strip()]
    preds = classifier.predict(texts) if texts else []
    return pd.DataFrame({"text": texts, "label": [p[0] for p in preds],
                         "probability": [p[1] for p in preds]})


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------

def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _plot_curves(history: list[dict], key: str, ylabel: str, batch_size: int, path: Path) -> Path:
    """The book's figures 6.16/6.17: train and val curves vs steps, examples seen on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(steps, [h[f"train_{key}"] for h in history], label=f"Training {key}")
    ax.plot(steps, [h[f"val_{key}"] for h in history], linestyle="-.", label=f"Validation {key}")
    ax.set_xlabel("Steps")
    ax.set_ylabel(ylabel)
    ax.legend()
    top = ax.secondary_xaxis("top", functions=(lambda s: s * batch_size, lambda e: e / batch_size))
    top.set_xlabel("Examples seen")
    fig.tight_layout()
    return _save_fig(fig, path)


def _plot_confusion(cm: np.ndarray, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(LABELS)), LABELS)
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    fig.tight_layout()
    return _save_fig(fig, path)


def tfidf_baseline(train: pd.DataFrame, test: pd.DataFrame, seed: int = 123) -> tuple[float, float]:
    """TF-IDF + LogisticRegression trained on train, scored on test: (accuracy, F1 of spam)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    vec = TfidfVectorizer()
    clf = LogisticRegression(max_iter=1000, random_state=seed)
    clf.fit(vec.fit_transform(train["text"]), train["label"])
    pred = clf.predict(vec.transform(test["text"]))
    return float(accuracy_score(test["label"], pred)), float(f1_score(test["label"], pred, zero_division=0))


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------

def load_backbone(cfg: SpamConfig, base_checkpoint: Optional[Path]) -> GPT:
    """The GPT to finetune: the pretrain stage's checkpoint, or llm.weights.load_pretrained(cfg.init)."""
    if cfg.init == "pretrain":
        if base_checkpoint is None:
            raise ValueError("spam.init is 'pretrain' but no pretrain checkpoint was given (base_checkpoint=None)")
        return load_model(base_checkpoint)
    from llm.weights import load_pretrained

    return load_pretrained(cfg.init)


class TrainingInterrupted(RuntimeError):
    """Raised by the `stop_after` test hook, as if the run had been killed after that step."""


STATE_VERSION = 1


def run_spam(cfg: SpamConfig, data_file: Path, out_dir: Path, base_checkpoint: Optional[Path] = None,
             progress: bool = True, log: Optional[MetricLogger] = None,
             stop_after: Optional[int] = None) -> StageResult:
    """Finetune a GPT backbone as a ham/spam classifier; write splits, plots, predictions, classifier.

    Returns metrics (accuracies, test F1/precision/recall, the TF-IDF baseline, split counts),
    artifacts (split parquets, test_predictions.parquet, loss/accuracy/confusion PNGs) and
    outputs {"classifier": out_dir/"classifier"} (load it with load_classifier).
    Runs with cfg.threads torch threads (0 = the cores not already busy; oversubscribed
    cores slow small-matrix training by an order of magnitude), restored afterwards.
    Every cfg.checkpoint_every steps the run saves out_dir/checkpoints/step-N (weights, optimizer,
    RNG, position in the data); running again with the same out_dir resumes from the newest one
    and ends exactly where the uninterrupted run would have (the checkpoints are deleted at the end).
    `stop_after` (tests) raises TrainingInterrupted after that optimizer step, as a kill would.
    """
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or free_cores())  # llm.train.free_cores: affinity minus load
    try:
        return _run_spam(cfg, data_file, out_dir, base_checkpoint, progress, log, stop_after)
    finally:
        torch.set_num_threads(old_threads)


def _run_spam(cfg: SpamConfig, data_file: Path, out_dir: Path, base_checkpoint: Optional[Path],
              progress: bool, log: Optional[MetricLogger], stop_after: Optional[int]) -> StageResult:
    import hashlib
    import json
    import shutil

    from llm.train import _rng_json, _rng_tensors, resume_finetune, save_checkpoint

    log = log_or_null(log)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # ---- data
    data = read_sms_pandas(data_file) if cfg.book_compat else read_sms_collection(data_file, skip_malformed=cfg.skip_malformed)
    train_df, val_df, test_df = balance_and_split(data.texts, data.labels, seed=cfg.seed)
    artifacts: list[Path] = []
    for name, df in (("train", train_df), ("val", val_df), ("test", test_df)):
        artifacts.append(_write_parquet(df, out_dir / f"{name}.parquet"))

    # ---- backbone + head
    backbone = load_backbone(cfg, base_checkpoint)
    device = _device()
    enc = _encoding()
    train_ids = encode_texts(enc, train_df["text"])
    ctx = backbone.cfg.context_length
    L = min(cfg.max_length or max(len(s) for s in train_ids), ctx)
    train_ids = [s[:L] for s in train_ids]
    val_ids = encode_texts(enc, val_df["text"], L)
    test_ids = encode_texts(enc, test_df["text"], L)

    torch.manual_seed(cfg.seed)
    net = add_classification_head(backbone, len(LABELS))
    wrapped = set_train_mode(net, cfg.train_mode, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                             book=cfg.book_compat)
    net.to(device)
    params_total = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())
    trainable = [p for p in net.parameters() if p.requires_grad]
    params_trainable = sum(p.numel() for p in trainable)

    pad_to = L if cfg.book_compat else None  # book: all padded to L, read at -1 (a pad for shorter messages)
    train_b = _Batches(train_ids, train_df["label"], cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed,
                       pad_to=pad_to)
    val_b = _Batches(val_ids, val_df["label"], cfg.batch_size, pad_to=pad_to)
    test_b = _Batches(test_ids, test_df["label"], cfg.batch_size, pad_to=pad_to)
    opt = make_adamw(trainable, cfg.lr, cfg.weight_decay)

    total = cfg.epochs * len(train_b)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    history: list[dict] = []
    step, epoch, epoch_step, run_loss, run_correct, run_n, train_time = 0, 0, 0, 0.0, 0, 0, 0.0

    # ---- resume from the newest checkpoint of an interrupted run in this folder
    identity = {"version": STATE_VERSION,
                "config": cfg.model_dump(mode="json", exclude={"threads", "checkpoint_every", "keep_checkpoints",
                                                               "baseline"}),
                "data": hashlib.sha256(json.dumps([train_ids, train_df["label"].tolist()]).encode()).hexdigest(),
                "model_config": net.cfg.to_dict()}
    ckpt_root = out_dir / "checkpoints"
    resumed_from = None
    state = resume_finetune(ckpt_root, identity, net, opt, device, "spam")
    if state is not None:
        step, epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]
        run_loss, run_correct, run_n = state["run_loss"], state["run_correct"], state["run_n"]
        history, train_time = state["history"], state["train_time"]
        resumed_from = step

    def save(step_now: int) -> None:
        state = {"identity": identity, "step": step_now, "epoch": epoch, "epoch_step": epoch_step,
                 "run_loss": run_loss, "run_correct": run_correct, "run_n": run_n, "history": history,
                 "train_time": train_time + (time.time() - t_train), "rng": _rng_json()}
        save_checkpoint(ckpt_root, step_now, net, opt, state, _rng_tensors(device), cfg.keep_checkpoints,
                        stage="spam")

    def do_eval():
        nonlocal run_loss, run_correct, run_n
        vl, vp, _ = evaluate(net, val_b, device, cfg.eval_batches)
        n_eval = len(vp)
        rec = {"train_loss": run_loss / max(run_n, 1), "train_accuracy": run_correct / max(run_n, 1),
               "val_loss": vl, "val_accuracy": _accuracy(vp, val_df["label"][:n_eval])}
        history.append({"step": step, **rec})
        log(rec, step)
        run_loss, run_correct, run_n = 0.0, 0, 0
        return rec

    net.train()
    t_train = time.time()
    bar = tqdm(total=total, initial=step, desc="spam finetune", disable=not progress, unit="step")
    while step < total:
        order = train_b.epoch_order(epoch)  # the same batches as an uninterrupted run's
        for b in range(epoch_step, len(train_b)):
            ids, lengths, y = (t.to(device) for t in train_b.batch(order, b))
            logits = classify_logits(net, ids, lengths)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, epoch_step = step + 1, b + 1
            run_loss += loss.item() * len(y)
            run_correct += int((logits.argmax(-1) == y).sum())
            run_n += len(y)
            bar.update(1)
            if step % cfg.eval_every == 0:
                rec = do_eval()
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val_acc=f"{rec['val_accuracy']:.3f}")
            if step % cfg.checkpoint_every == 0 and step < total:
                save(step)
            if stop_after is not None and step >= stop_after and step < total:
                raise TrainingInterrupted(f"spam stopped after step {step} (test hook)")
            if step >= total:
                break
        else:
            epoch, epoch_step = epoch + 1, 0
    if run_n:
        do_eval()
    bar.close()
    train_seconds = train_time + (time.time() - t_train)

    # ---- final evaluation
    net.eval()
    from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

    tr_eval = _Batches(train_ids, train_df["label"], cfg.batch_size)
    _, tr_pred, _ = evaluate(net, tr_eval, device)
    _, va_pred, _ = evaluate(net, val_b, device)
    test_loss, te_pred, te_prob = evaluate(net, test_b, device)
    y_test = test_df["label"].to_numpy()
    metrics: dict[str, float] = {
        "train_accuracy": _accuracy(tr_pred, train_df["label"]),
        "val_accuracy": _accuracy(va_pred, val_df["label"]),
        "test_accuracy": _accuracy(te_pred, y_test),
        "test_loss": test_loss,
        "test_f1": float(f1_score(y_test, te_pred, zero_division=0)),
        "test_precision": float(precision_score(y_test, te_pred, zero_division=0)),
        "test_recall": float(recall_score(y_test, te_pred, zero_division=0)),
        "n_train": len(train_df), "n_val": len(val_df), "n_test": len(test_df),
        "n_ham_raw": int(sum(1 for v in data.labels if v == 0)),
        "n_spam_raw": int(sum(1 for v in data.labels if v == 1)),
        **{f"dropped_{r}": data.dropped[r] for r in MALFORMED_REASONS},
        "max_length": L, "steps": step, "params_total": params_total, "params_trainable": params_trainable,
        "train_seconds": train_seconds,
    }
    if cfg.baseline:
        acc, f1 = tfidf_baseline(train_df, test_df, cfg.seed)
        metrics["baseline_test_accuracy"], metrics["baseline_test_f1"] = acc, f1

    preds = test_df.assign(pred=te_pred.astype(np.int64), prob_spam=te_prob.astype(np.float64),
                           correct=te_pred == y_test)
    artifacts.append(_write_parquet(preds, out_dir / "test_predictions.parquet"))
    artifacts.append(_plot_curves(history, "loss", "Loss", cfg.batch_size, out_dir / "loss_curve.png"))
    artifacts.append(_plot_curves(history, "accuracy", "Accuracy", cfg.batch_size, out_dir / "accuracy_curve.png"))
    cm = confusion_matrix(y_test, te_pred, labels=[0, 1])
    artifacts.append(_plot_confusion(cm, f"test accuracy {metrics['test_accuracy']:.2%}",
                                     out_dir / "confusion_matrix.png"))

    # ---- export (LoRA merged into plain Linear layers)
    if wrapped:
        from llm.lora import merge_lora

        merge_lora(net)
    net.cpu()
    clf_dir = save_model(net, out_dir / "classifier", extra={
        "task": "spam", "labels": list(LABELS), "tokenizer": "gpt2", "max_length": L,
        "readout": "position -1 (book)" if cfg.book_compat else "last token",
        "train_mode": cfg.train_mode, "test_accuracy": metrics["test_accuracy"]})
    shutil.rmtree(ckpt_root, ignore_errors=True)  # only for resuming; the classifier is the result
    metrics["stage_seconds"] = time.time() - t_start
    params = {"max_length": L, "train_mode": cfg.train_mode, "lora_modules": len(wrapped),
              "backbone": cfg.init, "device": str(device), "threads": torch.get_num_threads(),
              "resumed_from_step": resumed_from}
    return StageResult(metrics=metrics, params=params, artifacts=artifacts, outputs={"classifier": clf_dir})


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data_file", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--checkpoint", type=Path, default=None, help="pretrain checkpoint folder (init=pretrain)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="SpamConfig field override")
    args = ap.parse_args(argv)
    from llm.config import parse_overrides

    cfg = SpamConfig(**parse_overrides(args.set))
    res = run_spam(cfg, args.data_file, args.out_dir, args.checkpoint)
    for k, v in res.metrics.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
