"""Kernel ridge regression (``ssdd.methods.kernel_ridge.krr``): predictions and losses against a closed form written
out in numpy float64, gradients against central finite differences (with the ridge term held where the code holds it),
gradients through a real network down to the pixels, and the jitter fall-back of the Cholesky solve.

The ridge term lambda = ridge * trace(K_ss) carries no gradient by design (it is ``.detach()``-ed), so every
finite-difference reference below holds lambda at its value at the base point; one test checks that this is
what the code does (with a large ridge, letting lambda move gives a visibly different derivative).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from ssdd.device import seeded
from ssdd.methods.kernel_ridge.krr import krr_outer_loss, krr_predict, ridge_solve, with_bias_column
from ssdd.models import create_model

F64 = torch.float64
EPS64 = torch.finfo(F64).eps


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def f32_exact(*shape: int, seed: int) -> torch.Tensor:
    """float64 values that float32 represents exactly (see the note in the gradient tests)."""
    return randn(*shape, seed=seed).float().double()


# ---- the numpy float64 reference --------------------------------------------------------------------------


def np_bias(features: np.ndarray) -> np.ndarray:
    return np.hstack([features, np.ones((features.shape[0], 1))])


def np_ridge_lambda(fs: np.ndarray, ridge: float) -> float:
    fs1 = np_bias(fs)
    return ridge * float(np.trace(fs1 @ fs1.T))


def np_predict(fs: np.ndarray, ft: np.ndarray, ys: np.ndarray, ridge: float, lam: float | None = None) -> np.ndarray:
    """K_ts (K_ss + lambda I)^-1 Y_s with bias columns; lambda = ridge * trace(K_ss) unless given."""
    fs1, ft1 = np_bias(fs), np_bias(ft)
    k_ss, k_ts = fs1 @ fs1.T, ft1 @ fs1.T
    if lam is None:
        lam = ridge * np.trace(k_ss)
    return k_ts @ np.linalg.inv(k_ss + lam * np.eye(len(fs))) @ ys


def np_loss(fs: np.ndarray, ft: np.ndarray, ys: np.ndarray, yt: np.ndarray, ridge: float,
            lam: float | None = None) -> float:
    return float(np.mean((np_predict(fs, ft, ys, ridge, lam) - yt) ** 2))


def problem(n: int, b: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(features_syn (n, d), features_real (b, d), targets_syn (n, k), targets_real (b, k)) in float64."""
    return randn(n, d, seed=seed), randn(b, d, seed=seed + 1), randn(n, k, seed=seed + 2), randn(b, k, seed=seed + 3)


# N=6 synthetic points with 3 features (+ bias: a rank-4 kernel, the ridge keeps it invertible) and N=4 points
# with 8 features (a full-rank kernel); a tiny ridge and one large enough to change the prediction.
SHAPES = [(6, 4, 3, 2), (4, 5, 8, 3)]
RIDGES = [1e-6, 1e-2]
# The rank-4 kernel with the tiny ridge has condition number ~1e6: fine in float64, but neither float32 (error up
# to ~1e6 * 6e-8) nor central differences (third derivatives ~ 1 / lambda^2) can be compared with it tightly, so
# those checks use the well-conditioned combinations.
WELL_CONDITIONED = [((6, 4, 3, 2), 1e-2), ((4, 5, 8, 3), 1e-6), ((4, 5, 8, 3), 1e-2)]
WC_IDS = ["6x4x3x2-1e-2", "4x5x8x3-1e-6", "4x5x8x3-1e-2"]


# ---- predictions and losses -------------------------------------------------------------------------------


def test_with_bias_column_appends_a_column_of_ones() -> None:
    features = randn(3, 2, seed=0)
    out = with_bias_column(features)
    assert out.shape == (3, 3) and out.dtype == F64
    assert torch.equal(out[:, :2], features)
    assert torch.equal(out[:, 2], torch.ones(3, dtype=F64))
    assert with_bias_column(torch.zeros(0, 4)).shape == (0, 5)


@pytest.mark.parametrize("ridge", RIDGES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_krr_predict_float64_matches_closed_form(shape: tuple[int, int, int, int], ridge: float) -> None:
    fs, ft, ys, _ = problem(*shape)
    expected = np_predict(fs.numpy(), ft.numpy(), ys.numpy(), ridge)
    got = krr_predict(fs, ft, ys, ridge)
    assert got.dtype == F64  # float64 stays float64
    assert got.shape == (shape[1], shape[3])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("ridge", RIDGES)
def test_krr_predict_float32_matches_closed_form_to_float32_precision(ridge: float) -> None:
    fs, ft, ys, _ = problem(4, 5, 8, 3)
    expected = np_predict(fs.numpy(), ft.numpy(), ys.numpy(), ridge)
    got = krr_predict(fs.float(), ft.float(), ys.float(), ridge)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-3, atol=1e-4)


def test_the_ridge_changes_the_prediction() -> None:
    """Guards the two-ridge tests above: a large ridge gives a different prediction than a tiny one."""
    fs, ft, ys, _ = problem(6, 4, 3, 2)
    small, large = krr_predict(fs, ft, ys, 1e-6), krr_predict(fs, ft, ys, 1e-2)
    assert (small - large).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_krr_predict_promotes_half_precision_to_float32(dtype: torch.dtype) -> None:
    fs, ft, ys, _ = problem(4, 5, 8, 3)
    fs, ft, ys = fs.to(dtype), ft.to(dtype), ys.to(dtype)
    got = krr_predict(fs, ft, ys, 1e-2)
    assert got.dtype == torch.float32
    # the same values given in float32 (the half inputs are exact in float32): the same computation
    assert torch.equal(got, krr_predict(fs.float(), ft.float(), ys.float(), 1e-2))


@pytest.mark.parametrize("ridge", RIDGES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_krr_outer_loss_is_the_mse_of_the_closed_form_prediction(shape: tuple[int, int, int, int],
                                                                  ridge: float) -> None:
    fs, ft, ys, _ = problem(*shape)
    yt = f32_exact(shape[1], shape[3], seed=99)
    expected = np_loss(fs.numpy(), ft.numpy(), ys.numpy(), yt.numpy(), ridge)
    loss = krr_outer_loss(fs, ft, ys, yt, ridge)
    assert loss.dim() == 0
    assert float(loss) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize(("shape", "ridge"), WELL_CONDITIONED, ids=WC_IDS)
def test_krr_outer_loss_float32_matches_closed_form(shape: tuple[int, int, int, int], ridge: float) -> None:
    fs, ft, ys, _ = problem(*shape)
    yt = f32_exact(shape[1], shape[3], seed=99)
    expected = np_loss(fs.numpy(), ft.numpy(), ys.numpy(), yt.numpy(), ridge)
    loss32 = krr_outer_loss(fs.float(), ft.float(), ys.float(), yt.float(), ridge)
    assert loss32.dtype == torch.float32
    assert float(loss32) == pytest.approx(expected, rel=1e-4)


def test_krr_outer_loss_keeps_float64_real_targets_in_float64() -> None:
    """With float64 inputs the whole loss is float64 (as the prediction is): real targets that float32 cannot
    represent must not be rounded to float32 on the way."""
    fs, ft, ys, yt = problem(4, 5, 8, 3)
    expected = np_loss(fs.numpy(), ft.numpy(), ys.numpy(), yt.numpy(), 1e-2)
    loss = krr_outer_loss(fs, ft, ys, yt, 1e-2)
    assert loss.dtype == F64
    assert float(loss) == pytest.approx(expected, rel=1e-12)


# ---- gradients --------------------------------------------------------------------------------------------
# The real targets are made float32-exact in these tests, so that the function and its numpy reference see the
# same numbers whatever precision the loss reads the real targets in (that is tested on its own above).


@pytest.mark.parametrize("ridge", RIDGES)
def test_gradcheck_wrt_synthetic_targets(ridge: float) -> None:
    # lambda depends on the features only, so gradcheck's finite differences of the full function are the truth.
    fs, ft, ys, _ = problem(6, 4, 3, 2)
    yt = f32_exact(4, 2, seed=7)
    ys = ys.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: krr_outer_loss(fs, ft, y, yt, ridge), (ys,), eps=1e-6, atol=1e-7)


def central_differences(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        grad[idx] = (f(plus) - f(minus)) / (2 * h)
    return grad


@pytest.mark.parametrize(("shape", "ridge"), WELL_CONDITIONED, ids=WC_IDS)
def test_gradient_wrt_synthetic_features_matches_finite_differences_with_lambda_held(
        shape: tuple[int, int, int, int], ridge: float) -> None:
    fs, ft, ys, _ = problem(*shape)
    yt = f32_exact(shape[1], shape[3], seed=7)
    fs_ = fs.clone().requires_grad_(True)
    krr_outer_loss(fs_, ft, ys, yt, ridge).backward()
    lam0 = np_ridge_lambda(fs.numpy(), ridge)
    expected = central_differences(lambda f: np_loss(f, ft.numpy(), ys.numpy(), yt.numpy(), ridge, lam=lam0),
                                   fs.numpy())
    np.testing.assert_allclose(fs_.grad.numpy(), expected, rtol=1e-5, atol=1e-8)


def test_lambda_carries_no_gradient() -> None:
    """With a large ridge, finite differences that let lambda follow the features differ from the gradient the
    code computes (and the ones holding lambda agree with it, as tested above): lambda is detached."""
    fs, ft, ys, _ = problem(4, 5, 8, 3)
    yt = f32_exact(5, 3, seed=7)
    fs_ = fs.clone().requires_grad_(True)
    krr_outer_loss(fs_, ft, ys, yt, 1e-1).backward()
    moving = central_differences(lambda f: np_loss(f, ft.numpy(), ys.numpy(), yt.numpy(), 1e-1), fs.numpy())
    assert np.abs(fs_.grad.numpy() - moving).max() > 1e-3 * np.abs(moving).max()


def torch_loss_fixed_lambda(fs: torch.Tensor, ft: torch.Tensor, ys: torch.Tensor, yt: torch.Tensor,
                            lam: float) -> torch.Tensor:
    """The outer loss written out with a constant lambda and a general solve (no Cholesky), in float64."""
    ones_s, ones_t = torch.ones(fs.shape[0], 1, dtype=F64), torch.ones(ft.shape[0], 1, dtype=F64)
    fs1, ft1 = torch.cat([fs, ones_s], 1), torch.cat([ft, ones_t], 1)
    k_ss, k_ts = fs1 @ fs1.T, ft1 @ fs1.T
    alpha = torch.linalg.solve(k_ss + lam * torch.eye(fs.shape[0], dtype=F64), ys)
    return ((k_ts @ alpha - yt) ** 2).mean()


def test_gradients_reach_images_and_targets_through_a_network() -> None:
    with seeded(0):
        net = create_model("convnet", num_outputs=4, in_channels=1, image_size=8, widths=[2], norm="batch")
    net = net.double().eval()
    x_syn = randn(5, 1, 8, 8, seed=1).requires_grad_(True)
    x_real = randn(7, 1, 8, 8, seed=2)
    y_syn = randn(5, 3, seed=3).requires_grad_(True)
    y_real = f32_exact(7, 3, seed=4)
    # A moderate ridge, so that the ridge term matters; lambda carries no gradient in the code, so the finite
    # differences below hold it at its value at the base point (computed here from the features by hand).
    ridge = 1e-3
    real_features = net.features(x_real).detach()
    loss = krr_outer_loss(net.features(x_syn), real_features, y_syn, y_real, ridge)
    loss.backward()
    assert x_syn.grad is not None and y_syn.grad is not None
    assert x_syn.grad.abs().sum() > 0 and y_syn.grad.abs().sum() > 0

    with torch.no_grad():
        feats0 = net.features(x_syn)
        lam0 = ridge * float((feats0 ** 2).sum() + feats0.shape[0])  # trace of [F, 1][F, 1]^T

        def loss_at(x: torch.Tensor, y: torch.Tensor) -> float:
            return float(torch_loss_fixed_lambda(net.features(x), real_features, y, y_real, lam0))

        assert loss_at(x_syn, y_syn) == pytest.approx(float(loss), rel=1e-10)
        h = 1e-6
        for pixel in [(0, 0, 0, 0), (2, 0, 3, 5), (4, 0, 7, 7), (1, 0, 4, 2)]:
            plus, minus = x_syn.detach().clone(), x_syn.detach().clone()
            plus[pixel] += h
            minus[pixel] -= h
            fd = (loss_at(plus, y_syn) - loss_at(minus, y_syn)) / (2 * h)
            assert float(x_syn.grad[pixel]) == pytest.approx(fd, rel=1e-5, abs=1e-9), pixel
        for entry in [(0, 0), (1, 2), (3, 1), (4, 2)]:
            plus, minus = y_syn.detach().clone(), y_syn.detach().clone()
            plus[entry] += h
            minus[entry] -= h
            fd = (loss_at(x_syn, plus) - loss_at(x_syn, minus)) / (2 * h)
            assert float(y_syn.grad[entry]) == pytest.approx(fd, rel=1e-5, abs=1e-9), entry


# ---- the Cholesky solve and its jitter fall-back ----------------------------------------------------------


def test_ridge_solve_positive_definite_needs_no_jitter(caplog: pytest.LogCaptureFixture) -> None:
    f = randn(5, 7, seed=0)
    kernel, rhs = f @ f.T, randn(5, 2, seed=1)
    with caplog.at_level(logging.WARNING, logger="ssdd.methods.kernel_ridge.krr"):
        x, attempts = ridge_solve(kernel, rhs, 1e-2)
    assert attempts == 0
    assert not caplog.records
    lam = 1e-2 * np.trace(kernel.numpy())
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(kernel.numpy() + lam * np.eye(5), rhs.numpy()), rtol=1e-10)


def test_ridge_solve_recovers_a_singular_kernel_with_jitter(caplog: pytest.LogCaptureFixture) -> None:
    # F F^T with two identical rows of F: positive semi-definite with an exact zero eigenvalue; ridge 0 gives no
    # ridge term, so the first factorisation fails and the jitter has to step in.
    f = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 1.0], [0.0, 1.0]], dtype=F64)
    kernel = f @ f.T
    rhs = kernel @ randn(4, 2, seed=0)  # in the range of the kernel, so K x = rhs has exact solutions
    with caplog.at_level(logging.WARNING, logger="ssdd.methods.kernel_ridge.krr"):
        x, attempts = ridge_solve(kernel, rhs, 0.0)
    assert attempts >= 1
    assert torch.isfinite(x).all()
    np.testing.assert_allclose((kernel @ x).numpy(), rhs.numpy(), atol=1e-8)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "Cholesky failed" in messages[0] and "jitter" in messages[0]


def test_ridge_solve_jitter_schedule_by_hand(caplog: pytest.LogCaptureFixture) -> None:
    # diag(1, -1e-14), ridge 0: attempt 0 with no jitter fails; then jitter eps * max(trace, 1) = eps (2.2e-16),
    # 10 eps (2.2e-15) fail; 100 eps = 2.2e-14 makes the second pivot 1.2e-14 > 0: success at attempt 3.
    kernel = torch.diag(torch.tensor([1.0, -1e-14], dtype=F64))
    rhs = torch.tensor([[2.0], [3e-14]], dtype=F64)
    with caplog.at_level(logging.WARNING, logger="ssdd.methods.kernel_ridge.krr"):
        x, attempts = ridge_solve(kernel, rhs, 0.0)
    assert attempts == 3
    jitter = 100 * EPS64
    np.testing.assert_allclose(x.numpy().ravel(), [2.0 / (1 + jitter), 3e-14 / (-1e-14 + jitter)], rtol=1e-9)
    assert f"{jitter:.3g}" in caplog.records[-1].getMessage()
    # with a ridge the schedule starts at lambda = ridge * trace: diag(1, -1e-3), ridge 1e-4 -> lambda 9.99e-5
    # fails, 9.99e-4 fails (pivot -1e-6), 9.99e-3 succeeds at attempt 2.
    kernel = torch.diag(torch.tensor([1.0, -1e-3], dtype=F64))
    x, attempts = ridge_solve(kernel, torch.ones(2, 1, dtype=F64), 1e-4)
    assert attempts == 2
    jitter = 100 * 1e-4 * (1 - 1e-3)
    np.testing.assert_allclose(x.numpy().ravel(), [1 / (1 + jitter), 1 / (-1e-3 + jitter)], rtol=1e-9)


def test_ridge_solve_gives_up_on_an_indefinite_kernel_with_a_clear_error() -> None:
    kernel = torch.diag(torch.tensor([1.0, -1e6], dtype=F64))
    with pytest.raises(FloatingPointError, match="not positive definite even with jitter") as info:
        ridge_solve(kernel, torch.ones(2, 1, dtype=F64), 0.0)
    assert "\n" not in str(info.value)


def test_ridge_solve_error_names_the_largest_jitter_it_tried() -> None:
    # max_tries=6: jitters 0, eps, 10 eps, ..., 1e5 eps were tried; the message must name 1e5 eps, not 1e6 eps.
    kernel = torch.diag(torch.tensor([1.0, -1e6], dtype=F64))
    with pytest.raises(FloatingPointError) as info:
        ridge_solve(kernel, torch.ones(2, 1, dtype=F64), 0.0)
    assert f"jitter {1e5 * EPS64:.3g}" in str(info.value), str(info.value)


def test_ridge_solve_names_a_kernel_with_non_finite_entries_and_the_setting_to_lower() -> None:
    kernel = torch.tensor([[1.0, math.inf], [math.inf, 1.0]], dtype=F64)
    with pytest.raises(FloatingPointError) as info:
        ridge_solve(kernel, torch.ones(2, 1, dtype=F64), 1e-6)
    assert str(info.value) == ("KRR: the kernel has non-finite entries, so a network's features overflowed "
                               "(the kernel-ridge family: lower settings.pool.lr)")
