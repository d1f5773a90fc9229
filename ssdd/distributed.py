"""Runs on several processes with PyTorch's own engine: ``torchrun --nproc_per_node=N -m ssdd ...``.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env`
joins the process group they describe (NCCL on CUDA, gloo on CPU) and binds each process to its local GPU. Work
that splits into independent items is dealt round-robin with :func:`shard` and collected with
:func:`gather_objects`; only the main process (rank 0) writes files and prints reports.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

# torch.distributed.nn.functional binds the default group as its functions' default argument when it is imported, and
# torch imports it lazily (through torch._dynamo, on a first factory call under a device context). Imported after
# init_process_group, it kept the group alive past destroy_process_group, and the group's gloo threads then raced the
# interpreter's shutdown (an abort at exit). Imported here, before any group exists, it binds None.
import torch.distributed.nn  # noqa: F401

from ssdd.errors import ConfigError

T = TypeVar("T")
TIMEOUT_VARIABLE = "SSDD_PROCESS_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 720.0  # processes wait this long for each other (ssdd bench: a whole distillation)
_alone = False  # inside alone(): this process works as if it were the only one


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The current world: the process group's when one is initialised (and not inside :func:`alone`), else a
    single process."""
    if not _alone and dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return World()


def launched_size() -> int:
    """How many processes the launcher (torchrun) started for this run; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str = "auto") -> World:
    """Join the process group torchrun describes in the environment (no-op for a single process or when already
    joined); CUDA processes use NCCL and their ``LOCAL_RANK``'s GPU, the others gloo."""
    if launched_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise ConfigError("this torch was built without torch.distributed; run ssdd as a single process")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start several processes with torchrun")
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes()))
    return world()


def timeout_minutes() -> float:
    """How long a process waits for the others at a collective before the run fails: ``SSDD_PROCESS_TIMEOUT_MINUTES``
    or 12 hours (``ssdd bench`` has processes make whole sets alone, and the others wait for the slowest)."""
    value = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise ConfigError(f"{TIMEOUT_VARIABLE}={value!r} is not a positive number of minutes")
    return minutes


@contextmanager
def alone() -> Iterator[None]:
    """Within this block the process works as a single process: :func:`world` is one process, so the work inside
    neither shards nor waits for the others (``ssdd bench`` gives each process whole distillations this way)."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def leave(finished: bool) -> None:
    """Leave the process group at the end of a command (no-op without one). A command that ``finished`` first waits
    for every process to finish too, so that none exits while another still talks to it (gloo aborts a process
    whose peer has gone); each process then destroys its group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def shard(items: list[T], current: World | None = None) -> list[tuple[int, T]]:
    """This process's share of ``items``, dealt round-robin, each with its index in ``items``."""
    current = current or world()
    return [(i, item) for i, item in enumerate(items) if i % current.size == current.rank]


def barrier(current: World | None = None) -> None:
    """Wait until every process gets here (a no-op for one process)."""
    current = current or world()
    if current.size > 1:
        dist.barrier()


def gather_objects(obj: Any, current: World | None = None) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` for a single process)."""
    current = current or world()
    if current.size == 1:
        return [obj]
    out: list[Any] = [None] * current.size
    dist.all_gather_object(out, obj)
    return out


def sum_gradients(tensors: list[torch.Tensor], current: World | None = None) -> None:
    """Replace each tensor's gradient by its sum over the processes (a no-op for one process)."""
    current = current or world()
    if current.size == 1:
        return
    for tensor in tensors:
        if tensor.grad is not None:
            dist.all_reduce(tensor.grad, op=dist.ReduceOp.SUM)


def average_gradients(tensors: list[torch.Tensor], current: World | None = None) -> None:
    """Replace each tensor's gradient by its mean over the processes (a no-op for one process)."""
    current = current or world()
    sum_gradients(tensors, current)
    for tensor in tensors:
        if current.size > 1 and tensor.grad is not None:
            tensor.grad.div_(current.size)


def sum_over_processes(tensor: torch.Tensor, current: World | None = None) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over the processes, detached (``tensor`` itself for one process)."""
    current = current or world()
    if current.size == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def broadcast_object(obj: Any, current: World | None = None) -> Any:
    """The main process's ``obj`` on every process (what the others pass is ignored)."""
    current = current or world()
    if current.size == 1:
        return obj
    box = [obj if current.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_processes(value: float, current: World | None = None) -> float:
    """The mean of ``value`` over the processes (``value`` for one process)."""
    current = current or world()
    if current.size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total) / current.size
