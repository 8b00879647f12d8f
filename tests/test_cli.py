"""The `llmpipe` command line as a user runs it (subprocesses): errors, generate, classify, stages.

    python -m pytest -q tests/test_cli.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llm.checkpoint import save_model
from llm.model import GPT, GPTConfig


def llmpipe(*args, cwd=None, check_rc=None):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    p = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=300)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.stdout, p.stderr)
    return p


@pytest.mark.parametrize("args, rc, line", [
    (["run", "nosuch"], 2, "llmpipe: error: STAGE: unknown stage 'nosuch'; expected one of download, clean, shard, "
                           "pretrain, evaluate, spam, instruct, dpo, judge, all"),
    (["run", "--preset", "nope"], 2, "llmpipe: error: --preset 'nope': unknown preset; expected one of "),
    (["run", "--set", "pretrain.lr=abc"], 2, "llmpipe: error: --set: pretrain.lr: Input should be a valid number"),
    (["run", "--set", "pretrain.nosuch=1"], 2, "llmpipe: error: --set: pretrain.nosuch: unknown key"),
    (["run", "--force", "bogus"], 2, "llmpipe: error: --force: unknown stage 'bogus'"),
    (["run", "--task-runner", "threads", "--dask-address", "tcp://127.0.0.1:8786"], 2,
     "llmpipe: error: --dask-address: needs --task-runner dask (or leave --task-runner out)"),
    (["run", "--set", "orchestration.task_runner=ray"], 2,
     "llmpipe: error: --set: orchestration.task_runner: Input should be 'threads' or 'dask'"),
    (["run", "clean", "--corpus", "/nonexistent/dir/x.txt"], 1, "llmpipe: error: corpus '/nonexistent/dir/x.txt'"),
    (["generate", "--prompt", "hi", "--checkpoint", "/nonexistent"], 1,
     "llmpipe: error: --checkpoint /nonexistent: expected a folder with config.json and model.safetensors"),
    (["classify"], 2, "llmpipe: error: classify: give one or more TEXT arguments or --file F"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, args, rc, line):
    p = llmpipe(*args, cwd=tmp_path)
    assert p.returncode == rc, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(line), lines[0]
    assert "Traceback" not in p.stderr


def test_bad_config_file_names_file_and_line(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("pretrain:\n  lr: [\n")
    p = llmpipe("run", "--config", str(f), cwd=tmp_path, check_rc=2)
    assert p.stderr.strip().startswith(f"llmpipe: error: {f}:3: invalid YAML")


def test_generate_json_is_greedy_and_matches_the_library(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2))
    save_model(model, tmp_path / "ckpt")
    p = llmpipe("generate", "--prompt", "Every effort moves you", "--checkpoint", str(tmp_path / "ckpt"),
                "--max-new-tokens", "5", "--json", cwd=tmp_path, check_rc=0)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["prompt_tokens"] == [6109, 3626, 6100, 345]
    from llm.generate import generate
    from llm.tokenizer import get_encoding

    expected = generate(model, out["prompt_tokens"], 5, eos_id=None)
    expected = expected[:expected.index(50256)] if 50256 in expected else expected
    assert out["tokens"] == expected
    assert out["text"] == get_encoding().decode(expected)


def test_presets_lists_the_shipped_presets(tmp_path):
    p = llmpipe("presets", cwd=tmp_path, check_rc=0)
    assert {"tiny", "verdict", "gutenberg"} <= set(p.stdout.split())


def test_a_run_on_a_temporary_prefect_server_ends_without_log_errors(tmp_path):
    # LLMPIPE_PREFECT=ephemeral (set for the tests): the run's own server stops only after the logs and
    # events Prefect still queues in the process have reached it (before: "Error logging to API")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Every effort moves you toward the next line of the story.\n" * 200)
    p = llmpipe("run", "clean", "--corpus", str(corpus), "--no-progress", cwd=tmp_path, check_rc=0)
    assert "clean     ran" in p.stderr
    assert "Error logging to API" not in p.stderr, p.stderr[-500:]
