"""The in-process judge: the embedded Qwen2.5-Coder-1.5B-Instruct loaded with transformers in this process.

    from llm.judge.local import LocalJudge
    from llm.judge.prompts import PROTOCOLS
    j = LocalJudge(threads=2)                  # loads lazily, on the first judgement
    j.judge(PROTOCOLS["reference"], {"instruction": "Name a primary color.", "input": "", "output": "Red."}, "Red.")
    j.close()

    python -m llm.judge.local [PROMPT]         # load the model, judge three sample items, print them

No port, no server, no health check: the model (the bfloat16 folder `llmpipe judge prepare` converts,
see llm/judge/prepare.py) is loaded with transformers into the calling process, on CPU in bfloat16
where the CPU has bf16 instructions, else float32. Loading prints one line saying what it waits
for, and one when done.

- yes/no protocols (the default "reference"): one forward pass; the score is
  100 * P(yes) / (P(yes) + P(no)) over the next-token distribution, summing the single-token
  spellings of yes / no ("yes", " Yes", "YES", ...). Consecutive prompts that share a beginning
  (the same record's task and reference, judged for the model response, the reference, an empty
  and a wrong answer in a row) reuse the key/value cache of that beginning, so each further item
  costs only its own tokens.
- integer protocols ("rubric", "book"): greedy `generate` with `prefix_allowed_tokens_fn` allowing
  only the answers "0".."100" (Qwen2 spells digits one token each), then the strict parser.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

from llm.judge.base import Judge, JudgeError, Verdict
from llm.judge.parse import parse_score, yesno_score
from llm.judge.prepare import GGUF_SHA256, INSTALL_HINT, JUDGE_NAME, JudgeNotInstalled, cpu_dtype, hf_dir, installed
from llm.judge.prompts import Protocol, get_protocol


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class IntegerConstraint:
    """Which digits may follow a partial answer under root ::= "100" | [1-9]? [0-9]."""

    @staticmethod
    def allowed(prefix: str) -> tuple[str, bool]:
        """(digits that may follow, whether the answer may end here)."""
        if prefix == "":
            return "0123456789", False
        if prefix == "0" or len(prefix) == 3:
            return "", True
        if prefix == "10":
            return "0", True
        if len(prefix) == 1:
            return "0123456789", True
        return "", True  # two digits other than "10"


class LocalJudge(Judge):
    """See the module docstring. threads: torch threads while judging (restored afterwards)."""

    def __init__(self, threads: int = 1, folder: Optional[Path] = None, say: Callable[[str], None] = _stderr):
        self.folder = Path(folder) if folder is not None else hf_dir()
        self.threads = max(1, int(threads))
        self.say = say
        self.dtype = cpu_dtype()
        self.where = f"the embedded judge {JUDGE_NAME} ({self.folder})"
        self.identity = {"judge": "local", "model": JUDGE_NAME, "gguf_sha256": GGUF_SHA256,
                         "runtime": "transformers", "dtype": self.dtype}
        self.calls = 0
        self.load_seconds: Optional[float] = None
        self.model = self.tok = None
        self._ids: list[int] = []
        self._kv = None

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        if self.model is not None:
            return
        if not (self.folder / "config.json").is_file():
            ok, why = installed("transformers")
            raise JudgeNotInstalled(f"embedded judge: {self.folder} is missing (run `llmpipe judge prepare`)"
                                    + ("" if ok else f"; {why}") + f"; {INSTALL_HINT}")
        t = time.monotonic()
        self.say(f"judge: loading {JUDGE_NAME} ({self.dtype}, {self.threads} thread(s)) into this process "
                 f"from {self.folder}; waiting for the weights to load (~3 GB, usually 5-60 s)")
        import torch  # heavy imports deliberately lazy: only a run that asks the local judge pays for them
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        try:
            self.tok = AutoTokenizer.from_pretrained(str(self.folder))
            self.model = AutoModelForCausalLM.from_pretrained(str(self.folder), dtype=getattr(torch, self.dtype))
        except (OSError, ValueError) as e:
            raise JudgeError(f"{self.where}: cannot load ({type(e).__name__}: {str(e)[:200]}); "
                             "run `llmpipe judge prepare` again") from None
        self.model.eval()
        self.digit_ids = {}
        for d in "0123456789":
            ids = self.tok.encode(d, add_special_tokens=False)
            if len(ids) != 1:
                raise JudgeError(f"{self.where}: tokenizer splits digit {d!r} into {ids}")
            self.digit_ids[d] = ids[0]
        self.end_id = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.yes_ids = self._single_token_ids("yes")
        self.no_ids = self._single_token_ids("no")
        self.load_seconds = time.monotonic() - t
        self.say(f"judge: model loaded in {self.load_seconds:.1f} s")

    def _single_token_ids(self, word: str) -> list[int]:
        out = set()
        for v in (word, word.capitalize(), word.upper()):
            for sp in ("", " "):
                ids = self.tok.encode(sp + v, add_special_tokens=False)
                if len(ids) == 1:
                    out.add(ids[0])
        return sorted(out)

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        return list(ids[0] if ids and not isinstance(ids[0], int) else ids)

    # ------------------------------------------------------------------ scoring
    def _next_token_probs(self, ids: list[int]):
        """Softmax of the next-token logits after ids, reusing the cached keys/values of the longest
        prefix shared with the previous call."""
        torch = self.torch
        from transformers import DynamicCache  # lazy with the rest of transformers

        keep = 0
        while keep < min(len(self._ids), len(ids) - 1) and self._ids[keep] == ids[keep]:
            keep += 1
        if self._kv is None or keep == 0:
            self._kv, keep = DynamicCache(config=self.model.config), 0
        elif keep < self._kv.get_seq_length():
            self._kv.crop(keep - self._kv.get_seq_length())  # negative: tokens to drop (transformers 4.x and 5.x)
        # the cache is the 4th positional argument of forward in transformers 4.x (past_key_values) and 5.x (cache)
        out = self.model(torch.tensor([ids[keep:]]), None, None, self._kv, use_cache=True, logits_to_keep=1)
        self._ids = ids
        return torch.softmax(out.logits[0, -1].float(), dim=-1)

    def _generate_integer(self, ids: list[int]) -> str:
        torch = self.torch
        n0 = len(ids)

        def allowed(batch_id, sent):
            text = "".join(self.tok.decode([int(t)]) for t in sent[n0:].tolist())
            digits, may_end = IntegerConstraint.allowed(text)
            return [self.digit_ids[d] for d in digits] + ([self.end_id] if may_end else [])

        out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, n0, dtype=torch.long),
                                  max_new_tokens=4, do_sample=False, prefix_allowed_tokens_fn=allowed,
                                  eos_token_id=self.end_id, pad_token_id=self.end_id)
        return self.tok.decode(out[0, n0:].tolist(), skip_special_tokens=True)

    def params(self, protocol: Protocol) -> dict:
        return {"decoding": "greedy-integer"} if protocol.answer == "integer" else {"scoring": "p_yes"}

    def judge(self, protocol: Protocol, entry: dict, response: str) -> Verdict:
        self.load()
        torch = self.torch
        ids = self._prompt_ids(protocol.messages(entry, response))
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                self.calls += 1
                if protocol.answer == "yesno":
                    p = self._next_token_probs(ids)
                    py, pn = float(p[self.yes_ids].sum()), float(p[self.no_ids].sum())
                    return Verdict(yesno_score(py, pn), f"P(yes)={py:.4f} P(no)={pn:.4f}")
                answer = self._generate_integer(ids)
                s = parse_score(answer)
                return Verdict(None if s is None else float(s), answer)
        except RuntimeError as e:  # e.g. out of memory: one line naming the model
            raise JudgeError(f"{self.where}: {type(e).__name__}: {str(e)[:200]}") from None
        finally:
            torch.set_num_threads(old)

    def close(self) -> None:
        self.model = self.tok = self._kv = None
        self._ids = []


if __name__ == "__main__":
    rec = {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."}
    try:
        proto = get_protocol(sys.argv[1] if len(sys.argv) > 1 else "reference")
        j = LocalJudge(threads=2)
        for resp in ("Paris is the capital of France.", "", "The car is as fast as lightning."):
            t = time.monotonic()
            v = j.judge(proto, rec, resp)
            print(f"{v.score!s:>7} {v.answer}  ({time.monotonic() - t:.2f} s)  response={resp!r}")
    except (ValueError, JudgeError, JudgeNotInstalled) as e:
        sys.exit(f"error: {e}")
