"""Dataclass configurations, YAML presets and command-line overrides.

Every long-running command has a config dataclass.  A configuration is resolved in this order (later wins):
dataclass defaults < preset (``--preset NAME``) < YAML file (``--config FILE``) < explicit overrides.
Unknown keys are errors at every level.
"""

from __future__ import annotations

import dataclasses
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
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


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
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
    data = yaml.safe_load(path.read_text())
    return data or {}


def resolve_config(
    cls: type[C],
    group: str,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> C:
    """Defaults < preset < YAML file < overrides (``None`` values in overrides are ignored)."""
    merged: dict[str, Any] = {}
    if preset:
        deep_update(merged, preset_dict(group, preset))
    if config_file:
        deep_update(merged, read_yaml(config_file))
    if overrides:
        deep_update(merged, {k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, merged)
