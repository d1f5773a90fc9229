"""Device selection, batches moved to the device, and explicit random generators."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ssdd.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("amp", "float32")  # amp: bf16 autocast where native (the default); float32: as the released code runs
PRECISION_VARIABLE = "SSDD_PRECISION"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; asking for an absent device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise ConfigError(f"unknown device {name!r}; use one of {', '.join(DEVICE_CHOICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but this torch has no CUDA device; use --device cpu or auto")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but MPS is not available here; use --device cpu or auto")
    return torch.device(name)


def bf16_native_on_cpu() -> bool:
    """Whether this CPU runs bf16 convolutions natively (oneDNN with AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision() -> str:
    """The process's precision (``SSDD_PRECISION``, set by ``--precision``): ``amp`` lets every ``amp`` setting
    autocast to bf16 where that is native; ``float32`` turns every one of them off, so each method and protocol runs
    in float32 as the released code does."""
    value = os.environ.get(PRECISION_VARIABLE, "amp") or "amp"
    if value not in PRECISIONS:
        raise ConfigError(f"{PRECISION_VARIABLE}={value!r}: use one of {', '.join(PRECISIONS)}")
    return value


def set_precision(value: str) -> None:
    """Set :func:`precision` for this process and the processes it starts."""
    if value not in PRECISIONS:
        raise ConfigError(f"unknown precision {value!r}; use one of {', '.join(PRECISIONS)}")
    os.environ[PRECISION_VARIABLE] = value


def runs_bf16(device: torch.device, enabled: bool = True) -> bool:
    """Whether :func:`autocast` runs bf16 on ``device``: ``enabled``, bf16 native there, ``--precision amp``."""
    native = device.type == "cuda" or (device.type == "cpu" and bf16_native_on_cpu())
    return enabled and native and precision() == "amp"


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast (convolutions and matmuls in bf16, weights and losses in float32) on CUDA and on CPUs with
    native bf16; a no-op elsewhere, when not ``enabled`` or under ``--precision float32``, so results never depend
    on slow emulated bf16."""
    if runs_bf16(device, enabled):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is in a lower precision (an autocast output); float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def device_batches(data: torch.Tensor, batch_size: int, device: torch.device | str) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``data`` (first dimension) on ``device``.

    From the CPU to a CUDA device each batch travels through one of two page-locked (pinned) staging buffers and is
    copied on a side stream, issued before the previous batch is handed out, so the copy of batch i + 1 overlaps the
    work on batch i; anywhere else each batch is a plain slice moved with ``.to``.
    """
    device = torch.device(device)
    starts = range(0, data.shape[0], batch_size)
    if device.type != "cuda" or data.device.type != "cpu":
        for start in starts:
            yield data[start : start + batch_size].to(device)
        return
    stream = torch.cuda.Stream(device)
    staging = [torch.empty((batch_size, *data.shape[1:]), dtype=data.dtype, pin_memory=True) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]

    def send(index: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        slot, chunk = index % 2, data[starts[index] : starts[index] + batch_size]
        if copied[slot] is not None:
            copied[slot].synchronize()  # the copy that last read this buffer has finished
        buffer = staging[slot][: chunk.shape[0]]
        buffer.copy_(chunk)
        with torch.cuda.stream(stream):
            batch = buffer.to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        copied[slot] = event
        return batch, event

    pending = send(0) if len(starts) else None
    for index in range(len(starts)):
        batch, event = pending
        if index + 1 < len(starts):
            pending = send(index + 1)
        current = torch.cuda.current_stream(device)
        current.wait_event(event)
        batch.record_stream(current)  # allocated on the side stream, used on the current one
        yield batch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (e.g. model construction) under torch's global RNG seeded with ``seed``, then restore the
    global RNG state as it was, so the caller's randomness is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator seeded with ``seed`` (ssdd never reseeds the global RNG inside a loop)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def draw_seed(generator: torch.Generator) -> int:
    """A seed for something built fresh in a loop (a random network), drawn from ``generator``."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
