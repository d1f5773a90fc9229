"""PAA (ssdd.methods.kernel_ridge.paa): PCA bases, the byte budget, predefined views, approximation networks, the stored
set, the outer loop (objective, inner subsets, resume) and the settings' errors.

One tiny teacher (conftest ``tiny_teacher``) serves the module; runs are a few steps of the ``paa/tiny`` preset
made smaller still.  Expected values come from numpy's SVD, from hand arithmetic, from the teacher run by the
test itself on images it views itself, from a control run with zero learning rates, or from an uninterrupted
run -- never from the code under test.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import interrupt_then_resume, run_with_frozen_pool

from ssdd.config import deep_update, resolve_config
from ssdd.data import make_synthetic
from ssdd.distilled import APPROX_PARAMS, DistilledSet, load_distilled
from ssdd.errors import ConfigError
from ssdd.methods import Distillation, DistillConfig
from ssdd.methods.kernel_ridge.krr import krr_outer_loss
from ssdd.methods.kernel_ridge.paa import (
    PAA,
    fit_approximation,
    init_approximation,
    principal_directions,
    random_directions,
)
from ssdd.teachers import Teacher, load_teacher

N_SOURCE = 320  # the synthetic training split
C, H, W = 3, 32, 32  # the tiny teacher's input
IMAGE_VALUES = C * H * W  # 3072
D = 1024  # the tiny teacher's features
VIEWS = ["identity", "rot90", "rot180", "rot270"]  # PAA's default views
K = len(VIEWS) - 1  # views with their own targets

# The paa/tiny preset (U = V = 16 bases of 3x8x8 / 1024 values, approx_hidden 8, a budget of 20 KRR-ST images)
# made smaller: 4 steps, real batches of 16, a narrower pool, short approximation fits.
SMALL: dict[str, Any] = {
    "log_every": 1, "monitor": {"every": -1},
    "settings": {"steps": 4, "real_batch": 16, "pool": {"arch_args": {"width": 4}}, "approx_steps": 20},
}


def paa_config(teacher: Path, budget_bytes: int | None = None, **overrides: Any) -> DistillConfig:
    """The paa/tiny preset on the CPU, shrunk by SMALL, then ``overrides`` (nested dicts merge); with
    ``budget_bytes`` the preset's image budget gives way to a byte budget."""
    merged: dict[str, Any] = {"teacher": str(teacher), "device": "cpu"}
    deep_update(merged, copy.deepcopy(SMALL))
    deep_update(merged, copy.deepcopy(overrides))
    config = resolve_config(DistillConfig, "distill", "paa/tiny", overrides=merged)
    if budget_bytes is not None:
        config.images, config.bytes = None, budget_bytes
    return config


def method_of(config: DistillConfig) -> PAA:
    """The method as built (its initial state), without any step."""
    method = Distillation(config, None, progress=False).method
    assert isinstance(method, PAA)
    return method


def run(config: DistillConfig, out: Path | None = None, resume: bool = False) -> DistilledSet:
    return Distillation(config, out, resume=resume, progress=False).run()


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message, message
    return message


def config_error(config: DistillConfig) -> str:
    """Build the method; it must fail with a one-line ConfigError, whose message is returned."""
    with pytest.raises(ConfigError) as info:
        method_of(config)
    return one_line(info.value)


def rot(x: torch.Tensor, view: str) -> torch.Tensor:
    """The predefined views written out with torch's own primitives."""
    if view == "identity":
        return x
    if view.startswith("rot"):
        return torch.rot90(x, k=int(view[3:]) // 90, dims=(-2, -1))
    return {"hflip": x.flip(-1), "vflip": x.flip(-2)}[view]


def mlp_shift(y: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 2-layer ReLU MLP written out in float64: out(relu(hidden(y)))."""
    w = {k: v.double() for k, v in w.items()}
    hidden = torch.clamp(y.double() @ w["hidden.weight"].T + w["hidden.bias"], min=0)
    return hidden @ w["out.weight"].T + w["out.bias"]


@pytest.fixture(scope="module")
def teacher(tiny_teacher: Path) -> Teacher:
    return load_teacher(tiny_teacher)


@pytest.fixture(scope="module")
def real(teacher: Teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """Every source image in the teacher's pixel space and the teacher's features of it (computed here, not
    read from the feature cache the method uses)."""
    source = make_synthetic("train")
    images = teacher.pixel_space.normalize(source.converted(channels=C, size=H).images.float().div(255.0))
    with torch.no_grad():
        features = teacher(images)
    return images, features


def view_features(teacher: Teacher, images: torch.Tensor, view: str) -> torch.Tensor:
    with torch.no_grad():
        return teacher(rot(images, view))


# ---- 1. PCA bases -----------------------------------------------------------------------------------------


def test_principal_directions_at_full_rank_reconstruct_every_row() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(40, 12, generator=gen) + 3.0  # far from centred: uncentred PCA is what is asked for
    bases = principal_directions(rows, 12)
    assert bases.shape == (12, 12) and bases.dtype == torch.float32
    torch.testing.assert_close(bases @ bases.T, torch.eye(12), rtol=0, atol=1e-5)  # orthonormal rows
    torch.testing.assert_close((rows @ bases.T) @ bases, rows, rtol=0, atol=1e-4)  # project, reconstruct


@pytest.mark.parametrize("count", [1, 3, 7])
def test_principal_directions_below_rank_lose_exactly_the_discarded_singular_values(count: int) -> None:
    gen = torch.Generator().manual_seed(1)
    # rank-10 rows in 16 dimensions with distinct singular values and a large common mean
    rows = (torch.randn(50, 10, generator=gen) * torch.linspace(5, 1, 10)) @ torch.randn(10, 16, generator=gen) + 2.0
    x = rows.double().numpy()
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    bases = principal_directions(rows, count).double().numpy()
    assert bases.shape == (count, 16)
    np.testing.assert_allclose(bases @ bases.T, np.eye(count), atol=1e-5)
    error = np.sum((x - x @ bases.T @ bases) ** 2)  # ||X - X V V^T||_F^2
    np.testing.assert_allclose(error, np.sum(s[count:] ** 2), rtol=1e-4)
    # the same subspace as numpy's leading right singular vectors (the order of the rows: leading first)
    np.testing.assert_allclose(bases.T @ bases, vt[:count].T @ vt[:count], atol=1e-4)
    np.testing.assert_allclose(np.abs(np.sum(bases[0] * vt[0])), 1.0, atol=1e-5)


def test_random_directions_are_orthonormal_and_seeded() -> None:
    a = random_directions(20, 6, torch.Generator().manual_seed(4))
    b = random_directions(20, 6, torch.Generator().manual_seed(4))
    c = random_directions(20, 6, torch.Generator().manual_seed(5))
    assert a.shape == (6, 20) and torch.equal(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(a @ a.T, torch.eye(6), rtol=0, atol=1e-5)
    full = random_directions(9, 9, torch.Generator().manual_seed(6))
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close((x @ full.T) @ full, x, rtol=0, atol=1e-5)


def downsampled(images: torch.Tensor, side: int) -> torch.Tensor:
    return F.interpolate(images.double(), size=(side, side), mode="area")


def upsampled(images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(images, size=(H, W), mode="bilinear", align_corners=False)


# 16x16 bases: 3 * 16 * 16 = 768 values per basis image.  U = 768 spans the whole 16x16 space and V = 1024 all of
# feature space; U = V = 320 spans the PCA sample (pca_images >= 320 takes every source image, the chosen ones
# included); U = V = 16 keeps the sample's 16 leading directions only.
@pytest.mark.parametrize(("u", "v"), [(768, 1024), (320, 320), (16, 16)])
def test_initial_pca_images_and_targets_are_the_chosen_ones_projected_on_the_bases(
        tiny_teacher: Path, real: tuple[torch.Tensor, torch.Tensor], u: int, v: int) -> None:
    settings = {"parameterization": "pca", "basis_size": 16, "image_bases": u, "target_bases": v,
                "pca_images": 5000, "views": ["identity"], "images": 5}
    method = method_of(paa_config(tiny_teacher, budget_bytes=8_000_000, settings=settings))
    chosen = method.initial_indices
    assert method.num_images == 5 and method.learned["image_bases"].shape == (u, 3, 16, 16)
    small = downsampled(real[0], 16).flatten(1).numpy()  # the PCA sample: every source image at 16x16
    feats = real[1].double().numpy()
    with torch.no_grad():
        images, targets = method.images_of().double(), method.targets_of().double()
    assert images.shape == (5, C, H, W) and targets.shape == (5, D)

    # the stored bases span numpy's leading right singular subspace of the sample (uncentred)
    for learned, x, count in ((method.learned["image_bases"], small, u), (method.learned["target_bases"], feats, v)):
        b = learned.detach().double().flatten(1).numpy()
        np.testing.assert_allclose(b @ b.T, np.eye(count), atol=1e-4)
        if count < min(x.shape):
            vt = np.linalg.svd(x, full_matrices=False)[2][:count]
            np.testing.assert_allclose(b.T @ b, vt.T @ vt, atol=1e-5)

    if u >= 320:  # the chosen images lie in the bases' span: exactly their (upsampled) 16x16 versions
        expected = upsampled(downsampled(real[0][chosen], 16))
    else:
        vt = torch.from_numpy(np.linalg.svd(small, full_matrices=False)[2][:u])
        flat = downsampled(real[0][chosen], 16).flatten(1)
        expected = upsampled((flat @ vt.T @ vt).view(5, 3, 16, 16))
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-4)
    if v >= 320:  # likewise the chosen features: exactly the teacher's
        expected_targets = real[1][chosen].double()
    else:
        vt = torch.from_numpy(np.linalg.svd(feats, full_matrices=False)[2][:v])
        expected_targets = real[1][chosen].double() @ vt.T @ vt
    torch.testing.assert_close(targets, expected_targets, rtol=0, atol=5e-4)
    if u < 320:  # and the projection does lose something: the test can tell the cases apart
        assert (images - upsampled(downsampled(real[0][chosen], 16))).abs().max() > 1e-2


def test_initial_random_bases_and_no_parameterisation(
        tiny_teacher: Path, real: tuple[torch.Tensor, torch.Tensor]) -> None:
    # random bases spanning all of the 8x8 space (U = 3 * 8 * 8 = 192) reconstruct the downsampled images
    settings = {"parameterization": "random", "image_bases": 192, "target_bases": D, "views": ["identity"], "images": 4}
    method = method_of(paa_config(tiny_teacher, budget_bytes=6_000_000, settings=settings))
    chosen = method.initial_indices
    with torch.no_grad():
        torch.testing.assert_close(method.images_of().double(), upsampled(downsampled(real[0][chosen], 8)),
                                   rtol=0, atol=1e-4)
        torch.testing.assert_close(method.targets_of().double(), real[1][chosen].double(), rtol=0, atol=1e-3)
    # parameterization none stores the chosen images and features as they are (KRR-ST's form)
    method = method_of(paa_config(tiny_teacher,
                                  settings={"parameterization": "none", "views": ["identity"], "images": 4}))
    chosen = method.initial_indices
    assert set(method.learned) == {"images", "targets"}
    torch.testing.assert_close(method.learned["images"].detach(), real[0][chosen], rtol=0, atol=1e-6)
    torch.testing.assert_close(method.learned["targets"].detach(), real[1][chosen], rtol=0, atol=1e-4)


# ---- 2. the budget ----------------------------------------------------------------------------------------

# Hand arithmetic, float32 unless said (4 bytes a value).  C*H*W = 3072, d = 1024, K = 3 views besides identity,
# U = V = 16 bases of 3x8x8 = 192 values, approx_hidden 8.
#   fixed parts:   image bases 16 * 192 = 3072; target bases 16 * 1024 = 16384;
#                  approximation K * (2 * 8 * 1024 + 8 + 1024) = 3 * 17416 = 52248 (joint, post)
#   per image:     16 + 16 = 32 coefficients (pca, random) or 3072 + 1024 = 4096 (none); + K * 1024 = 3072 (stored)
# bytes = 300_010 -> 75_002 values (300_008 bytes):
#   pca/random, joint/post: room 75002 - 3072 - 16384 - 52248 = 3298 -> 103 images (3296), 2 values unused
#   pca/random, stored:     room 75002 - 19456 = 55546, 55546 // 3104 = 17 images (52768), 2778 unused
#   none, joint/post:       room 75002 - 52248 = 22754, 22754 // 4096 = 5 images (20480), 2274 unused
#   none, stored:           75002 // 7168 = 10 images (71680), 3322 unused
# images = 20 (a KRR-ST budget of 20 x (3072 + 1024) = 81920 values, 327680 bytes):
#   pca, joint: room 81920 - 71704 = 10216 -> 319 images (10208), 8 unused
# images = 40 (163840 values): pca, joint: room 92136 -> 2879 would fit, but the source has 320
# float16 (2 bytes a value), bytes = 300_010 -> 150_005 values: none, stored: 150005 // 7168 = 20 (143360), 6645 unused
BYTES = 300_010
BASES = {"image_bases": 3072, "target_bases": 16384}
APPROX = {"approximation": 52248}
COEFFS = {"image_coefficients": 16, "target_coefficients": 16}
PLAIN = {"images": IMAGE_VALUES, "targets": D}
STORED = {"view_targets": K * D}


def expected_spending(images: int, total_values: int, fixed: dict[str, int], per_image: dict[str, int],
                      b: int = 4) -> dict[str, int]:
    spent = ({f"{k}_bytes": v * b for k, v in fixed.items()}
             | {f"{k}_bytes": images * v * b for k, v in per_image.items()})
    return {"images": images, "budget_bytes": total_values * b, **spent,
            "unused_bytes": total_values * b - sum(spent.values())}


BUDGET_CASES = [
    # parameterization, approximation, (images budget, bytes budget, dtype), M, total values, fixed, per image
    ("pca", "joint", (None, BYTES, "float32"), 103, 75002, BASES | APPROX, COEFFS),
    ("pca", "post", (None, BYTES, "float32"), 103, 75002, BASES | APPROX, COEFFS),
    ("random", "joint", (None, BYTES, "float32"), 103, 75002, BASES | APPROX, COEFFS),
    ("random", "post", (None, BYTES, "float32"), 103, 75002, BASES | APPROX, COEFFS),
    ("pca", "stored", (None, BYTES, "float32"), 17, 75002, BASES, COEFFS | STORED),
    ("random", "stored", (None, BYTES, "float32"), 17, 75002, BASES, COEFFS | STORED),
    ("none", "joint", (None, BYTES, "float32"), 5, 75002, APPROX, PLAIN),
    ("none", "post", (None, BYTES, "float32"), 5, 75002, APPROX, PLAIN),
    ("none", "stored", (None, BYTES, "float32"), 10, 75002, {}, PLAIN | STORED),
    ("pca", "joint", (20, None, "float32"), 319, 81920, BASES | APPROX, COEFFS),
    ("pca", "joint", (40, None, "float32"), 320, 163840, BASES | APPROX, COEFFS),
    ("none", "stored", (None, BYTES, "float16"), 20, 150005, {}, PLAIN | STORED),
]


@pytest.mark.parametrize(("param", "approx", "budget", "m", "total", "fixed", "per_image"), BUDGET_CASES)
def test_budget_arithmetic_by_hand(tiny_teacher: Path, param: str, approx: str, budget: tuple[Any, Any, str], m: int,
                                   total: int, fixed: dict[str, int], per_image: dict[str, int]) -> None:
    images, budget_bytes, dtype = budget
    b = 4 if dtype == "float32" else 2
    config = paa_config(tiny_teacher, budget_bytes=budget_bytes, storage_dtype=dtype,
                        settings={"parameterization": param, "approximation": approx, "approx_steps": 2})
    if images is not None:
        config.images = images
    method = method_of(config)
    assert method.num_images == m
    spending = expected_spending(m, total, fixed, per_image, b)
    assert method.spending == spending
    distilled = method.distilled_set()
    assert distilled.num_images == m and distilled.metadata["spending"] == spending
    # the stored tensors, grouped by what they are, hold exactly the bytes the spending says
    groups: dict[str, int] = {}
    for name, tensor in distilled.tensors.items():
        assert tensor.dtype == (torch.float32 if b == 4 else torch.float16), name
        group = {"approx": "approximation", "view_targets": "view_targets"}.get(name.split(".")[0], name)
        groups[f"{group}_bytes"] = groups.get(f"{group}_bytes", 0) + tensor.numel() * tensor.element_size()
    assert groups == {k: v for k, v in spending.items() if k not in ("images", "budget_bytes", "unused_bytes")}
    assert distilled.byte_count == sum(groups.values()) == spending["budget_bytes"] - spending["unused_bytes"]
    assert distilled.byte_count <= (budget_bytes if budget_bytes is not None else images * (IMAGE_VALUES + D) * b)


def test_an_image_budget_means_that_many_krr_st_pairs(tiny_teacher: Path) -> None:
    # N = 7 images: 7 * (3072 + 1024) = 28672 values; without views and with no parameterisation that is 7 images
    config = paa_config(tiny_teacher, images=7, settings={"parameterization": "none", "views": ["identity"]})
    method = method_of(config)
    assert method.spending == {"images": 7, "budget_bytes": 28672 * 4, "images_bytes": 7 * 3072 * 4,
                               "targets_bytes": 7 * 1024 * 4, "unused_bytes": 0}
    assert method.distilled_set().byte_count == 7 * (IMAGE_VALUES + D) * 4


def test_given_images_are_used_and_checked(tiny_teacher: Path) -> None:
    # images = 50 fits (at most 103, see above): 50 images, the rest unused
    method = method_of(paa_config(tiny_teacher, budget_bytes=BYTES, settings={"images": 50, "approx_steps": 2}))
    assert method.num_images == 50
    assert method.spending == expected_spending(50, 75002, BASES | APPROX, COEFFS)
    message = config_error(paa_config(tiny_teacher, budget_bytes=BYTES, settings={"images": 104}))
    assert message == "images=104 does not fit the budget: at most 103 with U=16, V=16 and these views"


def test_given_images_beyond_the_source_are_refused(tiny_teacher: Path) -> None:
    """An explicit ``images`` the budget holds but the source does not have must not be silently lowered."""
    config = paa_config(tiny_teacher, budget_bytes=10**7, settings={"images": 400})
    with pytest.raises(ConfigError) as info:
        method_of(config)
    message = one_line(info.value)
    assert "400" in message and str(N_SOURCE) in message


def test_a_budget_beyond_the_source_says_what_stays_unused(tiny_teacher: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    # images = 40: 163840 values, 2879 images would fit (see above) but the source has 320
    config = paa_config(tiny_teacher, settings={"approx_steps": 2})
    config.images = 40
    with caplog.at_level(logging.WARNING, logger="ssdd.methods.kernel_ridge.paa"):
        method = method_of(config)
    unused = method.spending["unused_bytes"]
    assert unused == 163840 * 4 - (71704 + 320 * 32) * 4
    assert caplog.messages == [f"PAA: the budget holds 2879 images but the source has {N_SOURCE}; {unused:,} of its "
                               f"{163840 * 4:,} bytes stay unused"]
    caplog.clear()
    config.images = 20  # 319 images fit: no warning
    with caplog.at_level(logging.WARNING, logger="ssdd.methods.kernel_ridge.paa"):
        method_of(config)
    assert caplog.messages == []


def test_budget_errors(tiny_teacher: Path) -> None:
    # 71704 values of fixed parts + 32 for one image: 71735 values (286940 bytes) hold none
    message = config_error(paa_config(tiny_teacher, budget_bytes=286_940))
    assert message.startswith("the budget (71735 values) does not cover the fixed parts (")
    assert "'approximation': 52248" in message and "plus one image" in message and "larger budget" in message
    method = method_of(paa_config(tiny_teacher, budget_bytes=286_944, settings={"approx_steps": 1}))  # 71736: one
    assert method.num_images == 1 and method.spending["unused_bytes"] == 0
    # at most 3 * 8 * 8 = 192 image bases and d = 1024 target bases
    message = config_error(paa_config(tiny_teacher, budget_bytes=10**7, settings={"image_bases": 193}))
    assert message == "at most 192 image bases and 1024 target bases exist at this size; got 193 and 16"
    message = config_error(paa_config(tiny_teacher, budget_bytes=10**7, settings={"target_bases": 1025}))
    assert message == "at most 192 image bases and 1024 target bases exist at this size; got 16 and 1025"
    message = config_error(paa_config(tiny_teacher, budget_bytes=10**8,
                                      settings={"basis_size": None, "image_bases": 3073}))
    assert message.startswith("at most 3072 image bases")


# ---- 3. views ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("views", "approx"),
                         [(VIEWS, "joint"), (VIEWS, "stored"), (["identity", "hflip", "vflip"], "post")])
def test_views_are_exactly_the_predefined_transforms(tiny_teacher: Path, views: list[str], approx: str) -> None:
    config = paa_config(tiny_teacher, settings={"views": views, "approximation": approx, "images": 6,
                                                "inner_samples": None, "steps": 2})
    distillation = Distillation(config, None, progress=False)
    distilled = distillation.run()
    method = distillation.method
    assert isinstance(method, PAA) and distilled.views == views
    images, targets = distilled.materialize()
    m = 6
    assert images.shape == (len(views) * m, C, H, W) and targets.shape == (len(views) * m, D)
    block0 = images[:m]
    for j, view in enumerate(views):
        assert torch.equal(images[j * m:(j + 1) * m], rot(block0, view)), view
        if view == "rot90":
            assert torch.equal(images[j * m, 0, 0, 0], block0[0, 0, 0, -1])  # the top-right pixel goes top-left
    # the inner set a step trains on: every view of images_of(), with the identity targets, then each view's
    with torch.no_grad():
        inner_images, inner_targets = method.inner_set(torch.Generator().manual_seed(0))
        own, identity = method.images_of(), method.targets_of()
    assert inner_images.shape == images.shape
    for j, view in enumerate(views):
        assert torch.equal(inner_images[j * m:(j + 1) * m], rot(own, view)), view
    assert torch.equal(inner_targets[:m], identity)
    for j, view in enumerate(views[1:], start=1):
        block = slice(j * m, (j + 1) * m)
        if approx == "joint":  # the learned network's prediction of the view's shift, added to the identity targets
            weights = {p: method.learned[f"approx.{view}.{p}"].detach() for p in APPROX_PARAMS}
            expected = identity.double() + mlp_shift(identity, weights)
        else:  # stored and post learn free view targets
            expected = method.learned["view_targets"][j - 1].detach().double()
        torch.testing.assert_close(inner_targets[block].double(), expected, rtol=1e-5, atol=1e-4)
        # the stored set: the same targets, except that post stores networks fitted to them
        if approx == "post":
            expected = identity.double() + mlp_shift(identity, distilled.approximation_weights(view))
        torch.testing.assert_close(targets[block].double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(targets[:m], identity, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(images, inner_images, rtol=0, atol=1e-5)


def test_real_batches_show_random_views_with_the_teachers_features_of_them(
        tiny_teacher: Path, teacher: Teacher) -> None:
    method = method_of(paa_config(tiny_teacher, settings={"real_batch": 64, "approx_steps": 1}))
    images, features = method.real.sample(torch.Generator().manual_seed(3))
    assert images.shape == (64, C, H, W) and features.shape == (64, D)
    with torch.no_grad():
        torch.testing.assert_close(features, teacher(images), rtol=1e-4, atol=1e-4)
    # the batch is not all identity views: some images match none of the source images as they are
    source = make_synthetic("train")
    plain = teacher.pixel_space.normalize(source.converted(channels=C, size=H).images.float().div(255.0))
    matched = [bool((plain == x).flatten(1).all(1).any()) for x in images]
    assert 0 < sum(matched) < 64


# ---- 4. approximation networks ----------------------------------------------------------------------------


def test_init_approximation_is_pytorchs_linear_init_and_deterministic_in_the_seed() -> None:
    state = torch.random.get_rng_state()
    a, b, c = init_approximation(6, 5, 11), init_approximation(6, 5, 11), init_approximation(6, 5, 12)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    assert {k: tuple(v.shape) for k, v in a.items()} == {"hidden.weight": (5, 6), "hidden.bias": (5,),
                                                         "out.weight": (6, 5), "out.bias": (6,)}
    assert all(torch.equal(a[k], b[k]) for k in a) and not any(torch.equal(a[k], c[k]) for k in a)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        first, second = torch.nn.Linear(6, 5), torch.nn.Linear(5, 6)
    assert torch.equal(a["hidden.weight"], first.weight) and torch.equal(a["out.bias"], second.bias)
    assert float(a["hidden.weight"].abs().max()) <= 1 / 6 ** 0.5  # kaiming-uniform bound 1/sqrt(fan_in)


def test_fit_approximation_learns_a_toy_map() -> None:
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(128, 6, generator=gen)
    a = torch.randn(6, 6, generator=gen)
    shifts = torch.tanh(inputs @ a)
    start = init_approximation(6, 32, 3)
    kept = {k: v.clone() for k, v in start.items()}
    fitted, before, after = fit_approximation(inputs, shifts, start, steps=400, lr=1e-2)
    assert all(torch.equal(start[k], kept[k]) for k in start)  # the starting weights are not modified
    assert not fitted["hidden.weight"].requires_grad
    # before / after: the MSE of the starting and of the fitted network, recomputed here
    assert before == pytest.approx(float(((mlp_shift(inputs, start) - shifts.double()) ** 2).mean()), rel=1e-5)
    assert after == pytest.approx(float(((mlp_shift(inputs, fitted) - shifts.double()) ** 2).mean()), rel=1e-4)
    assert after < before / 10
    assert after < 0.1 * float((shifts ** 2).mean())  # much better than predicting no shift
    # zero steps: nothing moves
    same, b0, a0 = fit_approximation(inputs, shifts, start, steps=0, lr=1e-2)
    assert all(torch.equal(same[k], start[k]) for k in start) and b0 == a0 == pytest.approx(before)


def test_joint_fits_the_networks_to_the_teachers_view_shifts_at_initialisation(
        tiny_teacher: Path, teacher: Teacher, real: tuple[torch.Tensor, torch.Tensor]) -> None:
    config = paa_config(tiny_teacher, settings={"approximation": "joint", "approx_steps": 60, "approx_lr": 3e-3,
                                                "images": 12})
    method = method_of(config)
    distilled = method.distilled_set()
    chosen = method.initial_indices
    identity = method.targets_of().detach()  # the networks see the projected identity targets (C_y B_y)
    mse = distilled.metadata["approximation_mse"]
    assert set(mse) == set(VIEWS[1:])
    for view in VIEWS[1:]:
        shift = view_features(teacher, real[0][chosen], view).double() - identity.double()
        after = float(((mlp_shift(identity, distilled.approximation_weights(view)) - shift) ** 2).mean())
        assert mse[view]["after"] == pytest.approx(after, rel=1e-3)
        assert mse[view]["after"] < mse[view]["before"]


def test_post_fits_networks_that_predict_the_learned_view_targets(tiny_teacher: Path) -> None:
    # absolute rates: at the tiny preset's lr 0.01, RMS-scaled rates move the identity targets by a fifth in three
    # steps, and this test is about what the networks fit, not about how far the targets moved
    config = paa_config(tiny_teacher, settings={"approximation": "post", "approx_steps": 500, "images": 12,
                                                "steps": 3, "relative_lr": False})
    distillation = Distillation(config, None, progress=False)
    early = distillation.method.distilled_set()  # as a monitor would, mid-run: fitted to the initial targets
    distilled = distillation.run()
    method = distillation.method
    assert set(distilled.tensors) >= {f"approx.{v}.out.bias" for v in VIEWS[1:]}
    # the networks are fitted again to the view targets as they are at the end (same start, other targets)
    assert not torch.equal(early.tensors["approx.rot90.out.bias"], distilled.tensors["approx.rot90.out.bias"])
    assert not any(name.startswith("view_targets") for name in distilled.tensors)
    identity = method.targets_of().detach()
    for j, view in enumerate(VIEWS[1:], start=1):
        shift = method.learned["view_targets"][j - 1].detach().double() - identity.double()
        fitted = float(((mlp_shift(identity, distilled.approximation_weights(view)) - shift) ** 2).mean())
        zero = float((shift ** 2).mean())
        assert fitted < 0.8 * zero, (view, fitted, zero)
        assert distilled.metadata["approximation_mse"][view]["after"] == pytest.approx(fitted, rel=1e-3)


def test_stored_view_targets_start_as_the_teachers_features_of_the_viewed_images(
        tiny_teacher: Path, teacher: Teacher, real: tuple[torch.Tensor, torch.Tensor]) -> None:
    method = method_of(paa_config(tiny_teacher, settings={"approximation": "stored", "images": 5}))
    chosen = method.initial_indices
    assert method.learned["view_targets"].shape == (K, 5, D)
    for j, view in enumerate(VIEWS[1:], start=1):
        torch.testing.assert_close(method.learned["view_targets"][j - 1].detach(),
                                   view_features(teacher, real[0][chosen], view), rtol=1e-4, atol=1e-4)
    assert method.distilled_set().metadata["approximation_mse"] == {}


@pytest.mark.parametrize("param", ["pca", "none"])
def test_projected_targets_start_as_the_teachers_features_of_the_sets_own_images(
        tiny_teacher: Path, teacher: Teacher, param: str) -> None:
    """``target_init: projected``: every view's starting targets are the teacher's features of the set's materialised
    images under that view (for PCA bases: the projections, not the real images they came from)."""
    settings = {"approximation": "stored", "images": 5, "parameterization": param, "target_init": "projected"}
    method = method_of(paa_config(tiny_teacher, settings=settings))
    with torch.no_grad():
        images = method.images_of()
        identity = method.targets_of()
    expected = teacher(images)
    if param == "pca":  # the identity targets are coefficients of the target bases: the expected ones projected
        bases = method.learned["target_bases"].detach()
        expected = expected @ bases.T @ bases
    torch.testing.assert_close(identity, expected, rtol=1e-4, atol=1e-4)
    for j, view in enumerate(VIEWS[1:], start=1):
        torch.testing.assert_close(method.learned["view_targets"][j - 1].detach(),
                                   view_features(teacher, images, view), rtol=1e-4, atol=1e-4)


# ---- 5. the stored set round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("approx", ["joint", "post", "stored"])
def test_a_stored_set_materialises_identically_after_reload(tiny_teacher: Path, tmp_path: Path, approx: str) -> None:
    config = paa_config(tiny_teacher, settings={"approximation": approx, "images": 8, "steps": 2})
    distilled = run(config, tmp_path)
    assert {t.dtype for t in distilled.tensors.values()} == {torch.float32}
    loaded = load_distilled(tmp_path)
    assert loaded.method == "paa" and loaded.views == VIEWS and loaded.image_shape == (C, H, W)
    assert set(loaded.tensors) == set(distilled.tensors)
    for name, tensor in distilled.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype and torch.equal(loaded.tensors[name], tensor), name
    for a, b in zip(loaded.materialize(), distilled.materialize()):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert loaded.metadata["spending"] == distilled.metadata["spending"]
    assert loaded.byte_count == distilled.byte_count
    spending = distilled.metadata["spending"]
    assert loaded.byte_count == spending["budget_bytes"] - spending["unused_bytes"]


# ---- 6. the outer objective -------------------------------------------------------------------------------

# One frozen pool member (lr 0, no normalisation statistics), a constant learning rate and every (image, view)
# pair in the inner set: each step is then a stochastic gradient step on one fixed objective, the outer loss of
# the set against every source image under every view (the real batches draw a random view per image, so the
# batch loss is an unbiased estimate of that mean), which the test evaluates itself.
FROZEN = {"steps": 30, "real_batch": 64, "lr_schedule": "constant", "real_augment": "views", "images": 10,
          "inner_samples": None,
          "pool": {"size": 1, "arch": "convnet", "arch_args": {"widths": [4, 8], "norm": "none"},
                   "online_iterations": 10**6, "lr": 0.0}}


def frozen_run(tiny_teacher: Path, lr_images: float, lr_targets: float) -> tuple[DistilledSet, torch.nn.Module]:
    config = paa_config(tiny_teacher, settings={**FROZEN, "lr_images": lr_images, "lr_targets": lr_targets})
    return run_with_frozen_pool(config)


@pytest.fixture(scope="module")
def all_views(teacher: Teacher, real: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every source image under every default view, with the teacher's features of each."""
    images = torch.cat([rot(real[0], v) for v in VIEWS])
    return images, torch.cat([view_features(teacher, real[0], v) for v in VIEWS])


def full_objective(network: torch.nn.Module, distilled: DistilledSet,
                   target: tuple[torch.Tensor, torch.Tensor]) -> float:
    images, targets = distilled.materialize()
    with torch.no_grad():
        return float(krr_outer_loss(network.features(images).double(), network.features(target[0]).double(),
                                    targets.double(), target[1].double(), 1e-6))


def test_paa_lowers_its_outer_objective_and_a_zero_lr_control_does_not(
        tiny_teacher: Path, all_views: tuple[torch.Tensor, torch.Tensor]) -> None:
    control, network = frozen_run(tiny_teacher, 0.0, 0.0)
    initial = method_of(paa_config(tiny_teacher, settings={**FROZEN, "lr_images": 0.0, "lr_targets": 0.0}))
    for name, tensor in initial.stored_tensors().items():  # the control never moves from the initialisation
        assert torch.equal(control.tensors[name], tensor.detach()), name
    start = full_objective(network, control, all_views)

    learned, network2 = frozen_run(tiny_teacher, 0.01, 0.01)
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), network2.state_dict().values()))
    assert full_objective(network, learned, all_views) < 0.85 * start
    for name in ("image_coefficients", "image_bases", "target_coefficients", "target_bases", "approx.rot90.out.bias"):
        assert (learned.tensors[name] - control.tensors[name]).abs().max() > 1e-4, name


# ---- 7. inner subsets -------------------------------------------------------------------------------------


def test_inner_samples_draw_distinct_image_view_pairs_of_the_set(tiny_teacher: Path) -> None:
    m, samples = 10, 24  # 10 images x 4 views = 40 pairs, 24 per step
    method = method_of(paa_config(tiny_teacher, settings={"images": m, "inner_samples": samples, "approx_steps": 5}))
    with torch.no_grad():
        all_images, all_targets = method.distilled_set().materialize()  # row j * m + i: image i under view j
        seen: set[int] = set()
        for seed in range(12):
            images, targets = method.inner_set(torch.Generator().manual_seed(seed))
            assert images.shape == (samples, C, H, W) and targets.shape == (samples, D)
            again = method.inner_set(torch.Generator().manual_seed(seed))
            assert torch.equal(again[0], images) and torch.equal(again[1], targets)
            distance = torch.cdist(images.flatten(1).double(), all_images.flatten(1).double())  # (24, 40)
            pairs = distance.argmin(1)
            assert float(distance.min(1).values.max()) < 1e-3  # every row is a view of a set image...
            assert float(distance.topk(2, largest=False).values[:, 1].min()) > 1.0  # ...and only of that one
            assert len(set(pairs.tolist())) == samples  # no pair twice
            torch.testing.assert_close(targets, all_targets[pairs], rtol=1e-4, atol=1e-3)  # with its own targets
            seen |= set(pairs.tolist())
    assert seen == set(range(4 * m))  # over a few steps every pair is drawn
    # inner_samples >= M x views: every pair, in order
    method.settings.inner_samples = 4 * m
    with torch.no_grad():
        images, _ = method.inner_set(torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, all_images, rtol=0, atol=1e-5)


def test_a_run_with_inner_samples_is_deterministic(tiny_teacher: Path) -> None:
    config = paa_config(tiny_teacher, settings={"images": 10, "inner_samples": 16, "steps": 3})
    a, b = run(config), run(copy.deepcopy(config))
    assert set(a.tensors) == set(b.tensors)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.metadata["initial_indices"] == b.metadata["initial_indices"]
    config.seed = 1
    c = run(config)
    assert not torch.equal(a.tensors["image_coefficients"], c.tensors["image_coefficients"])


# ---- 8. resume --------------------------------------------------------------------------------------------


def step_losses(out: Path) -> list[tuple[int, float, int]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["member"]) for r in rows if "step" in r]


@pytest.mark.parametrize("approx", ["joint", "post"])
def test_resume_continues_bit_identically(tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          approx: str) -> None:
    settings = {"steps": 12, "images": 8, "inner_samples": 12, "approximation": approx}
    full = run(paa_config(tiny_teacher, settings=settings), tmp_path / "a")

    # run B checkpoints after every step up to step 4 only and is interrupted before step 7
    config = paa_config(tiny_teacher, checkpoint_minutes=0, settings=settings)
    resumed = interrupt_then_resume(monkeypatch, PAA, config, tmp_path / "b", checkpoint_until=4, stop_at=6)
    assert set(resumed.tensors) == set(full.tensors)
    for name, tensor in full.tensors.items():
        assert torch.equal(resumed.tensors[name], tensor), name
    assert resumed.metadata["approximation_mse"] == full.metadata["approximation_mse"]
    assert [s for s, _, _ in step_losses(tmp_path / "b")] == list(range(1, 13))
    assert step_losses(tmp_path / "b") == step_losses(tmp_path / "a")


# ---- 9. settings errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "expected"), [
    ({"parameterization": "svd"}, "parameterization must be one of pca, random, none, got 'svd'"),
    ({"approximation": "later"}, "approximation must be one of joint, post, stored, got 'later'"),
    ({"views": ["rot90", "identity"]}, ("views must start with identity and name distinct views of "
                                        "identity, rot90, rot180, rot270, hflip, vflip, got ['rot90', 'identity']")),
    ({"views": ["identity", "rot45"]}, ("views must start with identity and name distinct views of "
                                        "identity, rot90, rot180, rot270, hflip, vflip, got ['identity', 'rot45']")),
    ({"views": ["identity", "rot90", "rot90"]}, "views must start with identity"),
    ({"views": []}, "views must start with identity"),
    ({"image_bases": 0}, "image_bases, target_bases, approx_hidden and pca_images must be >= 1"),
    ({"approx_hidden": 0}, "image_bases, target_bases, approx_hidden and pca_images must be >= 1"),
    ({"images": 0}, "images and inner_samples must be >= 1 when given"),
    ({"inner_samples": 0}, "images and inner_samples must be >= 1 when given"),
    ({"real_augment": "blur"}, "real_augment must be one of crop-flip, none, views, got 'blur'"),
    ({"target_init": "teacher"}, "target_init must be one of real, projected, got 'teacher'"),
    ({"basis_size": 64}, "basis_size 64 is larger than the images (32x32)"),
])
def test_settings_errors(tiny_teacher: Path, settings: dict[str, Any], expected: str) -> None:
    message = config_error(paa_config(tiny_teacher, settings=settings))
    assert expected in message, message


@pytest.mark.parametrize(("key", "value"), [("basis_size", 0), ("basis_size", -4), ("approx_lr", -1.0)])
def test_out_of_range_settings_are_refused_when_the_run_is_built(tiny_teacher: Path, key: str, value: Any) -> None:
    """basis_size 0 must not silently mean 'the image size' (here it then fails as a budget error about 49152
    values of image bases), -4 must not reach torch's interpolation (a RuntimeError), and a negative approx_lr
    must not pass until ``post`` fits its networks after the whole run (torch's ValueError from Adam)."""
    with pytest.raises(ConfigError) as info:
        Distillation(paa_config(tiny_teacher, settings={"approximation": "post", key: value}), None, progress=False)
    assert key in one_line(info.value)


@pytest.mark.parametrize("relative", [True, False])
def test_each_learned_tensor_moves_at_its_own_scale(tiny_teacher: Path, relative: bool) -> None:
    method = method_of(paa_config(tiny_teacher, settings={"relative_lr": relative, "lr_images": 0.01,
                                                          "lr_targets": 0.002}))
    image_side = {"image_coefficients", "image_bases"}
    seen = set()
    for group in method.optimizer.param_groups:
        for tensor in group["params"]:
            name = next(n for n, t in method.learned.items() if t is tensor)
            seen.add(name)
            lr = 0.01 if name in image_side else 0.002
            rms = float(tensor.detach().double().pow(2).mean().sqrt())  # still the initial values
            assert group["lr"] == pytest.approx(lr * rms if relative else lr, rel=1e-6), name
    assert seen == set(method.learned)
    # the bases are unit rows of 8x8x3 = 192 entries, the coefficients projections of whole images: 20x apart
    ratio = method.param_groups[0]["lr"] / method.param_groups[1]["lr"] if relative else 1.0
    assert (ratio > 10) == relative


def test_drift_is_logged_for_what_the_set_is(tiny_teacher: Path) -> None:
    distillation = Distillation(paa_config(tiny_teacher, settings={"steps": 2}), None, progress=False)
    method = distillation.method
    metrics = method.step(0)
    assert {"drift_images", "drift_targets", "drift_image_bases", "drift_target_bases"} <= set(metrics)
    rows = method.drift_index
    with torch.no_grad():
        now = method.images_of(rows)
        start = method.initial["images"]
    assert metrics["drift_images"] == pytest.approx(float((now - start).norm() / start.norm()), rel=1e-5)
    assert metrics["drift_images"] > 0
