"""Reference teachers shipped with ssdd, named ``reference:<name>`` wherever a teacher path is accepted.

``reference:cifar10``: a 4-block ConvNet (32-64-128-256 channels, batch norm, 1,024-d features) trained by
``ssdd teacher --preset cifar10-cpu`` (Barlow Twins, 18 epochs on CIFAR-10's 50,000 training images; 65.1 % linear
probe); its metadata's ``reference`` record says how it was made."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ssdd.errors import ConfigError

PREFIX = "reference:"
REFERENCE_TEACHERS = {"cifar10": "cifar10.safetensors"}


def is_reference(name: str | Path) -> bool:
    """Whether ``name`` names a shipped teacher (``reference:<name>``) rather than a path."""
    return isinstance(name, str) and name.startswith(PREFIX)


def reference_path(name: str) -> Path:
    """The file of the shipped teacher ``reference:<name>``; an unknown name is a :class:`ConfigError` listing the
    shipped ones."""
    short = name.removeprefix(PREFIX)
    if short not in REFERENCE_TEACHERS:
        known = ", ".join(PREFIX + k for k in REFERENCE_TEACHERS)
        raise ConfigError(f"no shipped teacher {name!r}; the reference teachers are {known}")
    return Path(str(files(__name__) / REFERENCE_TEACHERS[short]))


def shipped_folder() -> Path:
    """The folder the shipped teachers live in (never a place to cache what is computed from them)."""
    return Path(str(files(__name__)))
