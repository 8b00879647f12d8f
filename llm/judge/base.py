"""The one small interface every judge implements, and the errors judges raise.

    from llm.judge.base import Judge, Verdict, JudgeError
    class MyJudge(Judge):
        identity = {"judge": "mine", "model": "m"}     # what determines its answers (cache key)
        where = "my-model"                              # named in error lines
        def judge(self, protocol, entry, response) -> Verdict: ...

Implementations: llm.judge.local.LocalJudge (the embedded model in this process, the default),
llm.judge.remote.RemoteJudge (any OpenAI-compatible server), llm.judge.llama.LlamaServerJudge
(llama.cpp's llama-server started for the run, spoken to as a remote judge).

    python -m llm.judge.base        # print the interface
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llm.judge.prompts import Protocol


class JudgeError(RuntimeError):
    """A judge could not answer one item (after its retries): the message names the URL or model."""


class JudgeFatal(JudgeError):
    """An error that retrying the next item cannot fix (cross-origin redirect, auth, unknown model)."""


@dataclass
class Verdict:
    score: Optional[float]  # 0..100, None = unscored (unparseable twice, no weight on yes or no)
    answer: Optional[str]  # what the judge said (text, or the probabilities it was scored from)
    calls: int = 1  # requests / forward passes made for it


class Judge:
    identity: dict = {}
    where: str = ""
    calls: int = 0  # requests or forward passes made so far (0 on a fully cached run)

    def params(self, protocol: Protocol) -> dict:
        """Generation parameters that, with identity, protocol and messages, determine the answer."""
        return {}

    def judge(self, protocol: Protocol, entry: dict, response: str) -> Verdict:
        raise NotImplementedError

    def close(self) -> None:
        """Release the model / connections (idempotent)."""


if __name__ == "__main__":
    print(__doc__)
