"""Choosing real images: random, herding, k-center and high-loss selection (coresets and baselines)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssdd.device import device_batches, make_generator
from ssdd.errors import ConfigError


def _check(n: int, available: int) -> None:
    if not 1 <= n <= available:
        raise ConfigError(f"cannot select {n} images out of {available}")


def select_random(n: int, available: int, seed: int) -> torch.Tensor:
    """``n`` distinct indices drawn uniformly with a seeded generator."""
    _check(n, available)
    return torch.randperm(available, generator=make_generator(seed))[:n]


@torch.no_grad()
def select_herding(features: torch.Tensor, n: int) -> torch.Tensor:
    """Herding (Welling, 2009): greedily add the point that brings the selection's mean closest to the data mean."""
    _check(n, features.shape[0])
    x = features.double()
    target = x.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(x.shape[0], dtype=torch.bool)
    for k in range(1, n + 1):
        # mean after adding x_i: (running + x_i) / k; pick argmin of its distance to the target mean
        distance = ((running + x) / k - target).pow(2).sum(1)
        distance[~available] = float("inf")
        i = int(distance.argmin())
        chosen.append(i)
        available[i] = False
        running += x[i]
    return torch.tensor(chosen, dtype=torch.long)


@torch.no_grad()
def select_kcenter(features: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Greedy k-center (farthest-first traversal) from a seeded random first center, Euclidean distance."""
    _check(n, features.shape[0])
    x = features.float()
    first = int(torch.randint(x.shape[0], (1,), generator=make_generator(seed)))
    chosen = [first]
    nearest = (x - x[first]).pow(2).sum(1)
    for _ in range(n - 1):
        i = int(nearest.argmax())
        chosen.append(i)
        nearest = torch.minimum(nearest, (x - x[i]).pow(2).sum(1))
    return torch.tensor(chosen, dtype=torch.long)


def select_top_loss(per_image_loss: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` images with the highest loss (MKDT's high-loss initialisation)."""
    _check(n, per_image_loss.shape[0])
    return per_image_loss.topk(n).indices


@torch.no_grad()
def per_image_mse(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, device: torch.device | str,
                  batch_size: int = 1024) -> torch.Tensor:
    """MSE of ``model``'s outputs against ``targets`` for each image (averaged over the target dimension)."""
    model.eval()
    out = []
    for start, batch in zip(range(0, images.shape[0], batch_size), device_batches(images, batch_size, device)):
        pred = model(batch).float().cpu()
        out.append(F.mse_loss(pred, targets[start : start + batch_size], reduction="none").mean(1))
    return torch.cat(out)
