"""Trajectory matching (ssdd.methods.trajectory: experts, unroll, matching): vmapped expert training and its resume,
the differentiable unroll and its gradients (supervised and self-supervised), the matching loss, MKDT, MTT and MTT-SSL
end to end, and their errors.

One tiny teacher (conftest ``tiny_teacher``) serves the module; runs are the ``mkdt/tiny`` and ``mtt/tiny`` presets
made smaller still, and the unit tests use one-block ConvNets on 4x4 or 8x8 images.  Expected values come from
manual loops with ``torch.optim.SGD``, central finite differences, hand arithmetic, the teacher and the experts'
checkpoints run by the test itself, or an uninterrupted run -- never from the code under test.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import interrupt_then_resume, matching_config, one_line, user_error

import ssdd
from ssdd.cli import main
from ssdd.data import PixelSpace, make_synthetic
from ssdd.data.augment import apply_dsa, sample_dsa_params
from ssdd.device import make_generator
from ssdd.distilled import DISTILLED_FILE, load_distilled
from ssdd.errors import ArtefactError, ConfigError
from ssdd.io import read_metadata
from ssdd.methods import Distillation, DistillConfig
from ssdd.methods.trajectory import experts as expert_module
from ssdd.methods.trajectory.experts import (
    SSL_VIEWS,
    ExpertSettings,
    ExpertStore,
    draw_views,
    expert_file,
    step_loss,
    train_experts,
)
from ssdd.methods.trajectory.matching import MKDT, MatchingSettings, MTTSettings, MTTSSLSettings
from ssdd.methods.trajectory.unroll import matching_loss, unrolled_sgd
from ssdd.teachers import load_teacher, teacher_features
from ssdd.training import build_student

Params = dict[str, torch.Tensor]

N_SOURCE = 320  # the synthetic training split
CLASSES = 10
LOSS_FUNCTIONS = {"mse": F.mse_loss, "ce": F.cross_entropy}

# the experts of the unit tests: one conv block of 2 channels on 3x8x8 images
UNIT_ARCH, UNIT_ARGS = "convnet", {"widths": [2], "norm": "instance"}
# the experts of the tiny presets
PRESET_ARCH, PRESET_ARGS = "convnet3", {"width": 8}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These networks are far too small to gain from intra-op threads, and on a loaded machine two threads
    spin-wait each other (a run here takes 20x longer): use one, and restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- helpers ----------------------------------------------------------------------------------------------------


def config_error(config: DistillConfig) -> str:
    """Building the run must fail with a one-line ConfigError, whose message is returned."""
    with pytest.raises(ConfigError) as info:
        Distillation(config, None, progress=False)
    return one_line(info.value)


def unit_data(n: int, loss: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random 3x8x8 images and random 4-d representation targets (``mse``) or labels of 3 classes (``ce``,
    every class present)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 8, 8, generator=gen)
    if loss == "mse":
        return images, torch.randn(n, 4, generator=gen)
    return images, torch.arange(n) % 3


def unit_experts(num_experts: int, parallel: int) -> ExpertSettings:
    return ExpertSettings(num_experts=num_experts, epochs=2, arch=UNIT_ARCH, arch_args=UNIT_ARGS, lr=0.05,
                          momentum=0.9, weight_decay=1e-3, batch_size=3, parallel=parallel)


def parameters_of(network: torch.nn.Module) -> Params:
    return {name: p.detach().clone() for name, p in network.named_parameters()}


def assert_params_close(actual: Params, expected: Params, atol: float) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=atol, msg=name)


def expert_by_hand(settings: ExpertSettings, images: torch.Tensor, targets: torch.Tensor, loss: str, seed: int,
                   k: int) -> list[Params]:
    """Expert ``k`` trained by a plain loop with torch.optim.SGD: its own initialisation and batch order (one
    permutation per epoch, consecutive batches, a final batch of one image dropped); parameters after every epoch."""
    if loss == "barlow-twins":
        outputs = settings.projection_dim
    else:
        outputs = targets.shape[1] if loss == "mse" else int(targets.max()) + 1
    network = build_student(settings.arch, settings.arch_args, outputs, tuple(images.shape[1:]), seed * 1000 + k)
    optimizer = torch.optim.SGD(network.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    gen = make_generator(seed * 1000 + k)
    history = [parameters_of(network)]
    for _ in range(settings.epochs):
        for idx in torch.randperm(images.shape[0], generator=gen).split(settings.batch_size):
            if len(idx) == 1:
                continue
            optimizer.zero_grad()
            if loss == "barlow-twins":
                v1, v2 = two_views_by_hand(len(idx), gen)
                barlow_twins_by_hand(network(apply_dsa(images[idx], v1)),
                                     network(apply_dsa(images[idx], v2))).backward()
            else:
                LOSS_FUNCTIONS[loss](network(images[idx]), targets[idx]).backward()
            optimizer.step()
        history.append(parameters_of(network))
    return history


def barlow_twins_by_hand(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float = 5e-3) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2, C the cross-correlation of the batch-standardised outputs."""
    z1, z2 = z1.double(), z2.double()
    z1 = (z1 - z1.mean(0)) / (z1.var(0, unbiased=False) + 1e-5).sqrt()
    z2 = (z2 - z2.mean(0)) / (z2.var(0, unbiased=False) + 1e-5).sqrt()
    c = z1.T @ z2 / z1.shape[0]
    off = ~torch.eye(c.shape[0], dtype=torch.bool)
    return ((1 - c.diagonal()) ** 2).sum() + lambda_offdiag * (c[off] ** 2).sum()


def two_views_by_hand(n: int, gen: torch.Generator) -> tuple[Any, Any]:
    """The two per-image augmentations of a self-supervised step, drawn in the order the code draws them."""
    return sample_dsa_params(n, SSL_VIEWS, gen), sample_dsa_params(n, SSL_VIEWS, gen)


def ssl_sgd_by_hand(network: torch.nn.Module, start: Params, batches: list[tuple[torch.Tensor, Any]],
                    lr: float) -> Params:
    """Plain SGD from ``start`` with the Barlow Twins loss between the network's outputs on each batch's two views."""
    network = copy.deepcopy(network)
    network.load_state_dict(start)
    optimizer = torch.optim.SGD(network.parameters(), lr=lr)
    for x, (v1, v2) in batches:
        optimizer.zero_grad()
        barlow_twins_by_hand(network(apply_dsa(x, v1)), network(apply_dsa(x, v2))).backward()
        optimizer.step()
    return parameters_of(network)


def sgd_by_hand(network: torch.nn.Module, start: Params, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float,
                loss: str) -> Params:
    """Plain SGD (torch.optim.SGD, no momentum) from ``start``, one step per batch; the final parameters."""
    network = copy.deepcopy(network)
    network.load_state_dict(start)
    optimizer = torch.optim.SGD(network.parameters(), lr=lr)
    for x, y in batches:
        optimizer.zero_grad()
        LOSS_FUNCTIONS[loss](network(x), y).backward()
        optimizer.step()
    return parameters_of(network)


def distance_ratio(student: Params, start: Params, target: Params) -> float:
    """The normalised matching distance computed by hand in float64."""
    num = sum(float(((student[k].double() - target[k].double()) ** 2).sum()) for k in target)
    den = sum(float(((start[k].double() - target[k].double()) ** 2).sum()) for k in target)
    return num / den


def file_state(path: Path) -> tuple[int, int, bytes]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, path.read_bytes()


# ---- 1. experts: training equals a manual torch.optim.SGD loop --------------------------------------------------


@pytest.mark.parametrize(("loss", "n"), [("mse", 7), ("ce", 8)])  # 7 = 3 + 3 + a dropped 1; 8 = 3 + 3 + 2
def test_experts_equal_a_manual_sgd_loop_at_every_epoch(tmp_path: Path, loss: str, n: int) -> None:
    images, targets = unit_data(n, loss)
    settings = unit_experts(num_experts=3, parallel=2)  # {0, 1} vmapped, {2} alone
    store = train_experts(tmp_path / "p2", settings, images, targets, loss, seed=2, progress=False)
    assert len(store) == 3 and store.epochs == 2
    for k in range(3):
        by_hand = expert_by_hand(settings, images, targets, loss, seed=2, k=k)
        for epoch, expected in enumerate(by_hand):
            assert_params_close(store.params(k, epoch), expected, atol=1e-6)
    # the stored record says what was trained
    assert store.metadata["loss"] == loss and store.metadata["seed"] == 2 and store.metadata["expert"] == 0
    assert store.metadata["settings"]["arch_args"] == UNIT_ARGS

    # one expert at a time: the same experts
    single = train_experts(tmp_path / "p1", unit_experts(num_experts=3, parallel=1), images, targets, loss, seed=2,
                           progress=False)
    for k in range(3):
        for epoch in range(3):
            assert_params_close(single.params(k, epoch), store.params(k, epoch), atol=1e-6)


# ---- 2. experts: resume -------------------------------------------------------------------------------------------


def test_train_experts_trains_only_the_missing_expert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, targets = unit_data(7, "mse")
    settings = unit_experts(num_experts=3, parallel=2)
    train_experts(tmp_path, settings, images, targets, "mse", seed=1, progress=False)
    files = [expert_file(tmp_path, k) for k in range(3)]
    before = [file_state(f) for f in files]
    deleted = ExpertStore(tmp_path, 3).params(1, 2)
    files[1].unlink()

    with pytest.raises(ArtefactError) as info:
        ExpertStore(tmp_path, 3)
    message = one_line(info.value)
    assert "1 of 3 experts" in message and "expert_001.safetensors" in message and "`ssdd experts`" in message

    built: list[int] = []
    original = expert_module.make_network

    def spy(settings: ExpertSettings, outputs: int, shape: tuple[int, int, int], seed: int) -> torch.nn.Module:
        built.append(seed)
        return original(settings, outputs, shape, seed)

    monkeypatch.setattr(expert_module, "make_network", spy)
    store = train_experts(tmp_path, settings, images, targets, "mse", seed=1, progress=False)
    assert built == [1000, 1001]  # expert 1's block of `parallel` experts, not expert 2's
    assert file_state(files[0]) == before[0] and file_state(files[2]) == before[2]  # untouched
    assert_params_close(store.params(1, 2), deleted, atol=0)


def test_a_retrained_expert_is_bit_identical_to_the_deleted_one(tmp_path: Path) -> None:
    images, targets = unit_data(7, "mse")
    settings = unit_experts(num_experts=3, parallel=2)
    train_experts(tmp_path, settings, images, targets, "mse", seed=1, progress=False)
    deleted = expert_file(tmp_path, 1).read_bytes()  # trained beside expert 0
    expert_file(tmp_path, 1).unlink()
    train_experts(tmp_path, settings, images, targets, "mse", seed=1, progress=False)  # retrained in its block
    assert expert_file(tmp_path, 1).read_bytes() == deleted


def test_self_supervised_experts_equal_a_manual_loop_and_train_one_at_a_time(tmp_path: Path) -> None:
    """Barlow Twins experts: each batch's two views drawn from the expert's generator after its permutation."""
    images = unit_data(7, "mse")[0]
    settings = ExpertSettings(num_experts=2, epochs=2, arch=UNIT_ARCH, arch_args=UNIT_ARGS, lr=0.002, momentum=0.9,
                              weight_decay=1e-3, batch_size=3, parallel=1, projection_dim=5)
    store = train_experts(tmp_path / "ssl", settings, images, torch.zeros(7, 0), "barlow-twins", seed=2,
                          progress=False)
    for k in range(2):
        for epoch, expected in enumerate(expert_by_hand(settings, images, torch.zeros(7, 0), "barlow-twins", 2, k)):
            assert_params_close(store.params(k, epoch), expected, atol=1e-5)  # the loss by hand is in float64
    assert store.params(0, 0)["head.weight"].shape[0] == 5  # the projection
    parallel = ExpertSettings(**{**settings.__dict__, "parallel": 2})
    with pytest.raises(ConfigError) as info:
        train_experts(tmp_path / "p2", parallel, images, torch.zeros(7, 0), "barlow-twins", seed=2, progress=False)
    assert one_line(info.value) == ("barlow-twins experts train one at a time (settings.experts.parallel: 1); the "
                                    "vmapped path takes supervised losses only")


# ---- 3.-5. the unroll and the matching loss -----------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_unrolled_sgd_equals_plain_sgd_on_the_same_batches(loss: str) -> None:
    images, targets = unit_data(5, loss, seed=3)
    outputs = 4 if loss == "mse" else 3
    network = build_student(UNIT_ARCH, UNIT_ARGS, outputs, (3, 8, 8), seed=0)
    start = parameters_of(network)
    steps, batch, lr = 5, 2, 0.1

    # the released batch order: a permutation cut into chunks of `batch` (the last one short), used from the last
    # chunk backwards; a new permutation when none is left
    gen = make_generator(7)
    chunks, batches = [], []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(5, generator=gen).split(batch))
        idx = chunks.pop()
        batches.append((images[idx], targets[idx]))
    assert [len(x) for x, _ in batches] == [1, 2, 2, 1, 2]
    expected = sgd_by_hand(network, start, batches, lr, loss)

    student = unrolled_sgd(network, start, images, targets, torch.tensor(lr), steps, batch, loss, make_generator(7))
    assert_params_close({k: v.detach() for k, v in student.items()}, expected, atol=1e-6)
    assert all(torch.equal(start[k], v) for k, v in parameters_of(network).items())  # the network is untouched


def test_the_amp_unroll_runs_its_forward_in_bf16_and_keeps_the_parameters_float32(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where bf16 is native (forced here, emulated on any CPU): the same unroll to bf16 rounding, but not bit for bit,
    with every layer (the norms' too) run in bf16 and float32 parameters and gradients; where it is not, the float32
    unroll bit for bit."""
    from ssdd import device

    network = build_student("convnet", {"widths": [8], "norm": "instance"}, 4, (3, 8, 8), seed=0)
    start = parameters_of(network)
    images, targets = unit_data(6, "mse", seed=2)
    images.requires_grad_(True)
    norm_inputs: list[torch.dtype] = []

    def unroll(amp: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        images.grad = None
        norm_inputs.clear()
        student = unrolled_sgd(network, start, images, targets, torch.tensor(0.05), 3, 3, "mse", make_generator(1),
                               amp=amp)
        sum(v.square().sum() for v in student.values()).backward()
        return {k: v.detach() for k, v in student.items()}, images.grad.clone()

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        norm_inputs.append(args[0].dtype)

    monkeypatch.setattr(device, "precision", lambda: "amp")
    monkeypatch.setattr(device, "bf16_native_on_cpu", lambda: False)
    plain, plain_grad = unroll(False)
    assert all(torch.equal(a, b) for a, b in zip(unroll(True)[0].values(), plain.values()))  # not native: float32
    monkeypatch.setattr(device, "bf16_native_on_cpu", lambda: True)
    with torch.nn.modules.module.register_module_forward_pre_hook(
            lambda m, a: record(m, a) if isinstance(m, torch.nn.GroupNorm) else None):
        mixed, mixed_grad = unroll(True)
    assert norm_inputs and set(norm_inputs) == {torch.bfloat16}
    assert all(v.dtype == torch.float32 for v in mixed.values()) and mixed_grad.dtype == torch.float32
    assert not all(torch.equal(mixed[k], plain[k]) for k in plain)
    assert_params_close(mixed, plain, atol=2e-2)
    assert float((mixed_grad - plain_grad).norm() / plain_grad.norm()) < 0.05  # bf16 has 8 bits of mantissa


def test_the_self_supervised_step_loss_is_barlow_twins_between_two_views_by_hand() -> None:
    network = build_student(UNIT_ARCH, UNIT_ARGS, 4, (3, 8, 8), seed=0)
    x = unit_data(6, "mse")[0]
    assert draw_views("mse", 6, make_generator(0), "cpu") is None
    views = draw_views("barlow-twins", 6, make_generator(0), "cpu")
    v1, v2 = two_views_by_hand(6, make_generator(0))
    first, second = apply_dsa(x, v1), apply_dsa(x, v2)
    assert not torch.allclose(first, second) and not torch.allclose(first, x)  # two different augmentations
    expected = barlow_twins_by_hand(network(first), network(second))
    value = step_loss(network, x, torch.zeros(6, 0), "barlow-twins", views)
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_the_self_supervised_unroll_equals_plain_sgd_on_the_same_views_and_replays_them_when_checkpointed() -> None:
    images = unit_data(5, "mse", seed=3)[0]
    network = build_student(UNIT_ARCH, UNIT_ARGS, 4, (3, 8, 8), seed=0)
    start = parameters_of(network)
    steps, batch, lr = 4, 3, 0.002
    gen = make_generator(7)
    chunks, batches = [], []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(5, generator=gen).split(batch))
        idx = chunks.pop()
        batches.append((images[idx], two_views_by_hand(idx.numel(), gen)))
    expected = ssl_sgd_by_hand(network, start, batches, lr)

    def unroll(x: torch.Tensor, checkpointed: bool) -> Params:
        return unrolled_sgd(network, start, x, torch.zeros(5, 0), torch.tensor(lr), steps, batch, "barlow-twins",
                            make_generator(7), checkpointed)

    plain = unroll(images, False)
    assert_params_close({k: v.detach() for k, v in plain.items()}, expected, atol=1e-5)
    grads = []
    for checkpointed in (False, True):  # recomputing a step in the backward pass must see the same two views
        x = images.clone().requires_grad_(True)
        student = unroll(x, checkpointed)
        grads.append(torch.autograd.grad(sum((v ** 2).sum() for v in student.values()), x)[0])
    assert float(grads[0].abs().max()) > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_unroll_gradients_match_central_finite_differences() -> None:
    """d loss / d (images, targets, lr) in float64 on a 2-step unroll of 3 images in batches of 2 (the second
    step draws a new permutation), plain and checkpointed."""
    network = build_student(UNIT_ARCH, UNIT_ARGS, 3, (1, 4, 4), seed=0).double()
    gen = torch.Generator().manual_seed(0)
    start = {k: v.double() for k, v in parameters_of(network).items()}
    target = {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in start.items()}
    images = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    targets = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    lr = torch.tensor(0.5, dtype=torch.float64)

    def objective(x: torch.Tensor, y: torch.Tensor, step: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        student = unrolled_sgd(network, start, x, y, step, 2, 2, "mse", make_generator(5), checkpointed)
        return matching_loss(student, start, target)

    def analytic(checkpointed: bool) -> tuple[torch.Tensor, ...]:
        inputs = [t.clone().requires_grad_(True) for t in (images, targets, lr)]
        value = objective(*inputs, checkpointed=checkpointed)
        return (value.detach(), *torch.autograd.grad(value, inputs))

    def numeric(which: int, eps: float = 1e-6) -> torch.Tensor:
        inputs = [images, targets, lr]
        grad = torch.zeros_like(inputs[which]).flatten()
        for i in range(grad.numel()):
            values = []
            for sign in (1, -1):
                shifted = [t.clone() for t in inputs]
                shifted[which].view(-1)[i] += sign * eps
                values.append(float(objective(*shifted).detach()))
            grad[i] = (values[0] - values[1]) / (2 * eps)
        return grad.view_as(inputs[which])

    plain = analytic(checkpointed=False)
    assert 0 < float(plain[0]) and all(float(g.abs().max()) > 1e-4 for g in plain[1:])  # a non-trivial check
    for which in range(3):
        torch.testing.assert_close(plain[1 + which], numeric(which), rtol=1e-5, atol=1e-8)
    for a, b in zip(analytic(checkpointed=True), plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_matching_loss_by_hand() -> None:
    start = {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.0]])}
    target = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([[5.0]])}  # ||start - target||^2 = 9 + 16 = 25
    student = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[4.0]])}  # ||student - target||^2 = 4 + 4 + 1 = 9
    assert float(matching_loss(student, start, target)) == pytest.approx(9 / 25, rel=1e-6)
    assert float(matching_loss(target, start, target)) == 0.0
    assert float(matching_loss(start, start, target)) == 1.0
    network = build_student(UNIT_ARCH, UNIT_ARGS, 4, (3, 8, 8), seed=0)
    real_start = parameters_of(network)
    real_target = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
                   for k, v in real_start.items()}
    assert float(matching_loss(real_target, real_start, real_target)) == 0.0
    assert float(matching_loss(real_start, real_start, real_target)) == 1.0


# ---- 6.-8. MKDT and MTT end to end --------------------------------------------------------------------------------


def real_images(pixel_space: PixelSpace, rows: torch.Tensor) -> torch.Tensor:
    """Source images ``rows`` at 32 px in ``pixel_space``, normalised here."""
    source = make_synthetic("train").converted(channels=3, size=32)
    return pixel_space.normalize(source.images[rows].float().div(255.0))


def objective_by_hand(store: ExpertStore, images: torch.Tensor, targets: torch.Tensor, lr: float, loss: str,
                      steps: int) -> float:
    """Expert 0 from epoch 0, ``steps`` full-batch SGD steps on the set by hand, distance to its epoch 2."""
    outputs = targets.shape[1] if loss == "mse" else CLASSES
    network = build_student(PRESET_ARCH, PRESET_ARGS, outputs, (3, 32, 32), seed=0)
    start = store.params(0, 0)
    student = sgd_by_hand(network, start, [(images.float(), targets)] * steps, lr, loss)
    return distance_ratio(student, start, store.params(0, 2))


@pytest.mark.parametrize("method", ["mkdt", "mtt"])
def test_the_matching_objective_decreases(tiny_teacher: Path, tmp_path: Path, method: str) -> None:
    """One expert and start epoch 0 only, every unrolled batch the whole set: every iteration descends the same
    objective, which the test evaluates itself for the initial set (rebuilt from the recorded indices) and the final."""
    images = 10
    config = {"iterations": 12, "batch_syn": images, "experts": {"num_experts": 1}, "max_start_epoch": 1,
              "experts_dir": str(tmp_path / "experts")}
    teacher = tiny_teacher if method == "mkdt" else None
    distilled = ssdd.distill(method, "synthetic", teacher=teacher, budget=images, preset="tiny", config=config,
                             out=tmp_path / "run", device="cpu", progress=False)
    store = ExpertStore(tmp_path / "experts", 1)
    rows = torch.tensor(distilled.metadata["initial_indices"])
    if method == "mkdt":
        loss, initial_targets = "mse", teacher_features(load_teacher(tiny_teacher), make_synthetic("train"))[rows]
        final_targets = distilled.tensors["targets"]
    else:
        loss, initial_targets = "ce", make_synthetic("train").labels[rows]
        final_targets = distilled.tensors["labels"]
    recorded = distilled.metadata["config"]["settings"]
    steps, init_lr = recorded["syn_steps"], recorded["init_lr"]
    before = objective_by_hand(store, real_images(distilled.pixel_space, rows), initial_targets, init_lr, loss, steps)
    after = objective_by_hand(store, distilled.tensors["images"], final_targets, float(distilled.learned_lr), loss,
                              steps)
    assert after < 0.99 * before, (before, after)


def test_mkdt_starts_from_the_images_the_epoch_1_experts_fit_worst(tiny_teacher: Path, tmp_path: Path) -> None:
    """The preset's 2 experts with more, larger steps per epoch, so that their epoch-1 checkpoints have learned
    something and rank the images differently from their initialisations and from each other."""
    chosen_count = 50
    config = matching_config("mkdt", tmp_path / "experts", tiny_teacher, images=chosen_count,
                             settings={"experts": {"batch_size": 16, "lr": 0.3}})
    method = Distillation(config, None, progress=False).method
    chosen = method.distilled_set().metadata["initial_indices"]

    teacher = load_teacher(tiny_teacher)
    images = real_images(teacher.pixel_space, torch.arange(N_SOURCE))
    features = teacher_features(teacher, make_synthetic("train"))
    store = ExpertStore(tmp_path / "experts", 2)

    def per_image_mse(expert: int, epoch: int) -> torch.Tensor:
        network = build_student(PRESET_ARCH, PRESET_ARGS, features.shape[1], (3, 32, 32), seed=0)
        network.load_state_dict(store.params(expert, epoch))
        with torch.no_grad():
            return ((network(images) - features) ** 2).mean(1)

    def top(scores: torch.Tensor) -> set[int]:
        ranked = scores.sort(descending=True)
        assert ranked.values[chosen_count - 1] > ranked.values[chosen_count]  # no tie at the cut
        return set(ranked.indices[:chosen_count].tolist())

    expected = top((per_image_mse(0, 1) + per_image_mse(1, 1)) / 2)
    assert set(chosen) == expected and len(chosen) == chosen_count
    # the check has power: the initialisations, the epoch-2 checkpoints or one expert alone choose other images
    assert all(top(other) != expected for other in (per_image_mse(0, 0) + per_image_mse(1, 0),
                                                     per_image_mse(0, 2) + per_image_mse(1, 2),
                                                     per_image_mse(0, 1), per_image_mse(1, 1)))
    # the set starts as those images with the teacher's features of them, at the initial step size
    torch.testing.assert_close(method.images.detach(), images[chosen], rtol=0, atol=1e-6)
    torch.testing.assert_close(method.targets.detach(), features[chosen], rtol=0, atol=0)
    assert float(method.syn_lr.detach()) == pytest.approx(0.1)


def test_mkdt_random_init_takes_the_seeded_random_images(tiny_teacher: Path, tmp_path: Path) -> None:
    config = matching_config("mkdt", tmp_path / "experts", tiny_teacher, images=12, seed=3,
                             settings={"init": "random", "experts": {"num_experts": 1}})
    distilled = Distillation(config, None, progress=False).method.distilled_set()
    expected = torch.randperm(N_SOURCE, generator=make_generator(3))[:12]
    assert distilled.metadata["initial_indices"] == expected.tolist()
    assert distilled.metadata["init"] == "random"


def test_mtt_set_is_class_balanced_with_true_hard_labels_and_a_learned_step_size(tmp_path: Path) -> None:
    distilled = ssdd.distill("mtt", "synthetic", budget=25, preset="tiny", out=tmp_path / "run", device="cpu",
                             progress=False, config={"iterations": 6, "init_lr": 0.05, "experts": {"num_experts": 1},
                                                     "experts_dir": str(tmp_path / "experts")})
    saved = load_distilled(tmp_path / "run" / DISTILLED_FILE)
    source = make_synthetic("train")
    rows = torch.tensor(saved.metadata["initial_indices"])
    assert len(rows) == len(set(rows.tolist())) == 20  # 25 images buy 2 per class
    assert torch.bincount(source.labels[rows], minlength=CLASSES).tolist() == [2] * CLASSES
    assert saved.target_kind == "hard-label" and saved.metadata["num_classes"] == CLASSES
    assert torch.equal(saved.tensors["labels"], source.labels[rows])  # fixed: never learned
    lr = saved.tensors["learned_lr"]
    assert lr.dim() == 0 and float(lr) > 0 and abs(float(lr) - 0.05) > 1e-6
    assert saved.tensors["images"].shape == (20, 3, 32, 32)
    assert not torch.allclose(saved.tensors["images"], real_images(saved.pixel_space, rows), atol=1e-4)
    assert all(torch.equal(saved.tensors[k], v) for k, v in distilled.tensors.items())


def test_mtt_starts_from_the_chosen_real_images(tmp_path: Path) -> None:
    config = matching_config("mtt", tmp_path / "experts", settings={"experts": {"num_experts": 1}})
    method = Distillation(config, None, progress=False).method
    rows = method.initial_rows
    torch.testing.assert_close(method.images.detach(), real_images(method.pixel_space, rows), rtol=0, atol=1e-6)
    assert torch.equal(method.targets, make_synthetic("train").labels[rows])


# ---- 9. resume ----------------------------------------------------------------------------------------------------


def step_losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "step" in r and "loss" in r]


def test_mkdt_resume_continues_bit_identically(tiny_teacher: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"iterations": 8, "experts": {"num_experts": 1}}
    full = Distillation(matching_config("mkdt", tmp_path / "experts", tiny_teacher, images=10, settings=settings),
                        tmp_path / "a", progress=False).run()
    config = matching_config("mkdt", tmp_path / "experts", tiny_teacher, images=10, settings=settings,
                             checkpoint_minutes=0)
    resumed = interrupt_then_resume(monkeypatch, MKDT, config, tmp_path / "b", checkpoint_until=3, stop_at=5)
    assert set(resumed.tensors) == set(full.tensors) == {"images", "targets", "learned_lr"}
    for name, tensor in full.tensors.items():
        assert torch.equal(resumed.tensors[name], tensor), name
    assert [s for s, _ in step_losses(tmp_path / "b")] == list(range(1, 9))
    assert step_losses(tmp_path / "b") == step_losses(tmp_path / "a")


# ---- 10. errors ---------------------------------------------------------------------------------------------------


def test_experts_with_running_statistics_are_refused(tiny_teacher: Path, tmp_path: Path) -> None:
    message = config_error(matching_config("mkdt", tmp_path / "experts", tiny_teacher,
                                           settings={"experts": {"arch": "convnet3-bn"}}))
    assert "convnet3-bn" in message and "running statistics" in message and "instance-norm" in message
    assert not (tmp_path / "experts").exists()  # refused before training anything


def test_the_target_epoch_must_exist() -> None:
    with pytest.raises(ConfigError) as info:
        MatchingSettings(max_start_epoch=2, expert_epochs=2, experts=ExpertSettings(epochs=2))
    message = one_line(info.value)
    assert "expert_epochs=2" in message and "at least 3 epochs" in message and "they train 2" in message
    MatchingSettings(max_start_epoch=1, expert_epochs=2, experts=ExpertSettings(epochs=2))  # the last one that fits


def test_mtt_ssl_lowers_its_objective_and_stores_the_teachers_view_of_its_images(tiny_teacher: Path,
                                                                                   tmp_path: Path) -> None:
    """One expert, start epoch 0, the whole set in every unrolled step: the run descends the expected matching
    distance over random view pairs, which the test estimates itself (Barlow Twins SGD by hand, the same 4 draws of
    views for the initial and the final set, each at the step size it was used with)."""
    images = 10
    config = {"iterations": 12, "batch_syn": images, "experts": {"num_experts": 1}, "max_start_epoch": 1,
              "experts_dir": str(tmp_path / "experts")}
    distilled = ssdd.distill("mtt-ssl", "synthetic", teacher=tiny_teacher, budget=images, preset="tiny",
                             config=config, out=tmp_path / "run", device="cpu", progress=False)
    store = ExpertStore(tmp_path / "experts", 1)
    recorded = distilled.metadata["config"]["settings"]
    steps = recorded["syn_steps"]
    network = build_student(PRESET_ARCH, PRESET_ARGS, recorded["experts"]["projection_dim"], (3, 32, 32), seed=0)
    start, target = store.params(0, 0), store.params(0, 2)

    def objective(x: torch.Tensor, lr: float) -> float:
        distances = []
        for draw in range(4):
            gen = make_generator(100 + draw)
            batches = [(x.float(), two_views_by_hand(images, gen)) for _ in range(steps)]
            distances.append(distance_ratio(ssl_sgd_by_hand(network, start, batches, lr), start, target))
        return sum(distances) / len(distances)

    rows = torch.tensor(distilled.metadata["initial_indices"])
    assert torch.equal(rows, torch.randperm(N_SOURCE, generator=make_generator(0))[:images])  # seeded random init
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-2]
    before = objective(real_images(distilled.pixel_space, rows), recorded["init_lr"])
    after = objective(distilled.tensors["images"], last["syn_lr"])
    assert after < 0.99 * before, (before, after)
    assert "learned_lr" not in distilled.tensors and distilled.target_kind == "representation"
    teacher = load_teacher(tiny_teacher)
    with torch.no_grad():
        torch.testing.assert_close(distilled.tensors["targets"], teacher(distilled.tensors["images"]),
                                   rtol=1e-4, atol=1e-5)
    assert distilled.byte_count == images * (3 * 32 * 32 + teacher.feature_dim) * 4


def test_mtt_ssl_settings_name_what_is_wrong() -> None:
    with pytest.raises(ConfigError) as info:
        MTTSSLSettings(init="high-loss")
    assert one_line(info.value) == "mtt-ssl starts from random real images (init: random), not 'high-loss'"
    with pytest.raises(ConfigError) as info:
        MTTSSLSettings(ssl="byol")
    assert one_line(info.value) == "ssl must be one of barlow-twins, simclr, got 'byol'"


def test_mtt_refuses_a_high_loss_init() -> None:
    with pytest.raises(ConfigError) as info:
        MTTSettings(init="high-loss")
    message = one_line(info.value)
    assert "mtt" in message and "init: random" in message and "'high-loss'" in message


def test_experts_trained_for_the_other_loss_are_refused(tiny_teacher: Path, tmp_path: Path) -> None:
    folder = tmp_path / "experts"
    Distillation(matching_config("mtt", folder, settings={"experts": {"num_experts": 1}}), None, progress=False)
    before = file_state(expert_file(folder, 0))
    message = config_error(matching_config("mkdt", folder, tiny_teacher))  # the preset wants 2 experts
    assert "'method_loss': 'ce'" in message and "'method_loss': 'mse'" in message
    assert "use another experts_dir" in message
    assert sorted(p.name for p in folder.iterdir()) == ["expert_000.safetensors"]  # nothing trained into it
    assert file_state(expert_file(folder, 0)) == before


def test_mtt_budget_below_the_number_of_classes(tmp_path: Path) -> None:
    message = config_error(matching_config("mtt", tmp_path / "experts", images=CLASSES - 1,
                                           settings={"experts": {"num_experts": 1}}))
    assert f"buys {CLASSES - 1} images" in message and f"fewer than the {CLASSES} classes" in message


def test_ssdd_experts_trains_the_experts_a_run_then_reuses(tiny_teacher: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "experts"
    assert main(["experts", "--method", "mtt-ssl", "--preset", "tiny", "--teacher", str(tiny_teacher),
                 "--out", str(folder), "--device", "cpu", "--no-progress"]) == 0
    assert f"2 experts of 3 epochs in {folder}" in capsys.readouterr().out
    files = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.safetensors")}
    assert len(files) == 2
    assert all(read_metadata(folder / name)["method_loss"] == "barlow-twins" for name in files)  # mtt-ssl's loss
    config = matching_config("mtt-ssl", folder, tiny_teacher, settings={"iterations": 1})
    Distillation(config, None, progress=False).run()
    assert {path.name: path.stat().st_mtime_ns for path in folder.glob("*.safetensors")} == files  # reused


def test_ssdd_experts_of_a_method_without_experts_names_those_with(capsys: pytest.CaptureFixture[str],
                                                                     tmp_path: Path) -> None:
    line = user_error(capsys, ["experts", "--method", "dm", "--preset", "tiny", "--out", str(tmp_path / "e"),
                               "--device", "cpu"])
    assert line == "ssdd: error: method dm trains no experts; experts are for mkdt, mtt, mtt-ssl"
