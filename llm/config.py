"""Typed, validated configuration for every llmpipe stage, and preset loading.

A run's configuration is one `PipelineConfig`: a section per stage, plus `orchestration` (how the
flow runs them: task runner, Dask address, concurrent finetunes; never part of a cache key or of
config_hash, since results do not depend on it). It is built from a
preset YAML shipped in `llm/presets/` (``--preset NAME``), then an optional user YAML
(``--config FILE``), then ``--set a.b=value`` overrides, in that order, and validated
once, whole (model shape included), so a bad value fails before any stage runs. Unknown keys,
wrong types and values out of range are one-line errors naming the field and the layer that
introduced it: the preset or --config file (with the line, when the file has the key), or --set.
The YAML reading, --set parsing and error lines are llm/config_files.py, re-exported here.

    from llm.config import load_config
    cfg = load_config("tiny", overrides=["pretrain.lr=1e-3"])
    print(cfg.pretrain.lr)

Run `python -m llm.config tiny` to print a resolved preset.
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Literal, Optional, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# YAML reading, --set parsing and error lines live in llm/config_files.py; every name stays importable from here.
from llm.config_files import (  # noqa: F401  (re-exported)
    ConfigError, FieldError, apply_override, deep_merge, first_error, format_validation_error, parse_override,
    parse_overrides, read_yaml_text, yaml_error_message, yaml_line,
)

PRESET_DIR = Path(__file__).parent / "presets"
STAGES = ("download", "clean", "shard", "pretrain", "evaluate", "spam", "instruct", "dpo", "judge")

# The named model shapes (llm/model.py's GPTConfig.named uses these). They live here, without torch, so
# that a config can be checked whole before any stage runs.
NAMED_CONFIGS: dict[str, dict] = {
    # OpenAI GPT-2 sizes (context 1024, qkv bias, tied output head as released).
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),
    # The book's GPT_CONFIG_124M (chapter 4), and its chapter-5 pretraining variant with context 256.
    "gpt2-124m": dict(emb_dim=768, n_layers=12, n_heads=12, context_length=1024, qkv_bias=False,
                      tie_weights=False, drop_rate=0.1),
    "gpt2-124m-256": dict(emb_dim=768, n_layers=12, n_heads=12, context_length=256, qkv_bias=False,
                          tie_weights=False, drop_rate=0.1),
}
NAMED_CONFIGS["gpt2"] = NAMED_CONFIGS["gpt2-small"]
GPT2_VOCAB = 50257  # the GPT-2 tokenizer's vocabulary (GPTConfig's default vocab_size)
GPT2_CONTEXT = 1024  # GPTConfig's default context_length


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


SectionT = TypeVar("SectionT", bound=Section)


class DownloadConfig(Section):
    sources: list[str] = Field(default_factory=list, description="names from data/sources.yaml to fetch")
    mirror: Optional[str] = Field(None, description="local folder or base URL replacing every source URL's base")
    accept_changed: list[str] = Field(
        default_factory=list,
        description="source names whose upstream file may differ from the pinned sha256 (new hash is recorded)",
    )
    retries: int = Field(3, ge=0, description="retries of a transient failure (with backoff)")
    timeout: float = Field(60.0, gt=0, description="seconds per HTTP request")
    sources_file: Optional[str] = Field(
        None, description="sources.yaml to use (default: <workdir>/data/sources.yaml, else the one shipped with llmpipe)"
    )


class CleanConfig(Section):
    sources: list[str] = Field(default_factory=list, description="downloaded sources that form the pretraining corpus")
    corpus: list[str] = Field(
        default_factory=list,
        description="user text files, folders or globs (.jsonl: one document per line, field 'text'); see --corpus",
    )
    strip_gutenberg: bool = True
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    collapse_blank_lines: bool = True
    dedup: bool = True
    min_chars: int = Field(100, ge=0, description="drop documents shorter than this after cleaning")


class ShardConfig(Section):
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split: Literal["tail", "document"] = Field(
        "tail",
        description="tail: the last val_fraction of every document's characters is val (the book's split); "
        "document: whole documents are assigned to val (seeded)",
    )
    seed: int = 123
    max_shard_mb: float = Field(64.0, gt=0, description="cap on one shard file's token payload")
    workers: int = Field(0, ge=0, description="tokenizer worker processes (0 = every core this process may use: its CPU affinity)")


class ModelConfigSection(Section):
    name: Optional[str] = Field("gpt2-small", description="named base config (gpt2-small/medium/large/xl, gpt2-124m-256)")
    vocab_size: Optional[int] = Field(None, ge=1)
    context_length: Optional[int] = Field(None, ge=1)
    emb_dim: Optional[int] = Field(None, ge=1)
    n_heads: Optional[int] = Field(None, ge=1)
    n_layers: Optional[int] = Field(None, ge=1)
    drop_rate: Optional[float] = Field(None, ge=0.0, lt=1.0)
    qkv_bias: Optional[bool] = None
    tie_weights: Optional[bool] = None

    def shape(self) -> dict:
        """The resolved shape fields: the named base (with GPTConfig's defaults) plus the fields given;
        without a name, only the fields given."""
        given = self.model_dump(exclude={"name"}, exclude_none=True)
        if not self.name:
            return given
        return {"vocab_size": GPT2_VOCAB, "context_length": GPT2_CONTEXT, **NAMED_CONFIGS[self.name], **given}

    @model_validator(mode="after")
    def _check_shape(self) -> "ModelConfigSection":
        if self.name is not None and self.name not in NAMED_CONFIGS:
            raise FieldError("name", f"unknown model config {self.name!r}; expected one of "
                             f"{', '.join(sorted(NAMED_CONFIGS))}")
        s = self.shape()
        if "emb_dim" in s and "n_heads" in s and s["emb_dim"] % s["n_heads"]:
            at = "n_heads" if self.n_heads is not None else "emb_dim"
            raise FieldError(at, f"expected emb_dim divisible by n_heads, got emb_dim={s['emb_dim']}, "
                             f"n_heads={s['n_heads']}")
        if s.get("vocab_size", GPT2_VOCAB) < GPT2_VOCAB:
            raise FieldError("vocab_size", f"expected >= {GPT2_VOCAB} (the GPT-2 tokenizer's vocabulary), "
                             f"got {s['vocab_size']}")
        return self


class LoopConfig(Section):
    """The training-loop fields every training section (pretrain, spam, instruct, dpo) has, with the
    defaults they share; a section re-declares a field only to give it its own default."""

    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(4e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    eval_every: int = Field(50, ge=1)
    eval_batches: Optional[int] = Field(None, ge=1, description="val batches per eval (None = all)")
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between resumable checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 123
    threads: int = Field(0, ge=0, description="torch threads (0 = the cores this process may use: its CPU affinity)")


LORA_TARGETS = ("att", "ff", "out_head")  # llm.lora names; "attn" stays accepted there as an alias of "att"


class PretrainConfig(LoopConfig):
    model: ModelConfigSection = Field(default_factory=ModelConfigSection)
    init: Optional[str] = Field(None, description="None = random init; gpt2, gpt2-medium, ... or a HF GPT-2 folder")
    grad_accum: int = Field(1, ge=1)
    stride: Optional[int] = Field(None, ge=1, description="window stride in tokens (default: context_length)")
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    initial_lr: float = Field(3e-5, ge=0, description="book_compat: the warmup starts at this lr (appendix D); "
                              "otherwise the warmup is lr * (step + 1) / warmup_steps")
    schedule: Literal["constant", "cosine"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU")
    nproc: int = Field(1, ge=1, description="DDP processes launched with torchrun")
    sample_prompt: str = "Every effort moves you"
    book_compat: bool = Field(
        False,
        description="replay the book's chapter-5 loop: PyTorch default init right after torch.manual_seed(seed), "
        "weight decay on every parameter, DataLoader-style shuffles drawn from the global RNG, eval after "
        "optimizer steps 1, 1+eval_every, ... with train loss re-measured on eval_batches train batches; "
        "appendix D's warmup from initial_lr and gradient clipping only after the warmup",
    )


class EvaluateConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: ["Every effort moves you", "The meaning of life is"])
    max_new_tokens: int = Field(30, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_k: Optional[int] = Field(25, ge=1)
    seed: int = 123
    batch_size: int = Field(8, ge=1)
    max_batches: Optional[int] = Field(None, ge=1)


class SpamConfig(LoopConfig):
    source: str = Field("sms_spam", description="source name in data/sources.yaml, or a path to a label<TAB>text file")
    init: str = Field("pretrain", description="pretrain (the pretrain stage's checkpoint), gpt2*, or a HF folder")
    skip_malformed: bool = False
    train_mode: Literal["head", "last_block", "all", "lora"] = "last_block"
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    max_length: Optional[int] = Field(None, ge=1, description="pad/truncate to this (default: longest train example)")
    epochs: int = Field(5, ge=1)
    lr: float = Field(5e-5, gt=0)
    baseline: bool = True
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between resumable checkpoints")
    book_compat: bool = Field(False, description="replay the book where it differs (README: book mode): "
                              "pandas read_csv parsing (5572 rows), padding to max_length and the class read at position -1, "
                              "appendix E LoRA (scaling alpha, separate Q/K/V adapters)")


class InstructConfig(LoopConfig):
    data: str = Field("instruction_data", description="source name in data/sources.yaml, or a JSON/JSONL path")
    init: str = Field("pretrain", description="pretrain, gpt2*, or a HF folder")
    prompt_format: Literal["alpaca", "phi3"] = "alpaca"
    mask_prompt: bool = False
    max_length: Optional[int] = Field(None, ge=8)
    train_mode: Literal["all", "lora"] = "all"
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    epochs: int = Field(2, ge=1)
    lr: float = Field(5e-5, gt=0)
    max_records: Optional[int] = Field(None, ge=1, description="use only the first N records (after shuffling)")
    test_limit: Optional[int] = Field(None, ge=1, description="generate responses for at most N test records")
    max_new_tokens: int = Field(256, ge=1)
    shuffle: bool = Field(False, description="shuffle the records (seeded) before the 85/10/5 split; the book does not")
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    book_compat: bool = Field(False, description="replay the book where it differs (README: book mode): "
                              "responses prompted without the response header (stripped afterwards), weight decay on every "
                              "parameter, appendix E LoRA (scaling alpha, separate Q/K/V adapters)")


class DpoConfig(LoopConfig):
    """The dpo stage (the book's ch07 DPO notebook): preference-tune the instruct model."""

    data: str = Field("instruction_preference",
                      description="source name in data/sources.yaml, or a JSON/JSONL path of {instruction, input, "
                      "output, chosen, rejected} records")
    beta: float = Field(0.1, gt=0, description="DPO beta (the book: 0.1)")
    max_length: Optional[int] = Field(None, ge=8, description="allowed_max_length (default: the context length)")
    train_mode: Literal["all", "lora"] = "all"
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    epochs: int = Field(1, ge=1, description="the book: 1 (DPO collapses when trained longer)")
    lr: float = Field(5e-6, gt=0, description="the book: 5e-6")
    weight_decay: float = Field(0.01, ge=0, description="the book: 0.01, on every parameter")
    eval_every: int = Field(5, ge=1)
    eval_batches: Optional[int] = Field(5, ge=1, description="batches per split at each eval (the book: 5)")
    checkpoint_every: int = Field(50, ge=1)
    max_records: Optional[int] = Field(None, ge=1, description="use only the first N records (after shuffling)")
    shuffle: bool = Field(False, description="shuffle before the 85/10/5 split; the book does not")
    test_limit: Optional[int] = Field(None, ge=1, description="generate responses for at most N test records")
    max_new_tokens: int = Field(256, ge=1, description="response length limit (keep equal to instruct's)")


class JudgeConfig(Section):
    url: Optional[str] = Field(None, description="OpenAI-compatible base URL (…/v1); None = the embedded local judge")
    model: Optional[str] = Field(None, description="model name sent to the server")
    api_key_env: Optional[str] = Field(None, description="environment variable holding the API key")
    prompt: Literal["reference", "rubric", "book"] = Field(
        "reference", description="judge protocol: reference (yes/no, scored 100*P(yes)), rubric (integer), "
        "book (the book's prompt, integer)")
    temperature: float = Field(0.0, ge=0, description="sampling temperature sent to the judge (0 = greedy)")
    seed: int = 123
    concurrency: int = Field(1, ge=1, description="parallel requests to a remote judge (judge.url)")
    retries: int = Field(3, ge=0, description="retries per request on connection errors, timeouts, 5xx, 429")
    backoff: float = Field(0.5, ge=0, description="first retry delay in seconds (doubles, capped at 20 s)")
    timeout: float = Field(120.0, gt=0, description="seconds to wait for one answer (connect: at most 10 s)")
    max_errors: int = Field(3, ge=1, description="stop after this many items in a row the judge could not answer")
    limit: Optional[int] = Field(None, ge=1, description="score at most N responses")
    calibration_sample: int = Field(20, ge=0, description="records whose reference output, an empty answer and a "
                                    "wrong answer (another record's reference) are also scored")
    threads: int = Field(1, ge=1, description="torch threads of the in-process judge (llama-server: its threads)")
    backend: Literal["auto", "transformers", "llama-server"] = Field(
        "auto", description="embedded judge runtime: transformers in this process (auto), or llama.cpp's "
        "llama-server started for the run")
    constrain: Literal["auto", "grammar", "json_schema", "none"] = Field(
        "auto", description="how an integer answer is forced to 0-100 on a server (auto: grammar for "
        "llama-server, json_schema for judge.url, dropped if the server rejects it)")
    max_tokens: int = Field(16, ge=1, description="answer length limit in tokens (integer protocols)")
    dpo: bool = Field(True, description="also score the dpo stage's responses beside instruct's "
                      "(judge_mean_score_dpo, judge_dpo_win_rate); the judge then needs the dpo stage")


class OrchestrationConfig(Section):
    """How the flow runs its stages; never part of a stage's cache key (results do not depend on it)."""

    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="where the data stages (clean, shard) run their parallel work: threads in "
        "this process, or a Dask cluster (prefect-dask): files cleaned and tokenized in parallel, identical output")
    dask_address: Optional[str] = Field(
        None, description="scheduler address of an existing Dask cluster (tcp://host:8786); "
        "none = a local cluster of worker processes for the run")
    dask_workers: int = Field(0, ge=0, description="worker processes of the local Dask cluster (0 = every core this process may use: its CPU affinity)")
    concurrent_finetunes: Union[bool, Literal["auto"]] = Field(
        "auto", description="run spam and instruct at the same time, each in its own process: true, false, or "
        "auto (when each can have a GPU of its own, or at least 4 CPU cores)")


class PipelineConfig(Section):
    preset: str = "custom"
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    spam: SpamConfig = Field(default_factory=SpamConfig)
    instruct: InstructConfig = Field(default_factory=InstructConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @model_validator(mode="after")
    def _check_across_sections(self) -> "PipelineConfig":
        check_pipeline(self)
        return self

    def section(self, stage: str) -> Section:
        return getattr(self, stage)

    def section_hash(self, stage: str) -> str:
        """sha256 of one stage's resolved section (stable JSON)."""
        data = self.section(stage).model_dump(mode="json")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def config_hash(self) -> str:
        """sha256 of what decides the results: every section but orchestration."""
        data = self.model_dump(mode="json", exclude={"orchestration"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def check_pipeline(cfg: PipelineConfig) -> None:
    """Checks that span fields or sections, run on every validated PipelineConfig (so before any stage
    runs): a FieldError naming the field path and what was expected. (spam/instruct/dpo max_length above
    the model's context length is not an error: those stages use min(max_length, context length), as
    documented, and the tests shrink pretrain.model.context_length under the presets' max_length.)"""
    p = cfg.pretrain
    if p.init is None and not p.model.name:
        missing = [f for f in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
                   if getattr(p.model, f) is None]
        if missing:
            raise FieldError(f"pretrain.model.{missing[0]}", "expected a value when pretrain.model.name is "
                             f"null (set {', '.join('pretrain.model.' + m for m in missing)}, or a name)")
    if p.book_compat and p.nproc > 1:
        raise FieldError("pretrain.nproc", f"expected 1 with pretrain.book_compat (the book's single-process "
                         f"loop), got {p.nproc}")


def section_from_overrides(cls: type[SectionT], items: list[str]) -> SectionT:
    """The config of a `python -m llm.<stage>` entry point: `cls` with its --set items applied, or one
    ConfigError line naming the field ("--set: epochs: Input should be greater than or equal to 1 (got 0)")."""
    try:
        return cls(**parse_overrides(items))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "--set")) from None


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _error_path(data: dict) -> Optional[str]:
    """The field path of the first problem of `data` as a PipelineConfig, or None when it is valid."""
    try:
        PipelineConfig.model_validate(data)
    except ValidationError as e:
        return first_error(e)[0]
    return None


def load_config(
    preset: str = "tiny",
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> PipelineConfig:
    """Resolve preset → config file → --set overrides into one validated PipelineConfig.

    A problem is blamed on the first layer where it appears: the preset file, the --config file (both
    with the line of the field when the file has it), or --set."""
    preset_path = PRESET_DIR / f"{preset}.yaml"
    if not preset_path.exists():
        raise ConfigError(f"--preset {preset!r}: unknown preset; expected one of {', '.join(list_presets())}")
    data, text = read_yaml_text(preset_path)
    layers = [(str(preset_path), text, copy.deepcopy(data))]
    if config_file is not None:
        extra, text = read_yaml_text(Path(config_file))
        data = deep_merge(data, extra)
        layers.append((str(config_file), text, copy.deepcopy(data)))
    for item in overrides:
        path, value = parse_override(item)
        apply_override(data, path, value, item)
    data.setdefault("preset", preset)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        bad = first_error(e)[0]
        for origin, text, layer in layers:
            layer.setdefault("preset", preset)
            if _error_path(layer) == bad:
                raise ConfigError(format_validation_error(e, origin, text)) from None
        raise ConfigError(format_validation_error(e, "--set")) from None


if __name__ == "__main__":
    try:
        cfg = load_config(sys.argv[1] if len(sys.argv) > 1 else "tiny", overrides=sys.argv[2:])
    except ConfigError as e:  # one line, no traceback
        sys.exit(f"llm.config: error: {e}")
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
