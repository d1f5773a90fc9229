"""What the labelled image-learning methods (DM, DC, DSA) share: class-balanced synthetic images initialised from
real images of each class, fixed hard labels, SGD with momentum on the images, and the artefact they make."""

from __future__ import annotations

from typing import Any

import torch

from ssdd.budget import Budget
from ssdd.data.augment import siamese_dsa
from ssdd.data.dataset import NormalizedImages
from ssdd.device import draw_seed, make_generator
from ssdd.distilled import DistilledSet
from ssdd.errors import ConfigError
from ssdd.methods.base import DistillContext, ImageLearningMethod
from ssdd.selection import select_per_class


class ClassBalancedImages(ImageLearningMethod):
    """Base of methods that learn ``ipc`` images per class with fixed hard labels.

    The settings must have ``lr_images`` and ``momentum``. Subclasses implement :meth:`step`, using
    :meth:`real_batch` (real images of one class) and :meth:`synthetic` (the learned images of one class).
    """

    needs_teacher = False

    def __init__(self, settings: Any, context: DistillContext, budget: Budget):
        super().__init__(settings, context, budget)
        source = context.source
        if source.num_classes < 2:
            raise ConfigError(f"{self.name} learns class-conditional images; {source.name} has no labels")
        self.classes = source.num_classes
        self.pixel_space = context.pixel_space
        c, h, w = self.image_shape = context.image_shape
        self.real = NormalizedImages(source, self.pixel_space, context.device, self.image_shape)
        self.members = source.class_indices()
        self.plan = budget.plan_per_class(budget.value_bytes(c * h * w, labels=1), self.classes, self.name)
        self.ipc = self.plan.per_class
        gen = make_generator(context.seed)
        chosen = select_per_class(source.labels, self.classes, self.ipc,
                                  lambda members, _: torch.randperm(members.numel(), generator=gen)[: self.ipc],
                                  source.name)
        self.initial_indices = chosen
        self.images = self.real[chosen].clone().requires_grad_(True)
        self.image_labels = source.labels[chosen].clone()
        self.optimizer = torch.optim.SGD([self.images], lr=settings.lr_images, momentum=settings.momentum)
        self.generator = make_generator(context.seed + 2)

    def real_batch(self, c: int, size: int) -> torch.Tensor:
        """``size`` real images of class ``c`` drawn with replacement, on the run's device."""
        rows = self.members[c]
        picks = rows[torch.randint(0, rows.numel(), (size,), generator=self.generator)]
        return self.real[picks]

    def synthetic(self, c: int) -> torch.Tensor:
        """The learned images of class ``c`` (a view of the learned tensor)."""
        return self.images[c * self.ipc : (c + 1) * self.ipc]

    def siamese(self, real: torch.Tensor, synthetic: torch.Tensor, dsa: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """With ``dsa``: one sampled DSA transform applied to both batches (siamese augmentation)."""
        return siamese_dsa(real, synthetic, self.generator) if dsa else (real, synthetic)

    def new_network_seed(self) -> int:
        return draw_seed(self.generator)

    def distilled_set(self) -> DistilledSet:
        return self.make_set({"images": self.images, "labels": self.image_labels.clone()}, "hard-label",
                             {"num_classes": self.classes, "ipc": self.ipc,
                              "initial_indices": self.initial_indices.tolist()})
