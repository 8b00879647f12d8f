"""The spam stage's data: the UCI SMS Spam Collection parsed, balanced, split, encoded and batched.

    from llm.spam_data import read_sms_collection, balance_and_split, encode_texts, Batches
    data = read_sms_collection("SMSSpamCollection")          # texts, labels (0 ham, 1 spam), dropped counts
    train, val, test = balance_and_split(data.texts, data.labels, seed=123)

Our parse splits each line on its FIRST tab (all 5574 rows of the real file); book mode
(cfg.book_compat) uses the book's pandas parse instead (read_sms_pandas, 5572 rows) and pads
every message to one length (Batches(pad_to=L)). llm.spam re-exports all of these names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

from llm.model import EOT_ID

LABELS = ("ham", "spam")
PAD_ID = EOT_ID
MALFORMED_REASONS = ("no_tab", "bad_label", "empty_text")


# --------------------------------------------------------------------------------------------
# Parsing
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
# Batches
# --------------------------------------------------------------------------------------------

class Batches:
    """Batches of (ids, lengths, labels), each padded to its own longest message; book mode
    (pad_to=L) pads every message to L and reports length L, so the class is read at position -1."""

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


# --------------------------------------------------------------------------------------------
# Book mode (cfg.book_compat): the chapter's pandas parse
# --------------------------------------------------------------------------------------------

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
