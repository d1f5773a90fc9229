"""``ssdd evaluate``: every set and baseline through one protocol, on every target, architecture and seed."""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ssdd.budget import pair_bytes
from ssdd.checks import SET_CHECKS
from ssdd.config import resolve_config, to_dict
from ssdd.data import load_dataset
from ssdd.data.transforms import PixelSpace
from ssdd.device import resolve_device
from ssdd.distilled import DistilledSet, load_distilled
from ssdd.distributed import gather_objects, shard, world
from ssdd.errors import ArtefactError, ConfigError
from ssdd.evaluation.baselines import BASELINES, SETLESS, make_baseline, make_labelled_baseline
from ssdd.evaluation.journal import Journal, Result
from ssdd.evaluation.protocols import PROTOCOLS, ProtocolSettings, ReadoutContext, Target
from ssdd.evaluation.relabel import RelabelSettings, relabels_on_the_fly, squeeze_labeller
from ssdd.evaluation.students import StudentJob
from ssdd.models import Backbone
from ssdd.progress import progress_bar
from ssdd.selection import HighLossSettings
from ssdd.teachers import Teacher, load_teacher, teacher_features
from ssdd.training import TrainSettings, build_student
from ssdd.values import FRACTION, SEED


@dataclass
class EvaluationConfig:
    """Every setting of an evaluation; written into ``results.json`` next to the numbers."""

    protocol: str = "linear"
    targets: list[str] = field(default_factory=lambda: ["cifar10"])
    archs: list[str] = field(default_factory=lambda: ["convnet3"])
    arch_args: dict[str, dict] = field(default_factory=dict)  # per architecture, e.g. {convnet3: {width: 64}}
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    pretrain: TrainSettings = field(default_factory=TrainSettings)  # MSE pre-training (linear/knn/finetune)
    full_epochs: int | None = None  # epochs of the `full` upper bound (None: pretrain.epochs), since a set of
    # 50,000 images needs far fewer epochs than one of 500 for the same number of steps
    use_learned_lr: bool = True  # pre-train at the set's learned lr when it has one
    supervised: TrainSettings = field(default_factory=lambda: TrainSettings(epochs=300, lr=0.01, weight_decay=5e-4,
                                                                            batch_size=256, augment="dsa"))
    temperature: float = 4.0  # soft labels (supervised protocol), unless the set records its own
    use_set_temperature: bool = True
    relabel: RelabelSettings = field(default_factory=RelabelSettings)  # sets that name their squeeze model
    readout: ProtocolSettings = field(default_factory=ProtocolSettings)
    high_loss: HighLossSettings = field(default_factory=HighLossSettings)
    data_root: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(PROTOCOLS.unknown_message(self.protocol))
        if not self.targets or not self.archs or not self.seeds:
            raise ConfigError("targets, archs and seeds must each name at least one item")
        for seed in self.seeds:
            SEED.check(seed, "seeds")
        for fraction in self.readout.fractions:
            FRACTION.check(fraction, "label fractions (readout.fractions)")


@dataclass
class Cell:
    """One result: an entry (set or baseline) under a protocol on a target with an architecture, over seeds."""

    entry: str
    protocol: str
    arch: str
    target: str
    fraction: float
    seeds: list[int]
    accuracies: list[float]
    seconds: float

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    def to_dict(self) -> dict:
        return {**self.__dict__, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, record: dict) -> Cell:
        """The cell of a :meth:`to_dict` record (its derived mean and std are recomputed, not read)."""
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})


@dataclass
class _Entry:
    name: str
    distilled: DistilledSet | None  # None: no pre-training
    baseline: str | None = None  # a BASELINES name: built per seed from the source, or a SETLESS network


def _entry_name(distilled: DistilledSet, taken: set[str]) -> str:
    name = distilled.method
    if name in taken and distilled.path is not None:
        name = f"{distilled.method} ({distilled.path.parent.name or distilled.path.stem})"
    while name in taken:
        name += "'"
    taken.add(name)
    return name


class Evaluator:
    """Runs the grid; target datasets and teacher features are loaded once and reused across cells."""

    def __init__(self, config: EvaluationConfig, teacher: Teacher | None, progress: bool):
        self.config = config
        self.teacher = teacher
        self.progress = progress
        if teacher is not None:  # a bar over the teacher-feature cache's pass, when it is computed
            teacher.progress = progress
        self.device = resolve_device(config.device)
        self.protocol = PROTOCOLS.get(config.protocol)
        self._targets: dict[tuple[str, tuple[int, int, int]], Target] = {}
        self._source = None
        # entry name -> its squeeze model's labeller, for the sets relabelled on the fly
        self._labellers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def load_labellers(self, entries: list[_Entry]) -> None:
        """Load the squeeze model of every set that relabels on the fly, so a missing one fails before training."""
        if self.protocol.takes != "labelled":
            return
        for entry in entries:
            if entry.distilled is not None and relabels_on_the_fly(entry.distilled, self.config.relabel):
                self._labellers[entry.name] = squeeze_labeller(entry.distilled, entry.name, self.config.relabel,
                                                               self.device)

    def target(self, name: str, image_shape: tuple[int, int, int]) -> Target:
        key = (name, image_shape)
        if key not in self._targets:
            c, h, _ = image_shape
            root = self.config.data_root
            self._targets[key] = Target(name, load_dataset(name, "train", root=root, image_size=h, channels=c),
                                        load_dataset(name, "test", root=root, image_size=h, channels=c))
        return self._targets[key]

    def source(self):  # noqa: ANN201 - (ImageDataset, features)
        if self._source is None:
            if self.teacher is None:
                raise ConfigError("baselines need the teacher (--teacher): its source data and features define them")
            source_meta = self.teacher.metadata.get("source", {})
            dataset = load_dataset(source_meta.get("dataset", ""), "train", root=self.config.data_root)
            if source_meta.get("fingerprint") not in (None, dataset.fingerprint):
                raise ConfigError(f"the teacher was trained on a different copy of {dataset.name} "
                                  "(fingerprints differ); baselines would not be comparable")
            self._source = (dataset, teacher_features(self.teacher, dataset, device=self.device))
        return self._source

    def student(self, entry: _Entry, distilled: DistilledSet | None, arch: str, seed: int,
                image_shape: tuple[int, int, int], target_dim: int) -> Backbone:
        cfg = self.config
        arch_args = cfg.arch_args.get(arch, {})
        if entry.baseline == "teacher":
            return copy.deepcopy(self.teacher.backbone).to(self.device).eval()
        if distilled is None:  # 'none' (refused by the protocols that train on labels)
            return build_student(arch, arch_args, target_dim, image_shape, seed).to(self.device).eval()
        job = StudentJob(entry.name, distilled, arch, arch_args, seed, image_shape, cfg, self.device, self.progress,
                         full=entry.baseline == "full", labeller=self._labellers.get(entry.name))
        return self.protocol.student(job)

    def run(self, entries: list[_Entry], budget_bytes: int | None,
            journal_stem: str | Path | None = None) -> list[Cell]:
        cfg = self.config
        self.load_labellers(entries)
        jobs = [(e, a, s) for e in entries for a in (cfg.archs[:1] if e.baseline == "teacher" else cfg.archs)
                for s in cfg.seeds]
        current = world()
        journal = (Journal(journal_stem, self._journal_key(entries, budget_bytes)) if journal_stem is not None
                   else None)
        finished = journal.resume(current) if journal is not None else {}
        if finished and current.is_main:
            print(f"[evaluate] resuming: {len(finished)} of {len(jobs)} jobs finished before ({journal.stem}-*.jsonl)")
        todo = [(index, job) for index, job in enumerate(jobs) if index not in finished]
        done: list[tuple[int, list[Result]]] = []  # this process's share of the jobs left, with their job index
        pending = progress_bar(shard(todo, current), desc=f"evaluate ({cfg.protocol})", unit="cell",
                               disable=not (self.progress and current.is_main))
        for _, (index, (entry, arch, seed)) in pending:
            started = time.monotonic()
            distilled = entry.distilled
            if entry.baseline is not None and entry.baseline not in SETLESS:
                source, features = self.source()
                if self.protocol.takes == "labelled":
                    distilled = make_labelled_baseline(entry.baseline, source, self.teacher, features, budget_bytes,
                                                       seed)
                else:
                    distilled = make_baseline(entry.baseline, source, self.teacher, features, budget_bytes, seed,
                                              self.device, cfg.high_loss)
            pixel_space, image_shape, target_dim = self._geometry(distilled)
            student = self.student(entry, distilled, arch, seed, image_shape, target_dim)
            pretrain_seconds = time.monotonic() - started
            results: list[Result] = []
            for target_name in cfg.targets:
                target = self.target(target_name, image_shape)
                ctx = ReadoutContext(student, target, pixel_space, cfg.readout, seed, self.device)
                readout_started = time.monotonic()
                accuracies = self.protocol.readout(ctx)
                cell_seconds = pretrain_seconds + time.monotonic() - readout_started
                results += [(entry.name, arch, target_name, fraction, accuracy, cell_seconds)
                            for fraction, accuracy in accuracies.items()]
            if journal is not None:
                journal.add(index, results)
            done.append((index, results))
        # every job's results in job order: the same cells, seeds in the same order, as one uninterrupted process makes
        raw: dict[tuple[str, str, str, float], list[float]] = {}
        seconds: dict[tuple[str, str, str, float], float] = {}
        for _, results in sorted([*finished.items(), *(job for part in gather_objects(done, current) for job in part)],
                                 key=lambda job: job[0]):
            for name, arch, target_name, fraction, accuracy, cell_seconds in results:
                key = (name, arch, target_name, fraction)
                raw.setdefault(key, []).append(accuracy)
                seconds[key] = seconds.get(key, 0.0) + cell_seconds
        return [Cell(e, cfg.protocol, a, t, f, list(cfg.seeds), accs, round(seconds[(e, a, t, f)], 1))
                for (e, a, t, f), accs in raw.items()]

    def _journal_key(self, entries: list[_Entry], budget_bytes: int | None) -> dict:
        """What the jobs' results depend on: the settings, the entries (a set by its fingerprint), the budget and
        the teacher."""
        return {"config": to_dict(self.config), "budget_bytes": budget_bytes,
                "teacher": self.teacher.fingerprint if self.teacher is not None else None,
                "entries": [[e.name, e.baseline, None if e.distilled is None else
                             e.distilled.metadata.get("fingerprint") or e.distilled.metadata.get("created")]
                            for e in entries]}

    def _geometry(self, distilled: DistilledSet | None) -> tuple[PixelSpace, tuple[int, int, int], int]:
        if distilled is not None:
            _, targets = distilled.materialize()
            dim = targets.shape[1] if targets.dim() == 2 else 0
            return distilled.pixel_space, distilled.image_shape, dim
        if self.teacher is None:
            raise ConfigError("'none' and 'teacher' need the teacher (--teacher); 'none' takes its image shape and "
                              "pixel space from it")
        return self.teacher.pixel_space, self.teacher.input_shape, self.teacher.feature_dim


IMAGE_MARGIN = 10.0  # pixel ranges a set's images may reach beyond its pixel space's valid range (learned sets drift)
TARGET_LIMIT = math.sqrt(torch.finfo(torch.float32).max)  # ~1.8e19: a target's squared error overflows float32 beyond


def check_values(distilled: DistilledSet, name: str) -> None:
    """Refuse set ``name`` when its images or float targets (as materialised) hold NaN or infinite values, when its
    images reach more than :data:`IMAGE_MARGIN` widths of its pixel space's valid range beyond that range (the range
    of [0, 1] pixels; farther out a network sees no image at all and scores chance), or when a target's magnitude
    exceeds :data:`TARGET_LIMIT` (pre-training's squared error overflows): the set is at fault, not the protocol."""
    images, targets = distilled.materialize()
    low, high = (b.flatten() for b in distilled.pixel_space.bounds())
    seen_low, seen_high = images.amin(dim=(0, 2, 3)), images.amax(dim=(0, 2, 3))
    largest = float(torch.maximum(seen_low.abs(), seen_high.abs()).max())
    fix = "the set's values are out of range, not the protocol's settings; distil it again or repair the set"
    if not math.isfinite(largest):
        raise ArtefactError(f"set {name!r}: its images hold NaN or infinite values; {fix}")
    beyond = float(torch.maximum(low - seen_low, seen_high - high).div(high - low).max())
    if beyond > IMAGE_MARGIN:
        raise ArtefactError(f"set {name!r}: its images reach max |value| {largest:.3g}, {beyond:.3g} pixel ranges "
                            f"outside its pixel space's valid range {float(low.min()):.3g}..{float(high.max()):.3g} "
                            f"(at most {IMAGE_MARGIN:g} are accepted); {fix}")
    if targets.is_floating_point():
        largest = float(torch.maximum(targets.amin().abs(), targets.amax().abs()))
        if not math.isfinite(largest):
            raise ArtefactError(f"set {name!r}: its targets hold NaN or infinite values; {fix}")
        if largest > TARGET_LIMIT:
            raise ArtefactError(f"set {name!r}: its targets reach max |value| {largest:.3g}, beyond {TARGET_LIMIT:.2g} "
                                f"where pre-training's squared error overflows float32; {fix}")


def image_budget_bytes(images: int, teacher: Teacher, protocol: str) -> int:
    """The bytes of ``images`` real images in float32 with their teacher targets (float32), or under the
    supervised protocol with int64 hard labels."""
    return images * pair_bytes(teacher.input_shape, None if protocol == "supervised" else teacher.feature_dim)


def evaluate(
    sets: Sequence[DistilledSet | str | Path] = (),
    config: EvaluationConfig | None = None,
    baselines: Sequence[str] = (),
    teacher: Teacher | str | Path | None = None,
    budget_bytes: int | None = None,
    budget_images: int | None = None,
    progress: bool = True,
    names: Sequence[str | None] = (),
    journal: str | Path | None = None,
) -> list[Cell]:
    """Evaluate distilled sets and baselines under one protocol; returns one :class:`Cell` per
    (entry, architecture, target, label fraction) with the accuracy of every seed.

    ``names`` labels the sets' rows in order (a missing or ``None`` name: the set's method, made unique).

    Baselines other than ``none`` and ``teacher`` are built from the teacher's source data at the byte budget of
    the first set, or at ``budget_bytes`` / ``budget_images`` (images with teacher targets, float32; under the
    supervised protocol, class-balanced images with int64 hard labels).

    With ``journal`` (a path stem), each finished (entry, architecture, seed) job is recorded in
    ``<journal>-<rank>.jsonl`` as it finishes, and a rerun with the same settings skips the jobs recorded there;
    remove the files with :func:`clear_journal` once the results are stored.
    """
    config = config or EvaluationConfig()
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline(s) {', '.join(unknown)}; use {', '.join(BASELINES)}")
    if not sets and not baselines:
        raise ConfigError("nothing to evaluate: give distilled sets and/or --baselines")
    if isinstance(teacher, (str, Path)):
        teacher = load_teacher(teacher, device=resolve_device(config.device))
    loaded = [s if isinstance(s, DistilledSet) else load_distilled(s) for s in sets]
    if budget_bytes is None and loaded:
        budget_bytes = loaded[0].byte_count
    if budget_images is not None:
        if teacher is None:
            raise ConfigError("--images needs the teacher (--teacher) to know the image and target sizes")
        budget_bytes = image_budget_bytes(budget_images, teacher, config.protocol)
    if len(names) > len(loaded):
        raise ConfigError(f"{len(names)} names for {len(loaded)} sets")
    given = [n for n in names if n is not None]
    clashes = sorted({n for n in given if given.count(n) > 1 or n in baselines})
    if clashes:
        raise ConfigError(f"row names must be distinct and differ from the baselines; repeated: {', '.join(clashes)}")
    taken: set[str] = set(given) | set(baselines)
    labels = list(names) + [None] * (len(loaded) - len(names))
    entries = [_Entry(label or _entry_name(s, taken), s) for s, label in zip(loaded, labels)]
    PROTOCOLS.get(config.protocol).refuse_mismatches([(e.name, e.distilled.target_kind) for e in entries],
                                                     list(baselines))
    for entry in entries:
        check_values(entry.distilled, entry.name)
    if "teacher" in baselines and teacher is None:
        raise ConfigError("baseline 'teacher' reads out the teacher's own network: give it with --teacher")
    entries += [_Entry(b, None, b) for b in baselines]
    return Evaluator(config, teacher, progress).run(entries, budget_bytes, journal)


@SET_CHECKS.register("protocol")
def protocol_check(distilled: DistilledSet, preset: str, archs: list[str] | None = None,
                   seeds: list[int] | None = None, device: str = "auto", data_root: str | None = None,
                   teacher: Teacher | None = None) -> dict[str, float]:
    """The evaluate preset ``preset`` run on ``distilled`` (on ``archs`` and ``seeds`` when given): mean top-1 % per
    ``<arch> <target> <fraction>``; the distillation engine's ``monitor.protocol`` (through :data:`SET_CHECKS`)."""
    overrides = {"archs": archs, "seeds": seeds, "device": device, "data_root": data_root}
    config = resolve_config(EvaluationConfig, "evaluate", preset, None, overrides)
    cells = evaluate([distilled], config, teacher=teacher, progress=False)
    return {f"{c.arch} {c.target} {c.fraction:g}": round(c.mean, 2) for c in cells}
