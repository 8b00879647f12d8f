"""The judge's SQLite cache: one row per judgement, so a re-run asks the judge nothing it has answered.

    from llm.judge.cache import JudgeCache
    cache = JudgeCache(Path("data/cache/judge.sqlite"))
    key = cache.key(identity={"judge": "remote", "url": "http://localhost:11434/v1", "model": "llama3"},
                    protocol="reference/v1", messages=[...], params={"temperature": 0.0})
    cache.get(key)            # (answer, score) or None
    cache.put(key, identity, "reference/v1", prompt_text, params, answer, score)

    python -m llm.judge.cache data/cache/judge.sqlite      # print entry counts per judge and protocol

The key is sha256 over the judge's identity (for a remote judge its normalised endpoint URL and
model name; for the embedded judge the model file's sha256, runtime and dtype), the protocol name
and version, the exact messages and the generation parameters: a different server, model, prompt
wording or parameter never reuses an answer. Unscored answers (unparseable, or no probability on
either answer) are reused for UNSCORED_TTL_S only, then asked again; failed requests are never
stored. Each entry is committed in its own transaction (WAL journal): a killed run leaves a valid cache.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Optional

UNSCORED_TTL_S = 24 * 3600.0
SCHEMA_VERSION = 2  # v1 (llm/judge.py) keyed on (model, messages, params) only: its rows are never matched


class JudgeCache:
    """SQLite store of judgements; safe across threads; path None = no caching."""

    def __init__(self, path: Optional[Path]):
        self.path = Path(path) if path is not None else None
        self.lock = threading.Lock()
        self.conn = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("CREATE TABLE IF NOT EXISTS judgements2 (key TEXT PRIMARY KEY, judge TEXT, "
                              "protocol TEXT, prompt TEXT, params TEXT, answer TEXT, score REAL, created REAL)")
            self.conn.commit()
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path}: not a usable judge cache ({e}); delete it or pass another path") from None

    @staticmethod
    def key(identity: dict, protocol: str, messages: list[dict], params: dict) -> str:
        blob = json.dumps({"v": SCHEMA_VERSION, "judge": identity, "protocol": protocol, "messages": messages,
                           "params": params}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str, now: Optional[float] = None) -> Optional[tuple[Optional[str], Optional[float]]]:
        """(answer, score) of a stored judgement; an unscored one only while younger than UNSCORED_TTL_S."""
        if self.conn is None:
            return None
        with self.lock:
            row = self.conn.execute("SELECT answer, score, created FROM judgements2 WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        if row[1] is None and (now if now is not None else time.time()) - row[2] > UNSCORED_TTL_S:
            return None
        return row[0], row[1]

    def put(self, key: str, identity: dict, protocol: str, prompt: str, params: dict, answer: Optional[str],
            score: Optional[float], created: Optional[float] = None) -> None:
        if self.conn is None:
            return
        with self.lock, self.conn:  # one transaction per entry
            self.conn.execute("INSERT OR REPLACE INTO judgements2 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              (key, json.dumps(identity, sort_keys=True), protocol, prompt,
                               json.dumps(params, sort_keys=True), answer, score,
                               created if created is not None else time.time()))

    def counts(self) -> list[tuple[str, str, int, int]]:
        """(judge, protocol, entries, unscored entries) per judge and protocol."""
        if self.conn is None:
            return []
        with self.lock:
            return self.conn.execute("SELECT judge, protocol, COUNT(*), SUM(score IS NULL) FROM judgements2 "
                                     "GROUP BY judge, protocol ORDER BY judge, protocol").fetchall()

    def close(self) -> None:
        if self.conn is not None:
            with self.lock:
                self.conn.close()
            self.conn = None


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        sys.exit("usage: python -m llm.judge.cache FILE.sqlite (an existing judge cache)")
    try:
        c = JudgeCache(Path(sys.argv[1]))
    except ValueError as e:
        sys.exit(f"error: {e}")
    for judge, protocol, n, unscored in c.counts():
        print(f"{n:6d} entries ({unscored} unscored)  {protocol}  {judge}")
