"""Prompt formats of the instruction data (the book's chapter 7): Alpaca and Phi-3.

Shared by the instruct finetune (llm/instruct.py: training texts, inference prompts) and the judge
(llm/judge/: the book's judge prompt quotes the Alpaca-formatted task), so neither imports the other.

       alpaca: "Below is an instruction that describes a task. Write a response that appropriately
               completes the request.\\n\\n### Instruction:\\n{instruction}" ["\\n\\n### Input:\\n{input}"]
               "\\n\\n### Response:\\n{output}"
       phi3:   "<|user|>\\n{instruction}" ["\\n{input}"] "\\n<|assistant|>\\n{output}"

    from llm.prompts import format_input, format_prompt, format_example, extract_response
    format_prompt({"instruction": "Name a color.", "input": ""})   # what the model is given

    python -m llm.prompts alpaca "Name a color." [INPUT]          # print a formatted prompt
"""
from __future__ import annotations

import sys

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
RESPONSE_HEADER = {"alpaca": "\n\n### Response:\n", "phi3": "\n<|assistant|>\n"}


def _check_format(prompt_format: str) -> None:
    if prompt_format not in RESPONSE_HEADER:
        raise ValueError(f"prompt_format {prompt_format!r}: expected one of {', '.join(RESPONSE_HEADER)}")


def format_input(entry: dict, prompt_format: str = "alpaca") -> str:
    """Instruction (+ input) part of the prompt (the book's format_input / format_input_phi)."""
    _check_format(prompt_format)
    if prompt_format == "alpaca":
        text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
        return text + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")
    return f"<|user|>\n{entry['instruction']}" + (f"\n{entry['input']}" if entry["input"] else "")


def format_prompt(entry: dict, prompt_format: str = "alpaca") -> str:
    """What the model is given at inference: format_input + the response header."""
    return format_input(entry, prompt_format) + RESPONSE_HEADER[prompt_format]


def format_example(entry: dict, prompt_format: str = "alpaca") -> str:
    """A full training text: prompt + reference output."""
    return format_prompt(entry, prompt_format) + entry["output"]


def extract_response(generated: str, prompt_format: str = "alpaca") -> str:
    """The response text from what the model generated after the prompt (tags it echoed removed)."""
    _check_format(prompt_format)
    if prompt_format == "alpaca":
        return generated.replace("### Response:", "").strip()
    return generated.replace("<|assistant|>:", "").replace("<|assistant|>", "").strip()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m llm.prompts alpaca|phi3 INSTRUCTION [INPUT]")
    try:
        print(format_prompt({"instruction": sys.argv[2], "input": sys.argv[3] if len(sys.argv) > 3 else ""},
                            sys.argv[1]))
    except ValueError as e:
        sys.exit(f"error: {e}")
