"""DC, dataset condensation with gradient matching (Zhao, Mopuri & Bilen, ICLR 2021), and DSA, DC with
differentiable siamese augmentation (Zhao & Bilen, ICML 2021).

One engine step is one outer iteration: a freshly initialised network; then ``outer_loop`` times: for every class,
the gradient of the cross-entropy on a real batch of that class and on the class's synthetic images are compared
layer by layer (:func:`gradient_distance`), the summed distance updates the images (SGD with momentum), and the
network is trained ``inner_loop`` SGD steps on the whole synthetic set. DSA applies one sampled transform to the
real and the synthetic batch of a class (and augments the inner training the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ssdd.data.augment import DSAConfig, apply_dsa, sample_dsa_params
from ssdd.errors import ConfigError
from ssdd.methods.base import METHODS
from ssdd.methods.feature_matching.labelled import ClassBalancedImages
from ssdd.training import build_student


@dataclass
class GradientMatchingSettings:
    """DC's settings; defaults are the paper's CIFAR-10 values at 10 images per class (1,000 outer iterations,
    10 matching steps each with 50 network steps between them, images by SGD lr 0.1 momentum 0.5, network by SGD
    lr 0.01, real batches of 256 per class, ConvNet-3 of width 128)."""

    iterations: int = 1000
    outer_loop: int = 10
    inner_loop: int = 50
    lr_images: float = 0.1
    momentum: float = 0.5
    lr_net: float = 0.01
    real_batch: int = 256
    arch: str = "convnet3"
    arch_args: dict[str, Any] = field(default_factory=lambda: {"width": 128})
    dsa: bool = False

    def __post_init__(self) -> None:
        if min(self.iterations, self.outer_loop, self.real_batch) < 1 or self.inner_loop < 0:
            raise ConfigError("iterations, outer_loop and real_batch must be >= 1 and inner_loop >= 0")
        if self.lr_images <= 0 or self.lr_net <= 0 or not 0 <= self.momentum < 1:
            raise ConfigError("lr_images and lr_net must be > 0 and momentum in [0, 1)")


def gradient_distance(real: list[torch.Tensor], synthetic: list[torch.Tensor]) -> torch.Tensor:
    """DC's layer-wise distance: for every parameter with more than one dimension, the sum over its output units
    (rows of the parameter reshaped to ``(out, -1)``) of 1 - cos(real row, synthetic row); 1-D parameters (biases,
    normalisation scales) are skipped, as in the paper."""
    total = torch.zeros((), device=synthetic[0].device if synthetic else "cpu")
    for g_real, g_syn in zip(real, synthetic, strict=True):
        if g_syn.dim() < 2:
            continue
        a, b = g_real.reshape(g_real.shape[0], -1), g_syn.reshape(g_syn.shape[0], -1)
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-6)
        total = total + (1 - cos).sum()
    return total


def class_gradient(network: torch.nn.Module, images: torch.Tensor, c: int, params: list[torch.Tensor],
                   differentiable: bool) -> list[torch.Tensor]:
    """The gradient of the cross-entropy of ``images`` (all of class ``c``) with respect to ``params``; with
    ``differentiable`` it keeps the graph back to ``images``, else it is detached."""
    labels = torch.full((images.shape[0],), c, device=images.device)
    grads = torch.autograd.grad(F.cross_entropy(network(images), labels), params, create_graph=differentiable)
    return list(grads) if differentiable else [g.detach() for g in grads]


class GradientMatching(ClassBalancedImages):
    """DC / DSA (labelled, class-balanced); ``dsa`` in the settings tells which."""

    settings_class = GradientMatchingSettings

    def total_steps(self) -> int:
        return self.settings.iterations

    def step(self, step: int) -> dict[str, float]:
        s = self.settings
        network = build_student(s.arch, s.arch_args, self.classes, self.image_shape, self.new_network_seed())
        network = network.to(self.context.device).train()
        params = [p for p in network.parameters() if p.requires_grad]
        net_optimizer = torch.optim.SGD(params, lr=s.lr_net)
        losses = []
        for _ in range(s.outer_loop):
            loss = torch.zeros((), device=self.context.device)
            for c in range(self.classes):
                real_c, syn_c = self.siamese(self.real_batch(c, s.real_batch), self.synthetic(c), s.dsa)
                g_real = class_gradient(network, real_c, c, params, differentiable=False)
                g_syn = class_gradient(network, syn_c, c, params, differentiable=True)
                loss = loss + gradient_distance(g_real, g_syn)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
            self.train_network(network, net_optimizer)
        return {"loss": sum(losses) / len(losses), "first_loss": losses[0], "last_loss": losses[-1]}

    def train_network(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """``inner_loop`` SGD steps of the network on the whole (detached) synthetic set, DSA-augmented with DSA."""
        images = self.images.detach()
        labels = self.image_labels.to(self.context.device)
        for _ in range(self.settings.inner_loop):
            batch = images
            if self.settings.dsa:
                batch = apply_dsa(images, sample_dsa_params(images.shape[0], DSAConfig(), self.generator,
                                                             self.context.device))
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(network(batch), labels).backward()
            optimizer.step()


@METHODS.register("dc")
class DC(GradientMatching):
    """Gradient matching (``dsa: true`` adds the siamese augmentation, as the ``dsa`` method does by default)."""


@dataclass
class DSASettings(GradientMatchingSettings):
    """DSA's settings: DC's with the siamese augmentation on (the paper's CIFAR values otherwise)."""

    dsa: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dsa:
            raise ConfigError("method dsa always augments; for gradient matching without augmentation use method dc")


@METHODS.register("dsa")
class DSA(GradientMatching):
    """Gradient matching with differentiable siamese augmentation."""

    settings_class = DSASettings
