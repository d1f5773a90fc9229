"""Feature-mean matching: a distillation method written outside ssdd (the walk-through of docs/extending.md).

The set starts from random real images; every step draws a batch of real images and moves the learned images so
that the mean of their teacher features meets the batch's.  The set stores the images with the teacher's features
of them as targets, so every representation protocol evaluates it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssdd.budget import Budget
from ssdd.device import make_generator
from ssdd.distilled import DistilledSet
from ssdd.errors import ConfigError
from ssdd.methods import DistillContext
from ssdd.methods.base import ImageLearningMethod
from ssdd.selection import select_random


@dataclass
class FeatureMeanSettings:
    """The method's settings: ``--set settings.steps=50``, or ``settings:`` in a config file."""

    steps: int = 100
    lr: float = 0.1
    real_batch: int = 64

    def __post_init__(self) -> None:
        if self.steps < 1 or self.real_batch < 1 or self.lr <= 0:
            raise ConfigError("steps and real_batch must be >= 1 and lr > 0")


class FeatureMean(ImageLearningMethod):
    """Learned images whose mean teacher feature follows the real images' (see the module docstring)."""

    settings_class = FeatureMeanSettings

    def __init__(self, settings: FeatureMeanSettings, context: DistillContext, budget: Budget):
        super().__init__(settings, context, budget)
        teacher = context.teacher
        c, h, w = context.image_shape
        self.plan = budget.plan(budget.value_bytes(c * h * w + teacher.feature_dim))  # an image and its target
        self.real = context.normalized_source()
        if self.plan.count > len(self.real):
            raise ConfigError(f"the budget asks for {self.plan.count} images; the source has {len(self.real)}")
        start = select_random(self.plan.count, len(self.real), context.seed)
        self.images = self.real[start].clone().to(context.device).requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.images], lr=settings.lr)
        self.generator = make_generator(context.seed + 1)  # the real batches; saved and restored with the state

    def total_steps(self) -> int:
        return self.settings.steps

    def step(self, step: int) -> dict[str, float]:
        rows = torch.randint(0, len(self.real), (self.settings.real_batch,), generator=self.generator)
        teacher = self.context.teacher
        with torch.no_grad():
            real_mean = teacher(self.real[rows].to(self.context.device)).mean(0)
        loss = (teacher(self.images).mean(0) - real_mean).pow(2).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def distilled_set(self) -> DistilledSet:
        images = self.images.detach()
        return self.make_set({"images": images, "targets": self.context.teacher.represent(images)}, "representation",
                             {"targets": "the teacher's features of the learned images"})
