"""User-facing errors.

Every mistake a user can make (unknown name, missing file, corrupt input, a shape that does not fit) raises a
subclass of :class:`SsddError` whose message is one line saying what is wrong and what to do.  The CLI prints
that line and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations

import math


class SsddError(Exception):
    """Base class of every error ssdd reports to a user."""

    exit_code = 2


class UnknownNameError(SsddError, KeyError):
    """A dataset, model, method, preset or protocol name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0]) if self.args else ""


class ConfigError(SsddError, ValueError):
    """A configuration or preset that does not fit its dataclass."""


class DataError(SsddError):
    """A dataset that cannot be found, or a file that cannot be read as the format it claims."""


class ArtefactError(SsddError):
    """A teacher or distilled-set file that is missing, corrupt, or not what was expected."""


class ShapeError(SsddError, ValueError):
    """Tensors whose shapes do not fit together (e.g. images of the wrong size for a model)."""


class RunFolderError(SsddError):
    """A run folder that another ssdd process is writing, or that holds a run a command would silently replace."""


class StorageError(SsddError, OSError):
    """A write that failed for want of space or permission, or through a file: disk full, read-only, not a folder
    (an OSError too, so that code which survives a failed write, e.g. of a cache, still does)."""


class ResourceError(SsddError):
    """A request that does not fit in the memory of the machine or the GPU."""

    exit_code = 3


class NumericalError(SsddError):
    """An optimisation diverged: its loss or its parameters became NaN or infinite."""


class BudgetError(SsddError):
    """A distilled set that stores more bytes than its budget allows (a method that spends past its plan)."""


def check_finite(value: float, what: str, advice: str) -> None:
    """Raise :class:`NumericalError` naming ``what`` (e.g. "the loss at step 12 of the teacher") when ``value``
    is NaN or infinite; ``advice`` says where the last good state is and what to change."""
    if not math.isfinite(value):
        raise NumericalError(f"{what} became {value}; {advice}")
