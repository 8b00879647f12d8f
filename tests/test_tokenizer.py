"""Tests for llm.tokenizer: exact parity with tiktoken's own "gpt2" loading path, and document encoding.

Run: python -m pytest -x -q tests/test_tokenizer.py

The reference ids come from `tiktoken.get_encoding("gpt2")` itself, run in a subprocess whose
TIKTOKEN_CACHE_DIR is pre-populated with the BPE files under the keys tiktoken uses for its
download URLs (sha1 of the URL), so tiktoken's official loader (hash check, regex, specials)
runs without network and independently of llm.tokenizer's construction.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llm import tokenizer as T
from llm.tokenizer import EOT, GPT2_VOCAB_SIZE, EncoderPool, encode, encode_documents, get_encoding

VARIED = (
    "Hello, world! It's a test: don't we'll they've I'm you're she'd.\n"
    "Accents: café, naïve, Ærøskøbing, Straße, ÉCOLE; combining e\u0301 vs \u00e9.\n"
    "Emoji: 😀👍🏽 👨‍👩‍👧 and flags 🇫🇷.\n"
    "CJK: 日本語のテキスト、中文文本，한국어 텍스트.\n"
    "Whitespace runs:    four spaces\t\ttabs\n\n\n\nblank lines   \n  trailing  \r\n"
    "Numbers 1234567 3.14159 1,000,000 and 2024-01-01.\n"
    "Code: def f(x):\n    return x**2  # comment\n"
    "Special as text: <|endoftext|> in the middle <|endoftext|>\n"
    "  leading spaces and a final space "
)


def _reference_ids(tmp_path, texts: list[str], mode: str) -> list[list[int]]:
    """ids from tiktoken.get_encoding('gpt2') (official path) in a subprocess with an offline cache."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir(exist_ok=True)
    vocab_bpe, encoder_json = T.bpe_files()
    for url, src in ((T.VOCAB_BPE_URL, vocab_bpe), (T.ENCODER_JSON_URL, encoder_json)):
        shutil.copyfile(src, cache / hashlib.sha1(url.encode()).hexdigest())
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    code = (
        "import json, sys, tiktoken\n"
        "enc = tiktoken.get_encoding('gpt2')\n"
        "assert enc.n_vocab == 50257 and enc.eot_token == 50256\n"
        "texts = json.load(open(sys.argv[1]))\n"
        "mode = sys.argv[2]\n"
        "kw = {'allowed_special': 'all'} if mode == 'allowed' else {'disallowed_special': ()}\n"
        "print(json.dumps([enc.encode(t, **kw) for t in texts]))\n"
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "texts.json"), mode],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_known_ids_and_constants():
    enc = get_encoding()
    assert enc is get_encoding()  # cached
    assert enc.name == "gpt2" and enc.n_vocab == GPT2_VOCAB_SIZE == 50257 and EOT == 50256
    assert enc.encode("This is some text") == [1212, 318, 617, 2420]
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")  # disallowed by default, as in tiktoken
    # The book's chapter 2 example.
    assert enc.encode("Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.",
                      allowed_special={"<|endoftext|>"}) == [
        15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617, 34680, 27271, 13]


def test_parity_with_official_tiktoken(tmp_path):
    texts = [VARIED, "", " ", "\n\n\n", "a" * 3000, "x\u00a0y\u2028z\u3000w"]
    enc = get_encoding()
    ref_allowed = _reference_ids(tmp_path, texts, "allowed")
    ref_plain = _reference_ids(tmp_path, texts, "disallowed")
    assert ref_allowed[0] != ref_plain[0]  # the special string really is treated differently
    assert 50256 in ref_allowed[0] and 50256 not in ref_plain[0]
    for text, ra, rp in zip(texts, ref_allowed, ref_plain):
        assert enc.encode(text, allowed_special="all") == ra
        assert enc.encode(text, disallowed_special=()) == rp
        assert encode(text).tolist() == ra
        assert encode(text, allow_special=False).tolist() == rp
    docs = encode_documents(texts, workers=1)
    assert [d.tolist() for d in docs] == [r + [EOT] for r in ref_allowed]
    assert all(d.dtype == np.uint16 for d in docs)
    docs = encode_documents(texts, workers=1, allow_special=False)
    assert [d.tolist() for d in docs] == [r + [EOT] for r in ref_plain]


def test_split_points_keep_tokens_exact():
    # Many newline kinds right after the cut points: blank lines, indentation, trailing spaces, CRs.
    text = (VARIED + "\n") * 40 + "end"
    enc = get_encoding()
    expected = enc.encode(text, allowed_special="all") + [EOT]
    for piece in (7, 50, 333, 1000):
        cuts = T.split_points(text, piece)
        assert cuts[-1] == len(text) and cuts == sorted(cuts)
        assert len(cuts) > 1
        for c in cuts[:-1]:
            assert text[c] == "\n" and not text[c - 1].isspace()
        with EncoderPool(workers=1, piece_chars=piece) as pool:
            got = pool.encode_documents([text, "short", text[:10]])
        assert got[0].tolist() == expected
        assert got[1].tolist() == enc.encode("short") + [EOT]
        assert got[2].tolist() == enc.encode(text[:10], allowed_special="all") + [EOT]


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_workers_give_identical_ids(backend):
    docs = [VARIED * 30, "tiny", "", VARIED[::-1] * 20]
    enc = get_encoding()
    expected = [enc.encode(d, allowed_special="all") + [EOT] for d in docs]
    with EncoderPool(workers=2, piece_chars=2000, backend=backend) as pool:
        got = pool.encode_documents(docs)
        got2 = pool.encode_documents(docs[:2])  # the pool is reused
        assert pool._executor is not None and pool.workers == 2  # really ran on the workers
    assert [g.tolist() for g in got] == expected
    assert [g.tolist() for g in got2] == expected[:2]


def test_bad_input():
    with pytest.raises(ValueError, match="expected str"):
        encode_documents(["ok", 3], workers=1)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="workers"):
        EncoderPool(workers=-1)
    with pytest.raises(ValueError, match="backend: expected one of thread, process, got 'gpu'"):
        encode_documents(["x"], backend="gpu")
