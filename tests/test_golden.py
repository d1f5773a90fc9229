"""Golden equivalence: ssdd's own code paths, run on the inputs of ``../shared/golden``, against the outputs the
official implementations (KRR-ST, MKDT, SRe2L, SC-DD) computed from them in float64.

Each test builds the method a real ``ssdd distill`` run builds (``KRRST``, ``MKDT``, ``SRe2L``, ``SCDD``) with its
default settings wherever the fixture's official settings are the released defaults, puts the fixture's tensors
into it (network weights, synthetic tensors, the real batch, the permutations and jitter the official code drew),
calls its ``step`` and compares every quantity the fixture stores.  Where ssdd can compute in float64 the test runs
in float64 at a tight tolerance; each also runs in float32 at the tolerance the fixtures' README gives.  The
comparisons use the README's *max rel diff*: max |ssdd - official| / max |official| over a tensor
(``GOLDEN_REPORT=1 pytest -s tests/test_golden.py`` prints each one; ``docs/faithfulness.md`` lists them).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ssdd.budget import Budget
from ssdd.data.dataset import ImageDataset
from ssdd.data.transforms import PixelSpace
from ssdd.evaluation.relabel import RelabelTraining
from ssdd.methods.base import DistillContext
from ssdd.methods.decoupled import SCDD, Recover, SRe2L
from ssdd.methods.kernel_ridge.krr import krr_fit
from ssdd.methods.kernel_ridge.krr_st import KRRST, KRRSTSettings
from ssdd.methods.kernel_ridge.pool import PoolSettings
from ssdd.methods.trajectory.experts import ExpertSettings
from ssdd.methods.trajectory.matching import MKDT, MatchingSettings
from ssdd.methods.trajectory.unroll import matching_loss, released_minibatches, unrolled_sgd
from ssdd.models import create_model
from ssdd.teachers.artefact import Teacher
from ssdd.training import batch_loss

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
F32, F64 = torch.float32, torch.float64
CPU = torch.device("cpu")


def golden(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A fixture's tensors and metadata; a missing fixture fails the test (it never skips)."""
    path = GOLDEN / f"{name}.safetensors"
    assert path.is_file(), f"golden fixture {path} is missing: the tests need ../shared/golden beside the checkout"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    return load_file(str(path)), metadata


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def max_rel(got: torch.Tensor | float, want: torch.Tensor | float) -> float:
    got, want = torch.as_tensor(got, dtype=F64), torch.as_tensor(want, dtype=F64)
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def check(quantity: str, got: torch.Tensor | float, want: torch.Tensor | float, tolerance: float) -> None:
    """Fail with the quantity's name and its max rel diff when it is beyond ``tolerance``."""
    if isinstance(got, torch.Tensor):
        got = got.detach()
    diff = max_rel(got, want)
    if os.environ.get("GOLDEN_REPORT"):  # GOLDEN_REPORT=1 pytest -s tests/test_golden.py: every diff, for the docs
        print(f"GOLDEN {quantity}: {diff:.3g}")
    assert diff <= tolerance, f"{quantity}: max rel diff {diff:.3g} from the official value (tolerance {tolerance:g})"


def context(images: int, feature_dim: int) -> DistillContext:
    """A run's context: a random uint8 source of 32 px images in 10 classes and a teacher with ``feature_dim``
    features (the fixtures give their own real batches and targets; the teacher only sizes the set)."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    source = ImageDataset("golden", "train", pixels, torch.arange(images) % 10, [str(c) for c in range(10)])
    backbone = create_model("convnet", num_outputs=feature_dim, in_channels=3, image_size=32,
                            widths=[feature_dim // 16] * 3)
    teacher = Teacher(backbone, PixelSpace((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                      {"fingerprint": f"golden-teacher-{feature_dim}"})
    return DistillContext(source, teacher, CPU, 0, logging.getLogger("golden"), progress=False)


def network(metadata: dict[str, str], state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """The fixture's network (``ssdd_model`` in its metadata) with the fixture's weights, in ``dtype``."""
    spec = json.loads(metadata["ssdd_model"])
    model = create_model(spec["name"], num_outputs=spec["num_outputs"], in_channels=3, image_size=32,
                         width=spec["width"])
    model.load_state_dict(state)
    return model.to(dtype)


# ---- KRR-ST: the outer objective, its gradients and the pool's online step ------------------------------------------

KRR_TOLERANCES = {  # (float64, float32) max rel diff; float64's dL/dX_s is limited by its float32 storage
    "outer loss": (1e-10, 1e-5), "lambda": (1e-12, 1e-6), "K_ss": (1e-12, 1e-6), "K_rs": (1e-12, 1e-6),
    "prediction P": (1e-10, 1e-4), "dL/dX_s": (1e-6, 1e-3), "dL/dY_s": (1e-10, 1e-3), "online loss": (1e-12, 1e-6),
    "weight change": (1e-10, 1e-4), "bias/norm change": (1e-10, 2e-3), "running stats": (1e-12, 1e-6),
}


def krr_st_step(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> tuple[KRRST, dict[str, float]]:
    """``KRRST.step`` on the fixture: pool of one member with ``pool_before``'s weights, the fixture's X_s, Y_s and
    real batch, AdamW at lr 0 (so the online step sees the stored X_s, Y_s, as the fixture isolates it), no amp."""
    g, meta = golden("krr_st_step")
    settings = KRRSTSettings(steps=1, real_batch=64, lr_images=0.0, lr_targets=0.0, teacher_copies=0, amp=False,
                             ridge=float(meta["ridge"]),
                             pool=PoolSettings(size=1, arch="convnet-widening", arch_args={"width": 8}))
    method = KRRST(settings, context(64, 32), Budget(images=32))
    member = method.pool.models[0]
    member.load_state_dict(prefixed(g, "pool_before."))
    member.to(dtype)  # in place: the member's SGD holds the same parameters
    method.learned["images"].data = g["X_s"].to(dtype, copy=True)  # copies: the steps change them in place
    method.learned["targets"].data = g["Y_s"].to(dtype, copy=True)
    monkeypatch.setattr(method.real, "sample", lambda generator: (g["X_real"].to(dtype), g["Y_real"].to(dtype)))
    return method, method.step(0)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_krr_st_outer_step_matches_the_official_code(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    g, meta = golden("krr_st_step")
    tol = {k: v[dtype == F32] for k, v in KRR_TOLERANCES.items()}
    method, metrics = krr_st_step(monkeypatch, dtype)
    check("outer loss", metrics["loss"], g["outer_loss"], tol["outer loss"])
    check("dL/dX_s", method.learned["images"].grad, g["grad_X_s"], tol["dL/dX_s"])
    check("dL/dY_s", method.learned["targets"].grad, g["grad_Y_s"], tol["dL/dY_s"])
    # the regression itself, with the functions the step calls, on the pool network before its online step
    before = network(meta, prefixed(g, "pool_before."), dtype).eval()
    with torch.no_grad():
        fit = krr_fit(before.features(g["X_s"].to(dtype)), before.features(g["X_real"].to(dtype)), g["Y_s"].to(dtype),
                      method.settings.ridge)
    check("lambda", fit.ridge_lambda, g["ridge_lambda"], tol["lambda"])
    check("K_ss", fit.kernel_syn_syn, g["kernel_syn_syn"], tol["K_ss"])
    check("K_rs", fit.kernel_real_syn, g["kernel_real_syn"], tol["K_rs"])
    check("prediction P", fit.prediction, g["prediction_real"], tol["prediction P"])


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_krr_st_pool_online_step_matches_the_official_code(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    g, meta = golden("krr_st_step")
    online = json.loads(meta["online_step"])
    defaults = PoolSettings()
    assert (defaults.lr, defaults.momentum, defaults.weight_decay) == (online["lr"], online["momentum"],
                                                                       online["weight_decay"])
    tol = {k: v[dtype == F32] for k, v in KRR_TOLERANCES.items()}
    method, metrics = krr_st_step(monkeypatch, dtype)
    check("online loss", metrics["online_loss"], g["online_loss"], tol["online loss"])
    start, official, after = prefixed(g, "pool_before."), prefixed(g, "pool_after."), method.pool.models[0].state_dict()
    assert set(after) == set(official)
    for name, value in after.items():
        if name.endswith("num_batches_tracked"):
            assert int(value) == int(official[name]) == int(start[name]) + 1, name
        elif name.endswith(("running_mean", "running_var")):
            check(f"pool {name}", value, official[name], tol["running stats"])
        else:  # a parameter: compare its change in the step
            kind = "weight change" if value.ndim > 1 else "bias/norm change"
            check(f"pool {name} ({kind})", value.double() - start[name].double(),
                  official[name] - start[name].double(), tol[kind])


# ---- MKDT: one iteration (5 unrolled steps, the normalised matching loss, its gradients, the SGD updates) ---------

MKDT_TOLERANCES = {"matching loss": (1e-12, 1e-5), "dL/dimages": (1e-12, 1e-5), "dL/dtargets": (1e-12, 1e-5),
                   "dL/dstep size": (1e-12, 1e-5), "images change": (1e-12, 1e-4), "targets change": (1e-12, 1e-3),
                   "step size after": (1e-12, 1e-7)}


def mkdt_iteration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                   dtype: torch.dtype) -> tuple[MKDT, dict[str, float], dict[str, torch.Tensor]]:
    """``MKDT.step`` on the fixture: one expert whose epochs 0 and 2 are the fixture's start and target, the
    fixture's images, targets and step size, and the permutations the official code drew; the released defaults
    for the learning rates and momentum."""
    g, meta = golden("mkdt_matching")
    sizes = json.loads(meta["sizes"])
    settings = MatchingSettings(iterations=1, syn_steps=sizes["syn_steps"], batch_syn=sizes["batch_syn"],
                                max_start_epoch=1, expert_epochs=2, init="random", experts_dir=str(tmp_path),
                                experts=ExpertSettings(num_experts=1, epochs=2, arch="convnet3",
                                                       arch_args={"width": 16}, batch_size=24))
    method = MKDT(settings, context(sizes["N"], sizes["d"]), Budget(images=sizes["N"]))
    epochs = {0: prefixed(g, "expert_start."), 2: prefixed(g, "expert_target.")}
    monkeypatch.setattr(method.experts, "params",
                        lambda expert, epoch, device="cpu": {k: v.to(dtype) for k, v in epochs[epoch].items()})
    permutations = iter(g["permutations"])
    monkeypatch.setattr(method, "permutation", lambda order: next(permutations))
    method.images.data = g["images"].to(dtype, copy=True)  # copies: the steps change them in place
    method.targets.data = g["targets"].to(dtype, copy=True)
    method.syn_lr.data = g["init_step_size"].to(dtype, copy=True)
    return method, method.step(0), g


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_mkdt_iteration_matches_the_official_code(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  dtype: torch.dtype) -> None:
    tol = {k: v[dtype == F32] for k, v in MKDT_TOLERANCES.items()}
    method, metrics, g = mkdt_iteration(monkeypatch, tmp_path, dtype)
    check("matching loss", metrics["loss"], g["matching_loss"], tol["matching loss"])
    check("dL/dimages", method.images.grad, g["grad_images"], tol["dL/dimages"])
    check("dL/dtargets", method.targets.grad, g["grad_targets"], tol["dL/dtargets"])
    check("dL/dstep size", method.syn_lr.grad, g["grad_step_size"], tol["dL/dstep size"])
    check("images change", method.images.detach().double() - g["images"].double(),
          g["images_after"] - g["images"].double(), tol["images change"])
    check("targets change", method.targets.detach().double() - g["targets"].double(),
          g["targets_after"] - g["targets"].double(), tol["targets change"])
    check("step size after", method.syn_lr, g["step_size_after"], tol["step size after"])


def test_mkdt_unroll_takes_the_official_minibatches_and_lands_on_the_official_student() -> None:
    g, meta = golden("mkdt_matching")
    sizes = json.loads(meta["sizes"])
    order = released_minibatches(sizes["N"], sizes["batch_syn"], iter(g["permutations"]).__next__)
    assert torch.equal(torch.stack(list(itertools.islice(order, sizes["syn_steps"]))), g["step_indices"]), \
        "the unroll's minibatches are not the official step_indices"
    start = {k: v.double() for k, v in prefixed(g, "expert_start.").items()}
    target = {k: v.double() for k, v in prefixed(g, "expert_target.").items()}
    model = network(meta, prefixed(g, "expert_start."), F64)
    student = unrolled_sgd(model, start, g["images"].double(), g["targets"].double(), g["init_step_size"].double(),
                           sizes["syn_steps"], sizes["batch_syn"], "mse", torch.Generator(),
                           permutation=iter(g["permutations"]).__next__)
    for name, value in prefixed(g, "student_final.").items():
        check(f"student {name}", student[name], value, 1e-12)
    check("param_dist", sum(((start[k] - target[k]) ** 2).sum() for k in start) / sizes["num_params"],
          g["param_dist"], 1e-12)
    check("matching loss", matching_loss(student, start, target), g["matching_loss"], 1e-12)


# ---- SRe2L and SC-DD: 4 recovery iterations; the relabel KL ----------------------------------------------------

RECOVER_TOLERANCES = {  # (float64, float32); float64's gradients and images are limited by their float32 storage
    "CE": (1e-11, 1e-5), "BN term": (1e-11, 1e-5), "total": (1e-11, 1e-5), "BN layer term": (1e-11, 1e-5),
    "lr": (1e-14, 1e-14), "grad (iteration 0)": (1e-6, 1e-5), "grad": (1e-6, 1e-3), "images change": (1e-6, 2e-3),
}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("method_cls", [SRe2L, SCDD], ids=["sre2l", "scdd"])
def test_recovery_matches_the_official_code(monkeypatch: pytest.MonkeyPatch, method_cls: type[Recover],
                                            dtype: torch.dtype) -> None:
    g, meta = golden("recover_bn")
    official = json.loads(meta[method_cls.name])
    defaults = method_cls.settings_class()  # the released CIFAR settings are the defaults
    assert (defaults.lr, defaults.r_bn, defaults.first_bn_weight, defaults.iterations, defaults.jitter,
            defaults.flip) == (official["lr"], official["r_bn"], official["first_bn_multiplier"],
                               int(meta["schedule_iterations"]), int(meta["jitter_max"]), meta["flip"] == "true")
    squeeze = network(meta, prefixed(g, "model."), F32)
    space = PixelSpace((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    monkeypatch.setattr(method_cls, "make_squeeze_model", classmethod(lambda cls, settings, ctx: (squeeze, space, {})))
    method = method_cls(defaults, context(20, 16), Budget(images=10))
    method.model.to(dtype)
    check("clip low", method.low.flatten(), g["clip_low"], 1e-15)
    check("clip high", method.high.flatten(), g["clip_high"], 1e-15)
    assert torch.equal(method.labels, g["labels"])
    monkeypatch.setattr(method, "starting_images", lambda index: g["noise"].to(dtype, copy=True))
    offsets = iter(g["jitter_offsets"].tolist())
    monkeypatch.setattr(method, "shift", lambda: tuple(next(offsets)))
    tol = {k: v[dtype == F32] for k, v in RECOVER_TOLERANCES.items()}
    prefix = f"{method_cls.name}."
    for t in range(4):
        metrics = method.step(t)
        check(f"{prefix}ce[{t}]", metrics["ce"], g[prefix + "ce"][t], tol["CE"])
        check(f"{prefix}bn[{t}]", metrics["bn"], g[prefix + "bn"][t], tol["BN term"])
        check(f"{prefix}loss[{t}]", metrics["loss"], g[prefix + "loss"][t], tol["total"])
        check(f"{prefix}lr[{t}]", method.optimizer.param_groups[0]["lr"], g[prefix + "lr"][t], tol["lr"])
        terms = torch.stack([term.detach() for term in method.statistics.layer_terms()])
        check(f"{prefix}bn_layer_terms[{t}]", terms, g[prefix + "bn_layer_terms"][t], tol["BN layer term"])
        check(f"{prefix}grad[{t}]", method.current.grad, g[prefix + "grad"][t],
              tol["grad (iteration 0)" if t == 0 else "grad"])
    check(f"{prefix}images after 4 (change from noise)", method.current.detach().double() - g["noise"].double(),
          g[prefix + "images_after"].double() - g["noise"].double(), tol["images change"])


def test_relabel_kl_is_the_official_loss_on_the_fly_and_t_squared_times_it_stored() -> None:
    g, meta = golden("recover_bn")
    temperature = json.loads(meta["relabel"])["temperature"]
    teacher = g["relabel.teacher_logits"].double()
    for scale, t_squared in ((1.0, RelabelTraining().kl_t_squared), (temperature**2, True)):
        student = g["relabel.student_logits"].double().requires_grad_(True)
        value = batch_loss(student, teacher, "kl", temperature, t_squared)
        (grad,) = torch.autograd.grad(value, student)
        check(f"relabel KL (x{scale:g})", value / scale, g["relabel.kl"], 1e-12)
        check(f"relabel KL gradient (x{scale:g})", grad / scale, g["relabel.grad_student_logits"], 1e-12)
