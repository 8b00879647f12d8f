"""The trained llmpipe models as MLflow pyfunc models (the wrapper lives in flows/: llm/ never imports mlflow).

One class serves the three model stages; `kind` says which command it mirrors:

- pretrain -> "generate": input column `prompt`; params max_new_tokens (50), temperature (0.0 = greedy),
  top_k, top_p, seed; output column `text` (the continuation only, as `llmpipe generate --json` gives it);
- spam     -> "classify": input column `text`; output columns `label`, `probability`;
- instruct -> "ask": input columns `instruction`, `input`; param max_new_tokens (256); output `response`.

The model is logged "from code": this file is the model's code (flows/registry.py logs it with
`model_config={"kind": ...}` and the llm/ package as code_paths), so nothing is pickled at all. The
weights travel as the checkpoint folder (model.safetensors + config.json) in the model's artifacts.
The tokenizer is tiktoken's offline "gpt2" encoding, recorded in the folder's config.json.

    import mlflow
    m = mlflow.pyfunc.load_model("models:/llmpipe-tiny-pretrain@best")
    m.predict({"prompt": ["Every effort moves you"]}, params={"max_new_tokens": 20})
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from llm.checkpoint import load_model, read_config
from llm.generate import generate
from llm.instruct import respond
from llm.procenv import allowed_cores
from llm.spam import load_classifier
from llm.tokenizer import get_encoding

KINDS = {"pretrain": "generate", "spam": "classify", "instruct": "ask", "dpo": "ask"}
DEFAULT_PARAMS = {
    "generate": {"max_new_tokens": 50, "temperature": 0.0, "top_k": 0, "top_p": 0.0, "seed": -1},
    "classify": {},
    "ask": {"max_new_tokens": 256},
}
INPUT_EXAMPLES = {
    "generate": {"prompt": ["Every effort moves you"]},
    "classify": {"text": ["You won a free prize, call now", "See you at lunch tomorrow?"]},
    "ask": {"instruction": ["Rewrite the sentence in passive voice."], "input": ["The cat ate the fish."]},
}


def _rows(model_input: Any, columns: list[str]) -> list[dict]:
    """A DataFrame, a dict of columns, a list of dicts or a list of strings (the first column) as rows."""
    if isinstance(model_input, pd.DataFrame):
        df = model_input
    elif isinstance(model_input, dict):
        df = pd.DataFrame({k: v if isinstance(v, (list, tuple)) else [v] for k, v in model_input.items()})
    elif isinstance(model_input, str):
        df = pd.DataFrame({columns[0]: [model_input]})
    else:
        items = list(model_input)
        df = pd.DataFrame(items) if items and isinstance(items[0], dict) else pd.DataFrame({columns[0]: items})
    if len(df) and any(isinstance(df[c].iloc[0], (list, tuple, np.ndarray)) for c in df.columns):  # {"prompt": ["a", "b"]} arrives as one row holding the list
        df = df.explode(list(df.columns)).reset_index(drop=True)
    missing = [c for c in columns[:1] if c not in df.columns]
    if missing:
        raise ValueError(f"input: expected a column {missing[0]!r}; got {list(df.columns)}")
    return [{c: ("" if c not in df.columns or df[c].iloc[i] is None else str(df[c].iloc[i])) for c in columns}
            for i in range(len(df))]


class LlmpipeModel(mlflow.pyfunc.PythonModel):
    """pyfunc around a checkpoint folder (artifact "model"): generate, classify or ask."""

    def __init__(self, kind: Optional[str] = None):
        self.kind = kind

    def load_context(self, context) -> None:
        self.kind = self.kind or (context.model_config or {}).get("kind")
        if self.kind not in DEFAULT_PARAMS:
            raise ValueError(f"model_config.kind: expected one of {', '.join(DEFAULT_PARAMS)}, got {self.kind!r}")
        d = Path(context.artifacts["model"])
        self.model_dir = d
        if self.kind == "classify":
            self.clf = load_classifier(d)
        else:
            self.model = load_model(d)
            self.meta = read_config(d).get("llmpipe", {})

    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None):
        # pd.DataFrame is a hint MLflow infers nothing from: no validation, and no "add type hints" warning
        p = {**DEFAULT_PARAMS[self.kind], **(params or {})}
        if self.kind == "classify":
            rows = _rows(model_input, ["text"])
            preds = self.clf.predict([r["text"] for r in rows])
            return pd.DataFrame({"label": [lab for lab, _ in preds], "probability": [pr for _, pr in preds]})
        if self.kind == "ask":
            fmt = self.meta.get("prompt_format", "alpaca")
            out = [respond(self.model, get_encoding(), {"instruction": r["instruction"], "input": r["input"],
                                                        "output": ""}, fmt, int(p["max_new_tokens"]))
                   for r in _rows(model_input, ["instruction", "input"])]
            return pd.DataFrame({"response": out})
        torch.set_num_threads(allowed_cores())  # as `llmpipe generate` does, so both give the same tokens
        enc = get_encoding()
        texts = []
        for r in _rows(model_input, ["prompt"]):
            ids = enc.encode(r["prompt"], allowed_special={"<|endoftext|>"})
            with torch.no_grad():
                new = generate(self.model, ids, int(p["max_new_tokens"]), temperature=float(p["temperature"]),
                               top_k=int(p["top_k"]) or None, top_p=float(p["top_p"]) or None,
                               seed=None if int(p["seed"]) < 0 else int(p["seed"]))
            texts.append(enc.decode(new))
        return pd.DataFrame({"text": texts})


def signature(kind: str):
    """Input and output columns plus the inference params, with their defaults."""
    inputs = {"generate": ["prompt"], "classify": ["text"], "ask": ["instruction", "input"]}[kind]
    outputs = {"generate": [ColSpec("string", "text")],
               "classify": [ColSpec("string", "label"), ColSpec("double", "probability")],
               "ask": [ColSpec("string", "response")]}[kind]
    types = {int: "long", float: "double"}
    params = ParamSchema([ParamSpec(k, types[type(v)], v) for k, v in DEFAULT_PARAMS[kind].items()]) \
        if DEFAULT_PARAMS[kind] else None
    return ModelSignature(inputs=Schema([ColSpec("string", c) for c in inputs]), outputs=Schema(outputs),
                          params=params)


mlflow.models.set_model(LlmpipeModel())  # the model this file defines when MLflow loads it from code
