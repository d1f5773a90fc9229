"""Trajectory matching: MKDT (Joshi, Ni, Mirzasoleiman, ICLR 2025) and supervised MTT (Cazenavette et al., 2022).

Both distil by making a student trained on the synthetic set follow an expert's training trajectory
(:mod:`ssdd.methods.trajectory.experts`): each iteration samples an expert (over all experts) and a start epoch
s < ``max_start_epoch``, takes ``syn_steps`` differentiable SGD steps from the expert's epoch-s parameters on
mini-batches of the synthetic set at a learnable step size, and minimises the distance to the expert's epoch
s + ``expert_epochs`` parameters normalised by the expert's own displacement.  Images, targets (MKDT) and the step
size are learned by SGD with momentum; the step size is stored with the set and used by the ``linear`` protocol.

* **MKDT**: experts regress the teacher's representations (MSE); the set is images + learned representation
  targets, initialised from the images the experts' epoch-1 checkpoints fit worst (``init: high-loss``) with their
  teacher features, or from random images (``init: random``).
* **MTT**: experts are classifiers trained with cross-entropy on the labels; the set is images with fixed hard
  labels, class-balanced, initialised from random real images of each class.
* **MTT-SSL**: the naive self-supervised version MKDT reports as failing: experts and the unrolled student train
  with a self-supervised loss (``ssl``: Barlow Twins by default) between two augmented views of each batch, from
  random real images; only the images are learned, and the set stores the teacher's representations of them
  (no step size: it was learned for another loss), so the ``linear`` protocol evaluates it like MKDT.

Experts are trained into ``experts_dir`` (default: ``experts/`` in the run folder) before the first iteration when
missing, or beforehand with ``ssdd experts``; either way, finished experts are never trained again.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ssdd.budget import Budget
from ssdd.data.transforms import PixelSpace
from ssdd.device import make_generator
from ssdd.distilled import DistilledSet
from ssdd.distributed import shard, sum_gradients, sum_over_processes, world
from ssdd.errors import ConfigError
from ssdd.io import read_metadata
from ssdd.methods.base import METHODS, DistillContext, Method
from ssdd.methods.trajectory.experts import (
    ExpertSettings,
    ExpertStore,
    expert_file,
    expert_loss_scores,
    expert_outputs,
    is_self_supervised,
    make_network,
    train_experts,
)
from ssdd.methods.trajectory.unroll import matching_loss, unrolled_sgd
from ssdd.selection import select_per_class, select_random, select_top_loss
from ssdd.teachers.features import teacher_features
from ssdd.teachers.losses import SSL_LOSSES

INITS = ("high-loss", "random")


@dataclass
class MatchingSettings:
    """Settings of trajectory matching; the defaults are MKDT's CIFAR settings at 2% (5,000 iterations, 40
    syn_steps, experts' epochs 0-1 as start, 2 epochs ahead as target)."""

    iterations: int = 5000
    experts: ExpertSettings = field(default_factory=ExpertSettings)
    experts_dir: str | None = None  # default: experts/ in the run folder
    expert_epochs: int = 2  # the target checkpoint is this many epochs after the start
    max_start_epoch: int = 2  # start epochs are drawn from 0 .. max_start_epoch - 1
    syn_steps: int = 40
    batch_syn: int | None = 256  # images per unrolled step, as released (None: the whole set)
    lr_images: float = 1000.0
    lr_targets: float = 1.0
    lr_lr: float = 1e-4
    momentum: float = 0.5
    init_lr: float = 0.1  # initial learnable step size
    init: str = "high-loss"  # MKDT only: high-loss | random
    checkpointed: bool = False  # recompute each unrolled step in the backward pass (memory for time)
    clamp_step_size: bool = True  # keep the learnable step size >= 1e-6 (the released code does not clamp it)
    amp: bool = False  # bf16 autocast of the unrolled forward where native (the released code runs float32)
    segments: int = 1  # (expert, start epoch) segments matched per iteration, their losses averaged; dealt to the
    # processes under torchrun (1: the released single stream of random draws)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if min(self.iterations, self.expert_epochs, self.max_start_epoch, self.syn_steps, self.segments) < 1:
            raise ConfigError("iterations, expert_epochs, max_start_epoch, syn_steps and segments must be >= 1")
        if self.max_start_epoch - 1 + self.expert_epochs > self.experts.epochs:
            raise ConfigError(f"start epochs up to {self.max_start_epoch - 1} plus expert_epochs={self.expert_epochs} "
                              f"need experts of at least {self.max_start_epoch - 1 + self.expert_epochs} epochs; "
                              f"they train {self.experts.epochs}")
        if self.batch_syn is not None and self.batch_syn < 1:
            raise ConfigError("batch_syn must be >= 1 (or unset for the whole set)")
        if min(self.lr_images, self.lr_targets, self.lr_lr, self.init_lr) <= 0 or not 0 <= self.momentum < 1:
            raise ConfigError("learning rates must be > 0 and momentum in [0, 1)")


def trajectory_data(loss: str, context: DistillContext) -> tuple[PixelSpace, torch.Tensor, torch.Tensor]:
    """The pixel space, the normalised source images (CPU) and what the experts fit: the teacher's features for
    ``mse`` (MKDT), the labels for ``ce`` (MTT), nothing (an (N, 0) tensor) for a self-supervised loss."""
    source, teacher = context.source, context.teacher
    if is_self_supervised(loss):
        targets = torch.zeros(len(source), 0)
    elif loss == "mse":
        if teacher is None:
            raise ConfigError("experts that regress representations need a teacher (--teacher PATH)")
        targets = teacher_features(teacher, source, device=context.device).float().cpu()
    else:
        if source.num_classes < 2:
            raise ConfigError(f"classifier experts need a labelled source; {source.name} has {source.num_classes} "
                              "class(es)")
        targets = source.labels.clone()
    return context.pixel_space, context.normalized_source(), targets


def prepare_experts(loss: str, settings: MatchingSettings, context: DistillContext, images: torch.Tensor,
                    targets: torch.Tensor) -> ExpertStore:
    """Train the experts missing from ``settings.experts_dir`` (default: ``experts/`` in the run folder) and check
    that the ones there were trained for this loss, source, teacher and architecture."""
    folder = settings.experts_dir
    folder = Path(folder) if folder else (context.workdir / "experts" if context.workdir else None)
    if folder is None:
        raise ConfigError("trajectory matching stores its experts on disk: give settings.experts_dir=FOLDER "
                          "(or run with an output folder)")
    identity = {"method_loss": loss,
                "source": {"dataset": context.source.name, "fingerprint": context.source.fingerprint},
                "teacher": context.teacher.fingerprint if context.teacher is not None else None}
    for k in range(settings.experts.num_experts):  # refuse a foreign folder before training anything into it
        if expert_file(folder, k).exists():
            _check_experts(folder, read_metadata(expert_file(folder, k)), identity, settings)
    store = train_experts(folder, settings.experts, images, targets, loss, context.seed, context.device,
                          metadata=identity, progress=context.progress)
    _check_experts(folder, store.metadata, identity, settings)
    return store


def _check_experts(folder: Path, metadata: dict[str, Any], identity: dict[str, Any],
                   settings: MatchingSettings) -> None:
    recorded = {k: metadata.get(k) for k in identity}
    if recorded != identity:
        raise ConfigError(f"the experts in {folder} were trained for {recorded}, not {identity}; "
                          "use another experts_dir")
    stored = metadata.get("settings", {})
    keys = ("arch", "arch_args", "epochs", "lr", "momentum", "weight_decay", "batch_size")
    for key in keys + (("projection_dim",) if is_self_supervised(identity["method_loss"]) else ()):
        if stored.get(key) != getattr(settings.experts, key):
            raise ConfigError(f"the experts in {folder} have {key}={stored.get(key)!r}, these settings "
                              f"{getattr(settings.experts, key)!r}; use another experts_dir")


class TrajectoryMatching(Method):
    """The shared outer loop; subclasses say what the experts regress and what the set holds."""

    settings_class = MatchingSettings
    splits_over_processes = True
    prepares = "experts"
    loss: ClassVar[str]  # the experts' and the unroll's loss: mse | ce
    target_kind: ClassVar[str]

    @classmethod
    def expert_loss(cls, settings: MatchingSettings) -> str:
        """The experts' and the unroll's loss under ``settings``."""
        return cls.loss

    @classmethod
    def prepare(cls, settings: MatchingSettings, context: DistillContext) -> ExpertStore:
        """The experts: those missing from ``settings.experts_dir`` trained, the others checked."""
        loss = cls.expert_loss(settings)
        _, images, targets = trajectory_data(loss, context)
        return prepare_experts(loss, settings, context, images, targets)

    def __init__(self, settings: MatchingSettings, context: DistillContext, budget: Budget):
        super().__init__(settings, context, budget)
        s = settings
        device = context.device
        self.pixel_space, self.real, self.real_targets = trajectory_data(self.loss, context)
        self.image_shape = tuple(self.real.shape[1:])
        outputs = expert_outputs(self.loss, s.experts, self.real_targets)
        self.network = make_network(s.experts, outputs, self.image_shape, context.seed).to("meta")
        self.experts = prepare_experts(self.loss, s, context, self.real, self.real_targets)  # prepare's, on this data
        self.num_images = self.plan_budget()
        chosen = self.initial_indices()
        self.initial_rows = chosen
        self.images = self.real[chosen].clone().to(device).requires_grad_(True)
        self.initial_images = self.images.detach().clone()
        self.targets = self.real_targets[chosen].clone().to(device)
        self.syn_lr = torch.tensor(s.init_lr, device=device, requires_grad=True)
        groups = [{"params": [self.images], "lr": s.lr_images}, {"params": [self.syn_lr], "lr": s.lr_lr}]
        if self.learns_targets:
            self.targets.requires_grad_(True)
            groups.append({"params": [self.targets], "lr": s.lr_targets})
        self.optimizer = torch.optim.SGD(groups, momentum=s.momentum)
        self.generator = make_generator(context.seed + 2)
        processes = world().size
        if processes > 1 and s.segments < processes:
            raise ConfigError(f"under torchrun each process matches its own segments: set settings.segments to at "
                              f"least the number of processes ({processes}), now {s.segments}")

    # ---- what differs between MKDT and MTT -----------------------------------------------------------------------

    learns_targets: ClassVar[bool]

    @abc.abstractmethod
    def plan_budget(self) -> int:
        """How many synthetic images the budget buys."""

    @abc.abstractmethod
    def initial_indices(self) -> torch.Tensor:
        """Which source images start the set."""

    # ---- shared -----------------------------------------------------------------------------------------------------

    def total_steps(self) -> int:
        return self.settings.iterations

    def segment_draws(self) -> list[tuple[int, int, torch.Generator]]:
        """This iteration's (expert, start epoch, generator of its mini-batch order) per segment, the same in every
        process.  One segment draws everything from the method's generator, as the released code does; several
        draw their expert and start epoch from it and each orders its mini-batches from a seed drawn with them."""
        s = self.settings
        draws = []
        for _ in range(s.segments):
            expert = int(torch.randint(0, len(self.experts), (1,), generator=self.generator))
            start_epoch = int(torch.randint(0, s.max_start_epoch, (1,), generator=self.generator))
            order = self.generator if s.segments == 1 else make_generator(
                int(torch.randint(0, 2**62, (1,), generator=self.generator)))
            draws.append((expert, start_epoch, order))
        return draws

    def segment_loss(self, expert: int, start_epoch: int, order: torch.Generator) -> torch.Tensor:
        """The normalised matching loss of one segment: the unroll from the expert's ``start_epoch`` parameters."""
        s, device = self.settings, self.context.device
        start = self.experts.params(expert, start_epoch, device)
        target = self.experts.params(expert, start_epoch + s.expert_epochs, device)
        student = unrolled_sgd(self.network, start, self.images, self.targets, self.syn_lr, s.syn_steps,
                               s.batch_syn or self.num_images, self.loss, order, s.checkpointed,
                               permutation=lambda: self.permutation(order), amp=s.amp)
        return matching_loss(student, start, target)

    def permutation(self, order: torch.Generator) -> torch.Tensor:
        """A random order of the synthetic images, drawn from ``order``, from which the unroll takes its batches."""
        return torch.randperm(self.num_images, generator=order)

    def step(self, step: int) -> dict[str, float]:
        s = self.settings
        current = world()
        draws = self.segment_draws()
        learned = [self.images, self.syn_lr] + ([self.targets] if self.learns_targets else [])
        self.optimizer.zero_grad(set_to_none=True)
        mine = 0.0
        for _, (expert, start_epoch, order) in shard(draws, current):  # each process its share of the segments
            loss = self.segment_loss(expert, start_epoch, order) / s.segments
            loss.backward(inputs=learned)
            mine += loss.item()
        sum_gradients(learned, current)  # the mean of the segments' losses, differentiated: the same in every process
        self.optimizer.step()
        with torch.no_grad():
            if s.clamp_step_size:  # a step size that crosses zero would train the student backwards
                self.syn_lr.clamp_(min=1e-6)
            drift = float((self.images - self.initial_images).norm() / self.initial_images.norm().clamp_min(1e-12))
        metrics = {"loss": float(sum_over_processes(torch.tensor([mine], dtype=torch.float64), current)),
                   "syn_lr": self.syn_lr.item(), "drift_images": drift}
        if s.segments == 1:
            metrics.update(expert=draws[0][0], start_epoch=draws[0][1])
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images.detach().cpu(), "targets": self.targets.detach().cpu(),
                "syn_lr": self.syn_lr.detach().cpu(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
            self.targets.copy_(state["targets"])
            self.syn_lr.copy_(state["syn_lr"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])

    def distilled_set(self) -> DistilledSet:
        tensors = {"images": self.images, "learned_lr": self.syn_lr}
        if self.target_kind == "representation":
            tensors["targets"] = self.targets
        else:
            tensors["labels"] = self.targets.long()
        metadata = {"initial_indices": self.initial_rows.tolist(), "init": self.settings.init,
                    "experts": {"folder": str(self.experts.folder), "count": len(self.experts),
                                "epochs": self.experts.epochs}}
        if self.target_kind == "hard-label":
            metadata["num_classes"] = self.context.source.num_classes
        return self.make_set(tensors, self.target_kind, metadata, self.pixel_space)


@METHODS.register("mkdt")
class MKDT(TrajectoryMatching):
    """Matching knowledge-distillation trajectories: experts regress the teacher; images and targets are learned."""

    loss = "mse"
    target_kind = "representation"
    learns_targets = True

    def plan_budget(self) -> int:
        c, h, w = self.image_shape
        self.plan = self.budget.plan(self.budget.value_bytes(c * h * w + self.real_targets.shape[1]),
                                     fixed_bytes=self.budget.value_bytes(1))  # + the learned step size
        return min(self.plan.count, self.real.shape[0])

    def initial_indices(self) -> torch.Tensor:
        ctx = self.context
        if self.settings.init == "random":
            return select_random(self.num_images, self.real.shape[0], ctx.seed)
        network = make_network(self.settings.experts, self.real_targets.shape[1], self.image_shape, 0)
        scores = expert_loss_scores(self.experts, network, self.real, self.real_targets, epoch=1, device=ctx.device)
        ctx.log.info(f"high-loss init: mean epoch-1 expert MSE {scores.mean():.4f}, of the chosen "
                     f"{scores.topk(self.num_images).values.mean():.4f}")
        return select_top_loss(scores, self.num_images)


@dataclass
class MTTSettings(MatchingSettings):
    """MTT's settings: those of trajectory matching, initialised from random real images of each class; each
    unrolled step takes the whole set unless ``batch_syn`` is given (MTT's released default)."""

    init: str = "random"
    batch_syn: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "random":
            raise ConfigError(f"mtt starts from random real images of each class (init: random), not {self.init!r}")


@METHODS.register("mtt")
class MTT(TrajectoryMatching):
    """Supervised trajectory matching: cross-entropy experts, class-balanced images with fixed hard labels."""

    settings_class = MTTSettings
    loss = "ce"
    target_kind = "hard-label"
    learns_targets = False
    needs_teacher = False

    def plan_budget(self) -> int:
        c, h, w = self.image_shape
        self.plan = self.budget.plan_per_class(self.budget.value_bytes(c * h * w, labels=1),
                                               self.context.source.num_classes, self.name,
                                               fixed_bytes=self.budget.value_bytes(1))  # + the learned step size
        return self.plan.count

    def initial_indices(self) -> torch.Tensor:
        source = self.context.source
        per_class = self.num_images // source.num_classes
        gen = make_generator(self.context.seed)
        return select_per_class(self.real_targets, source.num_classes, per_class,
                                lambda members, _: torch.randperm(members.numel(), generator=gen)[:per_class],
                                source.name)



@dataclass
class MTTSSLSettings(MatchingSettings):
    """MTT-SSL's settings: those of trajectory matching with a self-supervised ``ssl`` loss, from random images."""

    init: str = "random"
    ssl: str = "barlow-twins"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init != "random":
            raise ConfigError(f"mtt-ssl starts from random real images (init: random), not {self.init!r}")
        if not is_self_supervised(self.ssl):
            raise ConfigError(f"ssl must be one of {', '.join(SSL_LOSSES)}, got {self.ssl!r}")


@METHODS.register("mtt-ssl")
class MTTSSL(TrajectoryMatching):
    """Trajectory matching with self-supervised experts; the set's targets are the teacher's view of its images."""

    settings_class = MTTSSLSettings
    target_kind = "representation"
    learns_targets = False

    @classmethod
    def expert_loss(cls, settings: MTTSSLSettings) -> str:
        return settings.ssl

    @property
    def loss(self) -> str:  # type: ignore[override]  # the experts' and the unroll's loss is a setting here
        return self.settings.ssl

    def plan_budget(self) -> int:
        c, h, w = self.image_shape
        self.plan = self.budget.plan(self.budget.value_bytes(c * h * w + self.context.teacher.feature_dim))
        m = self.plan.count
        if m > self.real.shape[0]:
            raise ConfigError(f"the budget asks for {m} images but {self.context.source.name} has {self.real.shape[0]}")
        return m

    def initial_indices(self) -> torch.Tensor:
        return select_random(self.num_images, self.real.shape[0], self.context.seed)

    def distilled_set(self) -> DistilledSet:
        images = self.images.detach()
        tensors = {"images": images, "targets": self.context.teacher.represent(images)}
        metadata = {"initial_indices": self.initial_rows.tolist(), "init": self.settings.init, "ssl": self.settings.ssl,
                    "targets": "the teacher's representations of the learned images",
                    "experts": {"folder": str(self.experts.folder), "count": len(self.experts),
                                "epochs": self.experts.epochs}}
        return self.make_set(tensors, self.target_kind, metadata, self.pixel_space)
