"""What the labelled image-learning methods (DM, DC, DSA) share: class-balanced synthetic images initialised from
real images of each class, fixed hard labels, SGD with momentum on the images, and the artefact they make."""

from __future__ import annotations

from typing import Any

import torch

from ssdd.budget import Budget
from ssdd.data.augment import siamese_dsa
from ssdd.data.dataset import NormalizedImages
from ssdd.data.transforms import PixelSpace
from ssdd.device import draw_seed, make_generator
from ssdd.distilled import DistilledSet
from ssdd.errors import ConfigError
from ssdd.methods.base import DistillContext, ImageLearningMethod


class ClassBalancedImages(ImageLearningMethod):
    """Base of methods that learn ``ipc`` images per class with fixed hard labels.

    The settings must have ``lr_images`` and ``momentum``. Subclasses implement :meth:`step`, using
    :meth:`real_batch` (real images of one class) and :meth:`synthetic` (the learned images of one class).
    """

    needs_teacher = False

    def __init__(self, settings: Any, context: DistillContext, budget: Budget, name: str):
        super().__init__(settings, context, budget)
        source, teacher = context.source, context.teacher
        if source.num_classes < 2:
            raise ConfigError(f"{name} learns class-conditional images; {source.name} has no labels")
        self.classes = source.num_classes
        self.pixel_space = teacher.pixel_space if teacher is not None else PixelSpace.of(source.images)
        shape = teacher.input_shape if teacher is not None else source.image_shape
        self.real = NormalizedImages(source, self.pixel_space, context.device, shape)
        self.members = source.class_indices()
        c, h, w = shape
        self.plan = budget.plan_per_class(budget.value_bytes(c * h * w, labels=1), self.classes, name)
        self.ipc = self.plan.per_class
        too_few = [k for k, rows in enumerate(self.members) if rows.numel() < self.ipc]
        if too_few:
            raise ConfigError(f"class {too_few[0]} has fewer than the {self.ipc} images per class asked")
        gen = make_generator(context.seed)
        chosen = torch.cat([rows[torch.randperm(rows.numel(), generator=gen)[: self.ipc]] for rows in self.members])
        self.name = name
        self.initial_indices = chosen
        self.images = self.real[chosen].clone().requires_grad_(True)
        self.image_labels = source.labels[chosen].clone()
        self.optimizer = torch.optim.SGD([self.images], lr=settings.lr_images, momentum=settings.momentum)
        self.generator = make_generator(context.seed + 2)
        self.image_shape = shape

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
        dtype = self.budget.torch_dtype
        return DistilledSet({"images": self.images.detach().cpu().to(dtype), "labels": self.image_labels.clone()},
                            self.pixel_space, "hard-label", self.name,
                            {"num_classes": self.classes, "ipc": self.ipc,
                             "initial_indices": self.initial_indices.tolist()})
