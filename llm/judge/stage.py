"""The judge stage (the book's section 7.8): score every response 0-100, plus calibration items.

    from llm.judge import run_judge
    result = run_judge(cfg.judge, Path("out/instruct/responses.parquet"), Path("out/judge"),
                       cache_path=Path("data/cache/judge.sqlite"))
    result.metrics["judge_mean_score"], result.metrics["judge_auc"]

    python -m llm.judge --responses out/instruct/responses.parquet --out out/judge \\
        [--cache data/cache/judge.sqlite] [--field "model 1 response"] [--set prompt=book ...]

Items: every response (the first cfg.limit), and for the first cfg.calibration_sample records the
reference output itself, an empty answer and a fluent but wrong answer (the next calibration
record's reference). Items of one record are judged one after another (the local judge reuses the
shared prompt beginning). A judge that cannot answer an item (after its own retries) leaves it
unscored; after cfg.max_errors such errors in a row, or one fatal error, the stage stops with one
line naming the judge's URL (or model) and how many items were scored: answers already given stay
in the cache, and no half-written table is left (tables are written to a temp file, then renamed).

Metrics: judge_mean_score (0-100, over scored model responses), judge_scored, judge_unscored,
judge_reference_score, judge_empty_score, judge_wrong_score, judge_auc (the probability that a
record's reference outscores the wrong answer given to it; ties count half), judge_calibration_gap
(reference - empty), judge_requests (requests / forward passes: 0 on a fully cached re-run),
judge_cache_hits, judge_items, judge_seconds, judge_load_seconds, judge_seconds_per_item (over
items actually asked). With the dpo stage's responses (dpo_responses) they are scored as items of kind
"dpo", each right after the instruct response to the same task, adding judge_mean_score_instruct
(= judge_mean_score), judge_mean_score_dpo, judge_dpo_scored and judge_dpo_win_rate (the share of tasks
where the dpo response outscores the instruct one; ties count half). Artifacts: scores.parquet, scores.csv (one row per item), scores_hist.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pandas as pd
from tqdm import tqdm

from llm.config import JudgeConfig, section_from_overrides
from llm.fsutil import atomic_write_via, save_figure
from llm.judge.base import Judge, JudgeError, JudgeFatal, Verdict
from llm.judge.cache import JudgeCache
from llm.judge.llama import LlamaServerJudge
from llm.judge.local import LocalJudge  # cheap: it imports torch/transformers only when the model loads
from llm.judge.prepare import resolve_backend
from llm.judge.prompts import Protocol, get_protocol
from llm.judge.remote import OllamaJudge, RemoteJudge, ollama_root
from llm.records import read_records
from llm.result import MetricLogger, StageResult, log_or_null

FIELDS = ("instruction", "input", "output", "response")
KINDS = ("model", "reference", "wrong", "empty", "dpo")
EMPTY_ANSWER = "empty response: 0 by the protocol's rule (judge not asked)"


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def load_responses(path: str | Path, field: Optional[str] = None) -> list[dict]:
    """Records with instruction, input, output, response (strings) from Parquet, JSON or JSONL.
    field names the response field (e.g. "model 1 response"); by default "response", or
    "model_response" (the book's instruction-data-with-response.json) when there is no "response"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: responses file not found")
    if path.suffix.lower() == ".parquet":
        try:
            rows = pd.read_parquet(path).to_dict("records")
        except Exception as e:
            raise ValueError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None
        where = lambda i: f"{path}: row {i}"  # noqa: E731
    else:
        rows = read_records(path, "responses")
        where = rows.where
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{where(i)}: expected an object with {', '.join(FIELDS)}; got {type(r).__name__}")
        src = field or ("model_response" if "response" not in r and "model_response" in r else "response")
        if src not in r:
            have = ", ".join(repr(k) for k in r if k not in FIELDS[:3]) or "none"
            raise ValueError(f"{where(i)}: missing field '{src}' (expected a string; other fields there: {have})")
        r = {**r, "response": r[src]}
        for f in FIELDS:
            if f not in r:
                raise ValueError(f"{where(i)}: missing field '{f}' (expected a string)")
            if not isinstance(r[f], str):
                raise ValueError(f"{where(i)}: field '{src if f == 'response' else f}' must be a string, "
                                 f"got {type(r[f]).__name__}")
        out.append({f: r[f] for f in FIELDS})
    if not out:
        raise ValueError(f"{path}: no responses to judge")
    return out


def with_dpo_items(items: list[tuple], records: list[dict], dpo_records: list[dict]) -> list[tuple]:
    """items plus one ("dpo", index, record, dpo response) per dpo record, right after the instruct response
    to the same task (matched on instruction and input), so both answers to a task are judged in a row;
    dpo records without an instruct twin come last, with indexes after the instruct records'."""
    where = {}
    for i, r in enumerate(records):
        where.setdefault((r["instruction"], r["input"]), i)
    extra: dict[int, tuple] = {}
    tail = []
    for d in dpo_records:
        i = where.get((d["instruction"], d["input"]))
        if i is not None and i not in extra:
            extra[i] = ("dpo", i, records[i], d["response"])
        else:
            tail.append(("dpo", len(records) + len(tail), d, d["response"]))
    out = []
    for it in items:
        out.append(it)
        if it[0] == "model" and it[1] in extra:
            out.append(extra[it[1]])
    return out + tail


def dpo_win_rate(rows: list[dict]) -> Optional[float]:
    """Share of tasks whose dpo response outscores the instruct response (both scored; ties count 1/2)."""
    inst = {r["index"]: r["score"] for r in rows if r["kind"] == "model" and r["score"] is not None}
    pairs = [(r["score"], inst[r["index"]]) for r in rows
             if r["kind"] == "dpo" and r["score"] is not None and r["index"] in inst]
    if not pairs:
        return None
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def calibration_items(records: list[dict], n: int) -> list[tuple[str, int, dict, str]]:
    """(kind, record index, record, response) for every model response and the calibration of the first n
    records, ordered record by record (model, reference, wrong, empty) so a judge can reuse a shared prompt."""
    n = min(n, len(records))
    items = []
    for i, r in enumerate(records):
        items.append(("model", i, r, r["response"]))
        if i < n:
            items.append(("reference", i, r, r["output"]))
            if n > 1:  # a fluent but wrong answer: the next calibration record's reference
                other = records[(i + 1) % n]["output"]
                if other.strip() != r["output"].strip():
                    items.append(("wrong", i, r, other))
            items.append(("empty", i, r, ""))
    return items


# --------------------------------------------------------------------------------------------
# The judge the config asks for
# --------------------------------------------------------------------------------------------

def _api_key(cfg: JudgeConfig) -> Optional[str]:
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ValueError(f"judge.api_key_env: environment variable {cfg.api_key_env} is not set or empty")
    return key


def make_judge(cfg: JudgeConfig, log_dir: Optional[Path] = None) -> Judge:
    """cfg.url: a RemoteJudge; else the embedded model, in this process (backend auto / transformers)
    or through llama.cpp's llama-server (backend llama-server). Nothing is loaded or started yet."""
    if cfg.url and cfg.prompt == "book":
        root = ollama_root(cfg.url, cfg.timeout)  # bounded by judge.timeout (at most 5 s)
        if root is not None:  # the book's own client: native /api/chat, the book's options, no constraint
            return OllamaJudge(root, cfg.model or "", api_key=_api_key(cfg), seed=cfg.seed,
                               temperature=cfg.temperature, timeout=cfg.timeout, retries=cfg.retries,
                               backoff=cfg.backoff)
    if cfg.url:
        return RemoteJudge(cfg.url, cfg.model or "", api_key=_api_key(cfg), temperature=cfg.temperature,
                           seed=cfg.seed, max_tokens=cfg.max_tokens,
                           constrain="json_schema" if cfg.constrain == "auto" else cfg.constrain,
                           timeout=cfg.timeout, retries=cfg.retries, backoff=cfg.backoff)
    if resolve_backend(cfg.backend) == "llama-server":
        return LlamaServerJudge(threads=cfg.threads, log_file=(log_dir / "llama_server.log") if log_dir else None,
                                temperature=cfg.temperature, seed=cfg.seed, timeout=cfg.timeout,
                                retries=cfg.retries, backoff=cfg.backoff,
                                constrain="grammar" if cfg.constrain == "auto" else cfg.constrain)
    return LocalJudge(threads=cfg.threads)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------

def _mean(xs) -> Optional[float]:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def judge_auc(rows: list[dict]) -> Optional[float]:
    """P(reference score > wrong score) over records with both scored; ties count 1/2."""
    ref = {r["index"]: r["score"] for r in rows if r["kind"] == "reference" and r["score"] is not None}
    pairs = [(ref[r["index"]], r["score"]) for r in rows
             if r["kind"] == "wrong" and r["score"] is not None and r["index"] in ref]
    if not pairs:
        return None
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def plot_histogram(df: pd.DataFrame, path: Path, title: str) -> Path:
    import matplotlib  # lazy: only when a table is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = list(range(0, 101, 10))
    bins[-1] = 100.001
    for kind, color in (("model", "tab:blue"), ("dpo", "tab:purple"), ("reference", "tab:green"),
                        ("wrong", "tab:orange"), ("empty", "tab:red")):
        s = df.loc[(df["kind"] == kind) & df["score"].notna(), "score"].astype(float)
        if len(s):
            ax.hist(s, bins=bins, alpha=0.55, color=color, label=f"{kind} (n={len(s)}, mean {s.mean():.1f})",
                    density=True)
    ax.set_xlim(0, 100)
    ax.set_xlabel("judge score")
    ax.set_ylabel("fraction per point")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _write_table(df: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    pq, csv = out_dir / "scores.parquet", out_dir / "scores.csv"
    atomic_write_via(pq, lambda p: df.to_parquet(p, index=False))
    atomic_write_via(csv, lambda p: df.to_csv(p, index=False))
    return pq, csv


def _stop_line(judge: Judge, results: list, total: int, why: str) -> str:
    done = [r for r in results if r is not None]
    scored = sum(r[0].score is not None for r in done)
    return (f"judge {judge.where}: stopped ({why}); {scored} of {total} items scored, "
            f"{len(done) - scored} unscored, {total - len(done)} not asked")


def score_items(judge: Judge, protocol: Protocol, items: list[tuple], cache: JudgeCache, *,
                max_errors: int = 3, concurrency: int = 1, progress: bool = True,
                log: Optional[MetricLogger] = None) -> list[tuple[Verdict, bool, float]]:
    """(verdict, cached, seconds) per item, in order. An item whose judge call fails is unscored; after
    max_errors failures in a row (or a JudgeFatal) a JudgeError with the counts is raised."""
    log = log_or_null(log)
    results: list = [None] * len(items)
    stop = threading.Event()
    lock = threading.Lock()
    state = {"consecutive": 0, "error": None, "fatal": False}

    def work(k: int) -> None:
        if stop.is_set():
            return
        _, _, entry, resp = items[k]
        if protocol.empty_scores_zero and not resp.strip():
            results[k] = (Verdict(0.0, EMPTY_ANSWER, 0), False, 0.0)
            return
        messages = protocol.messages(entry, resp)
        key = cache.key(judge.identity, protocol.key, messages, judge.params(protocol))
        hit = cache.get(key)
        if hit is not None:
            results[k] = (Verdict(hit[1], hit[0], 0), True, 0.0)
            return
        t = time.monotonic()
        loaded_before = getattr(judge, "load_seconds", None)
        try:
            v = judge.judge(protocol, entry, resp)
        except JudgeError as e:
            with lock:
                state["consecutive"] += 1
                state["error"] = e
                state["fatal"] = state["fatal"] or isinstance(e, JudgeFatal)
                if state["fatal"] or state["consecutive"] >= max_errors:
                    stop.set()
            results[k] = (Verdict(None, f"error: {e}", 0), False, time.monotonic() - t)
            return
        with lock:
            state["consecutive"] = 0
        cache.put(key, judge.identity, protocol.key, messages[-1]["content"], judge.params(protocol), v.answer, v.score)
        load = getattr(judge, "load_seconds", None) if loaded_before is None else None  # loaded by this call
        results[k] = (v, False, time.monotonic() - t - (load or 0.0))

    bar = tqdm(total=len(items), desc="judge", unit="item", disable=not progress, dynamic_ncols=True)
    model_scores: list[float] = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = [pool.submit(work, k) for k in range(len(items))]
            for n, f in enumerate(futures, start=1):
                try:
                    f.result()
                except BaseException:  # e.g. the judge is not installed, Ctrl-C: ask nothing more
                    stop.set()
                    for other in futures:
                        other.cancel()
                    raise
                r = results[n - 1]
                if r is None:
                    continue
                if items[n - 1][0] == "model" and r[0].score is not None:
                    model_scores.append(r[0].score)
                bar.update(1)
                if model_scores:
                    bar.set_postfix(mean=f"{sum(model_scores) / len(model_scores):.1f}")
                if n % 10 == 0 or n == len(items):
                    log({"judge_items_done": n, **({"judge_running_mean": sum(model_scores) / len(model_scores)}
                                                   if model_scores else {})}, n)
    finally:
        bar.close()
    if stop.is_set():
        e = state["error"]
        why = "fatal error" if state["fatal"] else f"{max_errors} errors in a row"
        raise JudgeError(_stop_line(judge, results, len(items), why) + f"; last error: {e}")
    return results


def run_judge(cfg: JudgeConfig, responses: Path, out_dir: Path, cache_path: Optional[Path] = None,
              progress: bool = True, log: Optional[MetricLogger] = None, field: Optional[str] = None,
              judge: Optional[Judge] = None, dpo_responses: Optional[Path] = None) -> StageResult:
    """Score every response (cfg.limit first ones) plus the calibration items; see the module docstring.
    dpo_responses (the dpo stage's responses.parquet): its responses are scored too, as items of kind "dpo"."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    records = load_responses(responses, field)
    if cfg.limit is not None:
        records = records[:cfg.limit]
    protocol = get_protocol(cfg.prompt)
    items = calibration_items(records, cfg.calibration_sample)
    if dpo_responses is not None:
        dpo_records = load_responses(dpo_responses)
        if cfg.limit is not None:
            dpo_records = dpo_records[:cfg.limit]
        items = with_dpo_items(items, records, dpo_records)
    own = judge is None
    judge = judge if judge is not None else make_judge(cfg, out_dir)
    cache = JudgeCache(cache_path)
    try:
        results = score_items(judge, protocol, items, cache, max_errors=cfg.max_errors,
                              concurrency=cfg.concurrency if cfg.url else 1, progress=progress, log=log)
    finally:
        cache.close()
        if own:
            judge.close()
    rows = []
    for (kind, i, entry, resp), (v, cached, secs) in zip(items, results):
        rows.append({"kind": kind, "index": i, "instruction": entry["instruction"], "input": entry["input"],
                     "output": entry["output"], "response": resp, "score": v.score, "answer": v.answer,
                     "cached": cached, "seconds": round(secs, 3)})
    df = pd.DataFrame(rows)
    df["score"] = df["score"].astype("Float64")
    pq, csv = _write_table(df, out_dir)
    by = {k: [r["score"] for r in rows if r["kind"] == k] for k in KINDS}
    ref, empty = _mean(by["reference"]), _mean(by["empty"])
    asked = [r["seconds"] for r in rows if not r["cached"]]
    load_s = getattr(judge, "load_seconds", None)
    hist = plot_histogram(df, out_dir / "scores_hist.png", f"{judge.identity.get('model')} ({protocol.key} prompt)")
    metrics = {"judge_mean_score": _mean(by["model"]), "judge_scored": sum(s is not None for s in by["model"]),
               "judge_unscored": sum(s is None for s in by["model"]), "judge_reference_score": ref,
               "judge_empty_score": empty, "judge_wrong_score": _mean(by["wrong"]), "judge_auc": judge_auc(rows),
               "judge_calibration_gap": (ref - empty) if ref is not None and empty is not None else None,
               "judge_requests": judge.calls, "judge_cache_hits": sum(r["cached"] for r in rows),
               "judge_items": len(rows), "judge_seconds": time.monotonic() - t0, "judge_load_seconds": load_s,
               "judge_seconds_per_item": (sum(asked) / len(asked)) if asked else None}
    if dpo_responses is not None:  # judge_mean_score keeps its meaning: the instruct stage's responses
        metrics.update({"judge_mean_score_instruct": _mean(by["model"]), "judge_mean_score_dpo": _mean(by["dpo"]),
                        "judge_dpo_scored": sum(s is not None for s in by["dpo"]),
                        "judge_dpo_win_rate": dpo_win_rate(rows)})
    where = judge.identity.get("url") or "embedded"
    return StageResult(
        metrics={k: float(v) for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))},
        params={"judge_model": judge.identity.get("model"), "judge_url": where, "judge_prompt": protocol.key,
                "judge_backend": judge.identity.get("judge"), "judge_temperature": cfg.temperature,
                "judge_seed": cfg.seed, "judge_calibration_sample": cfg.calibration_sample,
                **({"judge_constrain": "none" if judge.constraint_dropped else judge.constrain}
                   if protocol.answer == "integer" and hasattr(judge, "constraint_dropped") else {})},
        artifacts=[pq, csv, hist],
        outputs={"scores": pq},
    )


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m llm.judge", description=__doc__.split("\n\n")[0])
    ap.add_argument("--responses", required=True, help="responses.parquet / .json / .jsonl")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--cache", help="SQLite cache file (persists across runs)")
    ap.add_argument("--field", help="the response field (default: response, or model_response)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="JudgeConfig field")
    a = ap.parse_args(argv)
    try:
        cfg = section_from_overrides(JudgeConfig, a.set)
        res = run_judge(cfg, Path(a.responses), Path(a.out), Path(a.cache) if a.cache else None, field=a.field)
    except (ValueError, FileNotFoundError, JudgeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"metrics": res.metrics, "params": res.params}, indent=2))
