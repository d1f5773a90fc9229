"""Augmentations: DSA (shared parameters, exact geometry, gradients, seeding), random crop/flip, predefined
views and the SSL two-view pipeline.

Geometric DSA ops are checked against an independent NumPy implementation of bilinear sampling with
``align_corners=False`` and zero padding, or against exact integer shifts and flips.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssdd.data.augment import (
    DSA_OPS,
    PREDEFINED_VIEWS,
    DSAConfig,
    DSAParams,
    SSLViews,
    apply_dsa,
    apply_view,
    apply_views,
    random_crop_flip,
    sample_dsa_params,
)
from ssdd.errors import ConfigError, SsddError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=gen(seed))


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """out[..., i, j] = x[..., i + dy, j + dx], zero where that falls outside the image."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            si, sj = i + dy, j + dx
            if 0 <= si < h and 0 <= sj < w:
                out[..., i, j] = x[..., si, sj]
    return out


def reference_affine(x: torch.Tensor, theta: np.ndarray) -> torch.Tensor:
    """Bilinear sampling of ``x`` (N, C, H, W) at ``theta @ [x_out, y_out, 1]`` in normalised coordinates.

    Pixel centres sit at (2k + 1) / size - 1 (align_corners=False); samples outside the image read zero.
    """
    xs = x.detach().double().numpy()
    n, c, h, w = xs.shape
    out = np.zeros_like(xs)
    theta = np.broadcast_to(np.asarray(theta, dtype=np.float64), (n, 2, 3))
    for b in range(n):
        for i in range(h):
            for j in range(w):
                xn, yn = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
                sx = theta[b, 0, 0] * xn + theta[b, 0, 1] * yn + theta[b, 0, 2]
                sy = theta[b, 1, 0] * xn + theta[b, 1, 1] * yn + theta[b, 1, 2]
                px, py = ((sx + 1) * w - 1) / 2, ((sy + 1) * h - 1) / 2
                x0, y0 = math.floor(px), math.floor(py)
                fx, fy = px - x0, py - y0
                acc = np.zeros(c)
                for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                    for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                        if 0 <= yy < h and 0 <= xx < w:
                            acc += wy * wx * xs[b, :, yy, xx]
                out[b, :, i, j] = acc
    return torch.from_numpy(out).to(x.dtype)


# ---- DSA: shared (siamese) parameters -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["single", "all"])
@pytest.mark.parametrize("seed", range(6))
def test_shared_params_transform_every_batch_identically(mode: str, seed: int) -> None:
    params = sample_dsa_params(1, DSAConfig(mode=mode), gen(seed))
    a, b = rand(3, 3, 8, 8, seed=100 + seed), rand(5, 3, 8, 8, seed=200 + seed)
    together = apply_dsa(torch.cat([a, b]), params)
    apart = torch.cat([apply_dsa(a, params), apply_dsa(b, params)])
    assert torch.allclose(together, apart, atol=1e-6)
    perm = torch.randperm(8, generator=gen(seed))
    x = torch.cat([a, b])
    assert torch.allclose(apply_dsa(x[perm], params), together[perm], atol=1e-6)
    # One image repeated: one shared transform gives one output.
    same = apply_dsa(a[:1].expand(4, -1, -1, -1).contiguous(), params)
    assert torch.allclose(same, same[:1].expand_as(same), atol=1e-6)


def test_per_image_params_differ_between_images() -> None:
    params = sample_dsa_params(6, DSAConfig(strategy="crop_rotate_scale", mode="all"), gen(0))
    x = rand(1, 3, 8, 8).expand(6, -1, -1, -1).contiguous()
    out = apply_dsa(x, params)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ConfigError) as excinfo:
        apply_dsa(rand(4, 3, 8, 8), params)
    assert "6" in str(excinfo.value) and "4" in str(excinfo.value)


def test_flip_with_p1_is_exact_mirror_and_p0_is_identity() -> None:
    x = rand(4, 3, 8, 8)
    for seed in range(3):
        params = sample_dsa_params(1, DSAConfig(strategy="flip", mode="all", flip_p=1.0), gen(seed))
        assert torch.equal(apply_dsa(x, params), x.flip(-1))
        params = sample_dsa_params(4, DSAConfig(strategy="flip", mode="all", flip_p=0.0), gen(seed))
        assert torch.equal(apply_dsa(x, params), x)


def test_flip_per_image_matches_sampled_mask() -> None:
    params = sample_dsa_params(16, DSAConfig(strategy="flip", mode="all"), gen(1))
    mask = params.values["flip"]
    assert 0 < int(mask.sum()) < 16
    x = rand(16, 3, 8, 8)
    out = apply_dsa(x, params)
    for k in range(16):
        assert torch.equal(out[k], x[k].flip(-1) if mask[k] else x[k])


def test_rotate_by_quarter_turn_is_rot90() -> None:
    x = rand(2, 3, 8, 8)
    params = DSAParams(("rotate",), {"angle": torch.tensor([math.pi / 2])}, 1)
    out = apply_dsa(x, params)
    matches = [k for k in (1, 3) if torch.allclose(out, torch.rot90(x, k, dims=(-2, -1)), atol=1e-5)]
    assert len(matches) == 1
    # and a quarter turn the other way is the other rot90
    back = apply_dsa(x, DSAParams(("rotate",), {"angle": torch.tensor([-math.pi / 2])}, 1))
    assert torch.allclose(back, torch.rot90(x, 4 - matches[0], dims=(-2, -1)), atol=1e-5)


def test_rotate_of_symmetric_image_by_quarter_turn_is_unchanged() -> None:
    # A pattern with four-fold symmetry (distance from the centre).
    idx = torch.arange(8, dtype=torch.float32) - 3.5
    radial = (idx.view(-1, 1) ** 2 + idx.view(1, -1) ** 2).view(1, 1, 8, 8) / 25
    out = apply_dsa(radial, DSAParams(("rotate",), {"angle": torch.tensor([math.pi / 2])}, 1))
    assert torch.allclose(out, radial, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_rotate_matches_reference_at_sampled_angle(seed: int) -> None:
    cfg = DSAConfig(strategy="rotate", mode="all", rotate_degrees=30.0)
    params = sample_dsa_params(3, cfg, gen(seed))
    angle = params.values["angle"].double()
    assert (angle.abs() <= math.radians(30) + 1e-9).all()
    x = rand(3, 2, 8, 8, seed=seed)
    theta = np.stack([[[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]] for a in angle.tolist()])
    assert torch.allclose(apply_dsa(x, params), reference_affine(x, theta), atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_scale_matches_reference_at_sampled_factors(seed: int) -> None:
    cfg = DSAConfig(strategy="scale", mode="all", scale_ratio=1.5)
    params = sample_dsa_params(3, cfg, gen(seed))
    s = params.values["scale"].double()
    assert ((s >= 1 / 1.5 - 1e-6) & (s <= 1.5 + 1e-6)).all()
    x = rand(3, 2, 8, 8, seed=seed)
    theta = np.stack([[[sx, 0, 0], [0, sy, 0]] for sx, sy in s.tolist()])
    assert torch.allclose(apply_dsa(x, params), reference_affine(x, theta), atol=1e-5)


def test_crop_hand_built_shift_moves_pixels_exactly() -> None:
    x = rand(2, 3, 8, 8)
    # shift fractions 2/8 and -1/8 of the side: two pixels right-to-left in x, one pixel in y
    params = DSAParams(("crop",), {"shift": torch.tensor([[0.25, -0.125]])}, 1)
    out = apply_dsa(x, params)
    want = shifted(x, dx=2, dy=-1)
    assert torch.allclose(out, want, atol=1e-6)
    assert (out[..., :, 6:] == 0).all() and (out[..., 0, :] == 0).all()


def test_crop_sampled_shift_is_a_whole_pixel_shift() -> None:
    cfg = DSAConfig(strategy="crop", mode="all", crop_ratio=0.25)
    x = rand(16, 1, 8, 8)
    params = sample_dsa_params(16, cfg, gen(3))
    shift = params.values["shift"]
    kx = (shift[:, 0] * 8).round().long().tolist()
    ky = (shift[:, 1] * 8).round().long().tolist()
    assert any(k != 0 for k in kx + ky)
    assert all(abs(k) <= 2 for k in kx + ky)
    out = apply_dsa(x, params)
    for n in range(16):
        assert torch.allclose(out[n], shifted(x[n], kx[n], ky[n]), atol=1e-6), (n, kx[n], ky[n])


def test_color_of_constant_grey_image_only_adds_brightness() -> None:
    # Saturation and contrast blend with the image's own mean, which is the image itself when it is constant.
    params = sample_dsa_params(5, DSAConfig(strategy="color", mode="all"), gen(4))
    x = torch.full((5, 3, 4, 4), 0.4)
    out = apply_dsa(x, params)
    want = 0.4 + params.values["brightness"].view(5, 1, 1, 1)
    assert torch.allclose(out, want.expand_as(out), atol=1e-6)


def test_color_matches_dsa_definition() -> None:
    params = sample_dsa_params(3, DSAConfig(strategy="color", mode="all"), gen(5))
    x = rand(3, 3, 4, 4, seed=5).double()
    b, s, c = (params.values[k].double().view(3, 1, 1, 1) for k in ("brightness", "saturation", "contrast"))
    y = x + b
    y = (y - y.mean(1, keepdim=True)) * s + y.mean(1, keepdim=True)
    y = (y - y.mean((1, 2, 3), keepdim=True)) * c + y.mean((1, 2, 3), keepdim=True)
    assert torch.allclose(apply_dsa(x.float(), params).double(), y, atol=1e-5)


def test_cutout_zeroes_one_square_and_keeps_the_rest() -> None:
    x = rand(1, 2, 16, 16) + 0.1  # no zeros before cutout
    params = DSAParams(("cutout",), {"cutout_center": torch.tensor([[0.5, 0.5]]),
                                     "cutout_ratio": torch.tensor(0.25)}, 1)
    out = apply_dsa(x, params)
    zero = (out == 0).all(dim=1)[0]
    rows, cols = zero.nonzero(as_tuple=True)
    assert zero.any()
    # the cut pixels form one solid square around the centre (8, 8), the others are untouched
    assert zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert rows.min() <= 8 <= rows.max() and cols.min() <= 8 <= cols.max()
    assert torch.equal(out[:, :, ~zero], x[:, :, ~zero])


@pytest.mark.parametrize("size,ratio", [(8, 0.5), (32, 0.5), (16, 0.25)])
def test_cutout_square_side_is_ratio_times_image_side(size: int, ratio: float) -> None:
    # DSA (Zhao & Bilen) cuts a square of side int(size * ratio + 0.5) pixels.
    side = int(size * ratio + 0.5)
    params = DSAParams(("cutout",), {"cutout_center": torch.tensor([[0.5, 0.5]]),
                                     "cutout_ratio": torch.tensor(ratio)}, 1)
    out = apply_dsa(torch.ones(1, 1, size, size), params)
    cut = int((out == 0).sum())
    assert cut == side * side, f"cutout_ratio={ratio} on {size} px cut {cut} pixels, expected a {side}x{side} square"


@pytest.mark.parametrize("op", DSA_OPS)
def test_gradients_flow_through_every_op(op: str) -> None:
    cfg = DSAConfig(strategy=op, mode="all", flip_p=1.0)
    params = sample_dsa_params(1, cfg, gen(6))
    x = rand(2, 3, 8, 8).requires_grad_(True)
    weights = rand(2, 3, 8, 8, seed=7)
    (apply_dsa(x, params) * weights).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    if op == "flip":
        assert torch.equal(x.grad, weights.flip(-1))


def test_gradients_flow_through_all_ops_together() -> None:
    params = sample_dsa_params(2, DSAConfig(mode="all"), gen(8))
    x = rand(2, 3, 8, 8).requires_grad_(True)
    apply_dsa(x, params).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _params_equal(p: DSAParams, q: DSAParams) -> bool:
    return p.ops == q.ops and p.values.keys() == q.values.keys() and all(
        torch.equal(p.values[k], q.values[k]) for k in p.values)


@pytest.mark.parametrize("mode", ["single", "all"])
def test_same_seed_same_params_and_output(mode: str) -> None:
    cfg = DSAConfig(mode=mode)
    x = rand(4, 3, 8, 8)
    p, q = sample_dsa_params(4, cfg, gen(11)), sample_dsa_params(4, cfg, gen(11))
    assert _params_equal(p, q)
    assert torch.equal(apply_dsa(x, p), apply_dsa(x, q))


def test_different_seed_different_params() -> None:
    cfg = DSAConfig(mode="all")
    p, q = sample_dsa_params(4, cfg, gen(11)), sample_dsa_params(4, cfg, gen(12))
    assert not _params_equal(p, q)
    assert not torch.equal(p.values["angle"], q.values["angle"])
    x = rand(4, 3, 8, 8)
    assert not torch.allclose(apply_dsa(x, p), apply_dsa(x, q))


def test_single_mode_picks_each_family_for_some_seed() -> None:
    seen = {sample_dsa_params(1, DSAConfig(), gen(s)).ops for s in range(60)}
    assert all(len(ops) == 1 for ops in seen)
    assert {ops[0] for ops in seen} == set(DSA_OPS)


def test_sampling_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    sample_dsa_params(8, DSAConfig(mode="all"), gen(0))
    random_crop_flip(rand(2, 3, 8, 8), gen(0))
    SSLViews()(rand(2, 3, 8, 8), gen(0))
    assert torch.equal(torch.get_rng_state(), before)


def test_dsa_config_rejects_unknown_op_and_mode() -> None:
    with pytest.raises(ConfigError) as excinfo:
        DSAConfig(strategy="color_blur")
    assert "blur" in str(excinfo.value)
    with pytest.raises(ConfigError) as excinfo:
        DSAConfig(mode="some")
    assert "'some'" in str(excinfo.value)
    assert isinstance(excinfo.value, SsddError)


# ---- random crop + flip -------------------------------------------------------------------------------------


def _match_shift_flip(out: torch.Tensor, x: torch.Tensor, padding: int) -> list[tuple[int, int, bool]]:
    found = []
    for dx in range(-padding, padding + 1):
        for dy in range(-padding, padding + 1):
            s = shifted(x, dx, dy)
            for flip in (False, True):
                if torch.allclose(out, s.flip(-1) if flip else s, atol=1e-6):
                    found.append((dx, dy, flip))
    return found


def test_random_crop_flip_is_integer_shift_with_zero_padding() -> None:
    x = rand(12, 2, 8, 8) + 0.1  # strictly positive, so zero fill is visible and matches are unique
    out = random_crop_flip(x, gen(0), padding=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    seen = []
    for n in range(12):
        matches = _match_shift_flip(out[n], x[n], padding=2)
        assert len(matches) == 1, (n, matches)
        seen.append(matches[0])
    assert len({(dx, dy) for dx, dy, _ in seen}) > 1
    assert {f for _, _, f in seen} == {False, True}


def test_random_crop_without_flip_never_flips() -> None:
    x = rand(10, 1, 8, 8) + 0.1
    out = random_crop_flip(x, gen(1), padding=1, flip=False)
    for n in range(10):
        matches = _match_shift_flip(out[n], x[n], padding=1)
        assert matches and not matches[0][2]


def test_random_crop_zero_padding_no_flip_is_identity() -> None:
    x = rand(3, 3, 8, 8)
    assert torch.allclose(random_crop_flip(x, gen(2), padding=0, flip=False), x, atol=1e-6)


def test_random_crop_flip_reproducible() -> None:
    x = rand(6, 3, 8, 8)
    assert torch.equal(random_crop_flip(x, gen(5)), random_crop_flip(x, gen(5)))
    assert not torch.equal(random_crop_flip(x, gen(5)), random_crop_flip(x, gen(6)))


# ---- predefined views ---------------------------------------------------------------------------------------


def test_rot90_four_times_is_identity() -> None:
    x = rand(2, 3, 5, 5)
    y = x
    for _ in range(4):
        y = apply_view(y, "rot90")
    assert torch.equal(y, x)
    assert not torch.equal(apply_view(x, "rot90"), x)


def test_rotations_compose() -> None:
    x = rand(2, 3, 6, 6)
    assert torch.equal(apply_view(x, "rot180"), apply_view(apply_view(x, "rot90"), "rot90"))
    assert torch.equal(apply_view(x, "rot270"), apply_view(apply_view(x, "rot180"), "rot90"))
    assert torch.equal(apply_view(apply_view(x, "rot270"), "rot90"), x)


def test_rot90_on_hand_matrix() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    y = apply_view(x, "rot90")
    # A quarter turn moves every corner to a neighbouring corner (values cycle 1->2->4->3 or the reverse).
    assert sorted(y.flatten().tolist()) == [1.0, 2.0, 3.0, 4.0]
    assert y.flatten().tolist() in ([2.0, 4.0, 1.0, 3.0], [3.0, 1.0, 4.0, 2.0])


def test_flips_are_involutions_and_exact() -> None:
    x = rand(2, 3, 4, 5)
    assert torch.equal(apply_view(apply_view(x, "hflip"), "hflip"), x)
    assert torch.equal(apply_view(apply_view(x, "vflip"), "vflip"), x)
    assert torch.equal(apply_view(x, "hflip")[..., 0], x[..., -1])
    assert torch.equal(apply_view(x, "vflip")[..., 0, :], x[..., -1, :])
    assert torch.equal(apply_view(x, "rot180"), apply_view(apply_view(x, "hflip"), "vflip"))
    assert apply_view(x, "identity") is x or torch.equal(apply_view(x, "identity"), x)


def test_apply_views_stacks_view_major() -> None:
    x = rand(3, 3, 4, 4)
    views = ["identity", "hflip", "rot90"]
    out = apply_views(x, views)
    assert out.shape == (9, 3, 4, 4)
    for v, name in enumerate(views):
        assert torch.equal(out[v * 3 : (v + 1) * 3], apply_view(x, name))
    all_views = apply_views(x, PREDEFINED_VIEWS)
    assert all_views.shape[0] == 3 * len(PREDEFINED_VIEWS)


def test_unknown_view_is_config_error() -> None:
    with pytest.raises(ConfigError) as excinfo:
        apply_view(rand(1, 1, 4, 4), "rot45")
    assert "'rot45'" in str(excinfo.value) and "rot90" in str(excinfo.value)
    with pytest.raises(ConfigError):
        apply_views(rand(1, 1, 4, 4), ["identity", "spin"])


# ---- SSL views ----------------------------------------------------------------------------------------------


def test_ssl_views_shape_and_range() -> None:
    x = rand(8, 3, 16, 16)
    v1, v2 = SSLViews().two_views(x, gen(0))
    for v in (v1, v2):
        assert v.shape == x.shape and v.dtype == x.dtype
        assert v.min() >= 0 and v.max() <= 1
        assert torch.isfinite(v).all()
    assert not torch.allclose(v1, v2)


def test_ssl_views_reproducible() -> None:
    x = rand(4, 3, 16, 16)
    a = SSLViews().two_views(x, gen(3))
    b = SSLViews().two_views(x, gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = SSLViews().two_views(x, gen(4))
    assert not torch.equal(a[0], c[0])


def test_ssl_views_one_channel() -> None:
    x = rand(4, 1, 12, 12)
    v1, v2 = SSLViews().two_views(x, gen(1))
    assert v1.shape == (4, 1, 12, 12) and v2.shape == (4, 1, 12, 12)
    assert v1.min() >= 0 and v1.max() <= 1
    assert not torch.allclose(v1, v2)


def test_ssl_views_without_randomness_is_identity() -> None:
    # Full-image crop, no flip, no jitter, no grayscale: every view must be the image itself.
    aug = SSLViews(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    x = rand(3, 3, 8, 8)
    assert torch.allclose(aug(x, gen(0)), x, atol=1e-5)


def test_ssl_views_grayscale_always_gives_equal_channels() -> None:
    aug = SSLViews(grayscale_p=1.0)
    out = aug(rand(4, 3, 8, 8), gen(2))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssl_views_gradient_flows(channels: int) -> None:
    x = (rand(4, channels, 12, 12) * 0.8 + 0.1).requires_grad_(True)
    v1, v2 = SSLViews().two_views(x, gen(9))
    (v1 * rand(*v1.shape, seed=1)).sum().add((v2 * rand(*v2.shape, seed=2)).sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
