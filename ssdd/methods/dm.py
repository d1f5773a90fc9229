"""DM, distribution matching (Zhao & Bilen, WACV 2023): class-balanced synthetic images whose mean embedding under
randomly initialised networks matches that of real images of the same class.

Each iteration draws a fresh network (``arch``, new random weights), and for every class a batch of ``real_batch``
real images of that class; real and synthetic images of a class go through the same sampled DSA transform
(siamese augmentation), and the loss sums ||mean f(real) - mean f(syn)||^2 over the classes.  Images are learned by
SGD with momentum; labels are fixed hard labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ssdd.errors import ConfigError
from ssdd.evaluation.training import build_student
from ssdd.methods.base import METHODS, Budget, DistillContext
from ssdd.methods.labelled import ClassBalancedImages


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

    def __init__(self, settings: DMSettings, context: DistillContext, budget: Budget):
        super().__init__(settings, context, budget, "dm")

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
