"""Kept for scripts and CI that call it: `python -m llm.judge_server check|prepare` = llm/judge/prepare.py.

The embedded judge no longer runs as an HTTP server: it is loaded in the judge stage's process
(llm/judge/local.py). Model preparation lives in llm/judge/prepare.py (also `llmpipe judge prepare`).

    python -m llm.judge_server prepare [--no-convert]
    python -m llm.judge_server check
"""
from llm.judge.prepare import main

if __name__ == "__main__":
    main(prog="python -m llm.judge_server")
