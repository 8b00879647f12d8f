"""The spam classifier's model side: the 2-class head, the last-token readout, and using a trained
classifier (shared by the spam stage's training in llm.spam and by `llmpipe classify` / the MLflow model).

    from llm.spam_infer import load_classifier, classify_file
    clf = load_classifier("out/spam/classifier")
    clf.predict(["You won a free prize, call now"])     # [("spam", 0.98)]
    classify_file(clf, "messages.txt")                  # DataFrame: text, label, probability

llm.spam re-exports all of these names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from safetensors.torch import load_file

from llm.checkpoint import read_config
from llm.model import GPT, GPTConfig
from llm.spam_data import LABELS, encode_texts, pad_batch
from llm.tokenizer import get_encoding

BOOK_READOUT = "position -1 (book)"  # config.json llmpipe.readout of a book-mode classifier


# --------------------------------------------------------------------------------------------
# The classification head and its readout
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
        self.enc = encoding if encoding is not None else get_encoding()
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
                      read_last_position=meta.get("readout") == BOOK_READOUT)


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


