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

from ssdd.data.augment import DSAConfig, apply_dsa, sample_dsa_params
from ssdd.data.transforms import PixelSpace
from ssdd.device import make_generator
from ssdd.distilled import DistilledSet
from ssdd.errors import ConfigError
from ssdd.evaluation.training import build_student
from ssdd.methods.base import METHODS, Budget, DistillContext, Method, images_per_class


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
class DM(Method):
    """Distribution matching with random networks and shared augmentation (labelled, class-balanced)."""

    settings_class = DMSettings
    needs_teacher = False

    def __init__(self, settings: DMSettings, context: DistillContext, budget: Budget):
        super().__init__(settings, context, budget)
        source, teacher = context.source, context.teacher
        if source.num_classes < 2:
            raise ConfigError(f"dm matches class-conditional distributions; {source.name} has no labels")
        self.classes = source.num_classes
        self.pixel_space = teacher.pixel_space if teacher is not None else PixelSpace.of(source.images)
        shape = teacher.input_shape if teacher is not None else source.image_shape
        images = source.converted(channels=shape[0], size=shape[1]).images
        self.real = self.pixel_space.normalize(images.float().div(255.0))
        self.labels = source.labels
        self.members = [(self.labels == c).nonzero().flatten() for c in range(self.classes)]
        c, h, w = shape
        self.ipc = images_per_class(budget, c * h * w * budget.bytes_per_value + 8, self.classes, "dm")  # int64 labels
        too_few = [k for k, rows in enumerate(self.members) if rows.numel() < self.ipc]
        if too_few:
            raise ConfigError(f"class {too_few[0]} has fewer than the {self.ipc} images per class asked")
        gen = make_generator(context.seed)
        chosen = torch.cat([rows[torch.randperm(rows.numel(), generator=gen)[: self.ipc]] for rows in self.members])
        self.initial_indices = chosen
        self.images = self.real[chosen].clone().to(context.device).requires_grad_(True)
        self.image_labels = self.labels[chosen].clone()
        self.optimizer = torch.optim.SGD([self.images], lr=settings.lr_images, momentum=settings.momentum)
        self.generator = make_generator(context.seed + 2)
        self.image_shape = shape

    def total_steps(self) -> int:
        return self.settings.iterations

    def step(self, step: int) -> dict[str, float]:
        s, device = self.settings, self.context.device
        network_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        network = build_student(s.arch, s.arch_args, 0, self.image_shape, network_seed).to(device).train()
        network.requires_grad_(False)
        real, synthetic = [], []
        for c, rows in enumerate(self.members):
            pick = rows[torch.randint(0, rows.numel(), (s.real_batch,), generator=self.generator)]
            real_c = self.real[pick].to(device)
            syn_c = self.images[c * self.ipc : (c + 1) * self.ipc]
            if s.dsa:  # one sampled transform for both (siamese augmentation)
                params = sample_dsa_params(1, DSAConfig(), self.generator, device)
                real_c, syn_c = apply_dsa(real_c, params), apply_dsa(syn_c, params)
            real.append(real_c)
            synthetic.append(syn_c)
        loss = dm_loss(network, real, synthetic)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images.detach().cpu(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])

    def distilled_set(self) -> DistilledSet:
        dtype = self.budget.torch_dtype
        return DistilledSet({"images": self.images.detach().cpu().to(dtype), "labels": self.image_labels.clone()},
                            self.pixel_space, "hard-label", "dm",
                            {"num_classes": self.classes, "ipc": self.ipc, "initial_indices": self.initial_indices.tolist()})
