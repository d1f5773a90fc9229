"""Every registered method under one contract, each on its ``tiny`` preset made shorter still: the set stays within
the method's plan of its budget, a run interrupted after a checkpoint and resumed writes the bit-identical set, the
method's state survives a checkpoint's round trip (``torch.save``, then ``torch.load`` with ``weights_only``), and an
unknown name is refused with the names the registry holds.

The truth of each check is independent of the method: the uninterrupted run's set, the state before it was saved,
the registry's own names.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import interrupt_then_resume, user_error

from ssdd.config import resolve_config
from ssdd.methods import METHODS, Distillation, DistillConfig, Method

SHIPPED = METHODS.names()  # the methods ssdd ships, at collection (before any test registers one of its own)
STEPS = 4  # outer steps (iterations) of every run: enough to interrupt one in the middle


def contract_config(method: str, teacher: Path, experts: Path) -> DistillConfig:
    """``method``'s tiny preset on the CPU with the tiny teacher, ``STEPS`` steps, a checkpoint after every step and
    no monitor."""
    names = {f.name for f in dataclasses.fields(METHODS.get(method).settings_class)}
    settings: dict[str, Any] = {key: STEPS for key in ("steps", "iterations") if key in names}
    if "outer_loop" in names:  # gradient matching: one matching pass per iteration
        settings["outer_loop"] = 1
    if "experts_dir" in names:
        settings["experts_dir"] = str(experts)  # trained by the first run, reused by the others
    overrides = {"device": "cpu", "teacher": str(teacher), "log_every": 1, "checkpoint_minutes": 0,
                 "monitor": {"every": -1}, "settings": settings}
    return resolve_config(DistillConfig, "distill", f"{method}/tiny", overrides=overrides)


def same(a: Any, b: Any) -> bool:
    """Whether two states are equal: tensors bit for bit, containers item by item."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("method", SHIPPED)
def test_every_method_keeps_its_budget_resumes_bit_identically_and_round_trips_its_state(
        method: str, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = contract_config(method, tiny_teacher, tmp_path / "experts")
    run = Distillation(config, tmp_path / "whole", progress=False)
    whole = run.run()
    assert run.method.plan is not None, f"{method} asked its budget for no plan"
    assert 0 < whole.byte_count <= run.method.plan.limit
    assert whole.method == method and whole.num_images > 0

    state = run.method.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # how a checkpoint is read back
    assert same(loaded, state)
    run.method.load_state_dict(loaded)
    assert same(run.method.distilled_set().tensors, whole.tensors)

    total = run.method.total_steps()
    if total < 3:  # a one-step method (coreset) has no middle to stop in
        assert method == "coreset"
        return
    stop_at = total // 2
    resumed = interrupt_then_resume(monkeypatch, METHODS.get(method), config, tmp_path / "resumed",
                                    checkpoint_until=stop_at - 1, stop_at=stop_at)
    assert same(resumed.tensors, whole.tensors), f"{method}: the resumed run's set differs"


def test_an_unknown_method_is_refused_with_the_registrys_names(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    class Extra(Method):  # a method registered for this test only: the message follows the registry
        pass

    monkeypatch.setitem(METHODS._entries, "krr-st-extra", Extra)
    line = user_error(capsys, ["distill", "--method", "krr-sst", "--dataset", "synthetic", "--images", "2",
                               "--out", str(tmp_path / "run"), "--device", "cpu"])
    known = METHODS.names()
    assert "krr-st-extra" in known and set(SHIPPED) <= set(known)
    assert line == (f"ssdd: error: unknown method 'krr-sst'. Did you mean krr-st, krr-st-extra? "
                    f"Known: {', '.join(known)}.")
