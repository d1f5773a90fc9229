"""The machinery of the kernel-ridge-regression family (KRR-ST, PAA): real batches, the pool, the outer step.

Each outer step picks a member of the model pool, regresses the synthetic targets on the member's features of the
synthetic images by kernel ridge regression (:mod:`.krr`), scores the prediction on a real batch
against the teacher's features of that batch, and takes an AdamW step on every learned synthetic tensor; the
member then trains one SGD step on the synthetic set (:mod:`.pool`).  A method of the family says how
its synthetic set is parameterised (:meth:`KernelRidgeMethod.inner_set`) and stored.

Speed: the teacher's features of the real views come from the feature cache (``teacher_copies`` fixed crop+flip
copies of the source; ``0`` runs the teacher on every batch for exact random augmentation), real features are
computed without autograd, and the synthetic set goes through the member once forward and once backward for the
outer loss (plus the member's own online step).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ssdd.budget import Budget
from ssdd.data.augment import apply_crop_flip, apply_view, random_crop_flip
from ssdd.data.mapped import is_mapped, read_rows
from ssdd.data.transforms import PixelSpace
from ssdd.device import autocast, make_generator, runs_bf16
from ssdd.distilled import DistilledSet
from ssdd.distributed import average_gradients, broadcast_object, mean_over_processes, world
from ssdd.errors import ConfigError
from ssdd.methods.base import DistillContext, Method
from ssdd.methods.kernel_ridge.krr import krr_outer_loss
from ssdd.methods.kernel_ridge.pool import ModelPool, PoolSettings
from ssdd.selection import HighLossSettings, high_loss_scores, select_random, select_top_loss
from ssdd.teachers.features import crop_flip_copies, teacher_features

REAL_AUGMENTATIONS = ("crop-flip", "none", "views")
INITIALISATIONS = ("random", "high-loss")


@dataclass
class KernelRidgeSettings:
    """Settings shared by the family; the defaults are KRR-ST's CIFAR-100 values (160,000 steps, real batch 1024,
    pool of 10 BatchNorm ConvNets with widening channels, AdamW lr 1e-4 with linear decay)."""

    steps: int = 160_000  # 0: the initial set itself, the zero-step control of an outer-loop result
    real_batch: int = 1024
    pool: PoolSettings = field(default_factory=PoolSettings)
    lr_images: float = 1e-4
    lr_targets: float = 1e-4
    lr_schedule: str = "linear"  # linear: decays to lr_end x lr at the last step | constant
    lr_end: float = 1e-3  # the linear schedule's last multiplier (the released LinearLR's end_factor)
    ridge: float = 1e-6  # lambda = ridge * trace(K_ss)
    real_augment: str = "crop-flip"  # crop-flip (4 px) | none | views (a random predefined view per image)
    teacher_copies: int = 8  # cached crop+flip copies of the source; 0: run the teacher on every real batch
    amp: bool = True  # bf16 autocast (channels-last) for the pool networks where native; the KRR solve stays float32
    init: str = "random"  # the real images the set starts from: random | high-loss (those students fit worst)
    high_loss: HighLossSettings = field(default_factory=HighLossSettings)  # the students of init: high-loss

    def __post_init__(self) -> None:
        if self.init not in INITIALISATIONS:
            raise ConfigError(f"init must be one of {', '.join(INITIALISATIONS)}, got {self.init!r}")
        if self.real_augment not in REAL_AUGMENTATIONS:
            raise ConfigError(f"real_augment must be one of {', '.join(REAL_AUGMENTATIONS)}, got {self.real_augment!r}")
        if self.lr_schedule not in ("linear", "constant"):
            raise ConfigError(f"lr_schedule must be linear or constant, got {self.lr_schedule!r}")
        if not 0 <= self.lr_end <= 1:
            raise ConfigError(f"lr_end is a multiplier of the learning rate in [0, 1], got {self.lr_end}")
        if self.steps < 0 or self.real_batch < 1 or self.pool.size < 1 or self.teacher_copies < 0:
            raise ConfigError("real_batch and pool.size must be >= 1, and steps and teacher_copies >= 0")


class RealBatches:
    """Augmented real batches with the teacher's features of exactly those views (cached or computed).

    ``crop-flip`` draws each image from one of ``teacher_copies`` fixed crop+flip copies whose teacher features
    are cached (or, with 0 copies, augments at random and runs the teacher); ``views`` shows each image under a
    random one of ``views`` (features cached per view); ``none`` uses the plain images.
    """

    def __init__(self, settings: KernelRidgeSettings, context: DistillContext, views: Sequence[str] = ("identity",)):
        self.context = context
        self.settings = settings
        self.mode = settings.real_augment
        self.views = list(views)
        teacher, source, device = context.teacher, context.source, context.device
        c, h, _ = teacher.input_shape
        self.source = source.converted(channels=c, size=h)
        self.images = None if self.source.mapped else self.source.images.to(device)  # a mapped source stays on disk
        self.features: torch.Tensor | None = None  # (variants, N, d) when cached
        if self.mode == "none":
            self.features = teacher_features(teacher, source, device=device).unsqueeze(0)
        elif self.mode == "views":
            self.features = teacher_features(teacher, source, views=self.views, device=device)
        elif settings.teacher_copies > 0:
            self.features = teacher_features(teacher, source, crop_flip=settings.teacher_copies, seed=context.seed,
                                             device=device)
            copies = crop_flip_copies(len(source), settings.teacher_copies, context.seed)
            self.shifts = torch.stack([shifts for shifts, _ in copies])  # (copies, N, 2)
            self.flips = torch.stack([flips for _, flips in copies])  # (copies, N)
        if self.features is not None and not is_mapped(self.features):  # a memory-mapped cache is read by rows
            self.features = self.features.to(device)

    def images_at(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 source images at ``idx``, on the device (a memory-mapped source's read from its file)."""
        if self.images is None:
            return self.source.batch(idx).to(self.context.device)
        return self.images[idx.to(self.images.device)]

    def feature_rows(self, variant: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``features[variant, idx]`` on the device (read from the cache file when it is memory-mapped)."""
        count = self.features.shape[1]
        rows = (variant * count + idx).to(self.features.device)
        return read_rows(self.features.flatten(0, 1), rows).to(self.context.device)

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised images, teacher features) of ``real_batch`` augmented source images."""
        n = len(self.source)
        idx = torch.randint(0, n, (min(self.settings.real_batch, n),), generator=generator)
        x = self.images_at(idx).float().div_(255.0)
        space = self.context.teacher.pixel_space
        if self.mode == "none":
            return space.normalize(x), self.feature_rows(torch.zeros_like(idx), idx)
        if self.mode == "views":
            variant = torch.randint(0, len(self.views), (idx.shape[0],), generator=generator)
            for j, view in enumerate(self.views):
                chosen = (variant == j).to(x.device)
                if view != "identity" and bool(chosen.any()):
                    x[chosen] = apply_view(x[chosen], view)
            return space.normalize(x), self.feature_rows(variant, idx)
        if self.features is None:
            x = random_crop_flip(x, generator)
            with torch.no_grad():
                return space.normalize(x), self.context.teacher(space.normalize(x))
        variant = torch.randint(0, self.settings.teacher_copies, (idx.shape[0],), generator=generator)
        x = apply_crop_flip(x, self.shifts[variant, idx], self.flips[variant, idx])
        return space.normalize(x), self.feature_rows(variant, idx)


class KernelRidgeMethod(Method):
    """The outer loop of the family.  Subclasses create their learned tensors in ``__init__`` (registering them
    with :meth:`learn`) and implement :meth:`inner_set` and :meth:`stored_tensors`."""

    settings_class = KernelRidgeSettings
    splits_over_processes = True

    def __init__(self, settings: KernelRidgeSettings, context: DistillContext, budget: Budget,
                 views: Sequence[str] = ("identity",)):
        super().__init__(settings, context, budget)
        processes = world().size
        if min(settings.real_batch, len(context.source)) % processes:
            raise ConfigError(f"the real batch ({settings.real_batch}) must split evenly over the {processes} "
                              "processes")
        self.pixel_space, self.image_shape, self.feature_dim = self.target_space(context)
        self.real = self.real_batches(settings, context, views)
        self.learned: dict[str, torch.Tensor] = {}
        self.initial: dict[str, torch.Tensor] = {}  # the tracked() quantities at initialisation
        self.param_groups: list[dict[str, Any]] = []
        layout = torch.channels_last if runs_bf16(context.device, settings.amp) else torch.contiguous_format
        self.pool = ModelPool(settings.pool, self.feature_dim, self.image_shape, context.seed + 1, context.device,
                              layout)
        self.generator = make_generator(context.seed + 2)
        self._optimizer: torch.optim.Optimizer | None = None

    def initial_selection(self, count: int) -> torch.Tensor:
        """Indices of the ``count`` source images the set starts from: a seeded random subset, or (``init:
        high-loss``, MKDT's selection) those that students trained one epoch to regress the teacher fit worst,
        chosen by process 0 for every process."""
        ctx = self.context
        if self.settings.init == "random":
            return select_random(count, len(ctx.source), ctx.seed)
        chosen = None
        if world().is_main:
            features = teacher_features(ctx.teacher, ctx.source, device=ctx.device)
            scores = high_loss_scores(ctx.source, features, ctx.teacher, self.settings.high_loss, ctx.seed, ctx.device)
            chosen = select_top_loss(scores, count)
        return broadcast_object(chosen)

    def target_space(self, context: DistillContext) -> tuple[PixelSpace, tuple[int, int, int], int]:
        """The pixel space and image shape of the set and the dimension of its targets: the teacher's."""
        teacher = context.teacher
        return teacher.pixel_space, teacher.input_shape, teacher.feature_dim

    def real_batches(self, settings: KernelRidgeSettings, context: DistillContext,
                     views: Sequence[str]) -> RealBatches:
        """Where the real batches and their targets come from: the teacher's features of augmented source images."""
        return RealBatches(settings, context, views)

    def learn(self, lr: float, relative: bool = False, **tensors: torch.Tensor) -> None:
        """Register learned tensors: one AdamW parameter group at ``lr``, or with ``relative`` one group per tensor
        at ``lr`` x the tensor's initial RMS (Adam moves every entry by about lr per step whatever its scale, so
        this makes tensors of different scales, such as bases and coefficients, move by the same fraction)."""
        for name, tensor in tensors.items():
            self.learned[name] = tensor.detach().clone().to(self.context.device).requires_grad_(True)
        if not relative:
            self.param_groups.append({"params": [self.learned[n] for n in tensors], "lr": lr, "base_lr": lr})
            return
        for name in tensors:
            scaled = lr * float(self.learned[name].detach().pow(2).mean().sqrt())
            self.param_groups.append({"params": [self.learned[name]], "lr": scaled, "base_lr": scaled})

    def tracked(self) -> dict[str, torch.Tensor]:
        """The quantities whose relative distance from initialisation is logged every step as ``drift_<name>``."""
        return {name: self.learned[name] for name in ("images", "targets") if name in self.learned}

    def start_tracking(self) -> None:
        """Record the tracked quantities of the initial set (subclasses call it at the end of ``__init__``)."""
        with torch.no_grad():
            self.initial = {name: value.detach().clone() for name, value in self.tracked().items()}

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self.param_groups, weight_decay=0.0)
        return self._optimizer

    @abc.abstractmethod
    def inner_set(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The (images, targets) the inner regression trains on this step, differentiable in the learned tensors."""

    @abc.abstractmethod
    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the final artefact (before casting to the storage dtype)."""

    def total_steps(self) -> int:
        return self.settings.steps

    def set_learning_rates(self, step: int) -> None:
        s = self.settings
        scale = 1.0 - (1.0 - s.lr_end) * step / s.steps if s.lr_schedule == "linear" else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale

    def step(self, step: int) -> dict[str, float]:
        s = self.settings
        if not self.pool.warmed:  # the released ageing rule trains the pool on the initial set first
            with torch.no_grad():
                images, targets = (t.detach() for t in self.inner_set(make_generator(self.context.seed + 3)))
            self.context.log.info(f"pool warm start (released ageing): up to {s.pool.online_iterations} online steps "
                                  f"for each of the {s.pool.size} members before step 0")
            with autocast(self.context.device, s.amp):
                warm = self.pool.warm_start(images, targets)
            self.context.log.info(f"pool warm start done: {warm} online steps")
        member = int(torch.randint(0, s.pool.size, (1,), generator=self.generator))
        reinitialised = self.pool.reinitialise_if_due(member)
        network = self.pool.models[member].eval()
        syn_images, syn_targets = self.inner_set(self.generator)
        real_images, real_targets = self.real.sample(self.generator)  # the same global batch in every process
        current = world()
        if current.size > 1:  # each process regresses its contiguous share of the real batch
            share = real_images.shape[0] // current.size
            rows = slice(current.rank * share, (current.rank + 1) * share)
            real_images, real_targets = real_images[rows], real_targets[rows]
        with torch.no_grad(), autocast(self.context.device, s.amp):
            real_features = network.features(real_images)
        with autocast(self.context.device, s.amp):
            syn_features = network.features(syn_images)
        loss = krr_outer_loss(syn_features, real_features, syn_targets, real_targets, s.ridge)  # float32 at least
        self.set_learning_rates(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.learned.values()))  # the synthetic tensors only, not the member's weights
        # the mean of the shares' gradients is the whole batch's: every process takes the same step
        average_gradients(list(self.learned.values()), current)
        self.optimizer.step()
        outer = mean_over_processes(loss.item(), current)
        metrics = {"loss": outer, "member": member, "reinitialised": int(reinitialised)}
        if self.pool.trains_online:
            with autocast(self.context.device, s.amp):
                online = self.pool.train_online(member, syn_images.detach(), syn_targets.detach())
            if math.isfinite(outer) and not math.isfinite(online):  # a non-finite outer loss is the engine's to report
                raise FloatingPointError(f"the pool's online training loss became {online}; lower settings.pool.lr "
                                         f"(now {s.pool.lr})")
            metrics["online_loss"] = online
        return {**metrics, **self.drift()}

    @torch.no_grad()
    def drift(self) -> dict[str, float]:
        """``drift_<name>``: ||current - initial|| / ||initial|| of every tracked quantity, how far the set has
        moved from its start."""
        now = self.tracked()
        return {f"drift_{name}": float((now[name] - start).norm() / start.norm().clamp_min(1e-12))
                for name, start in self.initial.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"learned": {k: v.detach().cpu() for k, v in self.learned.items()},
                "optimizer": self.optimizer.state_dict(), "pool": self.pool.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, tensor in self.learned.items():
                tensor.copy_(state["learned"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pool.load_state_dict(state["pool"])
        self.generator.set_state(state["generator"])

    def kernel_set(self, metadata: dict[str, Any], target_kind: str = "representation") -> DistilledSet:
        """The stored tensors as this method's set, with the pool's reinitialisation count."""
        return self.make_set(self.stored_tensors(), target_kind,
                             {**metadata, "pool_reinitialisations": self.pool.reinitialisations}, self.pixel_space)
