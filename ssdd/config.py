"""Dataclass configurations, YAML presets and command-line overrides.

Every long-running command has a config dataclass.  A configuration is resolved in this order (later wins):
dataclass defaults < preset (``--preset NAME``) < YAML file (``--config FILE``) < explicit overrides.
Unknown keys are errors at every level.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ssdd.errors import ConfigError

C = TypeVar("C")

PRESET_PACKAGE = "ssdd.presets"


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a (simple) type annotation, converting where it is lossless."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
            items = [_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, args))]
            return tuple(items)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):  # not a number, or an integer beyond float's range
                pass
        if number is None or not math.isfinite(number):  # NaN or inf in a setting is a mistake, named here
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[C], data: dict[str, Any], where: str | None = None) -> C:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and values of the wrong type."""
    where = where or cls.__name__
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(types_))}"
        )
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def merge(config: C, overrides: dict[str, Any]) -> C:
    """Return a copy of ``config`` with ``overrides`` applied (nested dataclasses merge key by key)."""
    current = to_dict(config)
    deep_update(current, overrides)
    return from_dict(type(config), current)


def deep_update(base: dict[str, Any], update: dict[str, Any]) -> None:
    """Merge ``update`` into ``base`` recursively; a mapping that switches ``arch`` drops its old ``arch_args``
    (options of one architecture mean nothing to another), keeping only those given with the new ``arch``."""
    if "arch" in update and update["arch"] != base.get("arch"):
        base.pop("arch_args", None)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, JSON/YAML-serialisable dict of a config dataclass (or of a mapping)."""
    return _plain(config if isinstance(config, dict) else dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


MAX_CONFIG_BYTES = 1 << 20  # a configuration file over 1 MiB is refused unread (presets are about 1 KB)
MAX_YAML_DEPTH = 32  # nesting of mappings and lists in a configuration
MAX_YAML_VALUES = 100_000  # values in a configuration with every alias expanded (a 300-byte alias bomb has 10^7)
_COLLECTION_STARTS = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_COLLECTION_ENDS = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


def safe_load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` of ``text`` once :func:`check_yaml_limits` has passed it; a value it cannot convert is a
    :class:`ConfigError` naming ``where`` (a syntax error stays a ``yaml.YAMLError``)."""
    check_yaml_limits(text, where)
    try:
        return yaml.safe_load(text)
    except ValueError as exc:  # a value yaml cannot convert: an integer of thousands of digits, a date like 2024-13-01
        raise ConfigError(f"{where} holds a value YAML cannot convert ({str(exc).splitlines()[0][:120]})") from None


def check_yaml_limits(text: str, where: str) -> None:
    """Refuse (a :class:`ConfigError` naming ``where``) YAML nested deeper than :data:`MAX_YAML_DEPTH`, holding more
    than :data:`MAX_YAML_VALUES` values once its aliases are expanded, an alias inside its own anchor, or a string
    that is not valid Unicode.  One streaming pass over the parser's events, which counts what each anchor expands to,
    so nothing is built, let alone expanded, before the limits hold."""
    sizes: dict[str, int] = {}  # values each finished anchor expands to
    open_collections: list[list] = []  # [anchor, values so far] of each collection being read
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, _COLLECTION_ENDS):
            anchor, count = open_collections.pop()
            if anchor:
                sizes[anchor] = count
            if open_collections:
                open_collections[-1][1] += count
            continue
        added = _values_of(event, sizes, open_collections, where)
        total += added
        if isinstance(event, _COLLECTION_STARTS):
            open_collections.append([event.anchor, 1])
            if len(open_collections) > MAX_YAML_DEPTH:
                raise ConfigError(f"{where} nests deeper than {MAX_YAML_DEPTH} levels; a configuration is a few levels "
                                  "deep")
        elif open_collections:
            open_collections[-1][1] += added
        if total > MAX_YAML_VALUES:
            raise ConfigError(f"{where} expands to more than {MAX_YAML_VALUES} values (through its aliases *name); "
                              "write the settings out without repeating aliases")


def _values_of(event: yaml.Event, sizes: dict[str, int], open_collections: list[list], where: str) -> int:
    """The values ``event`` adds once expanded: 1 for a scalar or a collection's start, its anchor's size for an
    alias, 0 for any other event; refuses a string that is not valid Unicode and an alias inside its own anchor."""
    if isinstance(event, yaml.AliasEvent):
        if any(anchor == event.anchor for anchor, _ in open_collections):
            raise ConfigError(f"{where}: alias *{event.anchor} is inside its own anchor (an endless value); write the "
                              "value out")
        return sizes.get(event.anchor, 1)  # an undefined alias is the loader's error
    if isinstance(event, yaml.ScalarEvent):
        _check_unicode(event.value, where)
        if event.anchor:
            sizes[event.anchor] = 1
        return 1
    return 1 if isinstance(event, _COLLECTION_STARTS) else 0


def _check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{where} holds a string that is not valid Unicode (a lone surrogate such as \\ud800); "
                          "remove it") from None


def _config_text(path: Path) -> str:
    """The text of the configuration file ``path``: at most :data:`MAX_CONFIG_BYTES` of UTF-8 without NUL bytes."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {size} bytes, more than the {MAX_CONFIG_BYTES} a configuration may "
                          "have; give a YAML file of settings")
    raw = path.read_bytes()
    offset = raw.find(b"\0")  # the first byte that is no text: a NUL, or one that is not UTF-8
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start if offset < 0 else min(offset, exc.start)
    if offset >= 0:
        raise ConfigError(f"config file {path} is binary, not YAML text (byte {offset} is not UTF-8 text); give a "
                          "YAML file of settings")
    return text


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing, binary, malformed or oversized file (the limits of
    :func:`check_yaml_limits` and :data:`MAX_CONFIG_BYTES`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = safe_load_yaml(_config_text(path), f"config file {path}")
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def list_presets(group: str) -> list[str]:
    """Names of the presets shipped for ``group`` (e.g. ``"teacher"``); presets in a sub-folder are named
    ``folder/name`` (e.g. ``"krr-st/cifar10-cpu"`` of group ``"distill"``)."""
    folder = resources.files(PRESET_PACKAGE) / group
    if not folder.is_dir():
        return []
    names = []
    for entry in folder.iterdir():
        if entry.is_dir():
            names += [f"{entry.name}/{p.name[: -len('.yaml')]}" for p in entry.iterdir() if p.name.endswith(".yaml")]
        elif entry.name.endswith(".yaml"):
            names.append(entry.name[: -len(".yaml")])
    return sorted(names)


def preset_dict(group: str, name: str) -> dict[str, Any]:
    """The raw mapping of preset ``name`` of ``group``."""
    path = resources.files(PRESET_PACKAGE) / group / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_presets(group)) or "none"
        raise ConfigError(f"unknown {group} preset {name!r}; known presets: {known}")
    data = safe_load_yaml(path.read_text(), f"preset {group}/{name}")
    return data or {}


def resolve_config(
    cls: type[C],
    group: str,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> C:
    """Defaults < preset < YAML file < overrides (``None`` values in overrides are ignored).

    A layer that gives any key of one of ``cls.exclusive_keys`` (groups of alternatives, such as a budget's ``images``
    and ``bytes``) replaces the whole group of the layers below it: ``--bytes`` replaces a preset's ``images``."""
    merged: dict[str, Any] = {}
    layers = [preset_dict(group, preset) if preset else {}, read_yaml(config_file) if config_file else {},
              {k: v for k, v in (overrides or {}).items() if v is not None}]
    for layer in layers:
        for alternatives in getattr(cls, "exclusive_keys", ()):
            if any(layer.get(key) is not None for key in alternatives):
                for key in alternatives:
                    merged.pop(key, None)
        deep_update(merged, layer)
    return from_dict(cls, merged)
