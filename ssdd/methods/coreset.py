"""Coreset selection as a method: real images chosen by ``random``, ``herding`` or ``kcenter`` selection
(:mod:`ssdd.selection`), over the whole source or per class, measured in the teacher's feature space or in pixel
space, stored with the teacher's features as targets (a representation set, like KRR-ST's) or with their hard
labels (a labelled set, like DM's). Such sets are baselines in their own right and initialisations for other
methods; every protocol evaluates them like any other set.

The run has one step, the selection; its ``loss`` is the distance between the selection's mean and the data's mean
in the selection space (what herding minimises greedily).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ssdd.budget import Budget
from ssdd.data.mapped import read_rows
from ssdd.distilled import DistilledSet
from ssdd.errors import ConfigError
from ssdd.methods.base import METHODS, DistillContext, Method
from ssdd.selection import SELECTIONS, feature_mean, select, select_per_class
from ssdd.teachers.features import teacher_features


@dataclass
class CoresetSettings:
    """How the coreset is chosen and what it stores."""

    selection: str = "random"  # random | herding | kcenter
    per_class: bool = False  # the same number of images from every class
    space: str = "teacher"  # where herding and k-center measure: teacher (features) | pixel (normalised pixels)
    targets: str = "teacher"  # teacher (features, a representation set) | labels (hard labels)

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.space not in ("teacher", "pixel"):
            raise ConfigError(f"space must be teacher or pixel, got {self.space!r}")
        if self.targets not in ("teacher", "labels"):
            raise ConfigError(f"targets must be teacher or labels, got {self.targets!r}")


@METHODS.register("coreset")
class Coreset(Method):
    """Real images chosen by a coreset selection (see the module docstring)."""

    settings_class = CoresetSettings
    needs_teacher = False

    def __init__(self, settings: CoresetSettings, context: DistillContext, budget: Budget):
        super().__init__(settings, context, budget)
        teacher, source = context.teacher, context.source
        if teacher is None and "teacher" in (settings.space, settings.targets):
            raise ConfigError("coreset with space or targets 'teacher' needs a teacher (--teacher PATH); "
                              "without one use space: pixel and targets: labels")
        if (settings.per_class or settings.targets == "labels") and source.num_classes < 2:
            raise ConfigError(f"per-class selection and label targets need labels; {source.name} has none")
        c, h, _ = context.image_shape
        self.converted = source.converted(channels=c, size=h)
        self.features = teacher_features(teacher, source, device=context.device).float().cpu() if teacher else None
        values = math.prod(self.converted.image_shape)
        if settings.targets == "teacher":
            item_bytes = budget.value_bytes(values + teacher.feature_dim)
        else:
            item_bytes = budget.value_bytes(values, labels=1)
        if settings.per_class:
            self.plan = budget.plan_per_class(item_bytes, source.num_classes, self.name)
        else:
            self.plan = budget.plan(item_bytes)
        self.count = self.plan.count
        if self.count > len(source):
            raise ConfigError(f"the budget asks for {self.count} images but {source.name} has {len(source)}")
        self.indices: torch.Tensor | None = None

    def space_rows(self) -> torch.Tensor:
        """Every source image as a row of the selection space (teacher features: memory-mapped with the source)."""
        if self.settings.space == "teacher":
            return self.features
        return self.normalized(None).flatten(1)

    def normalized(self, indices: torch.Tensor | None) -> torch.Tensor:
        """The source images at ``indices`` (None: all, in memory) in the set's pixel space."""
        images = self.converted.images if indices is None else self.converted.batch(indices)
        return self.context.pixel_space.normalize(images.float() / 255)

    def total_steps(self) -> int:
        return 1

    def step(self, step: int) -> dict[str, float]:
        rows, source, seed, how = self.space_rows(), self.context.source, self.context.seed, self.settings.selection
        if self.settings.per_class:
            k = self.count // source.num_classes
            self.indices = select_per_class(
                source.labels, source.num_classes, k,
                lambda members, c: select(how, read_rows(rows, members), k, seed * 1000 + c), source.name)
        else:
            self.indices = select(how, rows, self.count, seed)
        gap = (read_rows(rows, self.indices).double().mean(0) - feature_mean(rows)).norm()
        return {"loss": float(gap), "selected": float(self.indices.numel())}

    def state_dict(self) -> dict[str, Any]:
        return {"indices": self.indices}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.indices = state["indices"]

    def distilled_set(self) -> DistilledSet:
        if self.indices is None:
            raise ConfigError("the coreset has not been selected yet (the run has not taken its step)")
        s, source = self.settings, self.context.source
        tensors = {"images": self.normalized(self.indices)}
        meta = {"selection": s.selection, "per_class": s.per_class, "space": s.space,
                "selected_indices": self.indices.tolist()}
        if s.targets == "teacher":
            return self.make_set({**tensors, "targets": read_rows(self.features, self.indices)}, "representation", meta)
        return self.make_set({**tensors, "labels": source.labels[self.indices].clone()}, "hard-label",
                             {**meta, "num_classes": source.num_classes})
