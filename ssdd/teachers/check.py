"""The check after an import: feature statistics and a cosine kNN probe on a few thousand source images, next to
the same architecture with random weights, so a wrong stem, a wrong normalisation or a file of untrained weights
shows at once (its kNN is no better than the random network's)."""

from __future__ import annotations

from typing import Any

import torch

from ssdd.data.dataset import ImageDataset
from ssdd.device import make_generator
from ssdd.models import create_model
from ssdd.probes import knn_accuracy
from ssdd.teachers.artefact import Teacher

MARGIN = 5.0  # kNN points above the random network that a trained teacher is expected to clear
KNN_K = 200
SEED = 0


def feature_statistics(features: torch.Tensor) -> dict[str, Any]:
    """Whether every feature is finite, the mean norm, the mean per-dimension std, the fraction of constant
    dimensions and the effective rank (exp of the entropy of the normalised singular values; 1 = collapsed)."""
    finite = bool(torch.isfinite(features).all())
    if not finite:
        return {"finite": False}
    x = features.double()
    std = x.std(0, unbiased=False)
    singular = torch.linalg.svdvals(x - x.mean(0))
    p = singular / singular.sum().clamp_min(1e-300)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {
        "finite": True,
        "norm_mean": round(float(x.norm(dim=1).mean()), 6),
        "std_mean": round(float(std.mean()), 6),
        "constant_fraction": round(float((std <= 1e-6 * std.max().clamp_min(1e-300)).double().mean()), 6),
        "effective_rank": round(float(entropy.exp()), 3),
    }


def _subset(dataset: ImageDataset, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset's images and labels (splits are sorted by class: never ``[:count]``)."""
    chosen = torch.randperm(len(dataset), generator=make_generator(seed))[: min(count, len(dataset))]
    return dataset.batch(chosen), dataset.labels[chosen]


def _knn(teacher: Teacher, memory: tuple[torch.Tensor, torch.Tensor],
         queries: tuple[torch.Tensor, torch.Tensor]) -> tuple[float | None, torch.Tensor]:
    known, asked = teacher.encode(memory[0]), teacher.encode(queries[0])
    if not (torch.isfinite(known).all() and torch.isfinite(asked).all()):
        return None, asked
    k = min(KNN_K, known.shape[0])
    return round(knn_accuracy(known, memory[1], asked, queries[1], k=k), 2), asked


def check_teacher(teacher: Teacher, train: ImageDataset, test: ImageDataset, images: int) -> dict[str, Any]:
    """kNN top-1 (%) of ``teacher`` with ``images`` train images as memory and ``images // 2`` test images as
    queries, the same for the architecture with random weights (seeded), chance, the teacher's feature statistics
    on the queries and a verdict."""
    memory, queries = _subset(train, images, SEED), _subset(test, max(1, images // 2), SEED + 1)
    knn, features = _knn(teacher, memory, queries)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        random = create_model(**teacher.backbone.spec).to(next(teacher.backbone.parameters()).device)
    random_knn, _ = _knn(Teacher(random, teacher.pixel_space, {}), memory, queries)
    if knn is None:
        verdict = "the features are not finite"
    elif random_knn is not None and knn < random_knn + MARGIN:
        verdict = (f"kNN within {MARGIN:g} points of random weights: check the stem, the pixel space and that the "
                   "file holds trained weights")
    else:
        verdict = "ok"
    return {
        "dataset": train.name, "memory_images": len(memory[1]), "query_images": len(queries[1]), "k": KNN_K,
        "knn_top1": knn, "random_weights_knn_top1": random_knn,
        "chance_top1": round(100.0 / max(train.num_classes, 1), 2),
        "features": feature_statistics(features), "verdict": verdict,
    }
