"""FRePo (Zhou, Nezhadarya & Ba, NeurIPS 2022): neural feature regression with a model pool, on labels.

The kernel-ridge family's outer step (:mod:`.base`, the same :func:`~.krr.krr_outer_loss` as KRR-ST) with class labels
in place of a teacher's representations: the synthetic set is class-balanced images with learnable label vectors
initialised to their one-hot labels, and each real batch is scored against the one-hot labels of its (crop+flip
augmented) images. No teacher is needed; with one, its pixel space and input shape are used.

The stored labels are regression targets (float vectors, not probabilities), so the set records
``label_loss: mse`` and the supervised protocol trains on it with MSE to those vectors, as FRePo's own training
loss is; ``learn_labels: false`` keeps the one-hot labels fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssdd.budget import Budget
from ssdd.data.augment import random_crop_flip
from ssdd.data.transforms import PixelSpace
from ssdd.device import make_generator
from ssdd.distilled import DistilledSet
from ssdd.errors import ConfigError
from ssdd.methods.base import METHODS, DistillContext
from ssdd.methods.kernel_ridge.base import KernelRidgeMethod, KernelRidgeSettings


@dataclass
class FRePoSettings(KernelRidgeSettings):
    """FRePo's settings: the family's (real batches augmented by crop+flip or not at all) and whether the labels
    are learned."""

    learn_labels: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.real_augment not in ("crop-flip", "none"):
            raise ConfigError(f"frepo augments real batches by crop-flip or none, got {self.real_augment!r}")
        if self.init != "random":
            raise ConfigError(f"frepo starts from class-balanced random real images (init: random), not {self.init!r}")


class LabelledBatches:
    """Real batches (normalised, optionally crop+flip augmented) with the one-hot labels of their images."""

    def __init__(self, settings: FRePoSettings, context: DistillContext, pixel_space: PixelSpace,
                 shape: tuple[int, int, int]):
        self.settings = settings
        self.pixel_space = pixel_space
        self.device = context.device
        self.source = context.source.converted(channels=shape[0], size=shape[1])
        self.images = None if self.source.mapped else self.source.images.to(context.device)  # mapped: stays on disk
        self.targets = F.one_hot(self.source.labels, self.source.num_classes).float().to(context.device)

    def images_at(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 source images at ``idx``, on the device (a memory-mapped source's read from its file)."""
        if self.images is None:
            return self.source.batch(idx).to(self.device)
        return self.images[idx.to(self.images.device)]

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.source)
        idx = torch.randint(0, n, (min(self.settings.real_batch, n),), generator=generator)
        x = self.images_at(idx).float().div_(255.0)
        if self.settings.real_augment == "crop-flip":
            x = random_crop_flip(x, generator)
        return self.pixel_space.normalize(x), self.targets[idx.to(self.targets.device)]


@METHODS.register("frepo")
class FRePo(KernelRidgeMethod):
    """Kernel ridge regression onto learnable labels with a model pool (labelled, class-balanced)."""

    settings_class = FRePoSettings
    needs_teacher = False

    def __init__(self, settings: FRePoSettings, context: DistillContext, budget: Budget):
        if context.source.num_classes < 2:
            raise ConfigError(f"frepo regresses class labels; {context.source.name} has none")
        super().__init__(settings, context, budget)
        source, classes = context.source, context.source.num_classes
        c, h, w = self.image_shape
        self.classes = classes
        self.plan = budget.plan_per_class(budget.value_bytes(c * h * w + classes), classes, "frepo")  # soft labels
        self.ipc = self.plan.per_class
        gen = make_generator(context.seed)
        members = [(source.labels == k).nonzero().flatten() for k in range(classes)]
        too_few = [k for k, rows in enumerate(members) if rows.numel() < self.ipc]
        if too_few:
            raise ConfigError(f"class {too_few[0]} has fewer than the {self.ipc} images per class asked")
        chosen = torch.cat([rows[torch.randperm(rows.numel(), generator=gen)[: self.ipc]] for rows in members])
        images = self.real.images_at(chosen).float().div(255.0)
        self.initial_indices = chosen
        self.learn(settings.lr_images, images=self.pixel_space.normalize(images))
        labels = F.one_hot(source.labels[chosen], classes).float()
        if settings.learn_labels:
            self.learn(settings.lr_targets, targets=labels)
        else:
            self.fixed_labels = labels.to(context.device)
        self.start_tracking()

    def target_space(self, context: DistillContext) -> tuple[PixelSpace, tuple[int, int, int], int]:
        return context.pixel_space, context.image_shape, context.source.num_classes

    def real_batches(self, settings: FRePoSettings, context: DistillContext, views: Sequence[str]) -> LabelledBatches:
        return LabelledBatches(settings, context, self.pixel_space, self.image_shape)

    def labels(self) -> torch.Tensor:
        return self.learned["targets"] if self.settings.learn_labels else self.fixed_labels

    def inner_set(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.learned["images"], self.labels()

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {"images": self.learned["images"], "labels": self.labels()}

    def distilled_set(self) -> DistilledSet:
        return self.kernel_set({"initial_indices": self.initial_indices.tolist(), "num_classes": self.classes,
                                "ipc": self.ipc, "label_loss": "mse"}, target_kind="soft-label")
