"""Kernel ridge regression with the features of a network as the kernel, as KRR-ST, PAA and FRePo use it.

With F_s = [f(X_s), 1] and F_t = [f(X_t), 1] (a bias column appended), K_ss = F_s F_s^T, K_ts = F_t F_s^T and
lambda = ridge * trace(K_ss) (a constant, no gradient), the prediction for the real batch is

    K_ts (K_ss + lambda I)^-1 Y_s,

computed with a Cholesky factorisation and triangular solves, never an explicit inverse.  When the factorisation
fails (a kernel that is numerically not positive definite), the solve retries with a growing jitter and says so.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def with_bias_column(features: torch.Tensor) -> torch.Tensor:
    """[features, 1]: a constant feature so the regression has an intercept."""
    return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)


def ridge_solve(kernel: torch.Tensor, rhs: torch.Tensor, ridge: float, max_tries: int = 6) -> tuple[torch.Tensor, int]:
    """(K + lambda I)^-1 rhs with lambda = ridge * trace(K) (detached), by Cholesky.

    Returns the solution and how many times the jitter was raised (0 when the first factorisation held).
    """
    n = kernel.shape[0]
    if not bool(torch.isfinite(kernel).all()):
        raise FloatingPointError("KRR: the kernel has non-finite entries, so a network's features overflowed "
                                 "(the kernel-ridge family: lower settings.pool.lr)")
    lam = ridge * torch.trace(kernel).detach()
    eye = torch.eye(n, dtype=kernel.dtype, device=kernel.device)
    jitter = lam
    for attempt in range(max_tries + 1):
        if attempt:
            if jitter > 0:
                jitter = jitter * 10
            else:
                jitter = torch.finfo(kernel.dtype).eps * max(float(torch.trace(kernel).detach()), 1.0)
        chol, info = torch.linalg.cholesky_ex(kernel + jitter * eye)
        if int(info) == 0:
            if attempt:
                log.warning("KRR: Cholesky failed; solved with jitter %.3g (ridge term %.3g)", float(jitter),
                            float(lam))
            return torch.cholesky_solve(rhs, chol), attempt
    raise FloatingPointError(f"KRR: kernel matrix not positive definite even with jitter {float(jitter):.3g}")


class KernelRegression(NamedTuple):
    """One kernel ridge regression: the bias-augmented features, K_ss, lambda and the prediction for the real batch
    (K_ts, which the prediction never forms, on demand)."""

    features_syn: torch.Tensor  # F_s = [f(X_s), 1]
    features_real: torch.Tensor  # F_t = [f(X_t), 1]
    kernel_syn_syn: torch.Tensor  # K_ss = F_s F_s^T
    ridge_lambda: torch.Tensor  # ridge * trace(K_ss), detached
    prediction: torch.Tensor  # K_ts (K_ss + lambda I)^-1 Y_s

    @property
    def kernel_real_syn(self) -> torch.Tensor:
        return self.features_real @ self.features_syn.T


def krr_fit(features_syn: torch.Tensor, features_real: torch.Tensor, targets_syn: torch.Tensor,
            ridge: float = 1e-6) -> KernelRegression:
    """Kernel ridge regression of ``targets_syn`` on the synthetic features, evaluated at the real features.

    Both feature matrices get a bias column here; the solve runs in float32 at least (float64 stays float64).
    """
    dtype = torch.promote_types(features_syn.dtype, torch.float32)
    fs = with_bias_column(features_syn.to(dtype))
    ft = with_bias_column(features_real.to(dtype))
    kernel = fs @ fs.T
    alpha, _ = ridge_solve(kernel, targets_syn.to(dtype), ridge)
    return KernelRegression(fs, ft, kernel, ridge * torch.trace(kernel).detach(), ft @ (fs.T @ alpha))


def krr_predict(features_syn: torch.Tensor, features_real: torch.Tensor, targets_syn: torch.Tensor,
                ridge: float = 1e-6) -> torch.Tensor:
    """The prediction of :func:`krr_fit`."""
    return krr_fit(features_syn, features_real, targets_syn, ridge).prediction


def krr_outer_loss(features_syn: torch.Tensor, features_real: torch.Tensor, targets_syn: torch.Tensor,
                   targets_real: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """KRR-ST's outer objective: MSE between the KRR prediction for the real batch and its teacher targets."""
    prediction = krr_predict(features_syn, features_real, targets_syn, ridge)
    return F.mse_loss(prediction, targets_real.to(prediction.dtype))
