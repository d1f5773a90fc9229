"""DC and DSA: the layer-wise gradient distance against a hand computation, siamese augmentation on pixels, the
loss lowering its own objective, class balance, resume, and clear errors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import interrupt_then_resume, one_line

import ssdd
from ssdd.config import resolve_config
from ssdd.data import make_synthetic
from ssdd.errors import ConfigError
from ssdd.methods import Distillation, DistillConfig
from ssdd.methods.feature_matching import gradient_matching as gm
from ssdd.methods.feature_matching.gradient_matching import DC, DSA, gradient_distance

CLASSES = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_config(method: str, **overrides: Any) -> DistillConfig:
    merged: dict[str, Any] = {"device": "cpu", "log_every": 1, **overrides}
    return resolve_config(DistillConfig, "distill", f"{method}/tiny", overrides=merged)


def test_gradient_distance_by_hand() -> None:
    # a 2 x 2 weight (two output rows), a 1-D bias (skipped) and a 1 x 1 x 2 x 1 conv kernel (one row of 2)
    real = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([5.0, -5.0]), torch.tensor([[[[3.0], [4.0]]]])]
    syn = [torch.tensor([[1.0, 1.0], [0.0, -1.0]]), torch.tensor([1.0, 1.0]), torch.tensor([[[[4.0], [3.0]]]])]
    # rows: cos((1,0),(1,1)) = 1/sqrt(2); cos((0,2),(0,-1)) = -1; cos((3,4),(4,3)) = 24/25
    expected = (1 - 1 / math.sqrt(2)) + (1 - (-1)) + (1 - 24 / 25)
    assert float(gradient_distance(real, syn)) == pytest.approx(expected, rel=1e-5)
    assert float(gradient_distance(real, real)) == pytest.approx(0.0, abs=1e-5)
    scaled = [2.5 * g for g in real]  # the distance ignores each row's scale
    assert float(gradient_distance(real, scaled)) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError):
        gradient_distance(real, syn[:2])


def test_siamese_augmentation_is_the_same_transform_on_real_and_synthetic_pixels() -> None:
    method = Distillation(run_config("dsa"), None, progress=False).method
    batch = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(5):  # several draws of the transform family
        a, b = method.siamese(batch.clone(), batch.clone(), dsa=True)
        assert torch.equal(a, b)
    same = method.siamese(batch, batch[:2], dsa=True)
    torch.testing.assert_close(same[0][:2], same[1])  # one transform, whatever the batch size
    plain = method.siamese(batch, batch[:2], dsa=False)
    assert plain[0] is batch


def test_dc_lowers_its_gradient_matching_objective(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With the network fixed (always the same initialisation, no network steps in between), every matching step
    descends one objective, which the test evaluates itself on whole classes for the initial and final images."""
    fixed_seed = 123
    real_build = gm.build_student
    monkeypatch.setattr(gm, "build_student", lambda arch, args, outputs, shape, seed: real_build(
        arch, args, outputs, shape, fixed_seed))
    distilled = ssdd.distill("dc", "synthetic", budget=20, preset="tiny",
                             config={"iterations": 6, "outer_loop": 2, "inner_loop": 0, "real_batch": 32,
                                     "lr_images": 1.0},
                             out=tmp_path / "run", device="cpu", progress=False)
    source = make_synthetic("train")
    space = distilled.pixel_space
    real = space.normalize(source.images.float() / 255)
    network = real_build("convnet3", {"width": 8}, CLASSES, (3, 32, 32), fixed_seed).train()
    params = list(network.parameters())

    def objective(images: torch.Tensor) -> float:
        total = 0.0
        for c in range(CLASSES):
            rows = real[source.labels == c]
            g_real = torch.autograd.grad(F.cross_entropy(network(rows), torch.full((len(rows),), c)), params)
            syn = images[2 * c : 2 * c + 2]
            g_syn = torch.autograd.grad(F.cross_entropy(network(syn), torch.full((2,), c)), params)
            total += float(gradient_distance(list(g_real), list(g_syn)))
        return total

    initial = real[torch.tensor(distilled.metadata["initial_indices"])]
    before, after = objective(initial), objective(distilled.tensors["images"])
    assert after < 0.9 * before, (before, after)
    assert torch.equal(distilled.tensors["labels"], torch.arange(CLASSES).repeat_interleave(2))


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_run_is_class_balanced_and_resumes_bit_identically(method: str, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    whole = Distillation(run_config(method), tmp_path / "whole", progress=False).run()
    assert whole.method == method and whole.target_kind == "hard-label" and whole.metadata["ipc"] == 2
    assert whole.byte_count == 20 * (3 * 32 * 32 * 4 + 8)
    cls = {"dc": DC, "dsa": DSA}[method]
    resumed = interrupt_then_resume(monkeypatch, cls, run_config(method, checkpoint_minutes=0), tmp_path / "resumed",
                                    checkpoint_until=1, stop_at=2)
    assert torch.equal(resumed.tensors["images"], whole.tensors["images"])
    assert not torch.equal(whole.tensors["images"], Distillation(run_config(method), None).method.images.detach())


def test_errors_are_clear() -> None:
    with pytest.raises(ConfigError) as info:
        Distillation(run_config("dsa", settings={"dsa": False}), None)
    assert "use method dc" in one_line(info.value)
    with pytest.raises(ConfigError) as info:
        Distillation(run_config("dc", settings={"outer_loop": 0}), None)
    assert "outer_loop" in one_line(info.value)
    with pytest.raises(ConfigError) as info:
        Distillation(run_config("dc", images=5), None)
    assert "per class" in one_line(info.value) or "class" in str(info.value)
