"""Typed YAML configs: dataclasses built from dicts with unknown-key and type checks.

Every section of the run config is a dataclass. `build(cls, data, path)` turns a nested dict (from YAML
plus `--set key=value` overrides) into that dataclass and raises `ConfigError` naming the offending key
(`optimizer.lr`, not a stack trace) on an unknown key, a wrong type or a failed check.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from l2e_dist.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A user-facing configuration problem; `key` is the dotted path of the offending entry. Every rank reads the
    same config, so every rank raises the same ConfigError (`agreed`: rank 0 alone reports it)."""

    agreed = True

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at '{key}': {message}" if key else f"config error: {message}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check/convert one value against a type annotation (a small subset of typing)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(path, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(path, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(path, f"expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-3" as a string; accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types.

    After construction, a `validate()` method on the dataclass (if any) runs; it should raise
    `ConfigError` with keys relative to this section, which are prefixed here with `path`.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping for section {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(fields)})"
            raise ConfigError(_join(path, str(key)), f"unknown key{hint}")
    kwargs = {k: _convert(v, hints[k], _join(path, k)) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            if path and not exc.key.startswith(path + "."):
                raise ConfigError(_join(path, exc.key), str(exc).split(": ", 1)[-1]) from None
            raise
    return obj


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge `override` into a copy of `base` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict:
    """Read one YAML config file; `include:` (list of paths relative to this file) is merged first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("", f"cannot parse YAML in {path}{_yaml_position(exc)}: fix the syntax there") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must contain a mapping at the top level")
    merged: dict = {}
    for inc in data.pop("include", None) or []:
        merged = deep_merge(merged, load_yaml(path.parent / inc))
    return deep_merge(merged, data)


def _yaml_position(exc: yaml.YAMLError) -> str:
    """' at line L, column C (problem)' from a PyYAML error, whose own text spans several lines."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None)
    return f"{where} ({problem})" if problem else where


def apply_override(data: dict, assignment: str) -> dict:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a nested dict, returning a new dict."""
    if "=" not in assignment:
        raise ConfigError(assignment, "override must look like key.sub=value (e.g. optimizer.lr=3e-4)")
    dotted, raw = assignment.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(assignment, "empty key in override")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: Any = value
    for key in reversed(keys):
        nested = {key: nested}
    return deep_merge(data, nested)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (for saving the resolved config next to checkpoints and logs)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
