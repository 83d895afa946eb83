"""Dataclass configs: defaults, YAML files and dotted ``key=value`` overrides.

A config is a tree of dataclasses. :func:`load_config` starts from the defaults, merges a YAML file
(nested mappings for nested dataclasses) and then applies command-line overrides such as
``train.lr=1e-5``, ``student.timesteps=[999,499]`` or ``objective.guidance_scale=2``; every value is
checked against the field's type annotation, and mistakes raise :class:`ConfigError` naming the
dotted key, the value given and what was expected (with the closest valid key for typos).

YAML is read with the YAML 1.2 core rules for booleans and floats: only ``true``/``false`` are
booleans (so ``mixed_precision: no`` stays the string ``"no"``) and ``1e-5`` is a float (YAML 1.1,
and so plain ``yaml.safe_load``, reads it as a string). Files are written so that YAML 1.1 readers
get the same values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from fastgen.atomic import write_bytes
from fastgen.errors import UsageError

T = TypeVar("T")

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_BOOL_STRINGS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


class ConfigError(UsageError):
    """A config key, value or cross-field rule is invalid; the message names the dotted key."""


class UnknownKeyError(ConfigError):
    """A config key that the config does not have; ``key`` is the dotted key as given."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core booleans and floats."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes every string a YAML 1.1 or 1.2 reader would not read back as a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, _BOOL_RE, list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))
_Dumper.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


def _unique_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are distinct: YAML lets a later duplicate key replace the first silently."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_value(text: str) -> Any:
    """Parse one override value as YAML (``2`` → int, ``1e-5`` → float, ``[1,2]`` → list, ``null`` → None)."""
    return yaml.load(text, Loader=_Loader)


# ----------------------------------------------------------------------------- public API


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``key=value`` overrides."""
    tree = _defaults_tree(cls)
    if path is not None:
        try:
            from_file = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader)
        except yaml.YAMLError as err:
            raise ConfigError(_yaml_message(path, err)) from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not a text file ({err.reason} at byte {err.start}); expected a YAML config") from err
        if from_file is None:
            from_file = {}
        if not isinstance(from_file, Mapping):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {_describe(from_file)}")
        tree = _merge(tree, from_file)
        try:
            config_from_dict(cls, tree)
        except ConfigError as err:
            raise ConfigError(f"{err} (in {path})") from err
    return config_from_dict(cls, merge_overrides(cls, tree, overrides))


def merge_overrides(cls: type, tree: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``tree`` (plain nested data of a ``cls`` config) with the ``key=value`` overrides applied in order."""
    tree = dict(tree)
    for override in overrides:
        key, value = parse_override(cls, override)
        tree = _merge(tree, _nest(key.split("."), value))
    return tree


def config_from_dict(cls: type[T], mapping: Mapping[str, Any], prefix: str = "") -> T:
    """Build a ``cls`` instance from a nested mapping; missing keys take their defaults. ``prefix``
    (e.g. ``"objective"``) is prepended to the dotted keys named in errors.

    An unknown key whose last part is in the optional class attribute ``ALIASES`` of ``cls`` (a mapping of
    foreign key names, such as another tool's flags, to a hint) is reported with that hint, at any depth."""
    try:
        return _build(cls, mapping, f"{prefix}." if prefix else "")
    except UnknownKeyError as err:
        hint = _alias_hint(cls, err.key)
        if hint is None:
            raise
        raise UnknownKeyError(_alias_message(err.key, hint), err.key) from None


def config_to_dict(obj: Any) -> dict[str, Any]:
    """Convert a config dataclass instance to plain nested dicts and lists (YAML-ready)."""
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"expected a dataclass instance, got {_describe(obj)}")
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def save_config(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as YAML to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(config_to_dict(obj), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    write_bytes(path, text.encode("utf-8"))
    return path


# ----------------------------------------------------------------------------- building and checking


def _build(cls: type[T], mapping: Any, prefix: str) -> T:
    """Check ``mapping`` against dataclass ``cls`` and construct it; ``prefix`` is the dotted path so far."""
    if not isinstance(mapping, Mapping):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {_describe(mapping)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in mapping:
        if key not in fields:
            raise _unknown_key(cls, prefix, str(key))
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        if name in mapping:
            kwargs[name] = _coerce(mapping[name], hints[name], dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{dotted}' ({_type_name(hints[name])})")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, shown: Any = None) -> Any:
    """Return ``value`` converted to type ``tp``, or raise ConfigError naming ``key``.

    ``shown`` is the type named when ``value`` itself is rejected (``float or None`` for an Optional).
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    shown = tp if shown is None else shown
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:
            return _coerce(value, arms[0], key, shown=tp)
        for arg in arms:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise _type_error(key, value, shown)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _type_error(key, value, shown)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if origin in (list, tuple) or tp in (list, tuple):
        return _coerce_sequence(value, tp, key, shown)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, value, shown)
        value_type = args[1] if args else Any
        return {k: _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, str) and value.lower() in _BOOL_STRINGS:
            return _BOOL_STRINGS[value.lower()]
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, shown)
    if tp is int:
        return _coerce_int(value, key, shown)
    if tp is float:
        number = _as_number(value)
        if number is None:
            raise _type_error(key, value, shown)
        if not math.isfinite(number):  # no setting means anything at nan or inf (a nan weight switched its term off)
            raise ConfigError(f"{key} is {value!r}; expected a finite number")
        return float(number)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, shown)
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def _coerce_sequence(value: Any, tp: Any, key: str, shown: Any) -> list | tuple:
    """Coerce a list or tuple field; element errors name the index, e.g. ``student.timesteps[1]``."""
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, value, shown)
    args = typing.get_args(tp)
    origin = typing.get_origin(tp) or tp
    if not args:
        return origin(value)
    if origin is list:
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(
            f"{key}: expected {_type_name(tp)} with {len(args)} items, got {value!r} ({len(value)} items)"
        )
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _coerce_int(value: Any, key: str, shown: Any) -> int:
    """Integers, and floats or numeric strings with an integral value (``1e3`` → 1000); never bools."""
    number = _as_number(value)
    if isinstance(number, int):
        return number
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)
    raise _type_error(key, value, shown)


def _as_number(value: Any) -> int | float | None:
    """The int or float that ``value`` denotes (numbers and numeric strings), None otherwise; bools are not numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                continue
    return None


# ----------------------------------------------------------------------------- overrides and merging


def parse_override(cls: type, override: str) -> tuple[str, Any]:
    """Split ``key=value``, check the key against ``cls`` and parse the value for the field's type."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key=value")
    key, text = (part.strip() for part in override.split("=", 1))
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{override}' has an empty key")
    try:
        value = parse_value(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{override}': invalid YAML value ({_yaml_problem(err)})") from err
    try:
        tp = _field_type(cls, key)
    except UnknownKeyError as err:
        hint = _alias_hint(cls, err.key)
        if hint is None:
            raise
        raise UnknownKeyError(_alias_message(err.key, hint), err.key) from None
    section = _section_type(tp)
    if section is not None and not isinstance(value, Mapping) and not (value is None and section is not tp):
        example = next(f.name for f in dataclasses.fields(section) if f.init)
        raise ConfigError(
            f"config key '{key}' is a section ({section.__name__}), not a value: "
            f"set one of its fields (e.g. '{key}.{example}=...') or give a mapping"
        )
    if _accepts_str(tp) and (isinstance(value, (bool, int, float)) or (tp is str and text == "")):
        value = text
    return key, value


def _field_type(cls: type, key: str) -> Any:
    """The annotated type at dotted ``key``; free-form dict fields accept any key below them."""
    tp: Any = cls
    parts = key.split(".")
    for depth, part in enumerate(parts):
        section = _section_type(tp)
        if section is None:
            if typing.get_origin(tp) is dict or tp in (dict, Any):
                args = typing.get_args(tp)
                return args[1] if args and depth == len(parts) - 1 else Any
            parent = ".".join(parts[:depth])
            raise ConfigError(f"config key '{key}': '{parent}' is a value ({_type_name(tp)}), not a section")
        names = [f.name for f in dataclasses.fields(section) if f.init]
        if part not in names:
            raise _unknown_key(cls, "", key)
        tp = typing.get_type_hints(section)[part]
    return tp


def _section_type(tp: Any) -> type | None:
    """The dataclass behind ``tp`` (also inside ``Optional``), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        sections = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return sections[0] if len(sections) == 1 else None
    return None


def _accepts_str(tp: Any) -> bool:
    """Whether ``tp`` is ``str`` or ``str | None``: override text like ``2024`` then stays a string, and
    ``key=`` gives ``""`` for a plain ``str``."""
    if tp is str:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {str, type(None)}


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    """``["a", "b"], 1`` → ``{"a": {"b": 1}}``."""
    for part in reversed(parts):
        value = {part: value}
    return value


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _defaults_tree(cls: type) -> dict[str, Any]:
    """The defaults of ``cls`` as plain nested data; fields without a default are left out."""
    tree = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            tree[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            tree[f.name] = _plain(f.default_factory())
    return tree


def _plain(value: Any) -> Any:
    """Dataclasses → dicts, tuples → lists, containers copied."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- messages


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every valid dotted key under dataclass ``cls``, sections included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            keys.append(prefix + f.name)
            section = _section_type(hints[f.name])
            if section is not None:
                keys.extend(_dotted_keys(section, f"{prefix}{f.name}."))
    return keys


def _unknown_key(cls: type, prefix: str, key: str) -> UnknownKeyError:
    """UnknownKeyError for unknown ``prefix + key`` suggesting the closest valid key under ``cls`` (the root
    config's ``ALIASES`` are consulted by ``config_from_dict`` and ``parse_override``, which know the root)."""
    dotted = prefix + key
    candidates = _dotted_keys(cls, prefix)
    leaf = dotted.rsplit(".", 1)[-1]
    matches = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf]
    matches = matches or difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
    if matches:
        return UnknownKeyError(f"unknown config key '{dotted}'; did you mean '{matches[0]}'?", dotted)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    return UnknownKeyError(f"unknown config key '{dotted}'; valid keys here: {', '.join(names)}", dotted)


def _alias_hint(cls: type, dotted: str) -> str | None:
    """The hint of ``cls.ALIASES`` (optional: foreign key name -> hint) for the last part of ``dotted``."""
    aliases = getattr(cls, "ALIASES", None) or {}
    return aliases.get(dotted.rsplit(".", 1)[-1])


def _alias_message(dotted: str, hint: str) -> str:
    return f"unknown config key '{dotted}'; {hint}"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's reason without its multi-line source excerpt."""
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    return ", ".join(p for p in parts if p) or str(err).splitlines()[0]


def _yaml_message(path: str | Path, err: yaml.YAMLError) -> str:
    """``file:line:column: invalid YAML: reason`` on one line (lines and columns counted from 1)."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return f"{where}: invalid YAML: {_yaml_problem(err)}"


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    """Readable type names: ``int``, ``list[int]``, ``float or None``, ``mapping``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping for {tp.__name__}"
    if args:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", repr(tp))
