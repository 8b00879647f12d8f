"""Tests for llm/judge.py and llm/judge_server.py.

Protocol tests talk HTTP to a small OpenAI-compatible server written here (a real server on
127.0.0.1 that answers from a table and counts what it receives): request body (temperature,
seed, grammar / response_format), API key header, retry on 500, unparseable -> retry ->
unscored, constraint fallback on 400, cache hits on re-run (no requests at the server).
The last test runs the real embedded judge; it is skipped, with the reason printed (-ra),
only when the judge is not installed (scripts/install_judge.sh).

Run: python -m pytest -x -q tests/test_judge.py
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from llm.config import JudgeConfig
from llm.judge import (INTEGER_GRAMMAR, RETRY_MESSAGE, JudgeError, book_prompt, load_responses, parse_score,
                       rubric_prompt, run_judge)
from llm.judge_server import IntegerConstraint, _wants_integer, installed

RECORDS = [
    {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
     "output": "The car is as fast as lightning.", "response": "The car is as fast as a bullet."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris.", "response": "Berlin."},
    {"instruction": "Name a primary color.", "input": "", "output": "Red.", "response": "eighty"},
]


# ---------------------------------------------------------------------------------- parsing, prompts

@pytest.mark.parametrize("text,score", [
    ("85", 85), (" 85.\n", 85), ("0", 0), ("100", 100), ("100.", 100), ("7", 7), ("85/100", 85), ("85 / 100", 85),
    ('{"score": 85}', 85), (' {"score":0} ', 0),
    ("Score: 85", None), ("85.5", None), ("eighty", None), ("101", None), ("-3", None), ("", None), (None, None),
    ("007", None), ("85/10", None), ("85 points", None), ('{"score": 101}', None), ('{"score": true}', None),
    ('{"score": 85, "why": "x"}', None), ("85..", None), ("8 5", None),
])
def test_parse_score(text, score):
    assert parse_score(text) == score


def test_book_prompt_exact():
    assert book_prompt(RECORDS[1], "Berlin.") == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWhat is the capital of France?` and correct output `Paris.`, "
        "score the model response `Berlin.` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only.")


def test_rubric_prompt_labels_reference_and_candidate():
    assert rubric_prompt(RECORDS[0], "") == (
        "Compare a candidate answer with a reference answer to the same task.\n\n"
        "Task:\nRewrite the sentence using a simile.\n\nInput:\nThe car is very fast.\n\n"
        "Reference answer (correct):\nThe car is as fast as lightning.\n\n"
        'Candidate answer:\n""""""\n\n'
        "Does the candidate answer complete the task as well as the reference answer? "
        "An answer about something else is wrong, however well written. "
        "Score it from 0 to 100: 0-20 if it is wrong, off-topic, empty or missing; 21-79 if it is partly right; "
        "80-100 if it is right (wording may differ). Respond with the integer number only.")
    assert "Input:" not in rubric_prompt(RECORDS[1], "Berlin.")


def test_integer_constraint_accepts_exactly_0_to_100():
    accepted = set()

    def walk(prefix: str) -> None:
        digits, may_end = IntegerConstraint.allowed(prefix)
        if may_end:
            accepted.add(prefix)
        for d in digits:
            walk(prefix + d)

    walk("")
    assert accepted == {str(i) for i in range(101)}


def test_server_reads_constraint_requests():
    assert _wants_integer({"grammar": INTEGER_GRAMMAR}) == (True, False)
    schema = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}
    assert _wants_integer({"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}) == (True, True)
    assert _wants_integer({}) == (False, False)
    with pytest.raises(ValueError):
        _wants_integer({"grammar": "root ::= [a-z]+"})


def test_load_responses_errors(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    with pytest.raises(ValueError) as e:
        load_responses(p)
    assert str(e.value) == f"{p}: record 0: missing field 'response' (expected a string)"
    p.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b", "model_response": "c"}]))
    assert load_responses(p) == [{"instruction": "a", "input": "", "output": "b", "response": "c"}]
    q = tmp_path / "r.parquet"
    pd.DataFrame([{"instruction": "a", "input": 1, "output": "b", "response": "c"}]).to_parquet(q)
    with pytest.raises(ValueError) as e:
        load_responses(q)
    assert str(e.value) == f"{q}: row 0: field 'input' must be a string, got int"


# ---------------------------------------------------------------------------------- a table-driven server

TABLE = {"The car is as fast as a bullet.": "85", "Berlin.": "10", "eighty": "eighty",
         "The car is as fast as lightning.": "95", "Paris.": "100", "Red.": "90", "": "0"}


class TableServer:
    """OpenAI-compatible /v1/chat/completions answering from TABLE by the response in a book prompt."""

    def __init__(self, fail_first: int = 0, fail_status: int = 500, reject_constraint: bool = False,
                 retry_answer: str = "eighty"):
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.fail_left = fail_first
        self.fail_status = fail_status
        self.reject_constraint = reject_constraint
        self.retry_answer = retry_answer
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.bodies.append(body)
                    outer.headers.append(dict(self.headers))
                    if outer.fail_left > 0:
                        outer.fail_left -= 1
                        self._send(outer.fail_status, {"error": {"message": "busy"}})
                        return
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": "no route"}})
                    return
                if outer.reject_constraint and ("grammar" in body or "response_format" in body):
                    self._send(400, {"error": {"message": "unsupported: response_format"}})
                    return
                msgs = body["messages"]
                if msgs[-1]["content"] == RETRY_MESSAGE:
                    answer = outer.retry_answer
                else:
                    m = re.search(r"score the model response `(.*)` on a scale", msgs[0]["content"], re.S)
                    answer = TABLE[m.group(1)]
                if "response_format" in body and parse_score(answer) is not None:
                    answer = json.dumps({"score": parse_score(answer)})
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                              "finish_reason": "stop"}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def responses(tmp_path) -> Path:
    p = tmp_path / "responses.parquet"
    pd.DataFrame(RECORDS).to_parquet(p)
    return p


def _cfg(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(**{"url": url, "model": "table", "prompt": "book", "calibration_sample": 2, "retries": 2,
                          **kw})


def test_scores_calibration_and_request_body(tmp_path, responses):
    srv = TableServer()
    try:
        res = run_judge(_cfg(srv.url, constrain="grammar"), responses, tmp_path / "out", progress=False)
    finally:
        srv.close()
    m = res.metrics
    # model: 85, 10, unscored ("eighty", then "eighty" again); reference: 95, 100; empty: 0, 0;
    # wrong (the other calibration record's reference): "Paris." for record 0 -> 100, "The car is ..." -> 95
    assert m["judge_mean_score"] == 47.5 and m["judge_scored"] == 2 and m["judge_unscored"] == 1
    assert m["judge_reference_score"] == 97.5 and m["judge_empty_score"] == 0 and m["judge_calibration_gap"] == 97.5
    assert m["judge_wrong_score"] == 97.5
    assert m["judge_requests"] == 10 == len(srv.bodies)  # 9 items + one retry
    first = srv.bodies[0]
    assert first["model"] == "table" and first["temperature"] == 0.0 and first["seed"] == 123
    assert first["grammar"] == INTEGER_GRAMMAR and "response_format" not in first
    retry = [b for b in srv.bodies if len(b["messages"]) == 3]
    assert len(retry) == 1 and retry[0]["messages"][1] == {"role": "assistant", "content": "eighty"}
    df = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert df["kind"].tolist() == ["model"] * 3 + ["reference"] * 2 + ["empty"] * 2 + ["wrong"] * 2
    assert df["response"].tolist()[-2:] == ["Paris.", "The car is as fast as lightning."]
    assert df["score"].tolist()[:2] == [85, 10] and pd.isna(df["score"][2])
    assert json.loads(df["answer"][2]) == ["eighty", "eighty"]
    assert (tmp_path / "out" / "scores.csv").is_file() and (tmp_path / "out" / "scores_hist.png").is_file()
    assert "Authorization" not in srv.headers[0]


def test_unparseable_then_good_retry_is_scored(tmp_path, responses):
    srv = TableServer(retry_answer=" 12.")
    try:
        res = run_judge(_cfg(srv.url, calibration_sample=0), responses, tmp_path / "out", progress=False)
    finally:
        srv.close()
    assert res.metrics["judge_unscored"] == 0 and res.metrics["judge_mean_score"] == pytest.approx((85 + 10 + 12) / 3)


def test_retry_on_500_and_429(tmp_path, responses):
    for status in (500, 429):
        srv = TableServer(fail_first=2, fail_status=status)
        try:
            res = run_judge(_cfg(srv.url, calibration_sample=0, limit=1), responses, tmp_path / f"o{status}",
                            progress=False)
        finally:
            srv.close()
        assert res.metrics["judge_mean_score"] == 85 and len(srv.bodies) == 3


def test_persistent_500_and_auth_errors_raise(tmp_path, responses):
    srv = TableServer(fail_first=10)
    try:
        with pytest.raises(JudgeError, match="after 2 attempts: HTTP 500"):
            run_judge(_cfg(srv.url, retries=1, limit=1, calibration_sample=0), responses, tmp_path / "a",
                      progress=False)
    finally:
        srv.close()
    srv = TableServer(fail_first=10, fail_status=401)
    try:
        with pytest.raises(JudgeError, match="HTTP 401 .*check judge.api_key_env"):
            run_judge(_cfg(srv.url, limit=1, calibration_sample=0), responses, tmp_path / "b", progress=False)
        assert len(srv.bodies) == 1  # 4xx is not retried
    finally:
        srv.close()


def test_api_key_header_sent_never_written(tmp_path, responses, monkeypatch):
    secret = "sk-test-0123456789"
    monkeypatch.setenv("LLMPIPE_TEST_KEY", secret)
    srv = TableServer()
    try:
        res = run_judge(_cfg(srv.url, api_key_env="LLMPIPE_TEST_KEY", limit=1, calibration_sample=0), responses,
                        tmp_path / "out", progress=False)
    finally:
        srv.close()
    assert srv.headers[0]["Authorization"] == f"Bearer {secret}"
    for f in (tmp_path / "out").iterdir():
        assert secret.encode() not in f.read_bytes()
    assert secret not in json.dumps(res.params) + json.dumps(res.metrics)
    monkeypatch.delenv("LLMPIPE_TEST_KEY")
    with pytest.raises(ValueError, match="environment variable LLMPIPE_TEST_KEY is not set"):
        run_judge(_cfg("http://127.0.0.1:9/v1", api_key_env="LLMPIPE_TEST_KEY"), responses, tmp_path / "x",
                  progress=False)


def test_json_schema_and_fallback_when_rejected(tmp_path, responses):
    srv = TableServer()
    try:
        res = run_judge(_cfg(srv.url, calibration_sample=0, limit=2), responses, tmp_path / "a", progress=False)
    finally:
        srv.close()
    rf = srv.bodies[0]["response_format"]  # constrain=auto with judge.url: json_schema
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"]["properties"]["score"]["maximum"] == 100
    assert res.metrics["judge_mean_score"] == 47.5  # {"score": N} answers parsed
    srv = TableServer(reject_constraint=True)
    cache = tmp_path / "cache.sqlite"
    try:
        res = run_judge(_cfg(srv.url, calibration_sample=0, limit=2), responses, tmp_path / "b", cache_path=cache,
                        progress=False)
        assert res.metrics["judge_mean_score"] == 47.5 and res.params["judge_constrain"] == "none"
        assert len(srv.bodies) == 3 and "response_format" not in srv.bodies[-1]
        run_judge(_cfg(srv.url, calibration_sample=0, limit=2), responses, tmp_path / "c", cache_path=cache,
                  progress=False)
        assert len(srv.bodies) == 3  # the fallback answers were cached under the requested constraint too
    finally:
        srv.close()


def test_cache_second_run_makes_no_requests(tmp_path, responses):
    cache = tmp_path / "judge_cache.sqlite"
    srv = TableServer()
    try:
        first = run_judge(_cfg(srv.url), responses, tmp_path / "one", cache_path=cache, progress=False)
        n = len(srv.bodies)
        second = run_judge(_cfg(srv.url), responses, tmp_path / "two", cache_path=cache, progress=False)
        assert len(srv.bodies) == n == 10
        assert second.metrics["judge_requests"] == 0 and second.metrics["judge_cache_hits"] == 9
        assert {k: v for k, v in first.metrics.items() if "seconds" not in k and k not in ("judge_requests", "judge_cache_hits")} == \
               {k: v for k, v in second.metrics.items() if "seconds" not in k and k not in ("judge_requests", "judge_cache_hits")}
        # another prompt (or model, or parameter) is another cache key
        run_judge(_cfg(srv.url, seed=7, limit=1, calibration_sample=0), responses, tmp_path / "three",
                  cache_path=cache, progress=False)
        assert len(srv.bodies) == n + 1
    finally:
        srv.close()


def test_unreachable_server(tmp_path, responses):
    t = time.monotonic()
    with pytest.raises(JudgeError, match="cannot reach"):
        run_judge(_cfg("http://127.0.0.1:9/v1", retries=1, limit=1), responses, tmp_path / "x", progress=False)
    assert time.monotonic() - t < 10
    with pytest.raises(ValueError, match="judge.model must name"):
        run_judge(JudgeConfig(url="http://127.0.0.1:9/v1"), responses, tmp_path / "y", progress=False)


# ---------------------------------------------------------------------------------- the real embedded judge

_OK, _WHY = installed()


@pytest.mark.skipif(not _OK, reason=f"embedded judge not installed ({_WHY})")
def test_embedded_judge_discriminates(tmp_path):
    """The real local judge: references must score clearly above empty answers; the server is stopped after."""
    records = [
        {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris.",
         "response": "The capital of France is Berlin."},
        {"instruction": "Convert the active sentence to passive.", "input": "The chef cooks the meal every day.",
         "output": "The meal is cooked by the chef every day.", "response": "The meal is cooked by the chef every day."},
    ]
    p = tmp_path / "responses.json"
    p.write_text(json.dumps(records))
    cache = tmp_path / "cache.sqlite"
    res = run_judge(JudgeConfig(calibration_sample=2), p, tmp_path / "out", cache_path=cache, progress=False)
    m = res.metrics
    print("embedded judge:", res.params["judge_model"], {k: round(v, 2) for k, v in m.items()})
    assert m["judge_scored"] == 2 and m["judge_unscored"] == 0
    assert m["judge_reference_score"] >= m["judge_empty_score"] + 40
    assert "judge_wrong_score" in m
    log = (tmp_path / "out" / "judge_server.log").read_text()
    port = re.search(r"127\.0\.0\.1:(\d+)", log)
    if port:  # stopped: nothing listens on its port any more
        import socket

        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(port.group(1))), timeout=2).close()
    again = run_judge(JudgeConfig(calibration_sample=2), p, tmp_path / "out2", cache_path=cache, progress=False)
    assert again.metrics["judge_requests"] == 0 and again.metrics["judge_mean_score"] == m["judge_mean_score"]
