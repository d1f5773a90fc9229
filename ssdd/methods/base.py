"""The interface every distillation method implements, and what the shared machinery hands it.

A method is a class with a settings dataclass (``settings_class``) and a small set of hooks: ``total_steps``,
``step`` (one outer step, returning its metrics), ``state_dict`` / ``load_state_dict`` (everything a resumed run
needs: synthetic tensors, optimiser states, model pools, step counters, RNG states) and ``distilled_set`` (the
current set as an artefact).  The engine (:mod:`ssdd.methods.engine`) owns the loop, progress bar, metrics log,
checkpoints, monitoring and the final file, so no method repeats them.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ssdd.data.dataset import ImageDataset
from ssdd.distilled import DistilledSet
from ssdd.errors import ConfigError
from ssdd.registry import Registry
from ssdd.teachers.artefact import Teacher

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Budget:
    """How much a set may store: ``images`` (N images with their targets, as the method stores them) or ``bytes``
    (the exact byte count of every stored tensor), at ``dtype`` per stored value."""

    images: int | None = None
    bytes: int | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if (self.images is None) == (self.bytes is None):
            raise ConfigError("give the budget as a number of images (--images N) or of bytes (--bytes B), not both or neither")
        if (self.images is not None and self.images < 1) or (self.bytes is not None and self.bytes < 1):
            raise ConfigError("a budget must be positive")
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.dtype]

    @property
    def bytes_per_value(self) -> int:
        return torch.tensor([], dtype=self.torch_dtype).element_size()

    def count(self, values_per_item: int) -> int:
        """How many items of ``values_per_item`` stored values fit (``images`` when the budget is in images)."""
        if self.images is not None:
            return self.images
        n = self.bytes // (values_per_item * self.bytes_per_value)  # type: ignore[operator]
        if n < 1:
            raise ConfigError(f"a budget of {self.bytes} bytes holds no item of {values_per_item} {self.dtype} values "
                              f"({values_per_item * self.bytes_per_value} bytes)")
        return n

    def fit(self, item_bytes: int, fixed_bytes: int = 0) -> int:
        """How many items of ``item_bytes`` fit beside ``fixed_bytes`` of other stored tensors (``images`` when the
        budget is in images)."""
        if self.images is not None:
            return self.images
        n = (self.bytes - fixed_bytes) // item_bytes  # type: ignore[operator]
        if n < 1:
            raise ConfigError(f"a budget of {self.bytes} bytes holds no item of {item_bytes} bytes beside "
                              f"{fixed_bytes} bytes of fixed tensors ({self.dtype})")
        return n

    def total_values(self, pair_values: int) -> int:
        """Stored values the budget allows; an image budget means the bytes of that many (image, target) pairs
        of ``pair_values`` values (the equal-storage comparison with KRR-ST)."""
        if self.images is not None:
            return self.images * pair_values
        return self.bytes // self.bytes_per_value  # type: ignore[operator]

    def describe(self) -> dict[str, Any]:
        return {"images": self.images, "bytes": self.bytes, "dtype": self.dtype}


def images_per_class(budget: Budget, item_bytes: int, classes: int, method: str, fixed_bytes: int = 0) -> int:
    """Images per class a class-balanced set can hold: items of ``item_bytes`` (an image and its label) beside
    ``fixed_bytes``; a clear error when the budget does not reach one image per class."""
    count = budget.fit(item_bytes, fixed_bytes)
    if count < classes:
        raise ConfigError(f"{method} keeps the classes balanced: the budget buys {count} images, fewer than the "
                          f"{classes} classes")
    return count // classes


@dataclass
class DistillContext:
    """What a method works from: the source data, the teacher, the device, the seed and a logger."""

    source: ImageDataset
    teacher: Teacher | None
    device: torch.device
    seed: int
    log: logging.Logger
    workdir: Path | None = None  # the run folder (None for an in-memory run): where a method keeps its own files
    progress: bool = True  # whether long preparations (experts, squeeze models) show progress bars


class Method(abc.ABC):
    """One distillation method.  Subclasses set ``settings_class`` and implement the hooks below; the
    constructor builds the initial state (synthetic tensors, optimisers, pools) from ``context`` and ``budget``."""

    settings_class: ClassVar[type]
    needs_teacher: ClassVar[bool] = True
    splits_over_processes: ClassVar[bool] = False  # whether a run under torchrun shares each step's work

    def __init__(self, settings: Any, context: DistillContext, budget: Budget):
        self.settings = settings
        self.context = context
        self.budget = budget

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
        """The current set, cast to the budget's storage dtype."""


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


METHODS: Registry[type[Method]] = Registry("method")


def list_methods() -> list[str]:
    """Names of the registered distillation methods."""
    return METHODS.names()
