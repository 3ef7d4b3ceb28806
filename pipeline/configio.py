"""Reading a config: YAML files and ``key=value`` overrides, each value coerced to its key's type.

An override names a key in full (``train.epochs=3``) or by its bare name when that name is
unique across sections (``epochs=3``). Unknown keys and values of the wrong type are errors that
name the key; a YAML file that cannot be used (bad syntax such as a tab in the indentation, a
list or a scalar at the top, bytes that are not UTF-8) is an error on one line naming the file
and the line. ``pipeline.config`` holds the schema and ``load``.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from pathlib import Path

import yaml

from .config import SECTIONS, Config
from .errors import ConfigError

# Old key -> its new name: still accepted (YAML and key=value), with a one-line warning.
DEPRECATED = {"predict.autocast": "predict.precision", "autocast": "predict.precision"}


def _section_fields(section: str) -> dict[str, type]:
    cls = typing.get_type_hints(Config)[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_keys() -> dict[str, tuple[str, type]]:
    """Full dotted key -> (section, type)."""
    out = {}
    for sec in SECTIONS:
        for name, typ in _section_fields(sec).items():
            out[f"{sec}.{name}"] = (sec, typ)
    return out


def resolve_key(key: str) -> str:
    """Map ``epochs`` or ``train.epochs`` to the full dotted key; error lists candidates."""
    keys = _all_keys()
    if key in keys:
        return key
    if key in DEPRECATED:
        print(f"config: warning: '{key}' is deprecated, use '{DEPRECATED[key]}'", file=sys.stderr)
        return DEPRECATED[key]
    matches = [k for k in keys if k.split(".", 1)[1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"ambiguous config key '{key}': use one of {', '.join(sorted(matches))}")
    close = difflib.get_close_matches(key, [*keys, *(k.split(".", 1)[1] for k in keys)], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"unknown config key '{key}'{hint}. Valid keys: {', '.join(sorted(keys))}")


def _coerce(key: str, value, typ: type):
    """Convert a YAML or command-line value to the field's type, or raise naming the key."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value), 10) if isinstance(value, str) else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"config key '{key}' has unsupported type {typ}")
    raise ConfigError(f"config key '{key}' expects {typ.__name__}, got {value!r}")


def apply(cfg: Config, key: str, value) -> None:
    full = resolve_key(key)
    sec, name = full.split(".", 1)
    typ = _section_fields(sec)[name]
    setattr(getattr(cfg, sec), name, _coerce(full, value, typ))


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    out = []
    for a in args:
        if "=" not in a:
            raise ConfigError(f"override '{a}' is not of the form key=value")
        k, v = a.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def _yaml_error(p: Path, e: yaml.YAMLError) -> ConfigError:
    """One line naming the file, line and column; PyYAML's own message spans four lines."""
    mark = getattr(e, "problem_mark", None)
    where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if "'\\t'" in problem:   # PyYAML: found character '\t' that cannot start any token
        problem = "a tab character; YAML indents with spaces only"
    return ConfigError(f"{where}: not valid YAML: {problem}")


def read_yaml(p: Path) -> dict:
    """The top-level mapping of a YAML config file, or ConfigError naming the file (and line)."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _yaml_error(p, e) from None
    if doc is None:                      # an empty file (or only comments): the defaults
        return {}
    if not isinstance(doc, dict):
        line = yaml.compose(text, Loader=yaml.SafeLoader).start_mark.line + 1
        what = "list" if isinstance(doc, list) else type(doc).__name__
        raise ConfigError(f"{p}:{line}: the top level must be a mapping of sections or keys "
                          f"(e.g. 'train:' or 'epochs: 3'), got a {what}")
    return doc
