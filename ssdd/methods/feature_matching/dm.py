"""DM, distribution matching (Zhao & Bilen, WACV 2023): class-balanced synthetic images whose mean embedding under
randomly initialised networks matches that of real images of the same class.

Each iteration draws a fresh network (``arch``, new random weights), and for every class a batch of ``real_batch``
real images of that class; real and synthetic images of a class go through the same sampled DSA transform
(siamese augmentation), and the loss sums ||mean f(real) - mean f(syn)||^2 over the classes.  Images are learned by
SGD with momentum; labels are fixed hard labels.

DM-SSL is the naive self-supervised version that MKDT reports as failing: the same engine without labels, so the
whole synthetic set matches the mean embedding of the whole (unlabelled) source, and the set stores the teacher's
representations of its learned images as targets, so that every representation protocol evaluates it like a
KRR-ST or MKDT set of the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ssdd.budget import Budget
from ssdd.data.augment import siamese_dsa
from ssdd.data.dataset import NormalizedImages
from ssdd.device import draw_seed, make_generator
from ssdd.distilled import DistilledSet
from ssdd.errors import ConfigError
from ssdd.methods.base import METHODS, DistillContext, ImageLearningMethod
from ssdd.methods.feature_matching.labelled import ClassBalancedImages
from ssdd.selection import select_random
from ssdd.training import build_student


@dataclass
class DMSettings:
    """DM's settings; the defaults are the paper's CIFAR values (20,000 iterations, SGD lr 1 momentum 0.5, real
    batches of 256 per class, ConvNet-3 of width 128, DSA)."""

    iterations: int = 20_000
    lr_images: float = 1.0
    momentum: float = 0.5
    real_batch: int = 256
    arch: str = "convnet3"
    arch_args: dict[str, Any] = field(default_factory=lambda: {"width": 128})
    dsa: bool = True

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.real_batch < 1 or self.lr_images <= 0 or not 0 <= self.momentum < 1:
            raise ConfigError("iterations and real_batch must be >= 1, lr_images > 0 and momentum in [0, 1)")


def dm_loss(network: torch.nn.Module, real: list[torch.Tensor], synthetic: list[torch.Tensor]) -> torch.Tensor:
    """sum over classes of ||mean features(real_c) - mean features(syn_c)||^2 (real features without autograd)."""
    total = torch.zeros(())
    for real_c, syn_c in zip(real, synthetic):
        with torch.no_grad():
            target = network.features(real_c).mean(0)
        total = total + ((target - network.features(syn_c).mean(0)) ** 2).sum()
    return total


@METHODS.register("dm")
class DM(ClassBalancedImages):
    """Distribution matching with random networks and shared augmentation (labelled, class-balanced)."""

    settings_class = DMSettings

    def total_steps(self) -> int:
        return self.settings.iterations

    def step(self, step: int) -> dict[str, float]:
        s = self.settings
        network = build_student(s.arch, s.arch_args, 0, self.image_shape, self.new_network_seed())
        network = network.to(self.context.device).train().requires_grad_(False)
        real, synthetic = [], []
        for c in range(self.classes):
            real_c, syn_c = self.siamese(self.real_batch(c, s.real_batch), self.synthetic(c), s.dsa)
            real.append(real_c)
            synthetic.append(syn_c)
        loss = dm_loss(network, real, synthetic)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}


@dataclass
class DMSSLSettings(DMSettings):
    """DM-SSL's settings: DM's, with ``real_batch`` real images drawn from the whole source per iteration and
    ``syn_batch`` synthetic images (None: the whole set)."""

    syn_batch: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.syn_batch is not None and self.syn_batch < 1:
            raise ConfigError("syn_batch must be >= 1 (or unset for the whole set)")


@METHODS.register("dm-ssl")
class DMSSL(ImageLearningMethod):
    """Distribution matching without labels; the set's targets are the teacher's representations of its images."""

    settings_class = DMSSLSettings

    def __init__(self, settings: DMSSLSettings, context: DistillContext, budget: Budget):
        super().__init__(settings, context, budget)
        teacher, source = context.teacher, context.source
        self.pixel_space = context.pixel_space
        c, h, w = self.image_shape = context.image_shape
        self.real = NormalizedImages(source, self.pixel_space, context.device, self.image_shape)
        self.plan = budget.plan(budget.value_bytes(c * h * w + teacher.feature_dim))
        count = self.plan.count
        if count > len(source):
            raise ConfigError(f"the budget asks for {count} images but {source.name} has {len(source)}")
        self.initial_indices = select_random(count, len(source), context.seed)
        self.images = self.real[self.initial_indices].clone().requires_grad_(True)
        self.optimizer = torch.optim.SGD([self.images], lr=settings.lr_images, momentum=settings.momentum)
        self.generator = make_generator(context.seed + 2)

    def total_steps(self) -> int:
        return self.settings.iterations

    def step(self, step: int) -> dict[str, float]:
        s, device = self.settings, self.context.device
        network = build_student(s.arch, s.arch_args, 0, self.image_shape, draw_seed(self.generator))
        network = network.to(device).train().requires_grad_(False)
        real = self.real[torch.randint(0, len(self.real), (s.real_batch,), generator=self.generator)]
        synthetic = self.images
        if s.syn_batch is not None and s.syn_batch < len(self.images):
            synthetic = self.images[torch.randperm(len(self.images), generator=self.generator)[: s.syn_batch]]
        if s.dsa:
            real, synthetic = siamese_dsa(real, synthetic, self.generator)
        loss = dm_loss(network, [real], [synthetic])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def distilled_set(self) -> DistilledSet:
        images = self.images.detach()
        return self.make_set({"images": images, "targets": self.context.teacher.represent(images)}, "representation",
                             {"initial_indices": self.initial_indices.tolist(),
                              "targets": "the teacher's representations of the learned images"})
