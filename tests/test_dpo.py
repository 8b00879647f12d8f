"""Tests for llm/dpo.py: the DPO loss, log-probabilities and collate against the book's own functions, record
validation, a tiny end-to-end preference tuning (reward margin rises from 0), exact resume after a stop, LoRA.

The installed `llms_from_scratch` package has no DPO module, so the book's functions are reproduced below
verbatim in substance from rasbt/LLMs-from-scratch, ch07/04_preference-tuning-with-dpo/dpo-from-scratch.ipynb
(sections 2.3 "PreferenceDataset" / custom_collate_fn and 4 "Coding the DPO Loss Function":
compute_dpo_loss, compute_logprobs).

Run: python -m pytest -x -q tests/test_dpo.py
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from llm.checkpoint import read_config, save_model
from llm.config import DpoConfig, load_config
from llm.dpo import (TrainingInterrupted, collate_pairs, compute_logprobs, dpo_loss, encode_pair,
                     load_preference_records, run_dpo)
from llm.model import GPT, GPTConfig
from llm.tokenizer import get_encoding


# ------------------------------------------------------------------ the book's functions (dpo-from-scratch.ipynb)

def book_format_input(entry):
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def book_preference_item(entry, tokenizer):  # PreferenceDataset.__init__, one entry
    prompt = book_format_input(entry)
    prompt_tokens = tokenizer.encode(prompt)
    chosen_full_text = f"{prompt}\n\n### Response:\n{entry['chosen']}"
    rejected_full_text = f"{prompt}\n\n### Response:\n{entry['rejected']}"
    return {"prompt": prompt_tokens, "chosen": tokenizer.encode(chosen_full_text),
            "rejected": tokenizer.encode(rejected_full_text)}


def book_custom_collate_fn(batch, pad_token_id=50256, allowed_max_length=None, mask_prompt_tokens=True,
                           device="cpu"):
    batch_data = {"prompt": [], "chosen": [], "rejected": [], "rejected_mask": [], "chosen_mask": []}
    max_length_common = 0
    if batch:
        for key in ["chosen", "rejected"]:
            current_max = max(len(item[key]) + 1 for item in batch)
            max_length_common = max(max_length_common, current_max)
    for item in batch:
        prompt = torch.tensor(item["prompt"])
        batch_data["prompt"].append(prompt)
        for key in ["chosen", "rejected"]:
            sequence = item[key]
            padded = sequence + [pad_token_id] * (max_length_common - len(sequence))
            mask = torch.ones(len(padded)).bool()
            mask[len(sequence):] = False
            if mask_prompt_tokens:
                mask[:prompt.shape[0] + 2] = False
            batch_data[key].append(torch.tensor(padded))
            batch_data[f"{key}_mask"].append(mask)
    for key in ["chosen", "rejected", "chosen_mask", "rejected_mask"]:
        tensor_stack = torch.stack(batch_data[key])
        if allowed_max_length is not None:
            tensor_stack = tensor_stack[:, :allowed_max_length]
        batch_data[key] = tensor_stack.to(device)
    return batch_data


def book_compute_dpo_loss(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs,
                          reference_rejected_logprobs, beta=0.1):
    model_logratios = model_chosen_logprobs - model_rejected_logprobs
    reference_logratios = reference_chosen_logprobs - reference_rejected_logprobs
    logits = model_logratios - reference_logratios
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = (model_chosen_logprobs - reference_chosen_logprobs).detach()
    rejected_rewards = (model_rejected_logprobs - reference_rejected_logprobs).detach()
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def book_compute_logprobs(logits, labels, selection_mask=None):
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    selected_log_probs = torch.gather(input=log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    if selection_mask is not None:
        mask = selection_mask[:, 1:].clone()
        selected_log_probs = selected_log_probs * mask
        avg_log_prob = selected_log_probs.sum(-1) / mask.sum(-1)
        return avg_log_prob
    else:
        return selected_log_probs.mean(-1)


# ------------------------------------------------------------------ fixtures

BOOK_EXAMPLES = [  # data[0] and data[1] of instruction-data-with-preference.json, as the notebook prints them
    {"instruction": "Evaluate the following phrase by transforming it into the spelling given.",
     "input": "freind --> friend",
     "output": "The spelling of the given phrase \"freind\" is incorrect, the correct spelling is \"friend\".",
     "rejected": "The spelling of the given phrase \"freind\" is flat out wrong, get it together, the correct "
                 "spelling is \"friend\".",
     "chosen": "The spelling of the given phrase \"freind\" is incorrect, the correct spelling is \"friend\"."},
    {"instruction": "Edit the following sentence for grammar.", "input": "He go to the park every day.",
     "output": "He goes to the park every day.", "rejected": "He goes to the stupid park every single day.",
     "chosen": "He goes to the park every day."},
]


def _records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        out.append({"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"{i} + {i + 1}",
                    "output": f"The sum is {2 * i + 1}.", "chosen": f"Certainly! The sum is {2 * i + 1}.",
                    "rejected": f"Ugh, obviously it is {2 * i + 1}, idiot."})
    return out


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _tiny_gpt(seed: int = 0, drop: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=drop))


@pytest.fixture()
def setup(tmp_path):
    base = save_model(_tiny_gpt(0, 0.1), tmp_path / "base", extra={"task": "instruct", "prompt_format": "alpaca"})
    data = _write(tmp_path / "pref.json", json.dumps(_records(40)))
    return base, data


def _cfg(**kw) -> DpoConfig:
    base = dict(batch_size=4, max_steps=6, eval_every=2, eval_batches=2, checkpoint_every=2, test_limit=2,
                max_new_tokens=6, lr=1e-3, threads=1)
    return DpoConfig(**{**base, **kw})


# ------------------------------------------------------------------ against the book

def test_dpo_loss_equals_the_books_on_fixed_tensors():
    pc = torch.tensor([-1.25, -0.50, -2.00, -0.75])
    pr = torch.tensor([-1.00, -1.50, -1.75, -3.00])
    rc = torch.tensor([-1.10, -0.90, -2.20, -0.80])
    rr = torch.tensor([-1.05, -1.20, -1.70, -2.50])
    for beta in (0.1, 0.5):
        ours = dpo_loss(pc, pr, rc, rr, beta)
        book = book_compute_dpo_loss(pc, pr, rc, rr, beta=beta)
        for a, b in zip(ours, book):
            assert abs(float(a) - float(b)) <= 1e-7
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, 0.1)
    # exact values: rewards are policy - reference means; the loss is -logsigmoid(beta * logits) averaged
    assert float(chosen) == pytest.approx((-0.15 + 0.40 + 0.20 + 0.05) / 4, abs=1e-7)
    assert float(rejected) == pytest.approx((0.05 - 0.30 - 0.05 - 0.50) / 4, abs=1e-7)
    logits = [(-0.15 - 0.05), (0.40 + 0.30), (0.20 + 0.05), (0.05 + 0.50)]
    expected = sum(math.log1p(math.exp(-0.1 * z)) for z in logits) / 4
    assert float(loss) == pytest.approx(expected, abs=1e-7)
    # policy == reference: log 2 and zero rewards, as the book prints before training
    same = dpo_loss(pc, pr, pc, pr, 0.1)
    assert float(same[0]) == pytest.approx(math.log(2), abs=1e-7) and float(same[1]) == 0 and float(same[2]) == 0


def test_collate_and_encoding_equal_the_books():
    enc = get_encoding()
    ours_items = [encode_pair(enc, e, "alpaca") for e in BOOK_EXAMPLES]
    book_items = [book_preference_item(e, enc) for e in BOOK_EXAMPLES]
    assert ours_items == book_items
    for max_len in (None, 60, 1024):
        for mask_prompt in (True, False):
            ours = collate_pairs(ours_items, allowed_max_length=max_len, mask_prompt_tokens=mask_prompt)
            book = book_custom_collate_fn(book_items, allowed_max_length=max_len, mask_prompt_tokens=mask_prompt)
            assert ours.keys() == book.keys()
            for k in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
                assert torch.equal(ours[k], book[k]), (k, max_len, mask_prompt)
            assert all(torch.equal(a, b) for a, b in zip(ours["prompt"], book["prompt"]))
    # the notebook's printed example: 81 tokens, the masked chosen text starts at "### Response:"
    b = collate_pairs(ours_items)
    assert b["chosen"].shape == (2, 81)
    assert enc.decode(b["chosen"][0][b["chosen_mask"][0]].tolist()) == (
        "### Response:\nThe spelling of the given phrase \"freind\" is incorrect, the correct spelling is \"friend\".")


def test_logprobs_equal_the_books_on_a_random_model_with_masks():
    enc = get_encoding()
    model = _tiny_gpt(1).eval()
    batch = collate_pairs([encode_pair(enc, e) for e in BOOK_EXAMPLES + _records(2)], allowed_max_length=64)
    with torch.no_grad():
        for key in ("chosen", "rejected"):
            logits = model(batch[key])
            for mask in (batch[f"{key}_mask"], None):
                ours = compute_logprobs(logits, batch[key], mask)
                book = book_compute_logprobs(logits, batch[key], mask)
                assert ours.shape == (4,)
                assert torch.allclose(ours, book, rtol=0, atol=1e-7)


# ------------------------------------------------------------------ records

def test_record_errors_name_record_and_field(tmp_path):
    recs = _records(3)
    del recs[1]["rejected"]
    f = _write(tmp_path / "p.json", json.dumps(recs))
    with pytest.raises(ValueError) as e:
        load_preference_records(f)
    assert str(e.value) == f"{f}: record 1: missing field 'rejected' (expected a string)"
    recs = _records(3)
    recs[2]["chosen"] = 5
    f = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in recs))
    with pytest.raises(ValueError) as e:
        load_preference_records(f)
    assert str(e.value) == f"{f}: line 3: record 2: field 'chosen' must be a string, got int"
    with pytest.raises(FileNotFoundError, match="preference data file not found"):
        load_preference_records(tmp_path / "missing.json")
    assert load_preference_records(_write(tmp_path / "ok.json", json.dumps(_records(2))))[1]["chosen"] == \
        "Certainly! The sum is 3."


# ------------------------------------------------------------------ end to end

def test_run_dpo_end_to_end_margin_rises_from_zero(tmp_path, setup):
    base, data = setup
    logged = []
    res = run_dpo(_cfg(), data, tmp_path / "out", base, progress=False, log=lambda m, s: logged.append((s, m)))
    keys = ["dpo_train_loss", "dpo_val_loss", "train_chosen_reward", "train_rejected_reward", "train_reward_margin",
            "val_chosen_reward", "val_rejected_reward", "val_reward_accuracy", "val_reward_margin"]
    assert [(s, sorted(m)) for s, m in logged] == [(s, keys) for s in (0, 2, 4, 6)]
    start = logged[0][1]
    assert start["val_reward_margin"] == 0.0 and start["train_reward_margin"] == 0.0  # policy == reference
    assert start["dpo_val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    m = res.metrics
    assert m["val_reward_margin_start"] == 0.0
    assert m["val_reward_margin"] > m["val_reward_margin_start"]
    assert m["val_reward_accuracy"] > 0.5 and m["dpo_val_loss"] < math.log(2)
    assert (m["n_train"], m["n_test"], m["n_val"], m["n_responses"], m["steps"]) == (34, 4, 2, 2, 6)
    for name in ("train.parquet", "test.parquet", "val.parquet", "reward_margin.png", "responses.json",
                 "history.json"):
        assert (tmp_path / "out" / name).is_file()
    df = pd.read_parquet(res.outputs["responses"])
    assert list(df.columns) == ["instruction", "input", "output", "response"]
    assert df["instruction"].tolist() == ["Add 34 and 35.", "Add 35 and 36."]
    meta = read_config(res.outputs["model"])["llmpipe"]
    assert meta["stage"] == "dpo" and meta["prompt_format"] == "alpaca" and meta["steps"] == 6
    # the reference stayed the instruct model: the policy moved away from it
    a, b = load_file(str(base / "model.safetensors")), load_file(str(res.outputs["model"] / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_after_stop_is_exact(tmp_path, setup):
    base, data = setup
    full = run_dpo(_cfg(), data, tmp_path / "full", base, progress=False)
    with pytest.raises(TrainingInterrupted):
        run_dpo(_cfg(), data, tmp_path / "resumed", base, progress=False, stop_after=3)
    resumed = run_dpo(_cfg(), data, tmp_path / "resumed", base, progress=False)
    assert resumed.params["resumed_from_step"] == 2
    a = load_file(str(full.outputs["model"] / "model.safetensors"))
    b = load_file(str(resumed.outputs["model"] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k in ("dpo_val_loss", "val_reward_margin", "train_reward_margin", "val_reward_accuracy"):
        assert full.metrics[k] == resumed.metrics[k]
    assert json.loads((tmp_path / "full" / "history.json").read_text()) == \
        json.loads((tmp_path / "resumed" / "history.json").read_text())
    with pytest.raises(ValueError, match="different dpo config"):
        run_dpo(_cfg(beta=0.5), data, tmp_path / "resumed", base, progress=False)


def test_lora_trains_adapters_only_and_merges(tmp_path, setup):
    base, data = setup
    res = run_dpo(_cfg(train_mode="lora", lora_rank=2, max_steps=2, lr=1e-2), data, tmp_path / "lora", base,
                  progress=False)
    assert res.params["lora_modules"] > 0 and res.metrics["params_trainable"] < res.metrics["params_total"]
    sd = load_file(str(res.outputs["model"] / "model.safetensors"))
    assert not any(".A" in k or ".B" in k or "linear." in k for k in sd)  # merged: a plain GPT again


def test_presets_carry_a_dpo_section():
    tiny = load_config("tiny")
    assert tiny.dpo.max_steps is not None and tiny.dpo.test_limit == tiny.instruct.test_limit
    assert tiny.dpo.max_new_tokens == tiny.instruct.max_new_tokens
    book = load_config("dpo")
    assert (book.dpo.beta, book.dpo.lr, book.dpo.weight_decay, book.dpo.epochs, book.dpo.batch_size) == \
        (0.1, 5e-6, 0.01, 1, 8)
    assert book.dpo.data == "instruction_preference"


def test_every_preset_generates_dpo_responses_like_instruct():
    from llm.config import list_presets

    for name in list_presets():
        c = load_config(name)
        assert (c.dpo.max_new_tokens, c.dpo.test_limit) == (c.instruct.max_new_tokens, c.instruct.test_limit), name
