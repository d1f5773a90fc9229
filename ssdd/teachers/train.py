"""Self-supervised teacher pre-training (Barlow Twins or SimCLR) with resumable checkpoints."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ssdd.config import to_dict
from ssdd.data import ImageDataset, PixelSpace, load_dataset
from ssdd.data.augment import SSLViews
from ssdd.device import autocast, make_generator, precision, resolve_device, seeded
from ssdd.distributed import World, world
from ssdd.environment import environment
from ssdd.errors import ConfigError
from ssdd.models import create_model
from ssdd.optim import make_optimizer, set_lr, warmup_cosine
from ssdd.probes import dataset_features, knn_accuracy, linear_probe_accuracy
from ssdd.progress import LongRun
from ssdd.runs import RunDir, on_main
from ssdd.teachers.artefact import TEACHER_FILE, save_teacher
from ssdd.teachers.features import FEATURES_DIR
from ssdd.teachers.losses import SSL_LOSSES, make_projector
from ssdd.values import POSITIVE, POSITIVE_INT, SEED


@dataclass
class TeacherConfig:
    """Everything that determines a teacher run (recorded in the run folder and the artefact)."""

    dataset: str = "cifar10"
    data_root: str | None = None
    train_images: int | None = None  # use the first N images of a seeded permutation (quick runs)
    ssl: str = "barlow-twins"
    arch: str = "resnet18"
    arch_args: dict[str, Any] = field(default_factory=dict)
    projector: list[int] = field(default_factory=lambda: [2048, 2048, 2048])
    lambda_offdiag: float = 5e-3  # Barlow Twins
    temperature: float = 0.2  # SimCLR
    epochs: int = 100
    batch_size: int = 256
    optimizer: str = "lars"
    lr: float = 0.3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: float = 2.0
    final_lr_fraction: float = 0.0
    augment: SSLViews = field(default_factory=SSLViews)
    monitor_every: int = 5  # epochs between kNN monitors (0: never)
    monitor_train_images: int = 10000
    knn_k: int = 200
    probe: bool = True  # final linear probe on the full train/test splits
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16/AMX); the loss stays float32
    channels_last: bool = True  # measured faster for convnets on CPU too (docs/results/teachers.md)
    compile: bool = False  # torch.compile the training step's model (worth it for long GPU runs)
    checkpoint_minutes: float = 5.0
    keep_checkpoint: bool = False  # keep checkpoint.pt once the teacher is written (a finished run needs none)

    def __post_init__(self) -> None:
        if self.ssl not in SSL_LOSSES:
            raise ConfigError(f"unknown SSL method {self.ssl!r}; use one of {', '.join(SSL_LOSSES)}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError("epochs must be >= 1 and batch_size >= 2")
        SEED.check(self.seed, "seed")
        POSITIVE.check(self.lr, "lr")
        if self.train_images is not None:
            POSITIVE_INT.check(self.train_images, "train_images")


class SSLModel(nn.Module):
    """Backbone and projector as one module: what a training step runs (wrapped in DistributedDataParallel when
    several processes train)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone.features(views))


def distributed_model(model: SSLModel, current: World, cuda: bool) -> nn.Module:
    """``model`` for ``current``: itself for one process; else wrapped in DDP (gradients averaged over processes,
    which with the losses' gathering of the global batch gives the single-process gradient of that batch), with
    BatchNorm layers synchronised on CUDA (on CPU, where SyncBatchNorm does not run, each process normalises with
    its own share of the batch)."""
    if current.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if cuda:
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[current.local_rank] if cuda else None)


def _ssl_loss(config: TeacherConfig) -> nn.Module:
    if config.ssl == "barlow-twins":
        return SSL_LOSSES["barlow-twins"](lambda_offdiag=config.lambda_offdiag)
    return SSL_LOSSES["simclr"](temperature=config.temperature)


class _TeacherTraining:
    """State of one teacher run; :meth:`run` trains to the end, resuming from the run folder if asked."""

    def __init__(self, config: TeacherConfig, run_dir: RunDir, resume: bool, progress: bool, started: float):
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        self.progress = progress
        self.started = started  # the wall clock of the whole run, its setup included
        self.world = world()
        self.device = resolve_device(config.device)
        self.cuda = self.device.type == "cuda"

        self.log(f"started: {shlex.join(sys.argv)}")
        self.log(f"setup: loading {config.dataset}")
        train = load_dataset(config.dataset, "train", root=config.data_root)
        self.source_fingerprint = train.fingerprint  # of the whole split, which baselines and methods draw from
        if config.train_images:
            if config.train_images > len(train):  # a subset of more images than there are would silently be all
                raise ConfigError(f"train_images {config.train_images} exceeds the {len(train)} images of "
                                  f"{config.dataset}; give at most {len(train)}, or leave it out to train on all")
            order = torch.randperm(len(train), generator=make_generator(config.seed))
            train = train.subset(order[: config.train_images])
        self.train_set = train
        self.test_set = load_dataset(config.dataset, "test", root=config.data_root)
        self.pixel_space = PixelSpace.of(train.images)
        c, h, _ = train.image_shape
        self.log(f"setup: building {config.arch} and its projector")
        with seeded(config.seed):
            self.backbone = create_model(config.arch, in_channels=c, image_size=h, **config.arch_args)
            self.projector = make_projector(self.backbone.feature_dim, config.projector)
        self.backbone.to(self.device)
        self.projector.to(self.device)
        if config.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if config.batch_size % self.world.size:
            raise ConfigError(f"batch_size {config.batch_size} must split evenly over the {self.world.size} processes")
        self.model = distributed_model(SSLModel(self.backbone, self.projector), self.world, self.cuda)
        if config.compile:
            self.model = torch.compile(self.model)
        self.loss_fn = _ssl_loss(config)
        self.optimizer = make_optimizer(config.optimizer, [self.backbone, self.projector], config.lr,
                                        config.weight_decay, config.momentum)
        self.augment = config.augment
        self.steps_per_epoch = len(train) // config.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"batch_size {config.batch_size} exceeds the {len(train)} training images")
        self.total_steps = self.steps_per_epoch * config.epochs
        self.aug_gen = self.augmentation_generator(0)
        self.step = 0
        self.last_knn: float | None = None  # the latest kNN monitor, checkpointed so a run resumed at its end has it
        # uint8 on the device (a CIFAR-size set fits any); a memory-mapped source is read a batch at a time
        self.images = None if train.mapped else train.images.to(self.device)
        monitor = min(config.monitor_train_images, len(train))  # a seeded random subset: splits are sorted by class
        self.monitor_idx = torch.randperm(len(train), generator=make_generator(config.seed + 2))[:monitor]
        self.log(f"{config.ssl} {config.arch}: {config.epochs} epochs of {self.steps_per_epoch} steps on {len(train)} "
                 f"{config.dataset} images, seed {config.seed}, device {self.device}, precision {precision()}, "
                 f"{self.world.size} process(es), a checkpoint every {config.checkpoint_minutes:g} min; every "
                 "setting is in config.yaml")

    def log(self, message: str) -> None:
        """A line of ``run.log`` (process 0 writes it)."""
        if self.world.is_main:
            self.run_dir.log(message)

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "backbone": self.backbone.state_dict(),
            "projector": self.projector.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "aug_gen": self.aug_gen.get_state(),
            "last_knn": self.last_knn,
        }

    def augmentation_generator(self, step: int) -> torch.Generator:
        """Process 0 draws the single-process augmentation stream (carried in checkpoints); each other process
        draws its own, seeded by its rank and the step it starts at."""
        if self.world.rank == 0:
            return make_generator(self.config.seed + 1, self.device)
        return make_generator(self.config.seed + 1 + 1_000_003 * self.world.rank + step, self.device)

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint (written by process 0 of a run with any number of processes)."""
        self.step = int(state["step"])
        self.backbone.load_state_dict(state["backbone"])
        self.projector.load_state_dict(state["projector"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.last_knn = state.get("last_knn")
        if self.world.rank == 0:
            self.aug_gen.set_state(state["aug_gen"])
        else:
            self.aug_gen = self.augmentation_generator(self.step)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The shuffling of ``epoch``: a function of (seed, epoch) only, so a resumed run sees the same batches."""
        return torch.randperm(len(self.train_set), generator=make_generator(self.config.seed * 100003 + epoch))

    def train_step(self, batch_idx: torch.Tensor) -> float:
        cfg = self.config
        lr = cfg.lr * warmup_cosine(self.step, self.total_steps, int(cfg.warmup_epochs * self.steps_per_epoch),
                                    cfg.final_lr_fraction)
        set_lr(self.optimizer, lr)
        share = batch_idx.shape[0] // self.world.size  # this process's contiguous share of the global batch
        batch_idx = batch_idx[self.world.rank * share : (self.world.rank + 1) * share]
        x = (self.train_set.batch(batch_idx).to(self.device) if self.images is None
             else self.images[batch_idx.to(self.device)]).float().div_(255.0)
        v1, v2 = self.augment.two_views(x, self.aug_gen)
        views = self.pixel_space.normalize(torch.cat([v1, v2]))
        if cfg.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.config.amp):
            z = self.model(views)
        z1, z2 = z.float().chunk(2)
        loss = self.loss_fn(z1, z2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss.item()

    def features(self, dataset: ImageDataset, indices: torch.Tensor | None = None) -> torch.Tensor:
        self.backbone.eval()
        try:
            return dataset_features(self.backbone.features, dataset, self.pixel_space, indices, device=self.device)
        finally:
            self.backbone.train()

    def knn(self) -> float:
        train_feats = self.features(self.train_set, self.monitor_idx)
        test_feats = self.features(self.test_set)
        return knn_accuracy(train_feats, self.train_set.labels[self.monitor_idx], test_feats, self.test_set.labels,
                            k=self.config.knn_k)

    def run(self) -> Path:
        cfg = self.config
        main = self.world.is_main  # only process 0 writes, monitors and shows progress
        if self.resume and (state := self.run_dir.load_checkpoint()) is not None:
            self.load_state(state)
            self.log(f"resumed at step {self.step}" + (f" with {self.world.size} processes"
                                                        if self.world.size > 1 else ""))
        self.log(f"setup done in {time.monotonic() - self.started:.1f} s; training steps {self.step + 1} to "
                 f"{self.total_steps}")
        self.backbone.train()
        self.projector.train()
        loop = LongRun(self.total_steps, self.step, f"teacher {cfg.ssl} {cfg.arch}", cfg.checkpoint_minutes,
                       self.progress and main)
        knn = self.last_knn
        while self.step < self.total_steps:
            epoch, position = divmod(self.step, self.steps_per_epoch)
            order = self.epoch_order(epoch)
            batch = order[position * cfg.batch_size : (position + 1) * cfg.batch_size]
            loss = self.train_step(batch)
            loop.guard(loss, f"teacher {cfg.ssl}: the loss at step {self.step}", self.recovery_advice())
            postfix = {"epoch": epoch + 1, "loss": f"{loss:.3f}"}
            epoch_done = self.step % self.steps_per_epoch == 0
            if epoch_done and main:
                done_epochs = self.step // self.steps_per_epoch
                measured = None
                if cfg.monitor_every and (done_epochs % cfg.monitor_every == 0 or done_epochs == cfg.epochs):
                    knn = self.last_knn = measured = self.knn()
                self.run_dir.metrics(epoch=done_epochs, step=self.step, loss=loss, knn=measured,
                                     seconds=round(loop.seconds, 1))
                self.log(f"epoch {done_epochs}/{cfg.epochs}: loss {loss:.4g}"
                         + ("" if measured is None else f", kNN top-1 {measured:.2f}%"))
            if knn is not None:
                postfix["knn"] = f"{knn:.1f}"
            loop.advance(postfix)
            if main and epoch_done and loop.checkpoint_due():
                self.checkpoint()
                loop.checkpointed()
        loop.close()
        if not main:
            return self.run_dir.path / TEACHER_FILE
        self.checkpoint()
        return self.finish(knn, loop.seconds)

    def checkpoint(self) -> None:
        self.run_dir.save_checkpoint(self.state())
        self.log(f"checkpoint at step {self.step} ({self.run_dir.checkpoint_path})")

    def recovery_advice(self) -> str:
        """Where a diverged run can restart, and with what (for :class:`~ssdd.errors.NumericalError`)."""
        if self.run_dir.checkpoint_path.exists():
            return (f"the last good checkpoint is {self.run_dir.checkpoint_path}; resume from it with a lower "
                    f"learning rate (--resume --lr ...; this run's is {self.config.lr})")
        return ("no checkpoint had been written yet; start again with a lower learning rate "
                f"(--lr, now {self.config.lr})")

    def finish(self, knn: float | None, seconds: float) -> Path:
        """Probe the backbone and write the teacher, last (a run is finished once it exists); the checkpoint is
        removed unless kept."""
        cfg = self.config
        probe = None
        if cfg.probe:
            self.log("final linear probe")
            train_feats = self.features(self.train_set)
            test_feats = self.features(self.test_set)
            probe = linear_probe_accuracy(train_feats, self.train_set.labels, test_feats, self.test_set.labels)
            self.run_dir.log(f"linear probe top-1 {probe:.2f}%")
        info = {
            "ssl": {"method": cfg.ssl, "lambda_offdiag": cfg.lambda_offdiag, "temperature": cfg.temperature,
                    "projector": cfg.projector},
            "config": to_dict(cfg),
            "source": {"dataset": cfg.dataset, "fingerprint": self.source_fingerprint,
                       "trained_on_fingerprint": self.train_set.fingerprint, "images": len(self.train_set),
                       "image_shape": list(self.train_set.image_shape)},
            "epochs_trained": self.step // self.steps_per_epoch,
            "knn_top1": knn,
            "linear_probe_top1": probe,
            "environment": environment(self.device),
        }
        path = self.run_dir.path / TEACHER_FILE
        self.backbone.eval()
        wall = time.monotonic() - self.started
        self.run_dir.metrics(final=True, knn=knn, linear_probe=probe, wall_seconds=round(wall, 1))
        save_teacher(path, self.backbone.cpu(), self.pixel_space, info)
        self.log(f"finished: {self.step} steps, {seconds:.1f} s of training in this command, {wall:.1f} s wall time "
                 f"(setup and probes included); wrote {path}")
        self.run_dir.complete(cfg.keep_checkpoint)
        return path


def train_teacher(config: TeacherConfig, out: str | Path, resume: bool = False, progress: bool = True,
                  overwrite: bool = False) -> Path:
    """Train a self-supervised teacher and write ``out/teacher.safetensors``; returns its path.

    With ``resume=True`` a run killed earlier continues from the last checkpoint in ``out`` and, on CPU,
    finishes with exactly the weights an uninterrupted run would have (a finished run is kept as it is). An ``out``
    that holds a run needs ``resume`` or ``overwrite`` (which starts afresh). The folder is locked while it trains.
    """
    started = time.monotonic()
    current = world()
    run_dir = RunDir(out, TEACHER_FILE, (FEATURES_DIR,), echo=progress and current.is_main)
    finished = on_main(lambda: run_dir.start(config, resume=resume, ignore=("lr",), defaults=TeacherConfig(),
                                             overwrite=overwrite), current)
    try:
        if finished:
            if current.is_main:
                run_dir.log(f"resumed a finished run: its teacher {run_dir.path / TEACHER_FILE} is kept as it is")
                run_dir.complete(config.keep_checkpoint)  # a run killed before it removed its checkpoint
            return run_dir.path / TEACHER_FILE
        try:  # a run that fails before its first step leaves no run folder behind
            training = _TeacherTraining(config, run_dir, resume, progress, started)
        except BaseException:
            if current.is_main:
                run_dir.abandon()
            raise
        return training.run()
    finally:
        run_dir.close()
