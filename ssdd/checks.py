"""Checks of a distilled set that one layer runs by name and a sibling layer provides: ``SET_CHECKS``.

The distillation engine (``methods/``) checks its current set under an evaluation protocol when ``monitor.protocol``
names an evaluate preset, but ``methods/`` and ``evaluation/`` are siblings that never import each other (the import
contracts in ``pyproject.toml``).  So :mod:`ssdd.evaluation.evaluate` registers that check here as ``protocol`` when it
is imported (``import ssdd``, which every use of the package runs first, imports it), and the engine calls
``SET_CHECKS.get("protocol")(distilled, preset, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable

from ssdd.registry import Registry

# name -> check(distilled, preset, archs, seeds, device, data_root, teacher) -> {row label: number}
SET_CHECKS: Registry[Callable[..., dict[str, float]]] = Registry("set check")
