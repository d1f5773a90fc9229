"""Distillation methods: the registry and budget, the engine (checkpoints, exact resume, the numerical guard),
KRR-ST end to end on the tiny teacher, the parameterised forms of a DistilledSet, and ``ssdd distill``.

One tiny teacher (conftest ``tiny_teacher``) serves the module; runs are a few steps of the ``krr-st/tiny``
preset made smaller still.  Expected values come from hand arithmetic, from tensors the test builds itself, from
a control run with zero learning rates, or from an uninterrupted run -- never from the code under test.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import interrupt_then_resume, one_line, run_with_frozen_pool, user_error

import ssdd
from ssdd.budget import Budget
from ssdd.cli import main
from ssdd.config import deep_update, preset_dict, resolve_config
from ssdd.data import PixelSpace, make_synthetic
from ssdd.distilled import DISTILLED_FILE, DistilledSet, load_distilled
from ssdd.errors import ArtefactError, BudgetError, ConfigError, NumericalError, SsddError
from ssdd.io import load_checkpoint
from ssdd.methods import (
    METHODS,
    Distillation,
    DistillConfig,
    MonitorSettings,
    list_methods,
)
from ssdd.methods.kernel_ridge.krr import krr_outer_loss
from ssdd.methods.kernel_ridge.krr_st import KRRST, KRRSTSettings
from ssdd.teachers import Teacher, load_teacher, teacher_features

N_SOURCE = 320  # the synthetic training split
IMAGE_VALUES = 3 * 32 * 32  # the tiny teacher's input
FEATURE_DIM = 1024  # the tiny teacher's features: 16 channels x 8 x 8
ITEM_BYTES = (IMAGE_VALUES + FEATURE_DIM) * 4  # one float32 image with its target: 16384 bytes

# The krr-st/tiny preset made smaller: 6 images, 12 steps, real batches of 16, a narrower pool.
SMALL: dict[str, Any] = {
    "images": 6, "log_every": 1, "monitor": {"every": -1},
    "settings": {"steps": 12, "real_batch": 16, "pool": {"arch_args": {"width": 4}}},
}


def tiny_config(teacher: Path, **overrides: Any) -> DistillConfig:
    """The krr-st/tiny preset on the CPU, shrunk by SMALL, then ``overrides`` (nested dicts merge)."""
    merged: dict[str, Any] = {"teacher": str(teacher), "device": "cpu"}
    deep_update(merged, copy.deepcopy(SMALL))
    deep_update(merged, copy.deepcopy(overrides))
    return resolve_config(DistillConfig, "distill", "krr-st/tiny", overrides=merged)


def run(config: DistillConfig, out: Path | None = None, resume: bool = False) -> DistilledSet:
    return Distillation(config, out, resume=resume, progress=False).run()


def metric_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_rows(out: Path) -> list[dict[str, Any]]:
    return [r for r in metric_rows(out) if "step" in r and "loss" in r]


def payload_bytes(path: Path) -> int:
    """File size minus the 8-byte length prefix minus the JSON header: the bytes of the tensor data."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    return len(data) - 8 - header_len


@pytest.fixture(scope="module")
def teacher(tiny_teacher: Path) -> Teacher:
    return load_teacher(tiny_teacher)


@pytest.fixture(scope="module")
def real(teacher: Teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """Every source image in the teacher's pixel space (no augmentation) and the teacher's features of it."""
    source = make_synthetic("train")
    images = teacher.pixel_space.normalize(source.converted(channels=3, size=32).images.float().div(255.0))
    return images, teacher_features(teacher, source)


# ---- registry and budget ----------------------------------------------------------------------------------


def test_registry_refuses_a_duplicate_method_name() -> None:
    with pytest.raises(ValueError, match="method 'krr-st' is already registered"):
        METHODS.add("krr-st", object)  # type: ignore[arg-type]
    assert METHODS.get("krr-st") is KRRST
    assert "krr-st" in list_methods()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({}, "not both or neither"),
    ({"images": 3, "bytes": 100}, "not both or neither"),
    ({"images": 0}, "a budget must be positive"),
    ({"bytes": -5}, "a budget must be positive"),
    ({"images": 3, "dtype": "float64"}, "storage dtype must be one of float32, float16, bfloat16, got 'float64'"),
])
def test_budget_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        Budget(**kwargs)
    one_line(info.value)


def test_budget_count_by_hand() -> None:
    values = 3 * 8 * 8 + 16  # 208 values per item
    assert Budget(bytes=10_000).count(values) == 10_000 // (208 * 4) == 12
    assert Budget(bytes=10_000, dtype="float16").count(values) == 10_000 // (208 * 2) == 24
    assert Budget(bytes=10_000, dtype="bfloat16").count(values) == 24
    assert Budget(bytes=832).count(values) == 1  # exactly one item
    assert Budget(images=7).count(values) == 7 == Budget(images=7).count(1)
    assert [Budget(images=1, dtype=d).bytes_per_value for d in ("float32", "float16", "bfloat16")] == [4, 2, 2]
    assert Budget(bytes=5, dtype="float16").describe() == {"images": None, "bytes": 5, "dtype": "float16"}


def test_byte_budget_too_small_says_so() -> None:
    with pytest.raises(ConfigError) as info:
        Budget(bytes=831).count(208)
    assert one_line(info.value) == "a budget of 831 bytes holds no item of 208 float32 values (832 bytes)"


def test_run_level_configuration_errors(tiny_teacher: Path) -> None:
    with pytest.raises(ConfigError, match="give a budget") as info:
        ssdd.distill("krr-st", teacher=tiny_teacher, device="cpu", progress=False)
    one_line(info.value)
    with pytest.raises(ConfigError, match=f"asks for 1000 images but synthetic has {N_SOURCE}") as info:
        Distillation(tiny_config(tiny_teacher, images=1000), None)
    one_line(info.value)
    with pytest.raises(ConfigError, match="needs a teacher") as info:
        Distillation(DistillConfig(images=2, dataset="synthetic", device="cpu"), None)
    one_line(info.value)
    with pytest.raises(ConfigError, match="real_augment must be one of crop-flip, none, views, got 'blur'") as info:
        Distillation(tiny_config(tiny_teacher, settings={"real_augment": "blur"}), None)
    one_line(info.value)
    with pytest.raises(ConfigError, match="krr-st settings: unknown key"):
        Distillation(tiny_config(tiny_teacher, settings={"nosuch": 1}), None)


def test_source_images_distils_from_a_seeded_subset(tiny_teacher: Path) -> None:
    full = Distillation(tiny_config(tiny_teacher), None).source
    first = Distillation(tiny_config(tiny_teacher, source_images=50), None).source
    again = Distillation(tiny_config(tiny_teacher, source_images=50), None).source
    other = Distillation(tiny_config(tiny_teacher, source_images=50, seed=1), None).source
    assert len(first) == 50 and torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)
    # every subset image is one of the source's, with its label
    rows = {(bytes(img.numpy().tobytes()), int(lab)) for img, lab in zip(full.images, full.labels)}
    assert all((bytes(img.numpy().tobytes()), int(lab)) in rows for img, lab in zip(first.images, first.labels))
    with pytest.raises(ConfigError) as info:
        Distillation(tiny_config(tiny_teacher, source_images=N_SOURCE + 1), None)
    assert f"source_images must lie in 1..{N_SOURCE}" in one_line(info.value)


# ---- KRR-ST: what it optimises ----------------------------------------------------------------------------

# One frozen pool member (lr 0 and no normalisation statistics, so the network never changes), un-augmented real
# batches and a constant learning rate: each step is then a stochastic gradient step on one fixed objective, the
# outer loss of the set against *all* source images, which the test evaluates itself.
FROZEN = {"steps": 30, "real_batch": 64, "lr_schedule": "constant", "real_augment": "none",
          "pool": {"size": 1, "arch": "convnet", "arch_args": {"widths": [4, 8], "norm": "none"},
                   "online_iterations": 10**6, "lr": 0.0}}


def frozen_run(tiny_teacher: Path, lr_images: float, lr_targets: float) -> tuple[DistilledSet, torch.nn.Module]:
    config = DistillConfig(teacher=str(tiny_teacher), images=10, device="cpu", monitor=MonitorSettings(every=-1),
                           settings={**FROZEN, "lr_images": lr_images, "lr_targets": lr_targets})
    return run_with_frozen_pool(config)


def full_objective(network: torch.nn.Module, distilled: DistilledSet, real: tuple[torch.Tensor, torch.Tensor]) -> float:
    images, features = real
    with torch.no_grad():
        return float(krr_outer_loss(network.features(distilled.images).double(), network.features(images).double(),
                                    distilled.tensors["targets"].double(), features.double(), 1e-6))


def test_high_loss_init_starts_from_the_images_the_students_fit_worst(
        tiny_teacher: Path, real: tuple[torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    from ssdd.methods.kernel_ridge import base as kernel_ridge

    scores = torch.randperm(N_SOURCE, generator=torch.Generator().manual_seed(5)).float()
    asked = []

    def fake_scores(source, features, teacher, settings, seed, device):  # noqa: ANN001, ANN202 - the real signature
        asked.append((len(source), tuple(features.shape), settings.num_experts, seed))
        return scores

    monkeypatch.setattr(kernel_ridge, "high_loss_scores", fake_scores)
    config = tiny_config(tiny_teacher, settings={"steps": 1, "lr_images": 0.0, "lr_targets": 0.0, "init": "high-loss",
                                                 "high_loss": {"num_experts": 2}})
    distilled = run(config)
    worst = sorted(range(N_SOURCE), key=lambda i: -float(scores[i]))[:6]  # the 6 highest scores, by hand
    assert sorted(distilled.metadata["initial_indices"]) == sorted(worst)
    assert asked == [(N_SOURCE, (N_SOURCE, FEATURE_DIM), 2, config.seed)]
    chosen = torch.tensor(distilled.metadata["initial_indices"])
    torch.testing.assert_close(distilled.tensors["images"], real[0][chosen], rtol=0, atol=1e-6)
    torch.testing.assert_close(distilled.tensors["targets"], real[1][chosen], rtol=0, atol=0)


def test_an_unknown_init_and_frepo_with_high_loss_are_clear_errors() -> None:
    from ssdd.methods.kernel_ridge.frepo import FRePoSettings

    with pytest.raises(ConfigError) as info:
        KRRSTSettings(init="best")
    assert one_line(info.value) == "init must be one of random, high-loss, got 'best'"
    with pytest.raises(ConfigError) as info:
        FRePoSettings(init="high-loss")
    assert one_line(info.value) == "frepo starts from class-balanced random real images (init: random), not 'high-loss'"


def test_krr_st_lowers_its_outer_objective_and_a_zero_lr_control_does_not(
        tiny_teacher: Path, real: tuple[torch.Tensor, torch.Tensor]) -> None:
    control, network = frozen_run(tiny_teacher, 0.0, 0.0)
    # the control never moves: it is the initialisation, N random real images and the teacher's features of them
    chosen = torch.tensor(control.metadata["initial_indices"])
    assert len(set(chosen.tolist())) == 10 and 0 <= int(chosen.min()) and int(chosen.max()) < N_SOURCE
    torch.testing.assert_close(control.tensors["images"], real[0][chosen], rtol=0, atol=1e-6)
    torch.testing.assert_close(control.tensors["targets"], real[1][chosen], rtol=0, atol=0)
    start = full_objective(network, control, real)

    learned, network2 = frozen_run(tiny_teacher, 0.01, 0.01)
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), network2.state_dict().values()))
    assert full_objective(network, learned, real) < 0.85 * start
    assert (learned.tensors["images"] - control.tensors["images"]).abs().max() > 1e-3
    assert (learned.tensors["targets"] - control.tensors["targets"]).abs().max() > 1e-3
    # each half of the gradient helps on its own: images only, then targets only
    images_only, _ = frozen_run(tiny_teacher, 0.01, 0.0)
    assert torch.equal(images_only.tensors["targets"], control.tensors["targets"])
    assert full_objective(network, images_only, real) < 0.95 * start
    targets_only, _ = frozen_run(tiny_teacher, 0.0, 0.01)
    assert torch.equal(targets_only.tensors["images"], control.tensors["images"])
    assert full_objective(network, targets_only, real) < 0.97 * start


def test_zero_steps_give_the_set_a_zero_lr_run_ends_with(tiny_teacher: Path) -> None:
    """``steps: 0`` is the zero-step control of an outer-loop result: the initial set, as a run that never moves."""
    control, _ = frozen_run(tiny_teacher, 0.0, 0.0)
    config = DistillConfig(teacher=str(tiny_teacher), images=10, device="cpu", monitor=MonitorSettings(every=-1),
                           settings={**FROZEN, "steps": 0})
    zero = Distillation(config, None).run()
    assert zero.metadata["initial_indices"] == control.metadata["initial_indices"]
    assert all(torch.equal(zero.tensors[k], control.tensors[k]) for k in ("images", "targets"))
    with pytest.raises(ConfigError) as info:
        KRRSTSettings(steps=-1)
    assert one_line(info.value) == "real_batch and pool.size must be >= 1, and steps and teacher_copies >= 0"


@pytest.mark.parametrize(("augment", "copies"), [("crop-flip", 2), ("crop-flip", 0), ("none", 2)])
def test_real_batches_carry_the_teachers_features_of_exactly_those_views(
        tiny_teacher: Path, teacher: Teacher, augment: str, copies: int) -> None:
    config = tiny_config(tiny_teacher, settings={"real_augment": augment, "teacher_copies": copies})
    method = Distillation(config, None, progress=False).method
    images, features = method.real.sample(torch.Generator().manual_seed(3))
    assert images.shape == (16, 3, 32, 32) and features.shape == (16, FEATURE_DIM)
    with torch.no_grad():
        torch.testing.assert_close(features, teacher(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("schedule", "lr_end"), [("linear", 1e-3), ("linear", 0.0), ("constant", 1e-3)])
def test_learning_rate_schedule(tiny_teacher: Path, schedule: str, lr_end: float) -> None:
    config = tiny_config(tiny_teacher, settings={"steps": 4, "lr_schedule": schedule, "lr_images": 0.02,
                                                 "lr_targets": 0.04, "lr_end": lr_end})
    method = Distillation(config, None, progress=False).method
    for step in range(4):
        method.step(step)
        # linear: the released LinearLR(1 -> lr_end over the steps): 1, 1 - 0.25 (1 - lr_end), ...
        scale = 1 - (1 - lr_end) * step / 4 if schedule == "linear" else 1.0
        assert [g["lr"] for g in method.optimizer.param_groups] == pytest.approx([0.02 * scale, 0.04 * scale])


# ---- KRR-ST: the stored set -------------------------------------------------------------------------------


def test_byte_count_by_hand_and_exact_round_trip(tiny_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    distilled = run(tiny_config(tiny_teacher, images=5, settings={"steps": 3}), out)
    assert distilled.tensors["images"].shape == (5, 3, 32, 32)
    assert distilled.tensors["targets"].shape == (5, FEATURE_DIM)
    assert distilled.byte_count == 5 * ITEM_BYTES == 81920
    assert distilled.byte_count == sum(t.numel() * t.element_size() for t in distilled.tensors.values())
    path = out / DISTILLED_FILE
    assert distilled.path == path and payload_bytes(path) == 81920

    loaded = load_distilled(out)
    assert set(loaded.tensors) == {"images", "targets"}
    for name, tensor in distilled.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype and torch.equal(loaded.tensors[name], tensor), name
    images, targets = loaded.materialize()
    assert torch.equal(images, distilled.tensors["images"]) and torch.equal(targets, distilled.tensors["targets"])
    assert loaded.metadata["initial_indices"] == distilled.metadata["initial_indices"]
    assert loaded.metadata["budget"] == {"images": 5, "bytes": None, "dtype": "float32"}
    assert loaded.target_kind == "representation" and loaded.method == "krr-st"
    assert loaded.pixel_space == load_teacher(tiny_teacher).pixel_space


@pytest.mark.parametrize(("budget", "dtype", "images"), [
    (5 * ITEM_BYTES, "float32", 5),  # exactly five items
    (5 * ITEM_BYTES + ITEM_BYTES - 1, "float32", 5),  # one byte short of six
    (5 * ITEM_BYTES, "float16", 10),  # half the bytes per value: twice the images
])
def test_byte_budget_sets_the_number_of_images(tiny_teacher: Path, budget: int, dtype: str, images: int) -> None:
    config = tiny_config(tiny_teacher, bytes=budget, storage_dtype=dtype, settings={"steps": 2})
    config.images = None  # the preset's image budget gives way to the byte budget
    distilled = run(config)
    assert distilled.num_images == images == budget // ((IMAGE_VALUES + FEATURE_DIM) * (4 if dtype == "float32" else 2))
    assert distilled.byte_count <= budget
    assert distilled.byte_count == images * (IMAGE_VALUES + FEATURE_DIM) * (4 if dtype == "float32" else 2)


@pytest.mark.parametrize("budget", ["images", "bytes"])
def test_the_engine_refuses_a_set_over_its_budget(tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  budget: str) -> None:
    """A method whose set stores more than its plan (here one float32 value more than the 6 planned images with
    their targets: a step size it never asked the budget for) gets a one-line BudgetError and no set is written."""
    made = KRRST.distilled_set

    def oversized(self: KRRST) -> DistilledSet:
        distilled = made(self)
        distilled.tensors["learned_lr"] = torch.ones((), dtype=torch.float32)
        return distilled

    monkeypatch.setattr(KRRST, "distilled_set", oversized)
    config = tiny_config(tiny_teacher, settings={"steps": 2},
                         **({"bytes": 6 * ITEM_BYTES} if budget == "bytes" else {}))
    if budget == "bytes":
        config.images = None  # the preset's image budget gives way to the byte budget
    with pytest.raises(BudgetError) as info:
        run(config, tmp_path)
    given = "6 images" if budget == "images" else f"{6 * ITEM_BYTES} bytes"
    assert one_line(info.value) == (f"krr-st made a set of {6 * ITEM_BYTES + 4:,} bytes, over its budget of "
                                    f"{6 * ITEM_BYTES:,} bytes (a budget of {given}, float32); the set was not kept: "
                                    "the method stores more than it planned")
    assert not (tmp_path / DISTILLED_FILE).exists()


def test_float16_storage_halves_the_bytes(tiny_teacher: Path) -> None:
    full = run(tiny_config(tiny_teacher, images=4, settings={"steps": 2}))
    half = run(tiny_config(tiny_teacher, images=4, storage_dtype="float16", settings={"steps": 2}))
    assert {t.dtype for t in half.tensors.values()} == {torch.float16}
    assert half.byte_count * 2 == full.byte_count == 4 * ITEM_BYTES
    # the same run, stored at lower precision
    assert torch.equal(half.tensors["images"], full.tensors["images"].half())
    assert torch.equal(half.tensors["targets"], full.tensors["targets"].half())


# ---- the engine: checkpoints, resume, the numerical guard -------------------------------------------------


def test_resume_continues_bit_identically(tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = {"settings": {"steps": 20}}
    full = run(tiny_config(tiny_teacher, **steps), tmp_path / "a")

    # run B checkpoints after every step up to step 6 only, logs steps 7-10 and is interrupted before step 11
    config = tiny_config(tiny_teacher, checkpoint_minutes=0, **steps)
    resumed = interrupt_then_resume(monkeypatch, KRRST, config, tmp_path / "b", checkpoint_until=6, stop_at=10)
    assert torch.equal(resumed.tensors["images"], full.tensors["images"])
    assert torch.equal(resumed.tensors["targets"], full.tensors["targets"])
    assert resumed.metadata["pool_reinitialisations"] == full.metadata["pool_reinitialisations"]
    rows_a, rows_b = step_rows(tmp_path / "a"), step_rows(tmp_path / "b")
    assert [r["step"] for r in rows_b] == list(range(1, 21))  # no step twice, none missing
    for key in ("loss", "online_loss", "member", "reinitialised"):
        assert [r[key] for r in rows_b] == [r[key] for r in rows_a], key
    assert "resumed at step 6" in (tmp_path / "b" / "run.log").read_text()


def test_resume_with_other_settings_fails_clearly(tiny_teacher: Path, tmp_path: Path) -> None:
    run(tiny_config(tiny_teacher, settings={"steps": 2}), tmp_path)
    with pytest.raises(ConfigError) as info:
        Distillation(tiny_config(tiny_teacher, settings={"steps": 3}), tmp_path, resume=True)
    message = one_line(info.value)
    assert f"cannot resume {tmp_path}" in message and "settings differ" in message and "(settings.steps)" in message


def nan_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Make KRR-ST's outer loss NaN at its ``call``-th evaluation (1-based, one per step)."""
    from ssdd.methods.kernel_ridge import base as kernel_ridge

    calls = []

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        loss = krr_outer_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == call else loss

    monkeypatch.setattr(kernel_ridge, "krr_outer_loss", poisoned)


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_checkpoint(
        tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nan_at(monkeypatch, 4)
    with pytest.raises(NumericalError) as info:
        run(tiny_config(tiny_teacher, checkpoint_minutes=0), tmp_path)
    message = one_line(info.value)
    assert message.startswith("krr-st: the loss at step 4 became nan;"), message
    assert f"the last good checkpoint (step 3) is {tmp_path / 'checkpoint.pt'}" in message
    assert isinstance(info.value, SsddError)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert not (tmp_path / DISTILLED_FILE).exists()


def test_a_diverging_pool_stops_the_run_with_one_line_naming_the_setting(tiny_teacher: Path, tmp_path: Path) -> None:
    """The pool's online SGD blowing up (as FRePo's did on one-hot targets at lr 0.1) stops with the step, what
    overflowed, the setting to lower and the last checkpoint, not a traceback from the Cholesky solve."""
    with pytest.raises(NumericalError) as info:
        run(tiny_config(tiny_teacher, checkpoint_minutes=0, settings={"pool": {"lr": 1e12}}), tmp_path)
    message = one_line(info.value)
    assert message.startswith("krr-st: step "), message
    assert "lower settings.pool.lr" in message and f"is {tmp_path / 'checkpoint.pt'}" in message, message
    assert not (tmp_path / DISTILLED_FILE).exists()


def test_a_nan_loss_without_a_run_folder(tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nan_at(monkeypatch, 2)
    with pytest.raises(NumericalError) as info:
        run(tiny_config(tiny_teacher))
    assert one_line(info.value) == ("krr-st: the loss at step 2 became nan; no checkpoint was kept (no --out); "
                                    "start again with lower learning rates")


def test_the_numerical_errors_advice_can_be_followed(
        tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The message says to resume with a lower learning rate: doing so must continue from the checkpoint."""
    with monkeypatch.context() as m:
        nan_at(m, 4)
        with pytest.raises(NumericalError, match="resume from it with lower learning rates"):
            run(tiny_config(tiny_teacher, checkpoint_minutes=0), tmp_path)
    resumed = run(tiny_config(tiny_teacher, settings={"lr_images": 0.001, "lr_targets": 0.001}), tmp_path, resume=True)
    assert resumed.num_images == 6
    assert [r["step"] for r in step_rows(tmp_path)] == list(range(1, 13))


# ---- the model pool inside a run --------------------------------------------------------------------------
# One member, online_iterations 5, 12 steps.  Each step first calls reinitialise_if_due (counter >= 5?), then
# trains the member once (counter + 1).  Counters after steps 1..5: 1..5; step 6 re-initialises.
#   default: the counter restarts (0, then 1 after the step); steps 7-10 bring it to 5, step 11 re-initialises
#            again, step 12 does not: 2 re-initialisations, at steps 6 and 11.
#   ageing released: the counter is never reset (5, 6, ...), so steps 6..12 all re-initialise: 12 - 5 = 7 (after a
#            warm start of 1..5 online steps, which brings the counter to the limit sooner: checked below).
#   ageing fresh: every step re-initialises (12).
POOL_ARGS = ["--set", "settings.pool.size=1", "--set", "settings.pool.online_iterations=5",
             "--set", "settings.steps=12", "--set", "settings.real_batch=8", "--set", "log_every=1",
             "--set", "monitor.every=-1", "--images", "4"]


@pytest.mark.parametrize("ageing", ["reset", "released", "fresh"])
def test_pool_reinitialisations_in_a_run(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         ageing: str) -> None:
    argv = ["distill", "--method", "krr-st", "--preset", "tiny", "--teacher", str(tiny_teacher), "--out",
            str(tmp_path), "--device", "cpu", "--no-progress", *POOL_ARGS, "--pool-ageing", ageing]
    assert main(argv) == 0, capsys.readouterr().err
    distilled = load_distilled(tmp_path)
    assert distilled.metadata["config"]["settings"]["pool"]["ageing"] == ageing
    rows = step_rows(tmp_path)
    reinitialised = [r["step"] for r in rows if r["reinitialised"]]
    if ageing == "reset":
        assert reinitialised == [6, 11]
    elif ageing == "fresh":
        assert reinitialised == list(range(1, 13)) and not any("online_loss" in r for r in rows)
    else:  # warmed 1..5 steps: from the step where the counter reaches 5, every step re-initialises
        first = reinitialised[0]
        assert 1 <= first <= 6 and reinitialised == list(range(first, 13))
    assert distilled.metadata["pool_reinitialisations"] == len(reinitialised)
    assert {r["member"] for r in rows} == {0}


def test_precision_float32_is_recorded_with_the_set(tiny_teacher: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSDD_PRECISION", "amp")  # restored after the test (--precision writes it)
    argv = ["--precision", "float32", "distill", "--method", "krr-st", "--preset", "tiny", "--teacher",
            str(tiny_teacher), "--out", str(tmp_path), "--device", "cpu", "--no-progress", *POOL_ARGS]
    assert main(argv) == 0, capsys.readouterr().err
    assert load_distilled(tmp_path).metadata["environment"]["device"].endswith("float32 (--precision float32))")


# ---- DistilledSet parameterised forms ---------------------------------------------------------------------

SPACE1 = PixelSpace((0.5,), (0.25,))
M, U, V, D = 3, 2, 2, 5  # stored images, image bases, target bases, target dim


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def parameterised(**extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"image_coefficients": randn(M, U, seed=1), "image_bases": randn(U, 1, 4, 4, seed=2),
            "target_coefficients": randn(M, V, seed=3), "target_bases": randn(V, D, seed=4), **extra}


def test_parameterised_set_materialises_to_coefficients_times_upsampled_bases(tmp_path: Path) -> None:
    tensors = parameterised()
    distilled = DistilledSet(tensors, SPACE1, "representation", "test", {"image_shape": [1, 8, 8]})
    assert distilled.parameterized and distilled.num_images == M and distilled.image_shape == (1, 8, 8)
    images, targets = distilled.materialize()
    combined = torch.einsum("mu,uchw->mchw", tensors["image_coefficients"].double(), tensors["image_bases"].double())
    expected = F.interpolate(combined, size=(8, 8), mode="bilinear", align_corners=False)
    assert images.shape == (M, 1, 8, 8) and images.dtype == torch.float32
    torch.testing.assert_close(images.double(), expected, rtol=1e-5, atol=1e-5)
    expected_targets = tensors["target_coefficients"].double() @ tensors["target_bases"].double()
    torch.testing.assert_close(targets.double(), expected_targets, rtol=1e-5, atol=1e-5)
    # M*U + U*1*4*4 + M*V + V*D float32 values: (6 + 32 + 6 + 10) * 4 bytes
    assert distilled.byte_count == 216 == sum(t.numel() * t.element_size() for t in tensors.values())

    loaded = load_distilled(distilled.save(tmp_path / "set.safetensors"))
    assert loaded.byte_count == 216 and payload_bytes(tmp_path / "set.safetensors") == 216
    for name, tensor in tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name
    images2, targets2 = loaded.materialize()
    assert torch.equal(images2, images) and torch.equal(targets2, targets)


def test_constant_bases_upsample_to_constant_images() -> None:
    # a closed form independent of the interpolation code: constant bases stay constant when upsampled
    bases = torch.stack([torch.full((1, 4, 4), 2.0), torch.full((1, 4, 4), -1.0)])
    coefficients = torch.tensor([[1.0, 0.0], [0.5, 3.0], [0.0, 0.0]])
    tensors = {"image_coefficients": coefficients, "image_bases": bases, "targets": randn(3, D, seed=0)}
    images, _ = DistilledSet(tensors, SPACE1, "representation", "test", {"image_shape": [1, 8, 8]}).materialize()
    for i, value in enumerate([2.0, -2.0, 0.0]):
        assert torch.allclose(images[i], torch.full((1, 8, 8), value)), i
    # without an image_shape the bases' own resolution is the images'
    assert DistilledSet(tensors, SPACE1, "representation", "test").images.shape == (3, 1, 4, 4)


def test_views_with_stored_targets_materialise_view_major(tmp_path: Path) -> None:
    images, targets, rot = randn(M, 1, 8, 8, seed=1), randn(M, D, seed=2), randn(M, D, seed=3)
    tensors = {"images": images, "targets": targets, "view_targets.rot90": rot}
    distilled = DistilledSet(tensors, SPACE1, "representation", "test", {"views": ["identity", "rot90"]})
    out_images, out_targets = distilled.materialize()
    assert out_images.shape == (2 * M, 1, 8, 8) and out_targets.shape == (2 * M, D)
    assert torch.equal(out_images[:M], images)
    assert torch.equal(out_images[M:], torch.rot90(images, k=1, dims=(-2, -1)))
    assert torch.equal(out_images[M, 0, 0, 0], images[0, 0, 0, -1])  # rot90: the top-right pixel goes top-left
    assert torch.equal(out_targets[:M], targets) and torch.equal(out_targets[M:], rot)
    loaded = load_distilled(distilled.save(tmp_path))
    assert loaded.views == ["identity", "rot90"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.materialize(), (out_images, out_targets)))
    assert loaded.byte_count == (M * 64 + 2 * M * D) * 4


def approx_weights(hidden: int = 4, seed: int = 10) -> dict[str, torch.Tensor]:
    return {"approx.rot90.hidden.weight": randn(hidden, D, seed=seed),
            "approx.rot90.hidden.bias": randn(hidden, seed=seed + 1),
            "approx.rot90.out.weight": randn(D, hidden, seed=seed + 2),
            "approx.rot90.out.bias": randn(D, seed=seed + 3)}


def test_views_with_approximation_weights_predict_the_view_targets(tmp_path: Path) -> None:
    images, targets = randn(M, 1, 8, 8, seed=1), randn(M, D, seed=2)
    weights = approx_weights()
    distilled = DistilledSet({"images": images, "targets": targets, **weights}, SPACE1, "representation", "test",
                             {"views": ["identity", "rot90"]})
    out_images, out_targets = distilled.materialize()
    y = targets.double()
    w = {k.removeprefix("approx.rot90."): v.double() for k, v in weights.items()}
    hidden = torch.clamp(y @ w["hidden.weight"].T + w["hidden.bias"], min=0)
    expected = y + hidden @ w["out.weight"].T + w["out.bias"]
    assert torch.equal(out_targets[:M], targets)
    torch.testing.assert_close(out_targets[M:].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out_images[M:], torch.rot90(images, k=1, dims=(-2, -1)))
    loaded = load_distilled(distilled.save(tmp_path))
    assert torch.equal(loaded.materialize()[1], out_targets)
    assert loaded.byte_count == (M * 64 + M * D + 4 * D + 4 + D * 4 + D) * 4


def bad_set(tensors: dict[str, torch.Tensor], views: list[str] | None = None) -> str:
    with pytest.raises(ArtefactError) as info:
        DistilledSet(tensors, SPACE1, "representation", "test", {"views": views} if views else {})
    return one_line(info.value)


def test_parameterised_and_view_errors() -> None:
    images, targets = randn(M, 1, 8, 8, seed=1), randn(M, D, seed=2)
    plain = {"images": images, "targets": targets}
    message = bad_set(plain, ["identity", "rot90"])
    assert ("view 'rot90' needs either 'view_targets.rot90' or approximation weights 'approx.rot90.*', "
            "not neither") in message
    message = bad_set({**plain, "view_targets.rot90": targets, **approx_weights()}, ["identity", "rot90"])
    assert "not both" in message
    message = bad_set({**plain, "image_coefficients": randn(M, U, seed=3), "image_bases": randn(U, 1, 4, 4, seed=4)})
    assert "holds both 'images' and image coefficients/bases" in message
    wrong = {**approx_weights(), "approx.rot90.hidden.weight": randn(4, D + 1, seed=5)}
    message = bad_set({**plain, **wrong}, ["identity", "rot90"])
    assert f"'approx.rot90.hidden.weight' must have shape (4, {D}), got (4, {D + 1})" in message
    wrong = {**approx_weights(), "approx.rot90.out.weight": randn(D, 3, seed=5)}
    message = bad_set({**plain, **wrong}, ["identity", "rot90"])
    assert f"'approx.rot90.out.weight' must have shape ({D}, 4), got ({D}, 3)" in message
    partial = {k: v for k, v in approx_weights().items() if ".hidden." in k}
    message = bad_set({**plain, **partial}, ["identity", "rot90"])
    assert "needs hidden.weight, hidden.bias, out.weight, out.bias" in message
    for views in (["rot90", "identity"], ["identity", "rot45"], ["identity", "rot90", "rot90"]):
        assert "views must start with 'identity'" in bad_set({**plain, "view_targets.rot90": targets}, views)
    message = bad_set({**plain, "view_targets.rot90": randn(M, D + 1, seed=6)}, ["identity", "rot90"])
    assert f"'view_targets.rot90' must have shape ({M}, {D}), got ({M}, {D + 1})" in message
    message = bad_set({"image_coefficients": randn(M, U, seed=3), "image_bases": randn(U + 1, 1, 4, 4, seed=4),
                       "targets": targets})
    assert "image coefficients (M, U) (3, 2) do not fit image bases" in message
    message = bad_set({**parameterised(), "target_coefficients": randn(M, V + 1, seed=7)})
    assert "target coefficients (3, 3) do not fit 3 images and target bases (2, 5)" in message


def test_rotation_views_of_non_square_images_are_refused_when_the_set_is_built() -> None:
    """A rotated view of an H != W image has another shape than the identity view; such a set cannot be
    materialised, so it must be refused with a clear ArtefactError (not a torch error at materialize time)."""
    tensors = {"images": randn(2, 1, 8, 6, seed=1), "targets": randn(2, D, seed=2),
               "view_targets.rot90": randn(2, D, seed=3)}
    with pytest.raises(ArtefactError) as info:
        DistilledSet(tensors, SPACE1, "representation", "test", {"views": ["identity", "rot90"]}).materialize()
    assert "rot90" in one_line(info.value)


# ---- ssdd distill -----------------------------------------------------------------------------------------


def distill_argv(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--method", "krr-st", "--preset", "tiny", "--teacher", str(teacher), "--out", str(out),
            "--device", "cpu", "--no-progress", "--set", "settings.steps=5", "--set", "monitor.every=-1",
            "--set", "settings.real_batch=8", *extra]


def test_cli_distill_writes_a_set(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(distill_argv(tiny_teacher, tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"distilled set written to {tmp_path / DISTILLED_FILE}" in out
    distilled = load_distilled(tmp_path / DISTILLED_FILE)
    assert distilled.num_images == 20  # the preset's budget
    assert f"krr-st: 20 images, {20 * ITEM_BYTES:,} bytes" in out
    assert distilled.metadata["steps"] == 5 and distilled.metadata["config"]["settings"]["real_batch"] == 8
    assert distilled.metadata["monitor_knn"] is None
    assert metric_rows(tmp_path)[-1]["final"] is True


def test_cli_bytes_replaces_the_presets_image_budget(tiny_teacher: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    budget = 3 * ITEM_BYTES + 100
    assert main(distill_argv(tiny_teacher, tmp_path, "--bytes", str(budget))) == 0
    distilled = load_distilled(tmp_path)
    assert distilled.num_images == 3 and distilled.byte_count == 3 * ITEM_BYTES <= budget
    assert distilled.metadata["budget"] == {"images": None, "bytes": budget, "dtype": "float32"}


@pytest.mark.parametrize(("extra", "expected"), [
    (["--set", "nosuchkey=1"], "ssdd: error: DistillConfig: unknown key(s) nosuchkey; valid keys are "),
    (["--set", "foo"], "ssdd: error: --set expects KEY=VALUE (e.g. settings.steps=100), got 'foo'"),
    (["--set", "=3"], "ssdd: error: --set expects KEY=VALUE"),
    (["--set", "settings.nosuch=1"], "ssdd: error: krr-st settings: unknown key(s) nosuch; valid keys are "),
    (["--set", "settings.steps=[1,"], "ssdd: error: --set settings.steps: cannot read '[1,' as a value"),
    (["--set", "settings.steps=many"], "ssdd: error: krr-st settings.steps: expected an integer, got 'many'"),
    (["--bytes", "100"], "ssdd: error: a budget of 100 bytes holds no item of 4096 float32 values (16384 bytes)"),
    (["--bytes", "100000", "--images", "3"], "ssdd: error: give the budget as a number of images"),
    (["--images", "1000"], f"ssdd: error: the budget asks for 1000 images but synthetic has {N_SOURCE}"),
])
def test_cli_distill_user_errors(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 extra: list[str], expected: str) -> None:
    line = user_error(capsys, distill_argv(tiny_teacher, tmp_path / "out", *extra))
    assert line.startswith(expected), line
    assert not (tmp_path / "out").exists()  # a refused run leaves no folder, config or log behind


def test_a_refused_budget_keeps_the_existing_folder_and_its_files(tiny_teacher: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    user_error(capsys, distill_argv(tiny_teacher, tmp_path, "--bytes", "100"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_unknown_method(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = user_error(capsys, ["distill", "--method", "nope", "--teacher", str(tiny_teacher), "--images", "2",
                               "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert "unknown method 'nope'" in line
    assert f"Known: {', '.join(list_methods())}." in line  # the registry's names (a plug-in test adds its own)
    assert {"coreset", "krr-st", "mkdt", "paa", "scdd"} <= set(list_methods())


def test_cli_resume_with_other_settings_fails_clearly(tiny_teacher: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(distill_argv(tiny_teacher, tmp_path, "--set", "settings.steps=2")) == 0
    capsys.readouterr()
    line = user_error(capsys, distill_argv(tiny_teacher, tmp_path, "--resume", "--set", "settings.steps=3"))
    assert f"cannot resume {tmp_path}: settings differ from the original run (settings.steps)" in line
    # the same settings resume (the finished run's checkpoint is at its last step: nothing left to do)
    assert main(distill_argv(tiny_teacher, tmp_path, "--resume", "--set", "settings.steps=2")) == 0


def test_python_api_takes_a_preset_and_merges_settings_over_it(tiny_teacher: Path) -> None:
    """``ssdd.distill(..., preset=...)`` is the same run as the CLI's preset with --set overrides."""
    api = ssdd.distill("krr-st", teacher=tiny_teacher, preset="tiny", config={"steps": 3}, device="cpu",
                       progress=False)
    assert api.num_images == 20  # the preset's budget
    settings = api.metadata["config"]["settings"]
    assert settings["steps"] == 3 and settings["real_batch"] == 32 and settings["pool"]["size"] == 2
    cli = resolve_config(DistillConfig, "distill", "krr-st/tiny",
                         overrides={"teacher": str(tiny_teacher), "device": "cpu", "settings": {"steps": 3}})
    same = Distillation(cli, None, progress=False).run()
    assert torch.equal(api.tensors["images"], same.tensors["images"])
    assert torch.equal(api.tensors["targets"], same.tensors["targets"])


def test_a_run_folder_gets_a_plot_of_its_curves(tiny_teacher: Path, tmp_path: Path) -> None:
    from ssdd.show import save_curves

    run(tiny_config(tiny_teacher, log_every=1), tmp_path)
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert save_curves([{"final": True, "knn": 50.0}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_an_unknown_monitor_protocol_fails_before_distilling(tiny_teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError,
                       match="unknown evaluate preset 'linear-step-cpu'; known presets: .*linear-steps-cpu"):
        Distillation(tiny_config(tiny_teacher, monitor={"every": 2, "protocol": "linear-step-cpu"}), tmp_path)
    assert not (tmp_path / "config.yaml").exists()


def test_the_monitor_checks_the_initial_set_first(tiny_teacher: Path, tmp_path: Path) -> None:
    """With monitoring on, step 0 records the kNN of the initial set (the reference for later checks)."""
    run(tiny_config(tiny_teacher, monitor={"every": 2}, settings={"steps": 4}), tmp_path)
    checks = [(r.get("step", "end"), r["knn"]) for r in metric_rows(tmp_path) if r.get("knn") is not None]
    assert [step for step, _ in checks] == [0, 2, "end"]  # the initial set, a check, the final set
    assert all(0 <= knn <= 100 for _, knn in checks)


def test_the_protocol_monitor_is_the_protocol_on_the_kept_sets(tiny_teacher: Path, tmp_path: Path) -> None:
    """``monitor.protocol`` runs an evaluate preset at step 0 (the zero-step control), every check and the end; each
    logged number is what ``evaluate`` gives for the set kept at that step."""
    from ssdd.config import resolve_config
    from ssdd.evaluation import EvaluationConfig, evaluate

    monitor = {"every": 2, "protocol": "tiny", "protocol_seeds": [1], "keep_sets": True}
    final = run(tiny_config(tiny_teacher, monitor=monitor, settings={"steps": 4}), tmp_path)
    checks = {r.get("step", 4): r["protocol"] for r in metric_rows(tmp_path) if r.get("protocol")}  # the end: 4
    assert sorted(checks) == [0, 2, 4]
    assert final.metadata["monitor_protocol"] == checks[4]
    config = resolve_config(EvaluationConfig, "evaluate", "tiny", overrides={"seeds": [1], "device": "cpu"})
    for step, logged in checks.items():
        kept = tmp_path / "sets" / f"step-{step:06d}.safetensors"
        cells = evaluate([kept], config, progress=False)
        assert logged == {f"{c.arch} {c.target} {c.fraction:g}": round(c.mean, 2) for c in cells}
    assert set(checks[0]) == {"convnet synthetic 0.1", "convnet synthetic 1"}


@pytest.mark.parametrize(("arch", "arch_args"), [("convnet3", {"width": 4}), ("resnet10", {"width": 4}),
                                                 ("vit-tiny", {})], ids=["convnet3", "resnet10", "vit-tiny"])
def test_any_registered_model_can_be_the_pool(tiny_teacher: Path, arch: str, arch_args: dict[str, Any]) -> None:
    distilled = run(tiny_config(tiny_teacher, settings={"steps": 2, "pool": {"arch": arch, "arch_args": arch_args}}))
    assert distilled.metadata["config"]["settings"]["pool"]["arch"] == arch
    assert torch.isfinite(distilled.tensors["images"]).all()


def test_the_python_api_resolves_a_preset_as_the_command_line_does(tiny_teacher: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``ssdd.distill(method, preset=..., config=...)`` and ``ssdd distill --method --preset --set settings.*``
    give the same run configuration (one resolution: preset < overrides), the preset's monitor included."""
    from ssdd import cli
    from ssdd.methods import engine

    seen: list[DistillConfig] = []

    class Capture:
        def __init__(self, config: DistillConfig, *args: Any, **kwargs: Any) -> None:
            seen.append(config)

        def run(self) -> None:
            return None

    monkeypatch.setattr(engine, "Distillation", Capture)
    ssdd.distill("paa", teacher=tiny_teacher, preset="tiny", config={"steps": 3, "pool": {"size": 1}}, device="cpu",
                 seed=2)
    args = cli.build_parser().parse_args(["distill", "--method", "paa", "--preset", "tiny", "--teacher",
                                          str(tiny_teacher), "--set", "settings.steps=3", "--set",
                                          "settings.pool.size=1", "--device", "cpu", "--seed", "2",
                                          "--out", str(tmp_path)])
    command = cli._distill_config(args, {"images": args.images, "bytes": args.bytes,
                                         "storage_dtype": args.storage_dtype})
    api = seen.pop()
    assert engine.resolved_config(api) == engine.resolved_config(command)
    assert api.images == 20 and api.monitor.every == 0 and api.settings["steps"] == 3  # from paa/tiny, and ours
    ssdd.distill("dm", preset="tiny", device="cpu")  # every key of the preset applies, its dataset too
    assert seen.pop().dataset == "synthetic" == preset_dict("distill", "dm/tiny")["dataset"]
