"""Bad input found by trying the CLI from outside: each is one line naming the flag/field/file/record, non-zero exit.

Everything here fails before a model is loaded or a stage runs, so it is fast (no training).

    python -m pytest -q tests/test_input_checks.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from flows.cli import main
from llm import config
from llm.checkpoint import save_model
from llm.clean import run_clean
from llm.config import CleanConfig, ConfigError, load_config
from llm.dpo import load_preference_records
from llm.generate import generate
from llm.instruct import load_records
from llm.judge.stage import load_responses
from llm.model import GPT, GPTConfig
from llm.spam import add_classification_head

REC = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
PREF = {**REC, "chosen": "Blue.", "rejected": "No."}


def cli(capsys, *args) -> tuple[int, list[str]]:
    """Run `llmpipe ARGS` in this process: (exit code, non-empty stderr lines)."""
    rc = main(list(args))
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


# --- 1, 2: sampling flags of generate / ask / classify ---------------------------------------------------

@pytest.mark.parametrize("args, line", [
    (["generate", "--prompt", "hi", "--temperature", "-1"],
     "--temperature: expected a number >= 0 (0 = greedy), got -1.0"),
    (["generate", "--prompt", "hi", "--temperature", "nan"],
     "--temperature: expected a number >= 0 (0 = greedy), got nan"),
    (["generate", "--prompt", "hi", "--top-p", "2"], "--top-p: expected a number in (0, 1], got 2.0"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p: expected a number in (0, 1], got 0.0"),
    (["generate", "--prompt", "hi", "--top-k", "0"],
     "--top-k: expected an integer >= 1 (leave --top-k out for no top-k filter), got 0"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "-1"],
     "--max-new-tokens: expected a non-negative integer, got -1"),
    (["ask", "hello", "--max-new-tokens", "-5"], "--max-new-tokens: expected an integer >= 1, got -5"),
    (["ask", "hello", "--max-new-tokens", "0"], "--max-new-tokens: expected an integer >= 1, got 0"),
    (["ask", " "], "INSTRUCTION: expected a non-empty instruction"),
    (["classify", "ok", ""], "TEXT 2: expected a non-empty message"),
    (["classify", "--file", "/nonexistent/sms.txt"], "--file /nonexistent/sms.txt: file not found"),
])
def test_sampling_and_message_flags(capsys, tmp_path, args, line):
    # --checkpoint points nowhere: the flags must be rejected before any model is looked for.
    rc, lines = cli(capsys, *args, "--checkpoint", str(tmp_path / "none"))
    assert (rc, lines) == (2, [f"llmpipe: error: {line}"])


def test_classify_an_empty_file(capsys, tmp_path):
    torch.manual_seed(0)
    model = add_classification_head(GPT(GPTConfig(context_length=16, emb_dim=16, n_heads=2, n_layers=1))).eval()
    save_model(model, tmp_path / "clf", extra={"task": "spam", "labels": ["ham", "spam"], "tokenizer": "gpt2",
                                               "max_length": 16})
    blank = tmp_path / "sms.txt"
    blank.write_text("\n  \n")
    rc, lines = cli(capsys, "classify", "--file", str(blank), "--checkpoint", str(tmp_path / "clf"))
    assert (rc, lines) == (2, [f"llmpipe: error: --file {blank}: no messages to classify (expected one message per "
                               "line, or a 'text' column)"])
    blank.write_text("free prize, call now\n")
    rc, _ = cli(capsys, "classify", "--file", str(blank), "--checkpoint", str(tmp_path / "clf"))
    assert rc == 0


def test_generate_library_names_the_argument():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=120, context_length=16, emb_dim=32, n_heads=4, n_layers=2))
    with pytest.raises(ValueError) as e:
        generate(model, [1, 2], 3, temperature=1.0, top_k=0)
    assert str(e.value) == "top_k: expected an integer >= 1 or None (no top-k filter), got 0"
    with pytest.raises(ValueError, match=r"^top_p: expected a number in \(0, 1\] or None, got 1.5$"):
        generate(model, [1, 2], 3, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match=r"^temperature: expected a number >= 0 \(0 = greedy\), got -0.5$"):
        generate(model, [1, 2], 3, temperature=-0.5)
    assert len(generate(model, [1, 2], 3, temperature=1.0, top_k=1, eos_id=None, seed=1)) == 3  # top_k=1 is fine


def test_bad_flag_exits_2_from_the_real_command(tmp_path):
    p = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "--prompt", "hi", "--top-k", "0"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == "llmpipe: error: --top-k: expected an integer >= 1 (leave --top-k out for no top-k " \
                               "filter), got 0"


# --- 3: a corpus that is not text ---------------------------------------------------------------------------

def test_clean_rejects_a_nul_byte_corpus(tmp_path):
    nul = tmp_path / "zeros.txt"
    nul.write_bytes(b"\0" * 5000)
    with pytest.raises(ValueError) as e:
        run_clean(CleanConfig(corpus=[str(nul)]), {}, tmp_path / "out", progress=False)
    assert str(e.value) == ("clean: no documents left after cleaning 1 input document(s) (dropped: too_short=0, "
                            f"no_text=1, duplicate=0; min_chars=100) of {nul}")
    assert not (tmp_path / "out" / "documents.parquet").exists()


def test_clean_drops_binary_beside_real_text(tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 5
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(text)
    (tmp_path / "c" / "b.txt").write_bytes(b"\0\x01\x02" * 1000 + b"some words " * 10)  # more control than letters
    (tmp_path / "c" / "d.txt").write_text("12345 67890 " * 20)  # no letter at all
    res = run_clean(CleanConfig(corpus=[str(tmp_path / "c")]), {}, tmp_path / "out", progress=False)
    assert res.metrics["dropped_no_text"] == 2 and res.metrics["dropped_too_short"] == 0
    assert res.metrics["documents_out"] == 1
    assert pq.read_table(tmp_path / "out" / "documents.parquet").column("text").to_pylist() == [text.rstrip()]


# --- 4: JSON / JSON Lines record files ---------------------------------------------------------------------

def test_pretty_printed_json_is_json(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(REC, indent=2))
    assert load_records(one) == [REC]
    many = tmp_path / "many.jsonl"  # the suffix does not matter: the whole file parses as JSON
    many.write_text(json.dumps([REC, REC], indent=2))
    assert load_records(many) == [REC, REC]
    pref = tmp_path / "pref.json"
    pref.write_text(json.dumps([PREF], indent=4))
    assert load_preference_records(pref) == [PREF]
    resp = tmp_path / "resp.json"
    resp.write_text(json.dumps([{**REC, "response": "Red."}], indent=1))
    assert load_responses(resp) == [{**REC, "response": "Red."}]
    jl = tmp_path / "resp.json"  # JSON Lines with a .json name
    jl.write_text(json.dumps({**REC, "response": "A"}) + "\n" + json.dumps({**REC, "response": "B"}) + "\n")
    assert [r["response"] for r in load_responses(jl)] == ["A", "B"]


def test_record_file_errors_name_file_line_and_record(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([REC, REC], indent=2)[:-3])
    with pytest.raises(ValueError) as e:
        load_records(broken)
    assert str(e.value) == f"{broken}: invalid JSON (Expecting ',' delimiter at line 11 column 3)"

    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [PREF]}, indent=2))
    with pytest.raises(ValueError) as e:
        load_preference_records(wrapped)
    assert str(e.value) == (f"{wrapped}: expected a JSON list of records or JSON Lines, got an object with the list "
                            "under 'data'; write the list itself")

    jl = tmp_path / "d.json"
    jl.write_text(json.dumps(REC) + "\n\n" + json.dumps(REC)[:-1] + "\n")
    with pytest.raises(ValueError) as e:
        load_records(jl)
    assert str(e.value) == (f"{jl}: line 3: record 1: invalid JSON (Expecting ',' delimiter at column "
                            f"{len(json.dumps(REC))})")

    jl.write_text(json.dumps(REC) + "\n" + json.dumps({"instruction": "x", "input": ""}) + "\n")
    with pytest.raises(ValueError) as e:
        load_records(jl)
    assert str(e.value) == f"{jl}: line 2: record 1: missing field 'output' (expected a string)"

    scalar = tmp_path / "n.json"
    scalar.write_text("42\n")
    with pytest.raises(ValueError) as e:
        load_responses(scalar)
    assert str(e.value) == f"{scalar}: expected a JSON list of records or JSON Lines (one object per line), got int"


# --- 5: config errors name the file (and line) that introduced them ---------------------------------------

def test_config_file_error_names_file_and_line_with_mirror(capsys, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("pretrain:\n  epochs: 2\n  lrr: 1\n")
    rc, lines = cli(capsys, "run", "--config", str(f), "--mirror", str(tmp_path), "--corpus", str(f),
                    "--workdir", str(tmp_path / "wd"))
    assert (rc, lines) == (2, [f"llmpipe: error: {f}: pretrain.lrr: unknown key (line 3)"])
    f.write_text("pretrain:\n  model:\n    n_heads: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config("tiny", f, ['download.mirror="/tmp"'])
    assert str(e.value) == (f"{f}: pretrain.model.n_heads: expected emb_dim divisible by n_heads, got emb_dim=64, "
                            "n_heads=3 (line 3)")
    # the same value from --set is blamed on --set; a later --set can repair the file's value
    with pytest.raises(ConfigError) as e:
        load_config("tiny", None, ["pretrain.model.n_heads=3"])
    assert str(e.value).startswith("--set: pretrain.model.n_heads: expected emb_dim divisible by n_heads")
    assert load_config("tiny", f, ["pretrain.model.n_heads=4"]).pretrain.model.n_heads == 4


def test_preset_error_names_the_preset_file(monkeypatch, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("# a preset\nshard:\n  val_fraction: 1.5\n")
    monkeypatch.setattr(config, "PRESET_DIR", tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config("broken", None, ['download.mirror="/tmp"'])
    assert str(e.value) == f"{bad}: shard.val_fraction: Input should be less than 1 (got 1.5) (line 3)"


def test_missing_or_folder_config_file(capsys, tmp_path):
    rc, lines = cli(capsys, "run", "--config", str(tmp_path / "nope.yaml"), "--workdir", str(tmp_path))
    assert (rc, lines) == (2, [f"llmpipe: error: {tmp_path / 'nope.yaml'}: config file not found"])
    rc, lines = cli(capsys, "run", "--config", str(tmp_path), "--workdir", str(tmp_path))
    assert (rc, lines) == (2, [f"llmpipe: error: {tmp_path}: expected a YAML file, got a folder"])


# --- 6: the whole config is checked before any stage runs ---------------------------------------------------

@pytest.mark.parametrize("overrides, line", [
    (["pretrain.model.n_layers=0"], "--set: pretrain.model.n_layers: Input should be greater than or equal to 1 "
                                    "(got 0)"),
    (["pretrain.model.n_heads=0"], "--set: pretrain.model.n_heads: Input should be greater than or equal to 1 (got 0)"),
    (["pretrain.model.emb_dim=60", "pretrain.model.n_heads=8"],
     "--set: pretrain.model.n_heads: expected emb_dim divisible by n_heads, got emb_dim=60, n_heads=8"),
    (["pretrain.model.vocab_size=1000"],
     "--set: pretrain.model.vocab_size: expected >= 50257 (the GPT-2 tokenizer's vocabulary), got 1000"),
    (["pretrain.model.name=gpt3"], "--set: pretrain.model.name: unknown model config 'gpt3'; expected one of gpt2, "
                                   "gpt2-124m, gpt2-124m-256, gpt2-large, gpt2-medium, gpt2-small, gpt2-xl"),
    (["pretrain.model.name=null", "pretrain.model.vocab_size=null"],
     "--set: pretrain.model.vocab_size: expected a value when pretrain.model.name is null (set "
     "pretrain.model.vocab_size, or a name)"),
    (["pretrain.book_compat=true", "pretrain.nproc=2"],
     "--set: pretrain.nproc: expected 1 with pretrain.book_compat (the book's single-process loop), got 2"),
    (["judge.temperature=-1"], "--set: judge.temperature: Input should be greater than or equal to 0 (got -1)"),
])
def test_invalid_config_fails_before_any_stage(capsys, tmp_path, overrides, line):
    args = [a for o in overrides for a in ("--set", o)]
    rc, lines = cli(capsys, "run", *args, "--workdir", str(tmp_path))
    assert (rc, lines) == (2, [f"llmpipe: error: {line}"])
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, cleaned or created


def test_valid_shapes_still_load():
    cfg = load_config("tiny", None, ["pretrain.model.emb_dim=96", "pretrain.model.n_heads=3"])
    assert (cfg.pretrain.model.emb_dim, cfg.pretrain.model.n_heads) == (96, 3)
    # a finetune's max_length is a cap (min(max_length, context length)), so a smaller context is fine
    assert load_config("tiny", None, ["pretrain.model.context_length=16"]).instruct.max_length == 64
    for preset in config.list_presets():
        load_config(preset)


@pytest.mark.parametrize("args, line", [
    (["llm.spam", "data.tsv", "out", "--set", "epochs=0"],
     "error: --set: epochs: Input should be greater than or equal to 1 (got 0)"),
    (["llm.instruct", "--data", "d.json", "--out", "o", "--set", "lr=-1"],
     "error: --set: lr: Input should be greater than 0 (got -1)"),
    (["llm.dpo", "--data", "d.json", "--out", "o", "--base", "b", "--set", "beta=0"],
     "error: --set: beta: Input should be greater than 0 (got 0)"),
    (["llm.judge", "--responses", "r.json", "--out", "o", "--set", "temperature=-1"],
     "error: --set: temperature: Input should be greater than or equal to 0 (got -1)"),
    (["llm.train", "--config", "pretrain.yaml", "--shards", "s", "--out", "o"],
     "error: pretrain.yaml: lr: Input should be greater than 0 (got 0) (line 2)"),
    (["llm.train", "--config", "missing.yaml", "--shards", "s", "--out", "o"],
     "error: missing.yaml: config file not found"),
])
def test_stage_entry_points_print_one_line_for_a_bad_config(tmp_path, args, line):
    # the `python -m llm.<stage>` entry points validate their config before reading any data
    (tmp_path / "pretrain.yaml").write_text("epochs: 1\nlr: 0\n")
    p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [line]
