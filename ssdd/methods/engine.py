"""The machinery every method shares: ``ssdd.distill`` and ``ssdd distill`` both run :class:`Distillation`.

It resolves the source, teacher and budget, builds the method, and owns the loop: progress bar, metrics log
(``metrics.jsonl``), periodic checkpoints with exact resume (the method's state plus the step), a periodic kNN
monitor of the current set, a stop with a clear message when the loss stops being finite, and the final
``distilled.safetensors`` with its provenance.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ssdd.budget import BUDGET_KEYS, Budget, refuse_overspent
from ssdd.checks import SET_CHECKS
from ssdd.config import from_dict, list_presets, preset_dict, resolve_config, to_dict
from ssdd.data import load_dataset
from ssdd.data.dataset import ImageDataset
from ssdd.device import make_generator, precision, resolve_device
from ssdd.distilled import DISTILLED_FILE, DistilledSet, load_distilled
from ssdd.distributed import world
from ssdd.environment import environment
from ssdd.errors import ConfigError, NumericalError
from ssdd.methods.base import METHODS, DistillContext, Method
from ssdd.probes import extract_features, knn_accuracy
from ssdd.progress import LongRun
from ssdd.resources import ensure_fits
from ssdd.runs import RunDir, on_main
from ssdd.show import save_curves
from ssdd.teachers import Teacher, load_teacher
from ssdd.training import TrainSettings, build_student, train_network
from ssdd.values import SEED

# settings a resumed run may change besides runs.EXECUTION_SETTINGS: how it monitors, and the learning rates (the
# way out of a diverged run is to resume from the last good checkpoint at a lower rate)
RESUMABLE_CHANGES = ("monitor", "settings.lr_images", "settings.lr_targets")


WORKING_COPIES = 4  # a distilled tensor, its gradient and Adam's two moments
OWNED_FILES = ("curves.png", "grid.png", "sets")  # what a run writes besides its record and set (--overwrite removes)
MONITOR_SPLIT_SEED = 12345  # the monitor's memory/query split, fixed so checks compare across runs


@dataclass
class MonitorSettings:
    """The cheap periodic check of the current set: a small student pre-trained on it with MSE, then cosine kNN
    on labelled source images (a fixed random memory bank of ``memory_images`` and ``query_images`` disjoint
    queries, the same for every check of every run); a relative signal, not a protocol result."""

    every: int = 0  # outer steps between checks (0: only at the end; -1: never)
    arch: str = "convnet3"
    arch_args: dict[str, Any] = field(default_factory=lambda: {"width": 32})
    pretrain: TrainSettings = field(default_factory=lambda: TrainSettings(epochs=30, lr=0.1, batch_size=256))
    memory_images: int = 5000
    query_images: int = 1000
    k: int = 20
    # the real protocol as a curve: an evaluate preset (e.g. linear-steps-cpu) run on the set at every check,
    # step 0 included (the zero-step control), on these architectures and seeds (None: the preset's)
    protocol: str | None = None
    protocol_archs: list[str] | None = None
    protocol_seeds: list[int] | None = None
    keep_sets: bool = False  # write every checked set to sets/step-<N>.safetensors (for a fuller evaluation later)


@dataclass
class DistillConfig:
    """Run-level settings of ``ssdd distill``; ``settings`` holds the method's own (validated by its class)."""

    exclusive_keys: ClassVar = (BUDGET_KEYS,)  # a budget in images or in bytes: a layer that gives one replaces both
    method: str = "krr-st"
    dataset: str | None = None  # default: the teacher's source dataset
    teacher: str | None = None
    images: int | None = None
    bytes: int | None = None
    storage_dtype: str = "float32"
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None
    source_images: int | None = None  # distil from a seeded random subset of this many source images (quick runs)
    checkpoint_minutes: float = 5.0
    keep_checkpoint: bool = False  # keep checkpoint.pt once the set is written (a finished run needs none)
    log_every: int = 10
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        SEED.check(self.seed, "seed")


def distill_preset(preset: str | None, method: str | None) -> str | None:
    """The distill preset that ``preset`` names: ``METHOD/NAME`` or a preset of the group's top level as given, else
    ``NAME`` among ``method``'s own presets (refused, listing them, when it has no such preset)."""
    if not preset or "/" in preset or not method or preset in list_presets("distill"):
        return preset
    own = [p.partition("/")[2] for p in list_presets("distill") if p.startswith(f"{method}/")]
    if preset not in own:
        raise ConfigError(f"method {method} has no preset {preset!r}; its presets: {', '.join(own) or 'none'}")
    return f"{method}/{preset}"


def method_settings(method: str, settings: Any) -> Any:
    """The method's settings object from a dict (unknown keys are errors) or as given."""
    cls = METHODS.get(method).settings_class
    if settings is None:
        return cls()
    if isinstance(settings, dict):
        return from_dict(cls, settings, where=f"{method} settings")
    if not isinstance(settings, cls):
        raise ConfigError(f"settings for {method} must be a {cls.__name__} or a dict, got {type(settings).__name__}")
    return settings


def resolved_config(config: DistillConfig) -> dict[str, Any]:
    """``config`` as a run folder records it: with the method's settings completed by their defaults."""
    return {**to_dict(config), "settings": to_dict(method_settings(config.method, config.settings))}


def default_config(method: str) -> dict[str, Any]:
    """The recorded form of a run of ``method`` at every default (what a setting added since a run started is)."""
    return resolved_config(DistillConfig(method=method))


def prepare(config: DistillConfig, progress: bool = True) -> Any:
    """Do what a run of ``config`` does before its first step and keeps on disk (its method's
    :meth:`~ssdd.methods.base.Method.prepare`, e.g. training its experts), without distilling; returns what it made."""
    device = resolve_device(config.device)
    teacher, source = resolve_inputs(config, device)
    context = DistillContext(source, teacher, device, config.seed, logging.getLogger("ssdd.prepare"), progress=progress)
    return METHODS.get(config.method).prepare(method_settings(config.method, config.settings), context)


def resolve_inputs(config: DistillConfig, device: torch.device, teacher: Teacher | None = None,
                   source: ImageDataset | None = None) -> tuple[Teacher | None, ImageDataset]:
    """The teacher and source a run of ``config`` works from (loaded unless given), checked to belong together."""
    if teacher is None and config.teacher:
        teacher = load_teacher(config.teacher, device=device)
    if teacher is None and METHODS.get(config.method).needs_teacher:
        raise ConfigError(f"method {config.method} needs a teacher (--teacher PATH)")
    if source is None:
        name = config.dataset or (teacher.metadata.get("source", {}).get("dataset") if teacher else None)
        if not name:
            raise ConfigError("no source dataset: give --dataset (or a teacher that records its source)")
        source = load_dataset(name, "train", root=config.data_root)
    if teacher is not None:
        recorded = teacher.metadata.get("source", {})
        if recorded.get("dataset") == source.name and recorded.get("fingerprint") not in (None, source.fingerprint):
            raise ConfigError(f"the teacher was trained on a different copy of {source.name} (fingerprints differ)")
    if config.source_images is not None:
        if not 0 < config.source_images <= len(source):
            raise ConfigError(f"source_images must lie in 1..{len(source)} (the size of {source.name}), "
                              f"got {config.source_images}")
        order = torch.randperm(len(source), generator=make_generator(config.seed))
        source = source.subset(order[: config.source_images])
    return teacher, source


class Distillation:
    """One run of one method, checkpointed in ``out`` (or kept in memory when ``out`` is None); ``out`` holding a run
    already needs ``resume`` (a finished run is then returned as it is) or ``overwrite`` (it starts afresh)."""

    def __init__(self, config: DistillConfig, out: str | Path | None, resume: bool = False, progress: bool = True,
                 teacher: Teacher | None = None, source: ImageDataset | None = None, overwrite: bool = False):
        self.started = time.monotonic()  # the wall clock of the whole run, its setup included
        self.config = config
        self.progress = progress
        self.resume = resume
        self.device = resolve_device(config.device)
        method_cls = METHODS.get(config.method)
        self.world = world()
        if self.world.size > 1 and not method_cls.splits_over_processes:
            shared = ", ".join(n for n in METHODS.names() if METHODS.get(n).splits_over_processes)
            raise ConfigError(f"method {config.method} does not split over processes yet; run it as one process "
                              f"(methods that do: {shared})")
        self.settings = method_settings(config.method, config.settings)
        if config.monitor.protocol is not None:  # an unknown preset fails now, not at the first check
            preset_dict("evaluate", config.monitor.protocol)
        self.budget = Budget(config.images, config.bytes, config.storage_dtype)
        # read by every process when resuming, written (and locked) by process 0 only
        self.checkpoints = RunDir(out, DISTILLED_FILE, OWNED_FILES, echo=progress) if out is not None else None
        self.run_dir = self.checkpoints if self.world.is_main else None
        self.finished = self.checkpoints is not None and on_main(lambda: self.run_dir.start(
            resolved_config(config), resume=resume, ignore=RESUMABLE_CHANGES, defaults=default_config(config.method),
            overwrite=overwrite), self.world)
        self.logger = self.run_dir.logger if self.run_dir is not None else logging.getLogger("ssdd.distill")
        if self.finished:
            self.log(f"resumed a finished run: its set {self.checkpoints.path / DISTILLED_FILE} is kept as it is")
            return
        try:  # a run that fails before its first step leaves no run folder behind
            self.log(f"started: {shlex.join(sys.argv)}")
            self.log("setup: loading the teacher and the source data")
            teacher, source = resolve_inputs(config, self.device, teacher, source)
            if teacher is not None:  # a bar over the teacher-feature cache's pass, when it is computed
                teacher.progress = progress and self.world.is_main
            self.teacher = teacher
            self.source = source
            self.refuse_what_cannot_fit()
            self.log(f"{config.method}: a budget of {self.budget.text()}, seed {config.seed}, source {source.name} "
                     f"({len(source)} images), teacher {'-' if teacher is None else teacher.path or 'in memory'}, "
                     f"device {self.device}, precision {precision()}, {self.world.size} process(es), a checkpoint "
                     f"every {config.checkpoint_minutes:g} min; every setting is in config.yaml")
            self.log(f"setup: preparing {config.method} (its initial set and what it precomputes, e.g. teacher "
                     "features, networks or experts)")
            context = DistillContext(source, teacher, self.device, config.seed, self.logger,
                                     self.run_dir.path if self.run_dir is not None else None, progress)
            self.method: Method = method_cls(self.settings, context, self.budget)
        except BaseException:
            if self.run_dir is not None:
                self.run_dir.abandon()
            raise

    def refuse_what_cannot_fit(self) -> None:
        """Estimate the set's working memory (float32 values, gradients and two optimiser moments of every stored
        (image, target) value) before any of it is allocated, and refuse a budget the device cannot hold."""
        target_values = self.teacher.feature_dim if self.teacher is not None else self.source.num_classes
        values = self.budget.total_values(math.prod(self.source.image_shape) + target_values)
        ensure_fits(WORKING_COPIES * 4 * values, f"a budget of {self.budget.text()}", self.device,
                    "lower --images or --bytes, or distil on a larger machine")

    def refuse_overspent(self, distilled: DistilledSet) -> None:
        """Stop with a :class:`BudgetError` when ``distilled`` stores more bytes than the budget allows (under an image
        budget, more than the method's plan said its images cost)."""
        refuse_overspent(distilled.byte_count, self.budget, self.method.plan, self.config.method)

    def log(self, message: str) -> None:
        self.logger.info(message)

    def check(self, distilled: DistilledSet, step: int) -> dict[str, Any]:
        """Every monitor of the set at ``step``: ``knn`` and, with ``monitor.protocol``, ``protocol`` (top-1 % by
        ``<arch> <target> <fraction>``, the mean over the seeds); the set is kept under ``sets/`` if asked."""
        self.refuse_overspent(distilled)
        m = self.config.monitor
        checked: dict[str, Any] = {"knn": self.monitor(distilled)}
        if m.keep_sets and self.run_dir is not None:
            distilled.save(self.run_dir.path / "sets" / f"step-{step:06d}.safetensors")
        if m.protocol is not None:
            checked["protocol"] = self.protocol_check(distilled)
        self.log(f"monitor at step {step}: " + ", ".join(f"{k} {v}" for k, v in checked.items()))
        return checked

    def protocol_check(self, distilled: DistilledSet) -> dict[str, float]:
        """The monitor's protocol (an evaluate preset) run on ``distilled``: mean top-1 % per (arch, target,
        fraction)."""
        m, cfg = self.config.monitor, self.config
        check = SET_CHECKS.get("protocol")  # evaluation's, registered there: methods/ never imports evaluation/
        return check(distilled, m.protocol, archs=m.protocol_archs, seeds=m.protocol_seeds, device=cfg.device,
                     data_root=cfg.data_root, teacher=self.teacher)

    def monitor(self, distilled: DistilledSet) -> float | None:
        """kNN top-1 (%) of a small student pre-trained on ``distilled``; None when the source has no labels."""
        m = self.config.monitor
        source = self.source
        if source.num_classes < 2 or distilled.target_kind != "representation":
            return None
        images, targets = distilled.materialize()
        student = build_student(m.arch, m.arch_args, targets.shape[1], distilled.image_shape, self.config.seed)
        train_network(student, images, targets, m.pretrain, "mse", self.config.seed, self.device)
        c, h, _ = distilled.image_shape
        data = source.converted(channels=c, size=h)
        order = torch.randperm(len(data), generator=make_generator(MONITOR_SPLIT_SEED))
        memory = order[: m.memory_images]
        queries = order[m.memory_images : m.memory_images + m.query_images]
        feats = extract_features(student.features, data.batch(torch.cat([memory, queries])), distilled.pixel_space,
                                 device=self.device)
        return knn_accuracy(feats[: len(memory)], data.labels[memory], feats[len(memory):], data.labels[queries], k=m.k)

    def run(self) -> DistilledSet:
        """Distil to the end (from the last checkpoint when resuming) and write the set; a finished run's set as it
        is. The run folder's lock is released when this returns or fails."""
        try:
            if not self.finished:
                return self._distil()
            if self.run_dir is not None:
                self.run_dir.complete(self.config.keep_checkpoint)  # a run killed before it removed its checkpoint
            self.wall_seconds = time.monotonic() - self.started
            return load_distilled(self.checkpoints.path / DISTILLED_FILE)
        finally:
            if self.run_dir is not None:
                self.run_dir.close()

    def _distil(self) -> DistilledSet:
        cfg = self.config
        method = self.method
        total = method.total_steps()
        start = 0
        elapsed = 0.0
        main = self.world.is_main  # the only process that monitors, logs and writes
        if self.resume and self.checkpoints is not None and (state := self.checkpoints.load_checkpoint()) is not None:
            method.load_state_dict(state["method"])
            start, elapsed = int(state["step"]), float(state.get("seconds", 0.0))
            self.log(f"resumed at step {start}")
        self.log(f"setup done in {time.monotonic() - self.started:.1f} s; "
                 + (f"distilling steps {start + 1} to {total}" if start < total else "every step was done: finishing"))
        knn = None
        if start == 0 and cfg.monitor.every > 0 and main:  # the initial set, the reference of every later check
            checked = self.check(method.distilled_set(), 0)
            knn = checked["knn"]
            if self.run_dir is not None:
                self.run_dir.metrics(step=0, **checked)
        loop = LongRun(total, start, f"distill {cfg.method}", cfg.checkpoint_minutes, self.progress and main, elapsed)
        last_good = start if self.run_dir is not None and self.run_dir.checkpoint_path.exists() else None
        for step in range(start, total):
            try:
                metrics = method.step(step)
            except FloatingPointError as error:  # a method's own numerical failure, e.g. a kernel no jitter fixes
                raise NumericalError(f"{cfg.method}: step {step + 1} failed: {error}; "
                                     f"{self._recovery_advice(last_good)}") from None
            loop.guard(metrics["loss"], f"{cfg.method}: the loss at step {step + 1}", self._recovery_advice(last_good))
            done = step + 1
            if cfg.monitor.every > 0 and done % cfg.monitor.every == 0 and done < total and main:
                metrics.update(self.check(method.distilled_set(), done))
                knn = metrics["knn"]
            if self.run_dir is not None and (done % cfg.log_every == 0 or done == total or "knn" in metrics):
                self.run_dir.metrics(step=done, seconds=round(loop.seconds, 2), **metrics)
            loop.advance({"loss": f"{metrics['loss']:.4g}", **({"knn": f"{knn:.1f}"} if knn is not None else {})})
            if self.run_dir is not None and loop.checkpoint_due():
                self.checkpoint(done, loop.seconds)
                loop.checkpointed()
                last_good = done
        loop.close()
        seconds = loop.seconds
        if self.run_dir is not None:
            self.checkpoint(total, seconds)
        return self.finish(seconds)

    def _recovery_advice(self, last_good: int | None) -> str:
        lower = "--set settings.lr_images=... --set settings.lr_targets=..."
        if self.run_dir is None:
            return "no checkpoint was kept (no --out); start again with lower learning rates"
        if last_good is None:
            return f"no checkpoint had been written yet; start again with lower learning rates ({lower})"
        return (f"the last good checkpoint (step {last_good}) is {self.run_dir.checkpoint_path}; "
                f"resume from it with lower learning rates (--resume {lower})")

    def checkpoint(self, step: int, seconds: float) -> None:
        self.run_dir.save_checkpoint({"step": step, "seconds": seconds, "method": self.method.state_dict()})
        self.log(f"checkpoint at step {step} ({self.run_dir.checkpoint_path})")

    def finish(self, seconds: float) -> DistilledSet:
        """The final set with its provenance; in a run folder its record, curves and the set, written last (a run is
        finished once its set exists), and the checkpoint is removed unless kept."""
        cfg = self.config
        if cfg.monitor.every >= 0 and self.world.is_main:
            self.log("final monitor check")
        distilled = self.method.distilled_set()
        self.refuse_overspent(distilled)  # before any check or file: a set over its budget is never kept
        checks = cfg.monitor.every >= 0 and self.world.is_main
        checked = self.check(distilled, self.method.total_steps()) if checks else {}
        knn = checked.get("knn")
        teacher = self.teacher
        distilled.metadata.update({
            "config": {**to_dict(cfg), "settings": to_dict(self.settings)},
            "budget": self.budget.describe(),
            "seed": cfg.seed,
            "source": {"dataset": self.source.name, "fingerprint": self.source.fingerprint, "images": len(self.source)},
            "teacher": None if teacher is None else {"fingerprint": teacher.fingerprint,
                                                     "feature_dim": teacher.feature_dim,
                                                     "path": str(teacher.path) if teacher.path else None},
            "steps": self.method.total_steps(),
            "distill_seconds": round(seconds, 1),
            "monitor_knn": knn,
            "monitor_protocol": checked.get("protocol"),
            "environment": environment(self.device),
        })
        self.wall_seconds = time.monotonic() - self.started
        if self.run_dir is not None:
            self.run_dir.metrics(final=True, **checked, byte_count=distilled.byte_count, seconds=round(seconds, 1),
                                 wall_seconds=round(self.wall_seconds, 1))
            save_curves(self.run_dir.read_metrics(), self.run_dir.path / "curves.png")
            distilled.save(self.run_dir.path / DISTILLED_FILE)
            self.log(f"finished: {self.method.total_steps()} steps, {seconds:.1f} s in the outer loop (resumed parts "
                     f"included), {self.wall_seconds:.1f} s wall time of this command (setup and checks included); "
                     f"wrote {distilled.path} ({distilled.byte_count} bytes, monitor kNN {knn})")
            self.run_dir.complete(cfg.keep_checkpoint)
        return distilled


def distill(
    method: str,
    source: str | ImageDataset | None = None,
    teacher: str | Path | Teacher | None = None,
    budget: int | Budget | None = None,
    config: Any = None,
    preset: str | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    monitor: MonitorSettings | None = None,
    overwrite: bool = False,
) -> DistilledSet:
    """Distil ``source`` with ``method`` at ``budget`` (a number of images or a :class:`Budget`); returns the set.

    ``config`` is the method's settings (its dataclass, or a dict merged over the settings of ``preset``, e.g.
    ``"cifar10-cpu"``); the preset is resolved as ``ssdd distill --preset`` resolves it (every key applies, and the
    arguments given here override it: :func:`ssdd.config.resolve_config`), without a preset or its monitor the run
    has no monitor.  With ``out`` the run is checkpointed
    there, resumable with ``resume=True``, and the set is written to ``out/distilled.safetensors``; an ``out`` that
    holds a run needs ``resume=True`` (a finished one is returned as it is) or ``overwrite=True`` (it starts afresh).
    """
    name = distill_preset(preset, method) if preset else None
    preset_values = preset_dict("distill", name) if name else {}
    if budget is None and not (preset_values.get("images") or preset_values.get("bytes")):
        raise ConfigError("give a budget: a number of images or ssdd.Budget(bytes=...)")
    budget = budget if budget is None or isinstance(budget, Budget) else Budget(images=int(budget))
    settings = config if isinstance(config, dict) or config is None else to_dict(method_settings(method, config))
    overrides: dict[str, Any] = {
        "method": method, "dataset": source if isinstance(source, str) else None,
        "teacher": str(teacher) if isinstance(teacher, (str, Path)) else None, "seed": seed, "device": device,
        "settings": settings,
        "monitor": (to_dict(monitor) if monitor is not None
                    else None if "monitor" in preset_values else to_dict(MonitorSettings(every=-1))),
    }
    if budget is not None:
        overrides.update(images=budget.images, bytes=budget.bytes, storage_dtype=budget.dtype)
    cfg = resolve_config(DistillConfig, "distill", name, None, overrides)  # the command line's resolution
    method_settings(method, cfg.settings)  # unknown or wrong settings fail now, as on the command line
    loaded_teacher = teacher if isinstance(teacher, Teacher) else None
    dataset = source if isinstance(source, ImageDataset) else None
    return Distillation(cfg, out, resume, progress, teacher=loaded_teacher, source=dataset, overwrite=overwrite).run()
