"""Read-outs of frozen features: cosine kNN and L-BFGS logistic regression (the linear probe)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ssdd.data.dataset import ImageDataset
from ssdd.data.transforms import PixelSpace
from ssdd.device import device_batches


@torch.no_grad()
def extract_features(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    pixel_space: PixelSpace,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    bar: Any = None,
) -> torch.Tensor:
    """Features (N, d) of uint8 images, normalised into ``pixel_space`` batch by batch, returned on the CPU in
    float32 (``bar``: a tqdm bar advanced by each batch's images)."""
    out = []
    for batch in device_batches(images, batch_size, device):
        out.append(encoder(pixel_space.normalize(batch)).float().flatten(1).cpu())
        if bar is not None:
            bar.update(batch.shape[0])
    return torch.cat(out)


@torch.no_grad()
def dataset_features(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    dataset: ImageDataset,
    pixel_space: PixelSpace,
    indices: torch.Tensor | None = None,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    bar: Any = None,
) -> torch.Tensor:
    """:func:`extract_features` of ``dataset``'s images at ``indices`` (default: all), a memory-mapped dataset's
    read batch by batch through :meth:`ImageDataset.batches`."""
    if not dataset.mapped:
        images = dataset.images if indices is None else dataset.images[indices]
        return extract_features(encoder, images, pixel_space, batch_size, device, bar)
    out = []
    for batch in dataset.batches(batch_size, indices):
        out.append(encoder(pixel_space.normalize(batch.to(device))).float().flatten(1).cpu())
        if bar is not None:
            bar.update(batch.shape[0])
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> float:
    """Top-1 (%) of a cosine kNN classifier whose neighbours vote with weights exp(similarity / temperature)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start : start + chunk]).sum().item()
    return 100.0 * correct / test.shape[0]


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS on ``mean CE + l2/2 * ||W||^2``; returns (W, b)."""
    x = features.double()
    y = labels.long()
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    l2: float = 1e-3,
    max_iter: int = 200,
) -> float:
    """Top-1 (%) of logistic regression on features standardised with the labelled (train) set's statistics."""
    mean = train_features.float().mean(0)
    std = train_features.float().std(0, unbiased=False).clamp_min(1e-6)
    train = (train_features.float() - mean) / std
    test = (test_features.float() - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight, bias = fit_logistic_regression(train, train_labels, num_classes, l2=l2, max_iter=max_iter)
    predictions = (test.double() @ weight + bias).argmax(1)
    return 100.0 * (predictions == test_labels).float().mean().item()


def label_fraction(num_images: int, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a seeded random ``fraction`` of ``num_images`` labelled images (at least one)."""
    count = max(1, round(num_images * fraction))
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_images, generator=gen)[:count]
