"""Atomic file writes and safetensors artefacts with JSON metadata.

Nothing in ssdd writes a final file in place: it writes ``NAME.tmp-<pid>`` beside it, flushes it to disk and
renames it over ``NAME``, so an interrupted run leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ssdd.errors import ArtefactError

METADATA_KEY = "ssdd"
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_IMAGE_SIDE = 4096  # the largest image side an artefact may declare: a forged one must not make ssdd allocate


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``. Temporary files of
    ``path`` that killed writers left behind are deleted first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the ``NAME.tmp-<pid>`` files beside ``path`` whose process no longer runs."""
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rpartition(".tmp-")[2]
        if pid.isdigit() and not process_running(int(pid)):
            tmp.unlink(missing_ok=True)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block, so processes that read,
    change and write one file do so one at a time; the system releases it when its holder dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Save tensors with safetensors; ``metadata`` (JSON-serialisable) goes into the header under ``"ssdd"``."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    blob = save(contiguous, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    atomic_write_bytes(path, blob)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read only the ssdd metadata of a safetensors file (cheap: the header, not the tensors)."""
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path} does not exist")
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ArtefactError(f"{path} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, path.stat().st_size - 8):
            raise ArtefactError(f"{path} is not a valid safetensors file (header length {header_len} is out of range)")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ArtefactError(f"{path} is not a valid safetensors file (header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise ArtefactError(f"{path} has no ssdd metadata; it was not written by ssdd")
    if not isinstance(meta[METADATA_KEY], str):
        raise ArtefactError(f"{path} has corrupt ssdd metadata (not a JSON string)")
    try:
        data = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise ArtefactError(f"{path} has corrupt ssdd metadata (not JSON)") from None
    if not isinstance(data, dict):
        raise ArtefactError(f"{path} has corrupt ssdd metadata (not a mapping)")
    return data


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and ssdd metadata of a safetensors file, with clear errors for corrupt files."""
    metadata = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArtefactError(f"{path} is corrupt: {reason}") from None
    return tensors, metadata


def load_artefact(path: str | Path, kind: str, default_file: str, required: tuple[str, ...],
                  format_version: int) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """Load an ssdd artefact of ``kind`` (a file, or a folder holding ``default_file``) and check its kind,
    format version and required metadata keys; returns (resolved path, tensors, metadata)."""
    path = Path(path)
    if path.is_dir():
        path = path / default_file
    tensors, meta = load_tensors(path)
    if meta.get("kind") != kind:
        raise ArtefactError(f"{path} is a {meta.get('kind', 'unknown')!r} artefact, not a {kind}")
    if meta.get("format_version") != format_version or isinstance(meta.get("format_version"), bool):
        raise ArtefactError(f"{path} has format version {meta.get('format_version')!r}; this ssdd reads version {format_version}")
    missing = [key for key in required if key not in meta]
    if missing:
        raise ArtefactError(f"{path}: metadata lacks {', '.join(map(repr, missing))}; the file is damaged or not from ssdd")
    return path, tensors, meta


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically save a training checkpoint (tensors, numbers, strings and RNG states only)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; never unpickles arbitrary objects."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols; the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtefactError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt checkpoint to the user
        if "weights_only" in str(exc):  # torch refused a global or an instruction: a pickle of other objects
            reason = "it holds objects other than tensors and plain values, which ssdd never unpickles"
        else:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArtefactError(f"checkpoint {path} is corrupt or not an ssdd checkpoint: {reason}") from None
