"""Numerical failure: every optimisation loop stops at the first non-finite loss (or parameters) with one line that
names the loop, the step and where to restart; the distillation engine's own checks are in test_methods.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import one_line

from ssdd.config import resolve_config
from ssdd.errors import NumericalError, SsddError, check_finite
from ssdd.io import load_checkpoint
from ssdd.methods.trajectory.experts import ExpertSettings, expert_file, train_experts
from ssdd.teachers import TeacherConfig, load_teacher, train_teacher
from ssdd.teachers import train as teacher_training
from ssdd.training import TrainSettings, build_student, train_network


def test_check_finite_passes_numbers_and_names_what_became_nan_or_inf() -> None:
    check_finite(0.0, "x", "advice")
    check_finite(-1e30, "x", "advice")
    for bad, shown in ((math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")):
        with pytest.raises(NumericalError) as info:
            check_finite(bad, "the loss at step 3", "lower the learning rate")
        assert one_line(info.value) == f"the loss at step 3 became {shown}; lower the learning rate"
        assert isinstance(info.value, SsddError)


def test_a_diverging_student_stops_after_its_first_epoch() -> None:
    torch.manual_seed(0)
    images, targets = torch.randn(8, 3, 8, 8), torch.randn(8, 4)
    targets[3, 1] = math.nan  # one poisoned target makes every batch's loss NaN
    student = build_student("convnet", {"widths": [4], "norm": "none"}, 4, (3, 8, 8), seed=0)
    settings = TrainSettings(epochs=5, batch_size=4, lr=0.1, amp=False)
    with pytest.raises(NumericalError) as info:
        train_network(student, images, targets, settings, "mse", seed=0, desc="pre-train random convnet seed 0")
    assert one_line(info.value) == ("pre-train random convnet seed 0: the loss at step 2 became nan; "
                                    "lower the learning rate (0.1) in the protocol's settings")


@pytest.mark.parametrize("parallel", [1, 2])  # the module path and the vmapped path
def test_diverging_experts_stop_and_write_nothing(tmp_path: Path, parallel: int) -> None:
    torch.manual_seed(0)
    images, targets = torch.randn(6, 3, 8, 8), torch.randn(6, 4)
    settings = ExpertSettings(num_experts=2, epochs=2, arch="convnet", arch_args={"widths": [4], "norm": "none"},
                              lr=1e30, momentum=0.9, weight_decay=0.0, batch_size=3, parallel=parallel)
    with pytest.raises(NumericalError) as info:
        train_experts(tmp_path, settings, images, targets, "mse", seed=0, progress=False)
    message = one_line(info.value)
    assert message.startswith("expert training: the ") and " in epoch 1 became " in message
    assert message.endswith("lower settings.experts.lr (now 1e+30) and run again")
    assert not expert_file(tmp_path, 0).exists() and not expert_file(tmp_path, 1).exists()


def test_a_diverging_teacher_names_its_checkpoint_and_the_advice_can_be_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = resolve_config(TeacherConfig, "teacher", "tiny",
                            overrides={"device": "cpu", "probe": False, "monitor_every": 0, "checkpoint_minutes": 0})
    make_loss = teacher_training._ssl_loss
    calls = []

    def poisoned_loss(cfg: TeacherConfig) -> torch.nn.Module:
        loss_fn = make_loss(cfg)

        def loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            value = loss_fn(z1, z2)
            return value * math.nan if len(calls) == 8 else value  # step 8: in the second epoch of 5 steps

        return loss

    with monkeypatch.context() as m:
        m.setattr(teacher_training, "_ssl_loss", poisoned_loss)
        with pytest.raises(NumericalError) as info:
            train_teacher(config, tmp_path, progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    assert one_line(info.value) == (f"teacher {config.ssl}: the loss at step 8 became nan; the last good checkpoint "
                                    f"is {checkpoint}; resume from it with a lower learning rate (--resume --lr ...; "
                                    "this run's is 0.05)")
    assert load_checkpoint(checkpoint)["step"] == 5  # the end of the first epoch, before the failure
    assert not (tmp_path / "teacher.safetensors").exists()

    lower = resolve_config(TeacherConfig, "teacher", "tiny", overrides={
        "device": "cpu", "probe": False, "monitor_every": 0, "checkpoint_minutes": 0, "lr": 0.01})
    path = train_teacher(lower, tmp_path, resume=True, progress=False)
    assert load_teacher(path).feature_dim > 0
    assert "resumed with lr = 0.01 (was 0.05)" in (tmp_path / "run.log").read_text()
