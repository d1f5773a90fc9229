"""Evaluation protocols: which sets and baselines a protocol takes, how it makes a student from a set
(:mod:`ssdd.evaluation.students`) and how it reads that student out on a target dataset.

A read-out returns accuracies keyed by the label fraction (``1.0`` where the protocol always uses every label).
Protocols (:class:`Protocol`) are registered by name in ``PROTOCOLS``; every setting they use lives in
:class:`ProtocolSettings` and is written into the results.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ssdd.data.dataset import ImageDataset, NormalizedImages
from ssdd.data.transforms import PixelSpace
from ssdd.device import seeded
from ssdd.errors import ConfigError
from ssdd.evaluation.baselines import BASELINES, LABELLED_BASELINES
from ssdd.evaluation.students import StudentJob, label_trained_student, pretrained_student
from ssdd.models import Backbone
from ssdd.probes import dataset_features, knn_accuracy, label_fraction, linear_probe_accuracy
from ssdd.registry import Registry
from ssdd.training import TrainSettings, top1, train_network


@dataclass
class ProtocolSettings:
    """Read-out settings of every protocol (only the chosen protocol's are used)."""

    fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 1.0])  # linear
    l2: float = 1e-3  # linear: L2 weight of the logistic regression
    lbfgs_iterations: int = 200  # linear
    knn_k: int = 200  # knn
    knn_temperature: float = 0.1  # knn
    finetune: TrainSettings = field(default_factory=lambda: TrainSettings(epochs=10, lr=0.01, weight_decay=5e-4,
                                                                          batch_size=256, augment="crop-flip"))


@dataclass
class Target:
    """A target dataset's splits, already converted to the set's image shape (uint8)."""

    name: str
    train: ImageDataset
    test: ImageDataset


@dataclass
class ReadoutContext:
    student: Backbone
    target: Target
    pixel_space: PixelSpace
    settings: ProtocolSettings
    seed: int
    device: torch.device


Readout = Callable[[ReadoutContext], dict[float, float]]


@dataclass(frozen=True)
class Protocol:
    """A protocol: the sets it takes (``accepts``: their target kinds; ``takes``: them in a word), the baselines it
    builds, how it makes a student from a set and how it reads the student out."""

    name: str
    accepts: tuple[str, ...]
    takes: str  # "representation" | "labelled"
    student: Callable[[StudentJob], Backbone]
    readout: Readout
    baselines: tuple[str, ...] = BASELINES

    def refuse_mismatches(self, sets: list[tuple[str, str]], baselines: list[str]) -> None:
        """Refuse, before anything trains, a baseline or a set (``(name, target kind)``) that this protocol does not
        take, naming the protocols that do."""
        refused = [b for b in baselines if b not in self.baselines]
        if refused:
            others = [p.name for p in PROTOCOLS.values() if set(refused) <= set(p.baselines)]
            raise ConfigError(f"the {self.name} protocol evaluates {self.takes} sets; baselines {', '.join(refused)} "
                              f"are not among them; evaluate them with {', '.join(others)} (its {self.takes} baselines "
                              f"are {', '.join(self.baselines)})")
        for name, kind in sets:
            if kind not in self.accepts:
                others = [p.name for p in PROTOCOLS.values() if kind in p.accepts]
                raise ConfigError(f"set {name!r} holds {kind}s; the {self.name} protocol evaluates {self.takes} sets; "
                                  f"use --protocol {' or '.join(others)}")


PROTOCOLS: Registry[Protocol] = Registry("protocol")


def _frozen_features(ctx: ReadoutContext, train_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of the target's training images (all, or ``train_rows``) and of its test split."""
    ctx.student.eval()
    encode = ctx.student.features
    return (dataset_features(encode, ctx.target.train, ctx.pixel_space, train_rows, device=ctx.device),
            dataset_features(encode, ctx.target.test, ctx.pixel_space, device=ctx.device))


def linear_readout(ctx: ReadoutContext) -> dict[float, float]:
    """MKDT's protocol: L-BFGS logistic regression on frozen, standardised features of a seeded random fraction
    of the target's training labels; top-1 on the full test split.  Only the labelled images are encoded."""
    subsets = {f: label_fraction(len(ctx.target.train), f, ctx.seed) for f in ctx.settings.fractions}
    rows = torch.unique(torch.cat(list(subsets.values())))  # sorted
    train_feats, test_feats = _frozen_features(ctx, rows)
    results = {}
    for fraction, idx in subsets.items():
        at = torch.searchsorted(rows, idx)
        results[fraction] = linear_probe_accuracy(train_feats[at], ctx.target.train.labels[idx], test_feats,
                                                  ctx.target.test.labels, l2=ctx.settings.l2,
                                                  max_iter=ctx.settings.lbfgs_iterations)
    return results


def knn_readout(ctx: ReadoutContext) -> dict[float, float]:
    """Cosine kNN on frozen features, all training labels."""
    train_feats, test_feats = _frozen_features(ctx)
    return {1.0: knn_accuracy(train_feats, ctx.target.train.labels, test_feats, ctx.target.test.labels,
                              k=ctx.settings.knn_k, temperature=ctx.settings.knn_temperature)}


def finetune_readout(ctx: ReadoutContext) -> dict[float, float]:
    """KRR-ST's protocol: a new head, then the whole network fine-tuned on 100% of the target's labels."""
    model = copy.deepcopy(ctx.student)  # the pre-trained student is shared by every target
    with seeded(ctx.seed):
        model.reset_head(ctx.target.train.num_classes)
    train = NormalizedImages(ctx.target.train, ctx.pixel_space, ctx.device)  # batch by batch when memory-mapped
    test = NormalizedImages(ctx.target.test, ctx.pixel_space, ctx.device)
    model = train_network(model, train, ctx.target.train.labels, ctx.settings.finetune, "ce", ctx.seed,
                          ctx.device, desc=f"fine-tune on {ctx.target.name}")
    return {1.0: top1(model, test, ctx.target.test.labels, ctx.device)}


def supervised_readout(ctx: ReadoutContext) -> dict[float, float]:
    """For labelled sets: the student was trained from scratch on the set's labels; top-1 of its own head on
    the target's test split (the target must be the source, or share its classes)."""
    test = NormalizedImages(ctx.target.test, ctx.pixel_space, ctx.device)
    return {1.0: top1(ctx.student, test, ctx.target.test.labels, ctx.device)}


REPRESENTATION = ("representation",)
for _protocol in (Protocol("linear", REPRESENTATION, "representation", pretrained_student, linear_readout),
                  Protocol("knn", REPRESENTATION, "representation", pretrained_student, knn_readout),
                  Protocol("finetune", REPRESENTATION, "representation", pretrained_student, finetune_readout),
                  Protocol("supervised", ("hard-label", "soft-label"), "labelled", label_trained_student,
                           supervised_readout, LABELLED_BASELINES)):
    PROTOCOLS.add(_protocol.name, _protocol)
