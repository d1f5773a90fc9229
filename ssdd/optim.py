"""Optimisers and learning-rate schedules shared by every training loop."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from ssdd.errors import ConfigError


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al., 2017).

    Parameters with one dimension (biases, norm scales) get neither weight decay nor the trust ratio, as in
    the SSL recipes that use LARS.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if p.ndim > 1:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = p.norm(), grad.norm()
                    trust = torch.where((p_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * p_norm / (g_norm + group["eps"]),
                                        torch.ones_like(p_norm))
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def make_optimizer(name: str, modules: nn.Module | list[nn.Module], lr: float, weight_decay: float,
                   momentum: float = 0.9, decay_1d: bool = False) -> torch.optim.Optimizer:
    """``sgd`` | ``lars`` | ``adamw``; one-dimensional parameters (biases, norms) are weight-decayed only with
    ``decay_1d`` (as ``torch.optim`` does given ``model.parameters()``, and the released KRR-ST and SRe2L code)."""
    modules = modules if isinstance(modules, list) else [modules]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1 or decay_1d]
    no_decay = [p for p in params if p.ndim <= 1 and not decay_1d]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ConfigError(f"unknown optimizer {name!r}; use sgd, lars or adamw")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final_fraction: float = 0.0) -> float:
    """Multiplier of the base learning rate: linear warm-up, then cosine decay to ``final_fraction``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
