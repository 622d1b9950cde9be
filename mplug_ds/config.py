"""Typed configuration: YAML files (by name or path) merged into dataclasses, with ``key=value`` overrides.

Every configuration object in the project is a dataclass. ``load_config`` reads a YAML file, merges any
``a.b.c=value`` overrides into it, and builds the dataclass tree, rejecting unknown keys and wrong types
with a message that names the file and the dotted key. YAML files may ``extends: <name or path>`` another
file of the same kind; later keys win.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence, TypeVar

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


class ConfigKey(NamedTuple):
    """One leaf of a config tree as ``--help`` lists it."""

    key: str  # dotted, e.g. optim.lr; list items as sources[].name
    type: str
    default: str  # YAML spelling; "(required)" for list-item fields without a default
    help: str  # the field's trailing comment in its dataclass


def config_keys(cls: type, prefix: str = "", defaults: bool = True) -> list[ConfigKey]:
    """Every leaf key of the dataclass tree ``cls`` with its type, default and one-line meaning.

    The meaning is the trailing ``# comment`` of the field's line in the dataclass source, so the listing is
    generated from the typed tree itself. Nested dataclasses are expanded; a list of dataclasses is listed
    itself and then as ``key[].field``. ``defaults=False`` shows ``-`` instead (keys whose value comes from
    elsewhere, such as model overrides).
    """
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            keys += config_keys(tp, f"{key}.", defaults)
            continue
        keys.append(ConfigKey(key, _type_name(tp), _default(f) if defaults else "-", comments.get(f.name, "")))
        item = (typing.get_args(tp) or (None,))[0]
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(item):
            keys += config_keys(item, f"{key}[].", defaults)
    return keys


def field_comments(cls: type) -> dict[str, str]:
    """``{field: trailing comment}`` from the source of ``cls`` and its dataclass bases."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = inspect.getsource(klass)
        name, depth = None, 0
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NEWLINE:
                name = None
            elif tok.type == tokenize.OP and tok.string in "([{":
                depth += 1
            elif tok.type == tokenize.OP and tok.string in ")]}":
                depth -= 1
            elif tok.type == tokenize.NAME and name is None and depth == 0 and tok.start[1] > 0 \
                    and tok.line[tok.start[1] + len(tok.string):].lstrip().startswith(":"):
                name = tok.string
            elif tok.type == tokenize.COMMENT and name is not None:
                comments[name] = tok.string.lstrip("#").strip()
    return comments


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple, Sequence):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    return "any" if tp is Any else getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("...\n").strip()


def format_config_keys(keys: Sequence[ConfigKey]) -> str:
    """Aligned ``key  type  default  meaning`` lines (for ``--help`` epilogs)."""
    widths = [max(len(k[i]) for k in keys) for i in range(3)]
    return "\n".join(f"  {k.key:<{widths[0]}}  {k.type:<{widths[1]}}  {k.default:<{widths[2]}}  {k.help}".rstrip()
                     for k in keys)


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
