"""Judge protocols: what the judge is asked and how its answer becomes a score 0-100.

    from llm.judge.prompts import PROTOCOLS
    p = PROTOCOLS["reference"]
    p.messages({"instruction": "Name a primary color.", "input": "", "output": "Red."}, "Blue.")

    python -m llm.judge.prompts reference     # print the prompt of one protocol for a sample record

Three protocols (JudgeConfig.prompt; the name and version go into the judge cache key):

  reference -- the default. System "You are a careful grader."; task, reference answer (labelled
               correct), one yes/no question (is the candidate a correct answer to this task, meaning
               the same as the reference? yes only if correct; no if wrong, empty, incomplete or an
               answer to a different task), then the candidate answer in triple quotes.
               Score = 100 * P(yes) / (P(yes) + P(no)), read from the judge's next-token
               probabilities (answer kind "yesno"): a graded score from one forward pass, no sampling,
               no parsing. A response that is empty or only whitespace scores 0 by rule, without asking
               the judge (the embedded 1.5B model gives an empty answer 10-25 with the better wordings,
               up to 73 with others). Chosen by measurement among about a dozen wordings (README,
               "The judge").
  rubric    -- the previous default: the same layout with a 0-20 / 21-79 / 80-100 rubric, answered with
               an integer (answer kind "integer").
  book      -- the book's prompt, verbatim (section 7.8), answered with an integer: for replication.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

from llm.prompts import format_input

INTEGER_RETRY = "Respond with the integer number only (0 to 100), nothing else."
YESNO_RETRY = "Answer with one word: yes or no."


@dataclass(frozen=True)
class Protocol:
    name: str
    version: int  # bump when the wording or the scoring changes: old cache entries stop matching
    answer: str  # "integer": the judge answers 0..100 as text; "yesno": 100 * P(yes) from token probabilities
    prompt: Callable[[dict, str], str]
    system: Optional[str] = None  # a system message before the prompt
    empty_scores_zero: bool = False  # an empty / whitespace-only response scores 0 without asking the judge

    def messages(self, entry: dict, response: str) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + [{"role": "user", "content": self.prompt(entry, response)}]

    @property
    def retry_message(self) -> str:
        return INTEGER_RETRY if self.answer == "integer" else YESNO_RETRY

    @property
    def key(self) -> str:
        return f"{self.name}/v{self.version}"


def _task(entry: dict) -> str:
    return entry["instruction"] + (f"\n\nInput:\n{entry['input']}" if entry["input"] else "")


def book_prompt(entry: dict, response: str) -> str:
    """The book's judge prompt (chapter 7.8), verbatim."""
    return (f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{response}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def rubric_prompt(entry: dict, response: str) -> str:
    """Labelled task / reference / candidate and a score rubric, answered with an integer."""
    return ("Compare a candidate answer with a reference answer to the same task.\n\n"
            f"Task:\n{_task(entry)}\n\n"
            f"Reference answer (correct):\n{entry['output']}\n\n"
            f'Candidate answer:\n"""{response}"""\n\n'
            "Does the candidate answer complete the task as well as the reference answer? "
            "An answer about something else is wrong, however well written. "
            "Score it from 0 to 100: 0-20 if it is wrong, off-topic, empty or missing; 21-79 if it is partly right; "
            "80-100 if it is right (wording may differ). Respond with the integer number only.")


def reference_prompt(entry: dict, response: str) -> str:
    """Reference-guided yes/no question (the default protocol, scored by P(yes)). The candidate comes
    last, so the prompts of one record share everything before it (the local judge reuses that)."""
    return (f"Task:\n{_task(entry)}\n\n"
            f"Reference answer (correct):\n{entry['output']}\n\n"
            "Question: is the candidate answer below a correct answer to this task, meaning the same as the "
            "reference answer (wording may differ)? Answer yes only if it is correct; answer no if it is wrong, "
            "empty, incomplete, or an answer to a different task. Answer yes or no.\n\n"
            f'Candidate answer:\n"""{response}"""')


REFERENCE_SYSTEM = "You are a careful grader."


PROTOCOLS: dict[str, Protocol] = {
    "reference": Protocol("reference", 1, "yesno", reference_prompt, system=REFERENCE_SYSTEM, empty_scores_zero=True),
    "rubric": Protocol("rubric", 1, "integer", rubric_prompt),
    "book": Protocol("book", 1, "integer", book_prompt),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"judge.prompt {name!r}: expected one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


if __name__ == "__main__":
    sample = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
              "output": "The car is as fast as lightning."}
    try:
        print(get_protocol(sys.argv[1] if len(sys.argv) > 1 else "reference").prompt(sample, "The car is as fast as a bullet."))
    except ValueError as e:
        sys.exit(f"error: {e}")
