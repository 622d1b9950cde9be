"""Typed configuration: YAML files (by name or path) merged into dataclasses, with ``key=value`` overrides.

Every configuration object in the project is a dataclass. ``load_config`` reads a YAML file, merges any
``a.b.c=value`` overrides into it, and builds the dataclass tree, rejecting unknown keys and wrong types
with a message that names the file and the dotted key. YAML files may ``extends: <name or path>`` another
file of the same kind; later keys win.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

CONFIG_ROOT = Path(__file__).parent / "configs"

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


def config_path(kind: str, name_or_path: str | Path, suffix: str = ".yaml") -> Path:
    """Resolve ``name_or_path``: an existing ``suffix`` file, or a built-in config name under ``configs/<kind>/``.

    The one resolver for every config kind: ``models``, ``pretrain`` (YAML) and ``deepspeed`` (JSON templates).
    """
    path = Path(name_or_path).expanduser()
    accepted = (".yaml", ".yml") if suffix == ".yaml" else (suffix,)
    if path.suffix in accepted and path.is_file():
        return path
    candidate = CONFIG_ROOT / kind / f"{name_or_path}{suffix}"
    if candidate.is_file():
        return candidate
    known = ", ".join(available_configs(kind, suffix))
    raise ConfigError(f"no {kind} config named '{name_or_path}' (built-in: {known}; or pass a path to a "
                      f"{suffix} file)")


def available_configs(kind: str, suffix: str = ".yaml") -> list[str]:
    """Names of the built-in configs of one kind (``models``, ``pretrain``, ``deepspeed``)."""
    return sorted(p.stem for p in (CONFIG_ROOT / kind).glob(f"*{suffix}"))


def read_yaml(kind: str, name_or_path: str | Path) -> dict[str, Any]:
    """Read one YAML config, following ``extends`` chains."""
    path = config_path(kind, name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is not None:
        data = deep_merge(read_yaml(kind, parent), data)
    return data


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1,2]"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return nested


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(
            f"unknown config key '{key}' (valid keys here: {', '.join(sorted(fields))}); check its spelling")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"'{where}': invalid value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"'{where}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"'{where}' must be of type {getattr(tp, '__name__', tp)}, got {value!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (for saving beside outputs)."""
    return dataclasses.asdict(cfg)


def load_config(cls: type[T], kind: str, name_or_path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Load config ``name_or_path`` of ``kind`` into dataclass ``cls``, applying ``key=value`` overrides."""
    data = deep_merge(read_yaml(kind, name_or_path), parse_overrides(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{config_path(kind, name_or_path)}: {err}") from None
