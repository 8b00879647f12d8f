"""Turning a judge's answer into a score 0-100, strictly.

    from llm.judge.parse import parse_score, parse_yesno, yesno_score
    parse_score(" 85.\\n")          # 85
    parse_score("Score: 85")        # None: not the protocol
    parse_yesno("Yes.")             # 100.0
    yesno_score(p_yes=0.3, p_no=0.1)  # 75.0

    python -m llm.judge.parse "85/100"    # print what an answer parses to

Integer answers (`parse_score`): the whole answer, after trimming whitespace and one trailing
period, must be an integer 0..100 ("85", " 85.\\n"), or exactly "N/100", or a JSON object
{"score": N}. Anything else -- "Score: 85", "85.5", "eighty", "101", "-3", "" -- is unparseable (None):
the judge is asked once more, and if that answer is unparseable too the item is recorded as
unscored, never guessed. Yes/no answers: 100 * P(yes) / (P(yes) + P(no)) from token probabilities;
from text only, exactly "yes" or "no" (any case, one trailing period) counts.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Optional

INTEGER_GRAMMAR = 'root ::= "100" | [1-9]? [0-9]'  # llama.cpp GBNF: "0".."100", nothing else
SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
                "required": ["score"], "additionalProperties": False}
_INT_RE = re.compile(r"(0|[1-9][0-9]?|100)")
_FRACTION_RE = re.compile(r"(0|[1-9][0-9]?|100)\s*/\s*100")


def parse_score(text: Optional[str]) -> Optional[int]:
    """Strict: an integer 0..100 (optional surrounding whitespace and one trailing period), "N/100",
    or a JSON object {"score": N}; anything else is None."""
    if text is None:
        return None
    s = text.strip()
    if s.startswith("{"):
        try:
            obj = json.loads(s)
        except json.JSONDecodeError:
            return None
        v = obj.get("score") if isinstance(obj, dict) and len(obj) == 1 else None
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 100 else None
    if s.endswith("."):
        s = s[:-1].rstrip()
    m = _INT_RE.fullmatch(s) or _FRACTION_RE.fullmatch(s)
    return int(m.group(1)) if m else None


def parse_yesno(text: Optional[str]) -> Optional[float]:
    """100.0 for "yes", 0.0 for "no" (any case, surrounding whitespace, one trailing period); else None."""
    if text is None:
        return None
    s = text.strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    return {"yes": 100.0, "no": 0.0}.get(s.lower())


def yesno_score(p_yes: float, p_no: float) -> Optional[float]:
    """100 * P(yes) / (P(yes) + P(no)), rounded to 0.01; None when the judge put no weight on either."""
    total = p_yes + p_no
    if not total > 1e-6:
        return None
    return round(100.0 * p_yes / total, 2)


def is_yes(token: str) -> bool:
    return token.strip().lower() == "yes"


def is_no(token: str) -> bool:
    return token.strip().lower() == "no"


if __name__ == "__main__":
    for a in sys.argv[1:]:
        print(json.dumps({"answer": a, "integer": parse_score(a), "yesno": parse_yesno(a)}))
