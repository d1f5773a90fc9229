"""Assertion helpers shared by the test modules: user-facing errors and interrupted runs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from ssdd.cli import main
from ssdd.config import deep_update, resolve_config
from ssdd.distilled import DistilledSet
from ssdd.io import load_checkpoint
from ssdd.methods import Distillation, DistillConfig


def one_line(exc: BaseException) -> str:
    """The exception's message, checked to be a single non-empty line."""
    message = str(exc)
    assert message and "\n" not in message, message
    return message


def user_error(capsys: pytest.CaptureFixture[str], argv: list[str], status: int = 2) -> str:
    """Run ``argv``, check it failed as a user error (exit ``status``, one 'ssdd: error:' line), return the line."""
    returned = main(argv)
    captured = capsys.readouterr()
    assert returned == status, (returned, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("ssdd: error: "), captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    return lines[0]


def interrupt_then_resume(monkeypatch: pytest.MonkeyPatch, method_cls: type, config: DistillConfig, out: Path,
                          checkpoint_until: int, stop_at: int) -> DistilledSet:
    """Run ``config`` in ``out`` checkpointing after every step up to ``checkpoint_until`` only, interrupt it
    before step ``stop_at + 1`` (0-based ``stop_at``), check the checkpoint, then resume it to the end."""
    original_step, original_checkpoint = method_cls.step, Distillation.checkpoint

    def interrupted(self, step: int) -> dict[str, float]:  # noqa: ANN001
        if step == stop_at:
            raise KeyboardInterrupt
        return original_step(self, step)

    def until(self: Distillation, step: int, seconds: float) -> None:
        if step <= checkpoint_until:
            original_checkpoint(self, step, seconds)

    with monkeypatch.context() as m:
        m.setattr(method_cls, "step", interrupted)
        m.setattr(Distillation, "checkpoint", until)
        with pytest.raises(KeyboardInterrupt):
            Distillation(config, out, progress=False).run()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == checkpoint_until
    return Distillation(config, out, resume=True, progress=False).run()


def run_with_frozen_pool(config: DistillConfig) -> tuple[DistilledSet, torch.nn.Module]:
    """Run ``config`` (whose pool must not train) and return the set and pool member 0, checked unchanged."""
    distillation = Distillation(config, None, progress=False)
    network = copy.deepcopy(distillation.method.pool.models[0])
    distilled = distillation.run()
    after = distillation.method.pool.models[0]
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), after.state_dict().values()))
    return distilled, network


def matching_config(method: str, experts_dir: Path, teacher: Path | None = None, **overrides: Any) -> DistillConfig:
    """The ``method``/tiny preset on the CPU with its experts in ``experts_dir``, then ``overrides`` (nested dicts
    merge)."""
    merged: dict[str, Any] = {"device": "cpu", "log_every": 1, "monitor": {"every": -1},
                              "settings": {"experts_dir": str(experts_dir)}}
    if teacher is not None:
        merged["teacher"] = str(teacher)
    deep_update(merged, copy.deepcopy(overrides))
    return resolve_config(DistillConfig, "distill", f"{method}/tiny", overrides=merged)
