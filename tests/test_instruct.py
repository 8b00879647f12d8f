"""Tests for llm/instruct.py: book prompt strings, collate masks, record validation, split sizes,
a tiny end-to-end finetune (full and LoRA), exact resume after a stop, and `answer`.

Run: python -m pytest -x -q tests/test_instruct.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from llm.checkpoint import load_model, read_config, save_model
from llm.config import InstructConfig
from llm.instruct import (TrainingInterrupted, answer, collate, encode_examples, extract_response, format_example,
                          format_input, format_prompt, load_records, run_instruct, split_records)
from llm.model import GPT, GPTConfig

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
WITH_INPUT = {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
              "output": "The correct spelling is 'Occasion.'"}
NO_INPUT = {"instruction": "What is an antonym of 'complicated'?", "input": "",
            "output": "An antonym of 'complicated' is 'simple'."}


# ---------------------------------------------------------------------------------- prompts

def test_alpaca_with_input_exact():
    assert format_input(WITH_INPUT) == (
        PREAMBLE + "\n\n### Instruction:\nIdentify the correct spelling of the following word."
        "\n\n### Input:\nOcassion")
    assert format_example(WITH_INPUT) == format_input(WITH_INPUT) + "\n\n### Response:\nThe correct spelling is 'Occasion.'"


def test_alpaca_without_input_exact():
    assert format_prompt(NO_INPUT) == PREAMBLE + "\n\n### Instruction:\nWhat is an antonym of 'complicated'?\n\n### Response:\n"
    assert "### Input" not in format_example(NO_INPUT)


def test_phi3_exact():
    assert format_example(WITH_INPUT, "phi3") == (
        "<|user|>\nIdentify the correct spelling of the following word.\nOcassion\n<|assistant|>\n"
        "The correct spelling is 'Occasion.'")
    assert format_example(NO_INPUT, "phi3") == (
        "<|user|>\nWhat is an antonym of 'complicated'?\n<|assistant|>\nAn antonym of 'complicated' is 'simple'.")
    with pytest.raises(ValueError, match="prompt_format 'chatml'"):
        format_input(NO_INPUT, "chatml")


def test_extract_response():
    assert extract_response(" Paris.\n") == "Paris."
    assert extract_response("### Response:\nParis.") == "Paris."
    assert extract_response("<|assistant|>: Paris.", "phi3") == "Paris."


# ---------------------------------------------------------------------------------- collate

def test_collate_book_example_exact():
    batch = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    x, y = collate(batch)
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert y.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]


def test_collate_truncates_after_masking():
    x, y = collate([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert x.tolist() == [[0, 1, 2], [5, 6, 50256]]
    assert y.tolist() == [[1, 2, 3], [6, 50256, -100]]


def test_collate_prompt_mask_exact():
    # prompt lengths 2, 1, 2: targets predicting prompt tokens (positions < len-1) are ignored
    x, y = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], prompt_lengths=[2, 1, 2])
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert y.tolist() == [[-100, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [-100, 9, 50256, -100, -100]]


def test_prompt_mask_covers_the_whole_prompt():
    from llm.tokenizer import get_encoding

    enc = get_encoding()
    seqs, pls = encode_examples(enc, [WITH_INPUT], "alpaca")
    prompt_ids = enc.encode(format_prompt(WITH_INPUT))
    assert pls == [len(prompt_ids)] and seqs[0][:pls[0]] == prompt_ids
    _, y = collate(seqs, prompt_lengths=pls)
    targets = y[0].tolist()
    n = pls[0]
    assert targets[:n - 1] == [-100] * (n - 1)  # nothing of the prompt is learned
    assert targets[n - 1:] == seqs[0][n:] + [50256]  # the response and the end token are
    assert enc.decode(seqs[0][n:]) == WITH_INPUT["output"]


# ---------------------------------------------------------------------------------- records

def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_records_json_and_jsonl(tmp_path):
    recs = [NO_INPUT, {**WITH_INPUT, "extra": 1}]
    assert load_records(_write(tmp_path / "d.json", json.dumps(recs))) == [NO_INPUT, WITH_INPUT]
    jl = "\n".join(json.dumps(r) for r in recs) + "\n\n"
    assert load_records(_write(tmp_path / "d.jsonl", jl)) == [NO_INPUT, WITH_INPUT]


def test_record_errors_exact(tmp_path):
    p = _write(tmp_path / "d.json", json.dumps([NO_INPUT, {"instruction": "x", "input": ""}]))
    with pytest.raises(ValueError) as e:
        load_records(p)
    assert str(e.value) == f"{p}: record 1: missing field 'output' (expected a string)"

    p = _write(tmp_path / "e.json", json.dumps([{"instruction": "x", "input": 3, "output": "y"}]))
    with pytest.raises(ValueError) as e:
        load_records(p)
    assert str(e.value) == f"{p}: record 0: field 'input' must be a string, got int"

    p = _write(tmp_path / "f.jsonl", json.dumps(NO_INPUT) + "\n\n" + json.dumps({**NO_INPUT, "output": None}) + "\n")
    with pytest.raises(ValueError) as e:
        load_records(p)
    assert str(e.value) == f"{p}: line 3: record 1: field 'output' must be a string, got NoneType"

    p = _write(tmp_path / "g.jsonl", json.dumps(NO_INPUT) + "\n{bad\n")
    with pytest.raises(ValueError, match=r"g\.jsonl: line 2: record 1: invalid JSON"):
        load_records(p)

    p = _write(tmp_path / "h.json", json.dumps([NO_INPUT, ["a", "b"]]))
    with pytest.raises(ValueError) as e:
        load_records(p)
    assert str(e.value) == (f"{p}: record 1: expected an object with string fields instruction, input, output; "
                            "got list")
    with pytest.raises(FileNotFoundError, match="instruction data file not found"):
        load_records(tmp_path / "missing.json")


def test_split_is_the_books():
    recs = [{"instruction": str(i), "input": "", "output": ""} for i in range(1100)]
    train, test, val = split_records(recs)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train[0]["instruction"] == "0" and test[0]["instruction"] == "935" and val[0]["instruction"] == "1045"
    tr2, _, _ = split_records(recs, shuffle=True, seed=1)
    assert sorted(r["instruction"] for r in tr2) != [r["instruction"] for r in train]
    assert split_records(recs, shuffle=True, seed=1) == split_records(recs, shuffle=True, seed=1)
    train, test, val = split_records(recs[:20])
    assert (len(train), len(test), len(val)) == (17, 2, 1)


# ---------------------------------------------------------------------------------- end to end

def _records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        out.append({"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"{i} + {i + 1}",
                    "output": f"The sum is {2 * i + 1}."})
    return out


@pytest.fixture()
def setup(tmp_path):
    torch.manual_seed(0)
    base = save_model(GPT(GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2,
                                    drop_rate=0.1)), tmp_path / "base")
    data = _write(tmp_path / "data.json", json.dumps(_records(40)))
    return base, data


def _cfg(**kw) -> InstructConfig:
    base = dict(batch_size=4, max_steps=6, eval_every=2, eval_batches=1, checkpoint_every=2, test_limit=2,
                max_new_tokens=6, lr=1e-3, threads=1)
    return InstructConfig(**{**base, **kw})


def test_run_instruct_end_to_end(tmp_path, setup):
    base, data = setup
    logged = []
    res = run_instruct(_cfg(), data, tmp_path / "out", base_checkpoint=base, progress=False,
                       log=lambda m, s: logged.append((s, sorted(m))))
    assert logged == [(2, ["train_loss", "val_loss"]), (4, ["train_loss", "val_loss"]), (6, ["train_loss", "val_loss"])]
    m = res.metrics
    assert (m["n_train"], m["n_test"], m["n_val"], m["n_responses"], m["steps"]) == (34, 4, 2, 2, 6)
    assert m["val_loss"] < 10.9  # it learns something from ~11 (ln 50257 = 10.8)
    for name in ("train.parquet", "test.parquet", "val.parquet", "loss.png", "responses.json"):
        assert (tmp_path / "out" / name).is_file()
    df = pd.read_parquet(res.outputs["responses"])
    assert list(df.columns) == ["instruction", "input", "output", "response"]
    assert df["instruction"].tolist() == ["Add 34 and 35.", "Add 35 and 36."]
    assert json.loads((tmp_path / "out" / "responses.json").read_text())[0]["instruction"] == "Add 34 and 35."
    meta = read_config(res.outputs["model"])["llmpipe"]
    assert meta["task"] == "instruct" and meta["prompt_format"] == "alpaca"
    # the saved model reproduces the responses
    assert answer(res.outputs["model"], "Add 34 and 35.", "34 + 35", max_new_tokens=6) == df["response"][0]


def test_resume_after_stop_is_exact(tmp_path, setup):
    base, data = setup
    full = run_instruct(_cfg(), data, tmp_path / "full", base_checkpoint=base, progress=False)
    with pytest.raises(TrainingInterrupted):
        run_instruct(_cfg(), data, tmp_path / "resumed", base_checkpoint=base, progress=False, stop_after=3)
    resumed = run_instruct(_cfg(), data, tmp_path / "resumed", base_checkpoint=base, progress=False)
    assert resumed.params["resumed_from_step"] == 2
    a = load_file(str(full.outputs["model"] / "model.safetensors"))
    b = load_file(str(resumed.outputs["model"] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.metrics["val_loss"] == resumed.metrics["val_loss"]
    assert full.metrics["train_loss"] == resumed.metrics["train_loss"]
    # a changed config refuses to resume from these checkpoints
    with pytest.raises(ValueError, match="different instruct config"):
        run_instruct(_cfg(lr=2e-3), data, tmp_path / "resumed", base_checkpoint=base, progress=False)


def test_lora_and_mask_prompt(tmp_path, setup):
    base, data = setup
    res = run_instruct(_cfg(train_mode="lora", lora_rank=4, lora_alpha=8, mask_prompt=True, prompt_format="phi3",
                            max_steps=2), data, tmp_path / "lora", base_checkpoint=base, progress=False)
    assert res.metrics["params_trainable"] < res.metrics["params_total"] / 2
    model = load_model(res.outputs["model"])  # merged: a plain GPT checkpoint
    assert not any("lora" in n.lower() or n.endswith(".A") for n, _ in model.named_parameters())
    assert read_config(res.outputs["model"])["llmpipe"]["prompt_format"] == "phi3"


def test_init_pretrain_needs_checkpoint(tmp_path, setup):
    _, data = setup
    with pytest.raises(ValueError, match="no pretrain checkpoint"):
        run_instruct(_cfg(), data, tmp_path / "x", base_checkpoint=None, progress=False)
