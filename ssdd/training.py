"""Student networks and the one training loop: ``build_student`` (a fresh network, its weights a function of the seed),
``train_network`` (MSE pre-training on a set's targets, supervised training on labels or soft labels, fine-tuning)
and ``top1``.  Below both ``methods/`` (experts, squeeze models, monitors) and ``evaluation/`` (the protocols)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ssdd.data.augment import DSAConfig, apply_dsa, random_crop_flip, sample_dsa_params
from ssdd.data.dataset import NormalizedImages
from ssdd.device import autocast, device_batches, make_generator, seeded
from ssdd.errors import ConfigError, check_finite
from ssdd.models import Backbone, create_model
from ssdd.optim import make_optimizer, set_lr, warmup_cosine
from ssdd.progress import progress_bar


@dataclass
class TrainSettings:
    """One supervised or regression training run: SGD with momentum (or AdamW), cosine schedule, batches of
    ``batch_size``.

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
    cutmix: float = 0.0  # Beta(alpha, alpha) CutMix (a box pasted from another image of the batch) when > 0
    optimizer: str = "sgd"  # sgd (with momentum) | adamw
    decay_1d: bool = False  # weight-decay biases and norm parameters too (torch.optim's default on all parameters)
    kl_t_squared: bool = True  # kl: scale by T^2 (Hinton's convention); the released SRe2L / SC-DD relabel does not
    cosine: bool = True
    amp: bool = True  # bf16 autocast where native (see ssdd.device.autocast); the loss stays float32
    compile: bool = False  # torch.compile the network for its training steps (worth it for long GPU runs)

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if self.epochs < 0 or self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs and steps must be >= 0, batch_size >= 1 and lr > 0")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.mixup < 0 or self.cutmix < 0 or (self.mixup > 0 and self.cutmix > 0):
            raise ConfigError("mixup and cutmix are Beta(alpha, alpha) parameters >= 0; use at most one of them")


AUGMENTATIONS = ("none", "crop-flip", "dsa")
LOSSES = ("mse", "ce", "kl")


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Apply a :class:`TrainSettings` augmentation mode to a normalised batch."""
    if mode == "crop-flip":
        return random_crop_flip(x, generator)
    if mode == "dsa":
        return apply_dsa(x, sample_dsa_params(x.shape[0], DSAConfig(), generator, x.device))
    return x


def batch_loss(out: torch.Tensor, y: torch.Tensor, loss: str, temperature: float,
               t_squared: bool = True) -> torch.Tensor:
    """``mse`` against representations, ``ce`` against hard labels (or probabilities), ``kl`` against soft-label
    logits at ``temperature`` (scaled by T^2 unless not ``t_squared``)."""
    if loss == "mse":
        return F.mse_loss(out, y)
    if loss == "ce":
        return F.cross_entropy(out, y)
    return soft_label_loss(out, F.softmax(y / temperature, 1), temperature, t_squared)


def soft_label_loss(out: torch.Tensor, probabilities: torch.Tensor, temperature: float,
                    t_squared: bool = True) -> torch.Tensor:
    """KL(p || softmax(out / T)) averaged over the batch (``KLDivLoss(reduction="batchmean")``), times T^2 when
    ``t_squared``."""
    value = F.kl_div(F.log_softmax(out / temperature, 1), probabilities, reduction="batchmean")
    return value * temperature**2 if t_squared else value


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """CutMix's box (top, bottom, left, right): sides sqrt(1 - lam) of the image's, centred uniformly, clipped."""
    ratio = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width))


def build_student(arch: str, arch_args: dict, num_outputs: int, image_shape: tuple[int, int, int],
                  seed: int) -> Backbone:
    """A freshly initialised network for ``image_shape`` images, its weights a function of ``seed`` only."""
    c, h, _ = image_shape
    with seeded(seed):
        return create_model(arch, num_outputs=num_outputs, in_channels=c, image_size=h, **arch_args)


def train_network(
    model: Backbone,
    images: torch.Tensor | NormalizedImages,
    targets: torch.Tensor,
    settings: TrainSettings,
    loss: str,
    seed: int,
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
    desc: str = "training",
    progress: bool = False,
    labeller: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Backbone:
    """Train ``model`` on normalised ``images`` (a tensor, or :class:`NormalizedImages`: a dataset's, read batch by
    batch) with ``loss`` (see :func:`batch_loss`).

    With ``labeller`` (``kl`` only), every batch's soft-label logits are ``labeller(x)`` of the batch as the
    student sees it, after augmentation and mixing (relabelling on the fly), and ``targets`` are not used.
    Batch order, augmentation and mixing all come from ``seed``; nothing touches the global RNG.
    """
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    if (settings.mixup > 0 or settings.cutmix > 0) and loss == "mse":
        raise ConfigError("mixup and cutmix apply to label losses (ce, kl), not to representation regression")
    if labeller is not None and loss != "kl":
        raise ConfigError("relabelling on the fly gives soft labels: it trains with the kl loss")
    device = torch.device(device)
    model.to(device).train()
    optimizer = make_optimizer(settings.optimizer, model, settings.lr, settings.weight_decay, settings.momentum,
                               decay_1d=settings.decay_1d)
    n = len(images)
    batch = min(settings.batch_size, n)
    steps_per_epoch = -(-n // batch)  # every image once per epoch; the last batch may be smaller...
    if n % batch == 1 and n > 1:
        steps_per_epoch -= 1  # ...but never a single image, which BatchNorm cannot train on
    total = settings.steps or steps_per_epoch * settings.epochs
    forward = torch.compile(model) if settings.compile else model
    if isinstance(images, torch.Tensor):  # a distilled set is small: keep it on the device
        images = images.to(device)
    targets = targets.to(device)
    gen = make_generator(seed)
    mix_rng = np.random.default_rng(seed)
    step = 0
    bar = progress_bar(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    while step < total:
        order = torch.randperm(n, generator=gen)
        for i in range(min(steps_per_epoch, total - step)):
            idx = order[i * batch : (i + 1) * batch].to(device)
            x = images[idx]
            y = targets[idx]
            x = augment_batch(x, settings.augment, gen)
            if settings.cosine:
                set_lr(optimizer, settings.lr * warmup_cosine(step, total, 0))
            x, mixing = mix_batch(x, settings, gen, mix_rng)
            with autocast(device, settings.amp):
                out = forward(x).float()
            if labeller is not None:
                value = batch_loss(out, labeller(x), "kl", temperature, settings.kl_t_squared)
            elif mixing is None:
                value = batch_loss(out, y, loss, temperature, settings.kl_t_squared)
            elif loss == "ce":
                lam, perm = mixing
                value = lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[perm])
            else:  # soft labels: mix the probabilities, then match them
                lam, perm = mixing
                probs = lam * F.softmax(y / temperature, 1) + (1 - lam) * F.softmax(y[perm] / temperature, 1)
                value = soft_label_loss(out, probs, temperature, settings.kl_t_squared)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            step += 1
            bar.update(1)
        check_finite(value.item(), f"{desc}: the loss at step {step}",  # once per epoch: no sync per step
                     f"lower the learning rate ({settings.lr}) in the protocol's settings")
    bar.close()
    return model.eval()


def mix_batch(x: torch.Tensor, settings: TrainSettings, gen: torch.Generator,
              rng: np.random.Generator) -> tuple[torch.Tensor, tuple[float, torch.Tensor] | None]:
    """The batch mixed with a permutation of itself by mixup or CutMix (as ``settings`` say), and (lam, the
    permutation) with lam the first image's share of the pixels; (x, None) without mixing."""
    alpha = settings.mixup or settings.cutmix
    if alpha <= 0:
        return x, None
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    if settings.mixup > 0:
        return lam * x + (1 - lam) * x[perm], (lam, perm)
    top, bottom, left, right = cutmix_box(x.shape[2], x.shape[3], lam, rng)
    x = x.clone()
    x[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
    return x, (1.0 - (bottom - top) * (right - left) / (x.shape[2] * x.shape[3]), perm)


def image_batches(images: torch.Tensor | NormalizedImages, batch_size: int,
                  device: torch.device | str) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, batch) of consecutive batches of normalised ``images`` on ``device`` (a tensor's through
    :func:`ssdd.device.device_batches`)."""
    starts = range(0, len(images), batch_size)
    if isinstance(images, torch.Tensor):
        yield from zip(starts, device_batches(images, batch_size, device))
    else:
        for start in starts:
            yield start, images[torch.arange(start, min(start + batch_size, len(images)))]


@torch.no_grad()
def top1(model: Backbone, images: torch.Tensor | NormalizedImages, labels: torch.Tensor,
         device: torch.device | str = "cpu", batch_size: int = 1024) -> float:
    """Top-1 accuracy (%) of ``model``'s head on normalised images."""
    model.eval()
    correct = 0
    for start, batch in image_batches(images, batch_size, device):
        correct += (model(batch).argmax(1).cpu() == labels[start : start + batch_size]).sum().item()
    return 100.0 * correct / len(images)
