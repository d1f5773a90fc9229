"""Training loops the protocols share: MSE pre-training on a set's targets, supervised training, fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ssdd.data.augment import DSAConfig, apply_dsa, random_crop_flip, sample_dsa_params
from ssdd.device import autocast, device_batches, make_generator, seeded
from ssdd.errors import ConfigError, check_finite
from ssdd.models import Backbone, create_model
from ssdd.optim import make_optimizer, set_lr, warmup_cosine


@dataclass
class TrainSettings:
    """One supervised or regression training run: SGD with momentum, cosine schedule, batches of ``batch_size``.

    Its length is ``epochs`` passes over the data, or exactly ``steps`` optimiser steps when ``steps`` > 0 (equal
    compute for sets of different sizes; the batch order is the same as with epochs)."""

    epochs: int = 20
    steps: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256
    augment: str = "none"  # none | crop-flip (4 px random crop + horizontal flip) | dsa (per-image DSA)
    mixup: float = 0.0  # Beta(alpha, alpha) mixup of images and labels when > 0
    cosine: bool = True
    amp: bool = True  # bf16 autocast where native (see ssdd.device.autocast); the loss stays float32
    compile: bool = False  # torch.compile the network for its training steps (worth it for long GPU runs)

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if self.epochs < 0 or self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs and steps must be >= 0, batch_size >= 1 and lr > 0")


AUGMENTATIONS = ("none", "crop-flip", "dsa")
LOSSES = ("mse", "ce", "kl")


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Apply a :class:`TrainSettings` augmentation mode to a normalised batch."""
    if mode == "crop-flip":
        return random_crop_flip(x, generator)
    if mode == "dsa":
        return apply_dsa(x, sample_dsa_params(x.shape[0], DSAConfig(), generator, x.device))
    return x


def batch_loss(out: torch.Tensor, y: torch.Tensor, loss: str, temperature: float) -> torch.Tensor:
    """``mse`` against representations, ``ce`` against hard labels (or probabilities), ``kl`` against soft-label
    logits at ``temperature`` (scaled by T^2)."""
    if loss == "mse":
        return F.mse_loss(out, y)
    if loss == "ce":
        return F.cross_entropy(out, y)
    return F.kl_div(F.log_softmax(out / temperature, 1), F.softmax(y / temperature, 1),
                    reduction="batchmean") * temperature**2


def build_student(arch: str, arch_args: dict, num_outputs: int, image_shape: tuple[int, int, int], seed: int) -> Backbone:
    """A freshly initialised network for ``image_shape`` images, its weights a function of ``seed`` only."""
    c, h, _ = image_shape
    with seeded(seed):
        return create_model(arch, num_outputs=num_outputs, in_channels=c, image_size=h, **arch_args)


def train_network(
    model: Backbone,
    images: torch.Tensor,
    targets: torch.Tensor,
    settings: TrainSettings,
    loss: str,
    seed: int,
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
    desc: str = "training",
    progress: bool = False,
) -> Backbone:
    """Train ``model`` on normalised ``images`` with ``loss`` (see :func:`batch_loss`).

    Batch order, augmentation and mixup all come from ``seed``; nothing touches the global RNG.
    """
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    if settings.mixup > 0 and loss == "mse":
        raise ConfigError("mixup applies to label losses (ce, kl), not to representation regression")
    device = torch.device(device)
    model.to(device).train()
    optimizer = make_optimizer("sgd", model, settings.lr, settings.weight_decay, settings.momentum)
    n = images.shape[0]
    batch = min(settings.batch_size, n)
    steps_per_epoch = -(-n // batch)  # every image once per epoch; the last batch may be smaller...
    if n % batch == 1 and n > 1:
        steps_per_epoch -= 1  # ...but never a single image, which BatchNorm cannot train on
    total = settings.steps or steps_per_epoch * settings.epochs
    forward = torch.compile(model) if settings.compile else model
    images, targets = images.to(device), targets.to(device)  # a distilled set is small: keep it on the device
    gen = make_generator(seed)
    mix_rng = np.random.default_rng(seed)
    step = 0
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    while step < total:
        order = torch.randperm(n, generator=gen)
        for i in range(min(steps_per_epoch, total - step)):
            idx = order[i * batch : (i + 1) * batch].to(device)
            x = images[idx]
            y = targets[idx]
            x = augment_batch(x, settings.augment, gen)
            if settings.cosine:
                set_lr(optimizer, settings.lr * warmup_cosine(step, total, 0))
            mixing = None
            if settings.mixup > 0:
                lam = float(mix_rng.beta(settings.mixup, settings.mixup))
                perm = torch.randperm(x.shape[0], generator=gen).to(device)
                x = lam * x + (1 - lam) * x[perm]
                mixing = (lam, perm)
            with autocast(device, settings.amp):
                out = forward(x).float()
            if mixing is None:
                value = batch_loss(out, y, loss, temperature)
            elif loss == "ce":
                lam, perm = mixing
                value = lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[perm])
            else:  # soft labels: mix the probabilities, then match them
                lam, perm = mixing
                probs = lam * F.softmax(y / temperature, 1) + (1 - lam) * F.softmax(y[perm] / temperature, 1)
                value = F.kl_div(F.log_softmax(out / temperature, 1), probs, reduction="batchmean") * temperature**2
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            step += 1
            bar.update(1)
        check_finite(value.item(), f"{desc}: the loss at step {step}",  # once per epoch: no sync per step
                     f"lower the learning rate ({settings.lr}) in the protocol's settings")
    bar.close()
    return model.eval()


@torch.no_grad()
def top1(model: Backbone, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str = "cpu",
         batch_size: int = 1024) -> float:
    """Top-1 accuracy (%) of ``model``'s head on normalised images."""
    model.eval()
    correct = 0
    for start, batch in zip(range(0, images.shape[0], batch_size), device_batches(images, batch_size, device)):
        correct += (model(batch).argmax(1).cpu() == labels[start : start + batch_size]).sum().item()
    return 100.0 * correct / images.shape[0]
