"""The one place where images become bytes: storage budgets, what one stored item costs, and the plans methods
and baselines size their sets by.

A :class:`Budget` is a number of images (``--images N``: N images with their targets, as the method stores them) or
of bytes (``--bytes B``: the exact byte count of every stored tensor), at a storage dtype.  A method asks it for a
:class:`Plan` (:meth:`Budget.plan`, :meth:`Budget.plan_values`, :meth:`Budget.plan_per_class`): how many items fit
from the bytes one item costs and the bytes stored once (bases, a learned step size), and the most bytes the set may
then store.  The engine refuses a set whose ``byte_count`` exceeds that limit (:func:`refuse_overspent`).

Baselines of real images are float32 with float32 teacher targets or int64 labels (:data:`REAL_BYTES_PER_VALUE`,
:data:`LABEL_BYTES`): :func:`pair_bytes`, :func:`images_for_budget`, :func:`labelled_images_per_class`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ssdd.errors import BudgetError, ConfigError

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LABEL_BYTES = torch.tensor([], dtype=torch.int64).element_size()  # one hard label: every labelled set stores int64
REAL_BYTES_PER_VALUE = 4  # baselines keep real images (and teacher targets) in float32
BUDGET_KEYS = ("images", "bytes")  # a run's budget: one of the two; a layer of settings that gives one replaces both


@dataclass(frozen=True)
class Plan:
    """How a set spends its budget: ``count`` items of ``item_bytes`` beside ``fixed_bytes`` stored once, at most
    ``limit`` bytes in all (a byte budget's bytes; for an image budget, what its images cost as the method stores
    them); ``per_class`` items of each class for class-balanced sets."""

    count: int
    item_bytes: int
    fixed_bytes: int
    limit: int
    per_class: int | None = None

    @property
    def spending(self) -> int:
        """The bytes the planned set stores."""
        return self.count * self.item_bytes + self.fixed_bytes

    def describe(self) -> dict[str, Any]:
        return {"count": self.count, "item_bytes": self.item_bytes, "fixed_bytes": self.fixed_bytes,
                "limit": self.limit, "per_class": self.per_class}


@dataclass(frozen=True)
class Budget:
    """How much a set may store: ``images`` (N images with their targets, as the method stores them) or ``bytes``
    (the exact byte count of every stored tensor), at ``dtype`` per stored value."""

    images: int | None = None
    bytes: int | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if (self.images is None) == (self.bytes is None):
            raise ConfigError("give the budget as a number of images (--images N) or of bytes (--bytes B), "
                              "not both or neither")
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

    def value_bytes(self, values: int, labels: int = 0) -> int:
        """The bytes of ``values`` stored values and ``labels`` int64 hard labels."""
        return values * self.bytes_per_value + labels * LABEL_BYTES

    def plan(self, item_bytes: int, fixed_bytes: int = 0) -> Plan:
        """Items of ``item_bytes`` beside ``fixed_bytes`` of other stored tensors: as many as the bytes hold (``images``
        when the budget is in images); a clear error when not one fits."""
        if self.images is not None:
            return Plan(self.images, item_bytes, fixed_bytes, self.images * item_bytes + fixed_bytes)
        count = (self.bytes - fixed_bytes) // item_bytes  # type: ignore[operator]
        if count < 1:
            raise ConfigError(f"a budget of {self.bytes} bytes holds no item of {item_bytes} bytes beside "
                              f"{fixed_bytes} bytes of fixed tensors ({self.dtype})")
        return Plan(count, item_bytes, fixed_bytes, self.bytes)  # type: ignore[arg-type]

    def plan_values(self, values_per_item: int) -> Plan:
        """Items of ``values_per_item`` stored values (an image and its target), nothing stored once."""
        item_bytes = self.value_bytes(values_per_item)
        if self.bytes is not None and self.bytes < item_bytes:
            raise ConfigError(f"a budget of {self.bytes} bytes holds no item of {values_per_item} {self.dtype} values "
                              f"({item_bytes} bytes)")
        return self.plan(item_bytes)

    def plan_per_class(self, item_bytes: int, classes: int, method: str, fixed_bytes: int = 0) -> Plan:
        """A class-balanced set: as many items of ``item_bytes`` (an image and its label) per class as fit beside
        ``fixed_bytes``; a clear error when the budget does not reach one image per class."""
        total = self.plan(item_bytes, fixed_bytes)
        if total.count < classes:
            raise ConfigError(f"{method} keeps the classes balanced: the budget buys {total.count} images, fewer than "
                              f"the {classes} classes")
        per_class = total.count // classes
        return Plan(per_class * classes, item_bytes, fixed_bytes, total.limit, per_class)

    def count(self, values_per_item: int) -> int:
        """How many items of ``values_per_item`` stored values fit (``images`` when the budget is in images)."""
        return self.plan_values(values_per_item).count

    def total_values(self, pair_values: int) -> int:
        """Stored values the budget allows; an image budget means the bytes of that many (image, target) pairs
        of ``pair_values`` values (the equal-storage comparison with KRR-ST)."""
        if self.images is not None:
            return self.images * pair_values
        return self.bytes // self.bytes_per_value  # type: ignore[operator]

    def limit(self, plan: Plan | None) -> int | None:
        """The most bytes a set may store: the byte budget, or for an image budget the ``plan``'s limit (None when a
        method made no plan)."""
        if self.bytes is not None:
            return self.bytes
        return None if plan is None else plan.limit

    def text(self) -> str:
        return f"{self.images} images" if self.images is not None else f"{self.bytes} bytes"

    def describe(self) -> dict[str, Any]:
        return {"images": self.images, "bytes": self.bytes, "dtype": self.dtype}


def refuse_overspent(byte_count: int, budget: Budget, plan: Plan | None, method: str) -> None:
    """Raise :class:`BudgetError` when a set of ``byte_count`` bytes stores more than ``budget`` (through the method's
    ``plan`` for an image budget) allows."""
    limit = budget.limit(plan)
    if limit is not None and byte_count > limit:
        raise BudgetError(f"{method} made a set of {byte_count:,} bytes, over its budget of {limit:,} bytes "
                          f"(a budget of {budget.text()}, {budget.dtype}); the set was not kept: the method stores "
                          "more than it planned")


def pair_bytes(image_shape: tuple[int, int, int], target_dim: int | None,
               bytes_per_value: int = REAL_BYTES_PER_VALUE) -> int:
    """The bytes of one real image with its target: ``target_dim`` values, or an int64 label when it is None."""
    c, h, w = image_shape
    return c * h * w * bytes_per_value + (LABEL_BYTES if target_dim is None else target_dim * bytes_per_value)


def images_for_budget(budget_bytes: int, image_shape: tuple[int, int, int], target_dim: int,
                      bytes_per_value: int = REAL_BYTES_PER_VALUE) -> int:
    """How many (image, target) pairs fit in ``budget_bytes`` when both are stored at ``bytes_per_value``."""
    return budget_bytes // pair_bytes(image_shape, target_dim, bytes_per_value)


def labelled_images_per_class(budget_bytes: int, image_shape: tuple[int, int, int], classes: int) -> int:
    """Real images per class (float32, with int64 labels) a class-balanced set of ``budget_bytes`` holds."""
    return budget_bytes // pair_bytes(image_shape, None) // classes
