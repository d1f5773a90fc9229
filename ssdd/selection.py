"""Choosing real images: random, herding, k-center and high-loss selection (coresets, baselines, initial sets),
over a whole source (:func:`select`) or class by class (:func:`select_per_class`).

The high-loss scores (MKDT's selection: the per-image MSE of students trained briefly to regress the teacher) are
cached beside the teacher's feature cache: :func:`high_loss_scores`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ssdd.data.dataset import ImageDataset, NormalizedImages
from ssdd.data.mapped import is_mapped, read_range, read_rows
from ssdd.device import make_generator
from ssdd.errors import ConfigError
from ssdd.teachers.artefact import Teacher
from ssdd.teachers.features import derived_cache_path, read_cached, write_cached
from ssdd.training import TrainSettings, build_student, image_batches, train_network


def _check(n: int, available: int) -> None:
    if not 1 <= n <= available:
        raise ConfigError(f"cannot select {n} images out of {available}")


def select_random(n: int, available: int, seed: int) -> torch.Tensor:
    """``n`` distinct indices drawn uniformly with a seeded generator."""
    _check(n, available)
    return torch.randperm(available, generator=make_generator(seed))[:n]


CHUNK_ROWS = 8192  # feature rows a selection pass reads at a time (a memory-mapped matrix stays on disk)


def _chunks(features: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, features.shape[0], CHUNK_ROWS):
        yield start, read_range(features, start, start + CHUNK_ROWS)


def feature_mean(features: torch.Tensor) -> torch.Tensor:
    """The float64 mean row of ``features``, read a chunk at a time."""
    if features.shape[0] <= CHUNK_ROWS or not is_mapped(features):
        return features.double().mean(0)
    return sum(chunk.double().sum(0) for _, chunk in _chunks(features)) / features.shape[0]


@torch.no_grad()
def select_herding(features: torch.Tensor, n: int) -> torch.Tensor:
    """Herding (Welling, 2009): greedily add the point that brings the selection's mean closest to the data mean.

    Each of the ``n`` steps reads the rows a chunk at a time, so memory holds O(chunk + N) values, never N x N or
    all of a memory-mapped ``features``."""
    _check(n, features.shape[0])
    target = feature_mean(features)
    chosen: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(features.shape[0], dtype=torch.bool)
    for k in range(1, n + 1):
        # mean after adding x_i: (running + x_i) / k; pick argmin of its distance to the target mean
        best, i = float("inf"), -1
        for start, chunk in _chunks(features):
            distance = ((running + chunk.double()) / k - target).pow(2).sum(1)
            distance[~available[start : start + chunk.shape[0]]] = float("inf")
            at = int(distance.argmin())
            if float(distance[at]) < best:
                best, i = float(distance[at]), start + at
        chosen.append(i)
        available[i] = False
        running += read_rows(features, torch.tensor([i]))[0].double()
    return torch.tensor(chosen, dtype=torch.long)


@torch.no_grad()
def select_kcenter(features: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Greedy k-center (farthest-first traversal) from a seeded random first center, Euclidean distance; the
    rows are read a chunk at a time (memory: the N nearest distances and a chunk)."""
    _check(n, features.shape[0])
    first = int(torch.randint(features.shape[0], (1,), generator=make_generator(seed)))
    chosen = [first]
    nearest = torch.empty(features.shape[0])

    def distances(i: int) -> Iterator[tuple[int, torch.Tensor]]:
        center = read_rows(features, torch.tensor([i]))[0].float()
        for start, chunk in _chunks(features):
            yield start, (chunk.float() - center).pow(2).sum(1)

    for start, d in distances(first):
        nearest[start : start + d.shape[0]] = d
    for _ in range(n - 1):
        i = int(nearest.argmax())
        chosen.append(i)
        for start, d in distances(i):
            torch.minimum(nearest[start : start + d.shape[0]], d, out=nearest[start : start + d.shape[0]])
    return torch.tensor(chosen, dtype=torch.long)


SELECTIONS = ("random", "herding", "kcenter")  # the selections that need only the rows of a selection space


def select(selection: str, rows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` of ``rows`` (one per image, in the space the selection measures in) chosen by ``selection``."""
    if selection == "random":
        return select_random(n, rows.shape[0], seed)
    if selection == "herding":
        return select_herding(rows, n)
    if selection == "kcenter":
        return select_kcenter(rows, n, seed)
    raise ConfigError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")


def select_per_class(labels: torch.Tensor, classes: int, per_class: int,
                     pick: Callable[[torch.Tensor, int], torch.Tensor], dataset: str) -> torch.Tensor:
    """``per_class`` images of every class, class by class: ``pick(members, c)`` gives the positions among class
    ``c``'s indices ``members`` (e.g. ``lambda members, c: select("herding", rows[members], per_class, seed)``)."""
    members = [(labels == c).nonzero().flatten() for c in range(classes)]
    for c, rows in enumerate(members):
        if rows.numel() < per_class:
            raise ConfigError(f"class {c} of {dataset} has {rows.numel()} images, fewer than the {per_class} per "
                              "class asked")
    return torch.cat([rows[pick(rows, c)] for c, rows in enumerate(members)])


def select_top_loss(per_image_loss: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` images with the highest loss (MKDT's high-loss initialisation)."""
    _check(n, per_image_loss.shape[0])
    return per_image_loss.topk(n).indices


@torch.no_grad()
def per_image_mse(model: torch.nn.Module, images: torch.Tensor | NormalizedImages, targets: torch.Tensor,
                  device: torch.device | str, batch_size: int = 1024) -> torch.Tensor:
    """MSE of ``model``'s outputs against ``targets`` for each image (averaged over the target dimension)."""
    model.eval()
    out = []
    for start, batch in image_batches(images, batch_size, device):
        pred = model(batch).float().cpu()
        out.append(F.mse_loss(pred, targets[start : start + batch_size], reduction="none").mean(1))
    return torch.cat(out)


@dataclass
class HighLossSettings:
    """MKDT's selection: students trained by MSE to the teacher for ``epochs`` (epoch-1 checkpoints), images
    scored by the students' MSE averaged over ``num_experts`` of them."""

    num_experts: int = 3
    epochs: int = 1
    arch: str = "convnet3"
    arch_args: dict | None = None
    lr: float = 0.1
    batch_size: int = 256


def high_loss_scores(source: ImageDataset, features: torch.Tensor, teacher: Teacher, settings: HighLossSettings,
                     seed: int, device: torch.device) -> torch.Tensor:
    """Per-image MSE of ``num_experts`` students trained ``epochs`` epoch(s) to regress the teacher, averaged.

    Deterministic given the teacher, the source, the settings, the seed and the kind of device, so the scores are
    cached beside the teacher's feature cache and computed once (they cost minutes of training on a CPU)."""
    path = high_loss_cache_path(teacher, source, settings, seed, torch.device(device))
    scores = read_cached(path, "scores", teacher, source)
    if scores is None:
        scores = _train_and_score(source, features, teacher, settings, seed, device)
        write_cached(path, "scores", scores, teacher, source,
                     {"kind": "high-loss-scores", "settings": asdict(settings), "seed": seed})
    return scores


def high_loss_cache_path(teacher: Teacher, source: ImageDataset, settings: HighLossSettings, seed: int,
                         device: torch.device) -> Path | None:
    """Where the high-loss scores of ``source`` are cached (None for a teacher not loaded from a file)."""
    spec = json.dumps({"settings": asdict(settings), "seed": seed, "device": device.type}, sort_keys=True)
    return derived_cache_path(teacher, source, hashlib.sha1(spec.encode()).hexdigest()[:12], prefix="high-loss-")


def _train_and_score(source: ImageDataset, features: torch.Tensor, teacher: Teacher, settings: HighLossSettings,
                     seed: int, device: torch.device) -> torch.Tensor:
    images = NormalizedImages(source, teacher.pixel_space, device)  # a memory-mapped source is read batch by batch
    train = TrainSettings(epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size, cosine=False)
    scores = torch.zeros(len(source))
    for k in range(settings.num_experts):
        expert = build_student(settings.arch, settings.arch_args or {}, features.shape[1], source.image_shape,
                               seed * 1000 + k)
        train_network(expert, images, features, train, "mse", seed * 1000 + k, device, desc=f"expert {k + 1}")
        scores += per_image_mse(expert, images, features, device)
    return scores / settings.num_experts
