"""KRR-ST (Lee et al., ICLR 2024): kernel ridge regression onto a self-supervised teacher's representations.

Learned: N synthetic images X_s and their target representations Y_s, initialised from N random real images and
the teacher's features of them.  Each outer step picks a member of the model pool, regresses Y_s on the member's
features of X_s by kernel ridge regression (:mod:`ssdd.methods.krr`), scores the prediction on an augmented real
batch against the teacher's features of that batch, and takes an AdamW step on (X_s, Y_s); the member then trains
one SGD step on the synthetic set (:mod:`ssdd.methods.pool`).

Speed: the teacher's features of the real views come from the feature cache (``teacher_copies`` fixed crop+flip
copies of the source; ``0`` runs the teacher on every batch for exact random augmentation), real features are
computed without autograd, and the synthetic set goes through the member once forward and once backward for the
outer loss (plus the member's own online step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ssdd.data.augment import apply_crop_flip, random_crop_flip
from ssdd.device import autocast, make_generator
from ssdd.distilled import DistilledSet
from ssdd.errors import ConfigError
from ssdd.methods.base import METHODS, Budget, DistillContext, Method
from ssdd.methods.krr import krr_outer_loss
from ssdd.methods.pool import ModelPool, PoolSettings
from ssdd.selection import select_random
from ssdd.teachers.features import crop_flip_copies, teacher_features

REAL_AUGMENTATIONS = ("crop-flip", "none")


@dataclass
class KRRSTSettings:
    """KRR-ST's settings; the defaults are the paper's CIFAR-100 values (160,000 steps, real batch 1024,
    pool of 10 BatchNorm ConvNets with widening channels, AdamW lr 1e-4 with linear decay)."""

    steps: int = 160_000
    real_batch: int = 1024
    pool: PoolSettings = field(default_factory=PoolSettings)
    lr_images: float = 1e-4
    lr_targets: float = 1e-4
    lr_schedule: str = "linear"  # linear: decays to 0 at the last step | constant
    ridge: float = 1e-6  # lambda = ridge * trace(K_ss)
    real_augment: str = "crop-flip"  # crop-flip (4 px) | none
    teacher_copies: int = 8  # cached crop+flip copies of the source; 0: run the teacher on every real batch
    amp: bool = True  # bf16 autocast for the pool networks where native; the KRR solve stays float32

    def __post_init__(self) -> None:
        if self.real_augment not in REAL_AUGMENTATIONS:
            raise ConfigError(f"real_augment must be one of {', '.join(REAL_AUGMENTATIONS)}, got {self.real_augment!r}")
        if self.lr_schedule not in ("linear", "constant"):
            raise ConfigError(f"lr_schedule must be linear or constant, got {self.lr_schedule!r}")
        if self.steps < 1 or self.real_batch < 1 or self.pool.size < 1 or self.teacher_copies < 0:
            raise ConfigError("steps, real_batch and pool.size must be >= 1 and teacher_copies >= 0")


class RealBatches:
    """Augmented real batches with the teacher's features of exactly those views (cached or computed)."""

    def __init__(self, settings: KRRSTSettings, context: DistillContext):
        self.context = context
        self.settings = settings
        teacher = context.teacher
        source = context.source
        c, h, _ = teacher.input_shape
        self.images = source.converted(channels=c, size=h).images.to(context.device)
        self.cached = settings.real_augment == "none" or settings.teacher_copies > 0
        if settings.real_augment == "none":
            self.features = teacher_features(teacher, source, device=context.device).unsqueeze(0)
        elif self.cached:
            seed = context.seed
            self.features = teacher_features(teacher, source, crop_flip=settings.teacher_copies, seed=seed,
                                             device=context.device)
            copies = crop_flip_copies(len(source), settings.teacher_copies, seed)
            self.shifts = torch.stack([shifts for shifts, _ in copies])  # (copies, N, 2)
            self.flips = torch.stack([flips for _, flips in copies])  # (copies, N)
        self.features = self.features.to(context.device) if self.cached else None

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised images, teacher features) of ``real_batch`` augmented source images."""
        n = self.images.shape[0]
        idx = torch.randint(0, n, (min(self.settings.real_batch, n),), generator=generator)
        x = self.images[idx.to(self.images.device)].float().div_(255.0)
        space = self.context.teacher.pixel_space
        if self.settings.real_augment == "none":
            return space.normalize(x), self.features[0, idx]
        if not self.cached:
            x = random_crop_flip(x, generator)
            with torch.no_grad():
                return space.normalize(x), self.context.teacher(space.normalize(x))
        copy = torch.randint(0, self.settings.teacher_copies, (idx.shape[0],), generator=generator)
        x = apply_crop_flip(x, self.shifts[copy, idx], self.flips[copy, idx])
        return space.normalize(x), self.features[copy, idx]


@METHODS.register("krr-st")
class KRRST(Method):
    """Kernel ridge regression onto self-supervised targets; images and targets learned by AdamW."""

    settings_class = KRRSTSettings

    def __init__(self, settings: KRRSTSettings, context: DistillContext, budget: Budget):
        super().__init__(settings, context, budget)
        teacher, source, device = context.teacher, context.source, context.device
        self.image_shape = teacher.input_shape
        c, h, w = self.image_shape
        self.num_images = budget.count(c * h * w + teacher.feature_dim)
        if self.num_images > len(source):
            raise ConfigError(f"the budget asks for {self.num_images} images but {source.name} has {len(source)}")
        self.real = RealBatches(settings, context)
        plain = teacher_features(teacher, source, device=device)
        chosen = select_random(self.num_images, len(source), context.seed)
        images = self.real.images[chosen.to(self.real.images.device)].float().div(255.0)
        self.images = teacher.pixel_space.normalize(images).clone().requires_grad_(True)
        self.targets = plain[chosen].float().to(device).clone().requires_grad_(True)
        self.initial_indices = chosen
        self.optimizer = torch.optim.AdamW([
            {"params": [self.images], "lr": settings.lr_images, "base_lr": settings.lr_images},
            {"params": [self.targets], "lr": settings.lr_targets, "base_lr": settings.lr_targets},
        ], weight_decay=0.0)
        self.pool = ModelPool(settings.pool, teacher.feature_dim, self.image_shape, context.seed + 1, device)
        self.generator = make_generator(context.seed + 2)

    def total_steps(self) -> int:
        return self.settings.steps

    def set_learning_rates(self, step: int) -> None:
        scale = 1.0 - step / self.settings.steps if self.settings.lr_schedule == "linear" else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale

    def step(self, step: int) -> dict[str, float]:
        s = self.settings
        member = int(torch.randint(0, s.pool.size, (1,), generator=self.generator))
        reinitialised = self.pool.reinitialise_if_due(member)
        network = self.pool.models[member].eval()
        real_images, real_targets = self.real.sample(self.generator)
        with torch.no_grad(), autocast(self.context.device, s.amp):
            real_features = network.features(real_images)
        with autocast(self.context.device, s.amp):
            syn_features = network.features(self.images)
        loss = krr_outer_loss(syn_features.float(), real_features.float(), self.targets, real_targets, s.ridge)
        self.set_learning_rates(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with autocast(self.context.device, s.amp):
            online = self.pool.train_online(member, self.images.detach(), self.targets.detach())
        return {"loss": loss.item(), "online_loss": online, "member": member, "reinitialised": int(reinitialised)}

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images.detach().cpu(), "targets": self.targets.detach().cpu(),
                "optimizer": self.optimizer.state_dict(), "pool": self.pool.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
            self.targets.copy_(state["targets"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pool.load_state_dict(state["pool"])
        self.generator.set_state(state["generator"])

    def distilled_set(self) -> DistilledSet:
        dtype = self.budget.torch_dtype
        tensors = {"images": self.images.detach().cpu().to(dtype), "targets": self.targets.detach().cpu().to(dtype)}
        return DistilledSet(tensors, self.context.teacher.pixel_space, "representation", "krr-st",
                            {"initial_indices": self.initial_indices.tolist(),
                             "pool_reinitialisations": self.pool.reinitialisations})
