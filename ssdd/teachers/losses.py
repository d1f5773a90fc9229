"""Self-supervised losses and projector heads, usable on their own.

Both losses take the projections of two views, ``z1`` and ``z2`` of shape (N, D), where row i of each is a view
of the same image.  Under ``torch.distributed`` they gather the projections of every rank first (with gradients
flowing back to each rank's own rows), so a multi-process run computes the loss of the global batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssdd.distributed import world


def _full_precision(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather both views and lift half-precision projections to float32 (float64 stays float64)."""
    z1, z2 = gather_batch(z1), gather_batch(z2)
    if z1.dtype in (torch.float16, torch.bfloat16):
        z1, z2 = z1.float(), z2.float()
    return z1, z2


def gather_batch(z: torch.Tensor) -> torch.Tensor:
    """All rows of ``z`` from every rank (a no-op for a single process)."""
    if world().size == 1:
        return z
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z), dim=0)


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins: sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2.

    C is the cross-correlation of the two views' projections, each standardised over the batch (biased
    variance, as a BatchNorm without affine parameters does).
    """

    def __init__(self, lambda_offdiag: float = 5e-3, eps: float = 1e-5):
        super().__init__()
        self.lambda_offdiag = lambda_offdiag
        self.eps = eps

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z1, z2 = _full_precision(z1, z2)
        n = z1.shape[0]
        z1 = (z1 - z1.mean(0)) / (z1.var(0, unbiased=False) + self.eps).sqrt()
        z2 = (z2 - z2.mean(0)) / (z2.var(0, unbiased=False) + self.eps).sqrt()
        c = z1.T @ z2 / n
        on_diag = (1 - torch.diagonal(c)).pow(2).sum()
        off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        return on_diag + self.lambda_offdiag * off_diag


class NTXentLoss(nn.Module):
    """SimCLR's normalised-temperature cross entropy over the 2N views (2N - 2 negatives per positive pair)."""

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z1, z2 = _full_precision(z1, z2)
        n = z1.shape[0]
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        logits = z @ z.T / self.temperature
        logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, targets)


def make_projector(in_dim: int, dims: list[int] | tuple[int, ...]) -> nn.Sequential:
    """MLP projector: (Linear, BatchNorm1d, ReLU) for each hidden layer, then a bias-free Linear."""
    layers: list[nn.Module] = []
    prev = in_dim
    for i, dim in enumerate(dims):
        last = i == len(dims) - 1
        layers.append(nn.Linear(prev, dim, bias=not last))
        if not last:
            layers += [nn.BatchNorm1d(dim), nn.ReLU()]
        prev = dim
    return nn.Sequential(*layers)


SSL_LOSSES = {"barlow-twins": BarlowTwinsLoss, "simclr": NTXentLoss}
