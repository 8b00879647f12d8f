"""Config: every shipped preset loads; overrides and config files apply; bad input names the field.

    python -m pytest -q tests/test_config.py
"""
from __future__ import annotations

import pytest
import yaml

from llm.config import PRESET_DIR, ConfigError, list_presets, load_config, parse_override


def _leaves(data: dict, prefix: tuple = ()):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def test_every_shipped_preset_loads_what_its_file_says():
    assert list_presets() == ["dpo", "gpt2", "gutenberg", "instruct", "instruct-book", "spam", "spam-book", "tiny",
                              "verdict"]
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.preset == name
        dumped = cfg.model_dump(mode="json")  # YAML has lists where the config keeps tuples
        written = list(_leaves(yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())))
        assert written, name
        for path, value in written:
            got = dumped
            for key in path:
                got = got[key]
            assert got == value, f"{name}: {'.'.join(path)}"


def test_verdict_preset_is_the_books_chapter_5_run():
    p = load_config("verdict").pretrain
    assert (p.model.name, p.batch_size, p.lr, p.weight_decay, p.epochs, p.seed) == ("gpt2-124m-256", 2, 4e-4, 0.1, 10,
                                                                                     123)


def test_set_overrides_parse_yaml_values():
    cfg = load_config("tiny", overrides=["pretrain.lr=3e-3", "pretrain.model.n_layers=3", "spam.train_mode=lora",
                                         "evaluate.prompts=[a, b]", "pretrain.max_steps=null"])
    assert cfg.pretrain.lr == 3e-3
    assert cfg.pretrain.model.n_layers == 3
    assert cfg.spam.train_mode == "lora"
    assert cfg.evaluate.prompts == ["a", "b"]
    assert cfg.pretrain.max_steps is None


def test_config_file_merges_over_preset(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("pretrain:\n  epochs: 7\n  model:\n    emb_dim: 32\n")
    cfg = load_config("tiny", f)
    assert cfg.pretrain.epochs == 7
    assert cfg.pretrain.model.emb_dim == 32
    assert cfg.pretrain.model.n_layers == load_config("tiny").pretrain.model.n_layers


@pytest.mark.parametrize("overrides, message", [
    (["pretrain.lrr=1"], "--set: pretrain.lrr: unknown key"),
    (["pretrain.lr=abc"], "--set: pretrain.lr: Input should be a valid number"),
    (["pretrain.lr=-1"], "--set: pretrain.lr: Input should be greater than 0 (got -1)"),
    (["spam.train_mode=everything"], "--set: spam.train_mode: Input should be 'head', 'last_block', 'all' or 'lora'"),
    (["nosuchstage.x=1"], "--set: nosuchstage: unknown key"),
    (["pretrain.lr"], "--set 'pretrain.lr': expected key.path=value"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=overrides)
    assert str(e.value).startswith(message), str(e.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"--preset 'nope': unknown preset; expected one of .*tiny"):
        load_config("nope")


def test_bad_config_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("pretrain:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config("tiny", f)
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config("tiny", f)
    f.write_text("pretrain:\n  epochs: zero\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: pretrain.epochs: Input should be a valid integer"):
        load_config("tiny", f)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config("tiny", tmp_path / "missing.yaml")


def test_parse_override_reads_floats_in_exponent_form():
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)
    assert parse_override("a=hello") == (["a"], "hello")


def test_section_hash_changes_only_with_that_section():
    a, b = load_config("tiny"), load_config("tiny", overrides=["spam.lr=0.5"])
    assert a.section_hash("spam") != b.section_hash("spam")
    assert all(a.section_hash(s) == b.section_hash(s) for s in ("clean", "shard", "pretrain", "instruct"))
