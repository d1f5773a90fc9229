"""Memory limits: refuse a request that cannot fit before allocating it, and turn an allocator's failure into one
clear line instead of a traceback (or the kernel's out-of-memory kill)."""

from __future__ import annotations

from pathlib import Path

import torch

from ssdd.errors import ResourceError

GIB = 1024**3


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory a new allocation can use now: free GPU memory on CUDA, the kernel's ``MemAvailable`` on a CPU
    (None where it cannot be known, e.g. without /proc)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def ensure_fits(needed: int, what: str, device: torch.device | str, advice: str) -> None:
    """Raise :class:`ResourceError` when ``needed`` bytes (an estimate made before allocating) exceed the memory
    available on ``device``; ``what`` names the request and ``advice`` how to shrink it."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise ResourceError(f"{what} needs about {needed / GIB:.1f} GiB but only {free / GIB:.1f} GiB is free on "
                            f"{torch.device(device).type}; {advice}")


def on_device_if_it_fits(tensor: torch.Tensor, device: torch.device | str, share: float = 0.25) -> torch.Tensor:
    """``tensor`` moved to a GPU ``device`` when it takes at most ``share`` of the memory free there, so batches
    drawn from it are indexed on the GPU instead of copied from the host each step; otherwise ``tensor`` as it is."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device == device:
        return tensor
    free = available_bytes(device)
    if free is None or tensor.numel() * tensor.element_size() > share * free:
        return tensor
    return tensor.to(device)


def out_of_memory_message(exc: BaseException) -> str | None:
    """The one-line message for an allocator failure (CUDA out of memory, or a CPU allocation refused), else None."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return ("the GPU ran out of memory; lower the batch size or the budget, or use --device cpu "
                f"({str(exc).splitlines()[0]})")
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "not enough memory" in str(exc)):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"the machine ran out of memory; lower the batch size or the budget ({first})"
    return None
