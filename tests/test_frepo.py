"""FRePo: the kernel-ridge family's loss on one-hot labels (one shared implementation with KRR-ST), its objective
lowered on a tiny problem, what it stores, and how the supervised protocol trains on it."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import one_line, run_with_frozen_pool

from ssdd.config import resolve_config
from ssdd.data import make_synthetic
from ssdd.errors import ConfigError
from ssdd.evaluation import EvaluationConfig, evaluate
from ssdd.methods import Distillation, DistillConfig
from ssdd.methods.kernel_ridge import base as kernel_ridge
from ssdd.methods.kernel_ridge.base import KernelRidgeMethod
from ssdd.methods.kernel_ridge.frepo import FRePo
from ssdd.methods.kernel_ridge.krr import krr_outer_loss

students = importlib.import_module("ssdd.evaluation.students")  # where protocols train their students
CLASSES = 10
VALUES = 3 * 32 * 32
FROZEN = {"steps": 30, "real_batch": 64, "lr_schedule": "constant", "real_augment": "none",
          "pool": {"size": 1, "arch": "convnet", "arch_args": {"widths": [4, 8], "norm": "none"},
                   "online_iterations": 10**6, "lr": 0.0}}


def config(**overrides: Any) -> DistillConfig:
    merged: dict[str, Any] = {"device": "cpu", **overrides}
    return resolve_config(DistillConfig, "distill", "frepo/tiny", overrides=merged)


def run(cfg: DistillConfig) -> Any:
    return Distillation(cfg, None, progress=False).run()


def test_frepo_runs_the_kernel_ridge_step_on_one_hot_real_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    assert FRePo.step is KernelRidgeMethod.step  # the family's step, hence its single KRR loss
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(syn_f, real_f, syn_t, real_t, ridge):  # noqa: ANN001, ANN202
        seen.append((syn_t.detach().clone(), real_t.detach().clone()))
        return krr_outer_loss(syn_f, real_f, syn_t, real_t, ridge)

    monkeypatch.setattr(kernel_ridge, "krr_outer_loss", spy)
    distillation = Distillation(config(settings={"steps": 3}), None, progress=False)
    initial_labels = distillation.method.labels().detach().clone()
    distillation.run()
    assert len(seen) == 3
    syn_targets, real_targets = seen[0]
    torch.testing.assert_close(syn_targets, initial_labels)  # the first step regresses the initial labels
    source = make_synthetic("train")
    torch.testing.assert_close(initial_labels, F.one_hot(source.labels[distillation.method.initial_indices],
                                                         CLASSES).float())
    for _, real in seen:  # every real target is a one-hot label row
        assert real.shape == (32, CLASSES)
        assert torch.equal(real.sum(1), torch.ones(32)) and set(real.unique().tolist()) == {0.0, 1.0}


def full_objective(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    source = make_synthetic("train")
    distillation = Distillation(config(), None, progress=False)
    real = distillation.method.pixel_space.normalize(source.images.float() / 255)
    with torch.no_grad():
        return float(krr_outer_loss(network.features(images).double(), network.features(real).double(),
                                    labels.double(), F.one_hot(source.labels, CLASSES).double(), 1e-6))


def test_frepo_lowers_its_objective_with_a_frozen_pool() -> None:
    control, network = run_with_frozen_pool(config(settings={**FROZEN, "lr_images": 0.0, "lr_targets": 0.0}))
    learned, network2 = run_with_frozen_pool(config(settings={**FROZEN, "lr_images": 0.01, "lr_targets": 0.01}))
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), network2.state_dict().values()))
    start = full_objective(network, control.tensors["images"], control.tensors["labels"])
    after = full_objective(network, learned.tensors["images"], learned.tensors["labels"])
    assert after < 0.9 * start, (start, after)
    assert (learned.tensors["labels"] - control.tensors["labels"]).abs().max() > 1e-3


def test_frepo_set_is_class_balanced_with_label_vectors_and_exact_bytes() -> None:
    distilled = run(config(settings={"steps": 2}))
    source = make_synthetic("train")
    idx = torch.tensor(distilled.metadata["initial_indices"])
    assert torch.equal(source.labels[idx], torch.arange(CLASSES).repeat_interleave(2))
    assert distilled.target_kind == "soft-label" and distilled.metadata["label_loss"] == "mse"
    assert distilled.tensors["labels"].shape == (20, CLASSES)
    assert distilled.byte_count == 20 * (VALUES + CLASSES) * 4
    fixed = run(config(settings={"steps": 2, "learn_labels": False}))
    assert torch.equal(fixed.tensors["labels"], F.one_hot(source.labels[idx], CLASSES).float())


def test_supervised_protocol_trains_on_frepo_labels_with_mse(monkeypatch: pytest.MonkeyPatch) -> None:
    distilled = run(config(settings={"steps": 2}))
    losses: list[str] = []
    real_train = students.train_network

    def spy(model, images, targets, settings, loss, *args, **kwargs):  # noqa: ANN001, ANN202
        losses.append(loss)
        return real_train(model, images, targets, settings, loss, *args, **kwargs)

    monkeypatch.setattr(students, "train_network", spy)
    eval_config = resolve_config(EvaluationConfig, "evaluate", "tiny",
                                 overrides={"protocol": "supervised", "seeds": [0], "device": "cpu"})
    cells = evaluate([distilled], eval_config, progress=False)
    assert losses == ["mse"] and 0 <= cells[0].mean <= 100


def test_frepo_errors_are_clear() -> None:
    with pytest.raises(ConfigError) as info:
        Distillation(config(settings={"real_augment": "views"}), None)
    assert "frepo augments real batches by crop-flip or none" in one_line(info.value)
    with pytest.raises(ConfigError) as info:
        Distillation(config(images=5), None)
    assert "fewer than the 10 classes" in one_line(info.value)
