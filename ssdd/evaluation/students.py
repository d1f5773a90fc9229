"""How a protocol makes its student from a set: pre-trained by MSE on the set's representations
(:func:`pretrained_student`), or trained from scratch on its labels with the loss and temperature the set records
(:func:`label_trained_student`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ssdd.distilled import DistilledSet
from ssdd.models import Backbone
from ssdd.training import build_student, train_network


@dataclass
class StudentJob:
    """One student to make: the entry's set, architecture and seed, and the evaluation's settings."""

    name: str  # the entry's row name
    distilled: DistilledSet
    arch: str
    arch_args: dict[str, Any]
    seed: int
    image_shape: tuple[int, int, int]
    config: Any  # the EvaluationConfig
    device: torch.device
    progress: bool
    full: bool = False  # the ``full`` baseline (trained for ``full_epochs``)
    labeller: Callable[[torch.Tensor], torch.Tensor] | None = None  # soft labels of each augmented batch


def pretrained_student(job: StudentJob) -> Backbone:
    """MSE pre-training on the set's representation targets, at the set's learned lr when it has one (and
    ``use_learned_lr``)."""
    cfg, distilled = job.config, job.distilled
    settings = cfg.pretrain
    if job.full and cfg.full_epochs is not None:
        settings = replace(settings, epochs=cfg.full_epochs, steps=0)
    if cfg.use_learned_lr and distilled.learned_lr is not None:
        settings = replace(settings, lr=distilled.learned_lr)
    images, targets = distilled.materialize()
    model = build_student(job.arch, job.arch_args, targets.shape[1], job.image_shape, job.seed)
    return train_network(model, images, targets, settings, "mse", job.seed, job.device,
                         desc=f"pre-train {job.name} {job.arch} seed {job.seed}", progress=job.progress)


def label_trained_student(job: StudentJob) -> Backbone:
    """A student trained from scratch on the set's labels with the set's :attr:`~DistilledSet.label_loss`, at its
    recorded temperature (when ``use_set_temperature``), relabelled on the fly by ``labeller`` when given."""
    cfg, distilled = job.config, job.distilled
    images, targets = distilled.materialize()
    model = build_student(job.arch, job.arch_args, distilled.num_classes, job.image_shape, job.seed)
    temperature = cfg.temperature
    if cfg.use_set_temperature and distilled.temperature is not None:
        temperature = distilled.temperature
    settings = cfg.relabel.train if job.labeller is not None else cfg.supervised
    return train_network(model, images, targets, settings, distilled.label_loss, job.seed, job.device,
                         temperature=temperature, desc=f"{job.name} {job.arch} seed {job.seed}",
                         progress=job.progress, labeller=job.labeller)
