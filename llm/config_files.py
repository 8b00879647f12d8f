"""The file side of llm.config: reading preset and --config YAML, --set overrides, and one-line errors.

Everything here is re-exported by llm.config (import it from there); it lives apart so that
llm/config.py is the section classes and load_config. Errors name the layer at fault: a YAML file
with the line of the field (`yaml_line`), or --set. This module knows nothing of the sections: a
pydantic ValidationError of any of them is turned into one line by `format_validation_error`.

    from pathlib import Path
    from llm.config_files import parse_override, read_yaml_text
    parse_override("pretrain.lr=1e-3")     # (['pretrain', 'lr'], 0.001)
    data, text = read_yaml_text(Path("llm/presets/tiny.yaml"))

Run `python -m llm.config_files KEY=VALUE ...` to print how --set items parse.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError


class FieldError(ValueError):
    """A check that spans fields, raised inside a model validator: `path` is the field at fault relative
    to the model being validated (load_config prefixes the section and finds its line in the YAML)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class ConfigError(ValueError):
    """A configuration problem, with a message that names the file/field at fault."""


def read_yaml_text(path: Path) -> tuple[dict, str]:
    """(the mapping, the file's text) of a preset or --config file; one-line ConfigError otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: expected a YAML file, got a folder") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_message(path, e)) from None
    if data is None:
        return {}, text
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections at the top level, got {type(data).__name__}")
    return data, text


def yaml_error_message(path: Path, e: yaml.YAMLError) -> str:
    """"FILE:LINE: invalid YAML (problem)" for a YAML file that does not parse."""
    mark = getattr(e, "problem_mark", None)
    where = f":{mark.line + 1}" if mark is not None else ""
    return f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})"


def yaml_line(text: str, path: list[str]) -> Optional[int]:
    """1-based line of the deepest key of `path` (a dotted field path, split) that the YAML text has."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in path:
        if not isinstance(node, yaml.MappingNode):
            break
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == part:
                line, node = key.start_mark.line + 1, value
                break
        else:
            break
    return line


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (so 3, 1e-3, true, [a, b], null work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise ConfigError(f"--set {item!r}: expected key.path=value with a non-empty dotted key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads "1e-3" as a string; accept plain float syntax too.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return path, value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """--set items of a `python -m llm.<stage>` entry point as {"key": value} for its config class."""
    fields = {}
    for item in items:
        path, value = parse_override(item)
        fields[".".join(path)] = value
    return fields


def apply_override(data: dict, path: list[str], value: Any, item: str) -> None:
    cur = data
    for p in path[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {item}: {'.'.join(path[:-1])} is not a section")
        cur = nxt
    cur[path[-1]] = value


def first_error(err: ValidationError) -> tuple[str, str]:
    """(dotted field path, message) of a validation error's first problem."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):  # a check across fields: it names the field itself
        return ".".join([*loc, cause.path]), cause.message
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = first.get("input")
    got_s = "" if first["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
    return ".".join(loc), msg + got_s


def format_validation_error(err: ValidationError, origin: str, text: Optional[str] = None) -> str:
    """"ORIGIN: field.path: what was expected (got X)", with " (line N)" when origin is a YAML file whose
    text has the field."""
    path, msg = first_error(err)
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    line = yaml_line(text, path.split(".")) if text is not None and path else None
    return f"{origin}: {path}: {msg}{more}" + (f" (line {line})" if line else "")


if __name__ == "__main__":
    try:
        for arg in sys.argv[1:]:
            print(arg, "->", parse_override(arg))
    except ConfigError as e:  # one line, no traceback
        sys.exit(f"llm.config_files: error: {e}")
