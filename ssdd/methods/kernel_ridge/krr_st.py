"""KRR-ST (Lee et al., ICLR 2024): kernel ridge regression onto a self-supervised teacher's representations.

Learned: N synthetic images X_s and their target representations Y_s, initialised from N random real images and
the teacher's features of them, trained by the family's outer loop (:mod:`ssdd.methods.kernel_ridge.base`).

Speed: the teacher's features of the real views come from the feature cache (``teacher_copies`` fixed crop+flip
copies of the source; ``0`` runs the teacher on every batch for exact random augmentation), real features are
computed without autograd, and the synthetic set goes through the member once forward and once backward for the
outer loss (plus the member's own online step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssdd.budget import Budget
from ssdd.data.mapped import read_rows
from ssdd.distilled import DistilledSet
from ssdd.errors import ConfigError
from ssdd.methods.base import METHODS, DistillContext
from ssdd.methods.kernel_ridge.base import KernelRidgeMethod, KernelRidgeSettings
from ssdd.teachers.features import teacher_features


@dataclass
class KRRSTSettings(KernelRidgeSettings):
    """KRR-ST's settings (those of the family; the defaults are the paper's CIFAR-100 values)."""


@METHODS.register("krr-st")
class KRRST(KernelRidgeMethod):
    """Kernel ridge regression onto self-supervised targets; images and targets learned by AdamW."""

    settings_class = KRRSTSettings

    def __init__(self, settings: KRRSTSettings, context: DistillContext, budget: Budget):
        super().__init__(settings, context, budget)
        teacher, source = context.teacher, context.source
        c, h, w = self.image_shape
        self.plan = budget.plan_values(c * h * w + teacher.feature_dim)
        self.num_images = self.plan.count
        if self.num_images > len(source):
            raise ConfigError(f"the budget asks for {self.num_images} images but {source.name} has {len(source)}")
        chosen = self.initial_selection(self.num_images)
        images = self.real.images_at(chosen).float().div(255.0)
        targets = read_rows(teacher_features(teacher, source, device=context.device), chosen).float()
        self.learn(settings.lr_images, images=teacher.pixel_space.normalize(images))
        self.learn(settings.lr_targets, targets=targets)
        self.initial_indices = chosen
        self.start_tracking()

    def inner_set(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.learned["images"], self.learned["targets"]

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {"images": self.learned["images"], "targets": self.learned["targets"]}

    def distilled_set(self) -> DistilledSet:
        return self.kernel_set({"initial_indices": self.initial_indices.tolist()})
