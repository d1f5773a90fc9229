"""The interface every distillation method implements, and what the shared machinery hands it.

A method is a class with a settings dataclass (``settings_class``) and a small set of hooks: ``total_steps``,
``step`` (one outer step, returning its metrics), ``state_dict`` / ``load_state_dict`` (everything a resumed run
needs: synthetic tensors, optimiser states, model pools, step counters, RNG states) and ``distilled_set`` (the
current set as an artefact).  The engine (:mod:`ssdd.methods.engine`) owns the loop, progress bar, metrics log,
checkpoints, monitoring and the final file, so no method repeats them.
"""

from __future__ import annotations

import abc
import importlib
import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch

from ssdd.budget import Budget, Plan
from ssdd.data.dataset import ImageDataset
from ssdd.data.transforms import PixelSpace
from ssdd.distilled import DistilledSet
from ssdd.errors import UnknownNameError
from ssdd.registry import Registry
from ssdd.teachers.artefact import Teacher


@dataclass
class DistillContext:
    """What a method works from: the source data, the teacher, the device, the seed and a logger; and the geometry
    a set made from them has (the teacher's input, else the source's own)."""

    source: ImageDataset
    teacher: Teacher | None
    device: torch.device
    seed: int
    log: logging.Logger
    workdir: Path | None = None  # the run folder (None for an in-memory run): where a method keeps its own files
    progress: bool = True  # whether long preparations (experts, squeeze models) show progress bars

    @cached_property
    def pixel_space(self) -> PixelSpace:
        """The teacher's pixel space, else the source's own mean and std."""
        return self.teacher.pixel_space if self.teacher is not None else PixelSpace.of(self.source.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the set's images: the teacher's input, else the source's images."""
        return self.teacher.input_shape if self.teacher is not None else self.source.image_shape

    def normalized_source(self) -> torch.Tensor:
        """Every source image converted to :attr:`image_shape` and normalised into :attr:`pixel_space` (float32,
        CPU)."""
        c, h, _ = self.image_shape
        images = self.source.converted(channels=c, size=h).images
        return self.pixel_space.normalize(images.float().div(255.0))


class Method(abc.ABC):
    """One distillation method.  Subclasses set ``settings_class`` and implement the hooks below; the
    constructor builds the initial state (synthetic tensors, optimisers, pools) from ``context`` and ``budget``.
    Registering the class in :data:`METHODS` sets its ``name``."""

    name: ClassVar[str]  # set by METHODS when the class is registered
    settings_class: ClassVar[type]
    needs_teacher: ClassVar[bool] = True
    splits_over_processes: ClassVar[bool] = False  # whether a run under torchrun shares each step's work
    prepares: ClassVar[str | None] = None  # what :meth:`prepare` makes ahead of a run, in words ("experts")
    # how the set spends the budget, asked of ``budget`` (``budget.plan(...)``) by the constructor: under an image
    # budget the engine refuses a set over ``plan.limit`` bytes (a byte budget is its own limit)
    plan: Plan | None = None

    def __init__(self, settings: Any, context: DistillContext, budget: Budget):
        self.settings = settings
        self.context = context
        self.budget = budget

    @classmethod
    def prepare(cls, settings: Any, context: DistillContext) -> Any:
        """Make (or check) what a run needs before its first step and keeps in its run folder or ``settings``'
        folders: expert trajectories, a squeeze model.  A run makes it when its method is built; ``ssdd experts``
        (:func:`ssdd.methods.prepare`) makes it alone.  Returns what it made (None: nothing)."""
        return None

    @abc.abstractmethod
    def total_steps(self) -> int:
        """Number of outer steps of the whole run."""

    @abc.abstractmethod
    def step(self, step: int) -> dict[str, float]:
        """Run outer step ``step`` (0-based) and return its metrics (at least ``loss``)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors, optimiser and pool states, generator states)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""

    @abc.abstractmethod
    def distilled_set(self) -> DistilledSet:
        """The current set, cast to the budget's storage dtype (:meth:`make_set`)."""

    def make_set(self, tensors: dict[str, torch.Tensor], target_kind: str, metadata: dict[str, Any],
                 pixel_space: PixelSpace | None = None) -> DistilledSet:
        """A set of this method: ``tensors`` on the CPU, the float ones cast to the budget's storage dtype, in
        ``pixel_space`` (default: the context's)."""
        dtype = self.budget.torch_dtype
        stored = {k: v.detach().cpu().to(dtype) if v.is_floating_point() else v.detach().cpu()
                  for k, v in tensors.items()}
        return DistilledSet(stored, pixel_space or self.context.pixel_space, target_kind, self.name, metadata)


class ImageLearningMethod(Method):
    """A method whose whole state is one learned image tensor (``self.images``), its optimiser (``self.optimizer``)
    and one generator (``self.generator``), which subclasses create."""

    images: torch.Tensor
    optimizer: torch.optim.Optimizer
    generator: torch.Generator

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images.detach().cpu(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


ENTRY_POINT_GROUP = "ssdd.methods"  # where installed packages register their methods (name = "module:Class")


class MethodRegistry(Registry[type[Method]]):
    """The registry of methods: registering a class names it.  Besides the methods registered here, it knows those
    that installed packages declare as entry points of the group ``ssdd.methods`` (loaded when first asked for), and
    takes any ``package.module:Class`` name of a :class:`Method` subclass (imported when first asked for)."""

    def add(self, name: str, obj: type[Method]) -> type[Method]:
        super().add(name, obj)
        obj.name = name
        return obj

    def entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        """The installed packages' methods, by name (not loaded)."""
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}

    def names(self) -> list[str]:
        return sorted({*super().names(), *self.entry_points()})

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def get(self, name: str) -> type[Method]:
        if not super().__contains__(name):
            declared = self.entry_points().get(name)
            if declared is not None:
                return self._adopt(name, declared.load, f"entry point {declared.value!r}")
            if ":" in name:
                module, _, attribute = name.partition(":")
                return self._adopt(name, lambda: getattr(importlib.import_module(module), attribute),
                                   f"module {module!r}")
        return super().get(name)

    def _adopt(self, name: str, load: Callable[[], Any], where: str) -> type[Method]:
        """The class ``load`` returns, checked to be a method and registered as ``name``."""
        try:
            cls = load()
        except (ImportError, AttributeError) as exc:
            raise UnknownNameError(f"method {name!r}: cannot load it from {where} ({exc})") from None
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise UnknownNameError(f"method {name!r}: {where} gives {cls!r}, not a subclass of ssdd.methods.Method")
        return cls if cls in self.values() else self.add(name, cls)  # a class that registers itself keeps its name


METHODS = MethodRegistry("method")


def list_methods() -> list[str]:
    """Names of the registered distillation methods."""
    return METHODS.names()
