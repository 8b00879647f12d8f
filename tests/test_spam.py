"""Tests for llm/spam.py: parsing, balancing/splitting, last-real-token selection, train modes,
classifier save/load, classify_file, and a tiny end-to-end run_spam.

Run: python -m pytest -x -q tests/test_spam.py
"""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch

from llm.checkpoint import load_model, save_model
from llm.config import SpamConfig
from llm.lora import LoRALinear
from llm.model import EOT_ID, GPT, GPTConfig
from llm.spam import (Classifier, add_classification_head, balance_and_split, classify_file,
                      classify_logits, last_token_hidden, load_classifier, pad_batch,
                      read_sms_collection, run_spam, set_train_mode)
from llm.tokenizer import get_encoding

TINY = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
SMALL_VOCAB = GPTConfig(vocab_size=101, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)


def write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


# ------------------------------------------------------------------------------------ parsing

def test_parse_tricky_lines(tmp_path):
    raw = (b'ham\tHe said "hi\r\n'               # lone quote: pandas' default quoting merges lines here
           b'spam\tWIN a "FREE" prize\tnow!!\n'   # second tab belongs to the text
           b'ham\t"quoted whole"\n'
           b'\n'                                  # blank line: ignored
           b'ham\t  Ok lar... Joking wif u oni...')  # no final newline
    p = write(tmp_path, "sms", raw)
    d = read_sms_collection(p)
    assert d.texts == ['He said "hi', 'WIN a "FREE" prize\tnow!!', '"quoted whole"', "  Ok lar... Joking wif u oni..."]
    assert d.labels == [0, 1, 0, 0]
    assert d.dropped == {"no_tab": 0, "bad_label": 0, "empty_text": 0}
    assert d.blank_lines == 1
    # the book's pandas reading merges lines at a stray quote: the reason for first-tab parsing
    q = write(tmp_path, "quotes", b'ham\t"Wait\nspam\tCall now\nham\tok" fine\nham\tlast')
    assert len(pd.read_csv(q, sep="\t", header=None, names=["Label", "Text"])) == 2
    assert read_sms_collection(q).labels == [0, 1, 0, 0]


@pytest.mark.parametrize("line,msg", [
    (b"spma\tcall now", "{p}:3: unknown label 'spma', expected 'ham' or 'spam'"),
    (b"ham call me later", "{p}:3: expected 'label<TAB>text', found no tab"),
    (b"spam\t  ", "{p}:3: empty message text after label 'spam'"),
])
def test_parse_errors_name_file_and_line(tmp_path, line, msg):
    p = write(tmp_path, "sms.tsv", b"ham\tfine\nspam\tgood\n" + line + b"\nham\tafter\n")
    with pytest.raises(ValueError) as e:
        read_sms_collection(p)
    assert str(e.value) == msg.format(p=p)


def test_parse_skip_mode_counts_per_reason(tmp_path):
    raw = b"ham\tfine\nbad\tx\nno tab here\nspam\t\nSPAM\ty\nspam\tgood\r\nham\tz"
    d = read_sms_collection(write(tmp_path, "sms", raw), skip_malformed=True)
    assert d.texts == ["fine", "good", "z"] and d.labels == [0, 1, 0]
    assert d.dropped == {"no_tab": 1, "bad_label": 2, "empty_text": 1}


def test_parse_missing_file_and_bad_utf8(tmp_path):
    with pytest.raises(FileNotFoundError, match="SMS spam data file not found"):
        read_sms_collection(tmp_path / "nope")
    p = write(tmp_path, "sms", b"ham\tok\nspam\t\xff\xfe bad\n")
    with pytest.raises(ValueError, match=r"sms:2: invalid UTF-8"):
        read_sms_collection(p)


# ------------------------------------------------------------------------- balance and split

def book_split(texts, labels, seed):
    """The book's create_balanced_dataset + random_split (ch06), verbatim apart from names."""
    df = pd.DataFrame({"Label": ["spam" if y else "ham" for y in labels], "Text": texts})
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=seed)
    df = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    df = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(df) * 0.7)
    validation_end = train_end + int(len(df) * 0.1)
    return df[:train_end], df[train_end:validation_end], df[validation_end:]


def test_balance_and_split_exact_sizes_and_book_order():
    texts = [f"ham message {i}" for i in range(30)] + [f"spam message {i}" for i in range(13)]
    labels = [0] * 30 + [1] * 13
    train, val, test = balance_and_split(texts, labels, seed=123)
    # 26 balanced -> train int(18.2)=18, val int(2.6)=2, test 6
    assert (len(train), len(val), len(test)) == (18, 2, 6)
    allp = pd.concat([train, val, test])
    assert list(allp.columns) == ["text", "label"]
    assert allp["label"].value_counts().to_dict() == {0: 13, 1: 13}
    assert allp["text"].is_unique
    assert set(allp.loc[allp.label == 1, "text"]) == {f"spam message {i}" for i in range(13)}
    for ours, book in zip((train, val, test), book_split(texts, labels, 123)):
        assert ours["text"].tolist() == book["Text"].tolist()
        assert ours["label"].tolist() == [int(x == "spam") for x in book["Label"]]
    again = balance_and_split(texts, labels, seed=123)
    assert all(a.equals(b) for a, b in zip(again, (train, val, test)))
    other = balance_and_split(texts, labels, seed=7)
    assert other[0]["text"].tolist() != train["text"].tolist()


def test_balance_needs_both_classes_and_enough_rows():
    with pytest.raises(ValueError, match="need both ham and spam"):
        balance_and_split(["a", "b"], [0, 0])
    with pytest.raises(ValueError, match="leaves the val split empty"):
        balance_and_split(["a", "b", "c"], [0, 1, 0])


# ------------------------------------------------------------------------ last-token selection

def test_last_real_token_not_position_minus_one():
    torch.manual_seed(0)
    model = add_classification_head(GPT(SMALL_VOCAB)).eval()
    short, long = [5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14]
    ids, lengths = pad_batch([short, long], pad_id=100)
    assert ids[0].tolist() == [5, 17, 42, 100, 100, 100, 100, 100] and lengths.tolist() == [3, 8]
    with torch.no_grad():
        h = model.hidden(ids)
        ours = last_token_hidden(model, ids, lengths)
        assert torch.equal(ours[0], h[0, 2]) and torch.equal(ours[1], h[1, -1])
        assert not torch.allclose(h[0, -1], h[0, 2], atol=1e-3)  # the book's [:, -1] reads a pad
        padded = classify_logits(model, ids, lengths)
        alone = classify_logits(model, torch.tensor([short]), torch.tensor([3]))
        book = model.out_head(h[:, -1, :])
    assert torch.allclose(padded[0], alone[0], atol=1e-6)
    assert not torch.allclose(book[0], alone[0], atol=1e-3)
    # padding further (to a fixed max_length) changes nothing for the real last token
    ids16, len16 = pad_batch([short, long], pad_to=16, pad_id=100)
    with torch.no_grad():
        assert torch.allclose(classify_logits(model, ids16, len16), padded, atol=1e-6)


def test_pad_batch_default_pad_is_endoftext():
    ids, lengths = pad_batch([[1], [2, 3]])
    assert ids.tolist() == [[1, EOT_ID], [2, 3]] and lengths.tolist() == [1, 2]


# -------------------------------------------------------------------------------- train modes

def one_step(model):
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    ids, lengths = pad_batch([[1, 2, 3], [4, 5, 6, 7, 8]], pad_id=100)
    torch.nn.functional.cross_entropy(classify_logits(model, ids, lengths), torch.tensor([0, 1])).backward()
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p, frozen[n])}, frozen


@pytest.mark.parametrize("mode", ["head", "last_block", "lora", "all"])
def test_only_the_chosen_parameters_change(mode):
    torch.manual_seed(0)
    model = add_classification_head(GPT(SMALL_VOCAB))
    wrapped = set_train_mode(model, mode, lora_rank=4, lora_alpha=4, lora_targets=["att", "ff", "out_head"])
    changed, before = one_step(model)
    names = {n for n, _ in model.named_parameters()}
    if mode == "head":
        expect = {"out_head.weight", "out_head.bias"}
    elif mode == "last_block":
        expect = {n for n in names if n.startswith(("trf_blocks.1.", "final_norm.", "out_head."))}
    elif mode == "lora":
        assert len(wrapped) == 9
        # B moves at once; A's first gradient is zero (B = 0) but weight decay shrinks it
        expect = {n for n in names if n.endswith((".A", ".B"))}
    else:
        expect = names
    assert changed == expect
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in expect)


def test_lora_mode_without_head_target_trains_head():
    torch.manual_seed(0)
    model = add_classification_head(GPT(SMALL_VOCAB))
    set_train_mode(model, "lora", lora_rank=2, lora_alpha=2, lora_targets=["attn"])
    assert not isinstance(model.out_head, LoRALinear)
    assert model.out_head.weight.requires_grad and not model.tok_emb.weight.requires_grad


def test_unknown_train_mode():
    with pytest.raises(ValueError, match="train_mode 'bogus'"):
        set_train_mode(add_classification_head(GPT(SMALL_VOCAB)), "bogus")


# --------------------------------------------------------------------- classifier round trip

def test_save_load_classifier_roundtrip_and_classify_file(tmp_path):
    torch.manual_seed(0)
    model = add_classification_head(GPT(TINY)).eval()
    with torch.no_grad():
        model.out_head.bias.copy_(torch.tensor([0.1, -0.2]))
    texts = ["You won a free prize, call now", "see you at lunch?", "x"]
    before = Classifier(model, max_length=20, encoding=get_encoding()).predict(texts)
    save_model(model, tmp_path / "clf", extra={"task": "spam", "labels": ["ham", "spam"],
                                                "tokenizer": "gpt2", "max_length": 20})
    meta = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert meta["llmpipe_model"]["vocab_size"] == 50257  # the backbone config, not the head's
    clf = load_classifier(tmp_path / "clf")
    after = clf.predict(texts)
    assert after == before
    assert [lab for lab, _ in after] == [("ham", "spam")[int(p.argmax())] for p in clf.predict_proba(texts)]
    assert all(0.5 <= prob <= 1.0 for _, prob in after)

    (tmp_path / "msgs.txt").write_text("You won a free prize, call now\n\nsee you at lunch?\r\nx")
    df = classify_file(clf, tmp_path / "msgs.txt")
    assert df["text"].tolist() == texts
    assert list(zip(df["label"], df["probability"])) == after
    pd.DataFrame({"id": [1, 2], "text": texts[:2]}).to_csv(tmp_path / "m.csv", index=False)
    assert classify_file(clf, tmp_path / "m.csv")["label"].tolist() == [a[0] for a in after[:2]]
    pd.DataFrame({"msg": ["a"]}).to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"bad.tsv: expected a 'text' column, found \['msg'\]"):
        classify_file(clf, tmp_path / "bad.tsv")
    with pytest.raises(ValueError, match="text 1 is empty"):
        clf.predict(["fine", ""])


def test_load_classifier_rejects_plain_checkpoint(tmp_path):
    save_model(GPT(SMALL_VOCAB), tmp_path / "plain")
    with pytest.raises(ValueError, match="not a spam classifier checkpoint"):
        load_classifier(tmp_path / "plain")


# -------------------------------------------------------------------------------- end to end

def fixture_file(tmp_path, n_ham=28, n_spam=12):
    hams = [f"hey, are we still on for lunch {i}? I'll bring the \"good\" snacks" for i in range(n_ham)]
    spams = [f"WINNER!! You have won a FREE prize #{i}. Call 0800{i:03d} now to claim" for i in range(n_spam)]
    lines = [f"ham\t{t}" for t in hams] + [f"spam\t{t}" for t in spams]
    rng = np.random.default_rng(0)
    rng.shuffle(lines)
    return write(tmp_path, "SMSSpamCollection", "\r\n".join(lines).encode())


def test_run_spam_end_to_end_tiny(tmp_path):
    torch.manual_seed(0)
    save_model(GPT(TINY), tmp_path / "base")
    data = fixture_file(tmp_path)
    cfg = SpamConfig(init="pretrain", train_mode="last_block", epochs=2, batch_size=4, lr=1e-3,
                     eval_every=2, eval_batches=1)
    seen = []
    res = run_spam(cfg, data, tmp_path / "out", tmp_path / "base", progress=False,
                   log=lambda m, s: seen.append((s, dict(m))))
    m = res.metrics
    # 24 balanced -> 16 / 2 / 6; 16 // 4 = 4 steps per epoch
    assert (m["n_train"], m["n_val"], m["n_test"]) == (16, 2, 6)
    assert (m["n_ham_raw"], m["n_spam_raw"]) == (28, 12)
    assert m["steps"] == 8 and [s for s, _ in seen] == [2, 4, 6, 8]
    assert set(seen[0][1]) == {"train_loss", "val_loss", "train_accuracy", "val_accuracy"}
    for k in ("train_accuracy", "val_accuracy", "test_accuracy", "test_f1", "test_precision", "test_recall",
              "baseline_test_accuracy", "baseline_test_f1", "params_total", "params_trainable"):
        assert k in m and np.isfinite(m[k]), k
    assert m["dropped_no_tab"] == m["dropped_bad_label"] == m["dropped_empty_text"] == 0
    assert 0 < m["params_trainable"] < m["params_total"]
    out = tmp_path / "out"
    for f in ("train.parquet", "val.parquet", "test.parquet", "test_predictions.parquet",
              "loss_curve.png", "accuracy_curve.png", "confusion_matrix.png"):
        assert (out / f).exists() and out / f in res.artifacts, f
    assert pd.read_parquet(out / "val.parquet").shape == (2, 2)
    preds = pd.read_parquet(out / "test_predictions.parquet")
    assert len(preds) == 6 and m["test_accuracy"] == preds["correct"].mean()
    assert res.outputs == {"classifier": out / "classifier"}
    # last_block: everything below the last block is the base checkpoint's, bit for bit
    base = load_model(tmp_path / "base").state_dict()
    clf = load_classifier(out / "classifier")
    sd = clf.model.state_dict()
    assert torch.equal(sd["tok_emb.weight"], base["tok_emb.weight"])
    assert torch.equal(sd["trf_blocks.0.att.qkv.weight"], base["trf_blocks.0.att.qkv.weight"])
    assert not torch.equal(sd["trf_blocks.1.att.qkv.weight"], base["trf_blocks.1.att.qkv.weight"])
    # the saved classifier reproduces the stage's own test predictions
    test = pd.read_parquet(out / "test.parquet")
    labels = [lab for lab, _ in clf.predict(test["text"].tolist())]
    assert labels == [("ham", "spam")[p] for p in preds["pred"]]


def test_run_spam_lora_exports_merged_plain_model(tmp_path):
    torch.manual_seed(0)
    save_model(GPT(TINY), tmp_path / "base")
    data = fixture_file(tmp_path, n_ham=14, n_spam=6)
    cfg = SpamConfig(train_mode="lora", lora_rank=2, lora_alpha=4, epochs=1, batch_size=4, lr=1e-2,
                     max_length=12, max_steps=2, baseline=False)
    res = run_spam(cfg, data, tmp_path / "out", tmp_path / "base", progress=False)
    assert res.metrics["steps"] == 2 and res.metrics["max_length"] == 12
    assert "baseline_test_accuracy" not in res.metrics
    from safetensors.torch import load_file

    keys = set(load_file(str(res.outputs["classifier"] / "model.safetensors")))
    assert not any(k.endswith((".A", ".B")) or ".linear." in k for k in keys)
    assert load_classifier(res.outputs["classifier"]).max_length == 12


def test_run_spam_pretrain_needs_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no pretrain checkpoint was given"):
        run_spam(SpamConfig(init="pretrain"), fixture_file(tmp_path), tmp_path / "out", None, progress=False)


def test_run_spam_resume_after_stop_is_exact(tmp_path):
    """A run stopped after step 5 (checkpoints every 2 steps) and run again ends bit for bit where
    the uninterrupted run ends; a changed config refuses those checkpoints."""
    from safetensors.torch import load_file

    from llm.spam import TrainingInterrupted

    torch.manual_seed(0)
    save_model(GPT(TINY), tmp_path / "base")
    data = fixture_file(tmp_path)
    cfg = SpamConfig(init="pretrain", train_mode="all", epochs=3, batch_size=4, lr=1e-3, eval_every=3,
                     eval_batches=1, checkpoint_every=2, baseline=False)
    full = run_spam(cfg, data, tmp_path / "full", tmp_path / "base", progress=False)
    with pytest.raises(TrainingInterrupted):
        run_spam(cfg, data, tmp_path / "resumed", tmp_path / "base", progress=False, stop_after=5)
    assert [p.name for p in sorted((tmp_path / "resumed" / "checkpoints").iterdir())] == ["step-000002",
                                                                                          "step-000004"]
    with pytest.raises(ValueError, match=r"step-000004/state.json: this checkpoint was made with a different spam"):
        run_spam(cfg.model_copy(update={"lr": 2e-3}), data, tmp_path / "resumed", tmp_path / "base", progress=False)
    seen = []
    resumed = run_spam(cfg, data, tmp_path / "resumed", tmp_path / "base", progress=False,
                       log=lambda m, s: seen.append(s))
    assert resumed.params["resumed_from_step"] == 4 and full.params["resumed_from_step"] is None
    assert seen == [6, 9, 12]  # the steps after the checkpoint (12 = 3 epochs x 4 steps)
    a = load_file(str(full.outputs["classifier"] / "model.safetensors"))
    b = load_file(str(resumed.outputs["classifier"] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = {"train_seconds", "stage_seconds"}
    assert {k: v for k, v in full.metrics.items() if k not in timing} == \
        {k: v for k, v in resumed.metrics.items() if k not in timing}
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # removed once the classifier is written
