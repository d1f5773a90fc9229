"""Atomic file writes and safetensors artefacts with JSON metadata.

Nothing in ssdd writes a final file in place: it writes ``NAME.tmp-<pid>`` beside it, flushes it to disk and
renames it over ``NAME``, so an interrupted run leaves either the old file or the new one, never half of one. A write
that fails for want of space or permission, or through a file, is one line (:func:`storage_error`), and a folder that
one process writes is locked against the others (:func:`hold_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ssdd.errors import ArtefactError, RunFolderError, StorageError

METADATA_KEY = "ssdd"
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_IMAGE_SIDE = 4096  # the largest image side an artefact may declare: a forged one must not make ssdd allocate
LOCK_FILE = ".lock"  # a folder's lock file, there while a process holds it
LOW_SPACE_BYTES = 64 * 2**20  # torch's writer failing with less than this free failed on a full disk
TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter")  # torch.save's errors, which never say why
_held_locks: dict[Path, tuple[IO[str], int]] = {}  # the lock files this process holds, with how many times each


def storage_error(exc: BaseException, path: str | Path) -> StorageError | None:
    """The one-line error of a write of ``path`` that failed with ``exc``: a full disk (ENOSPC, EDQUOT, or torch's
    writer failing with little space left), a read-only folder (EROFS, EACCES, EPERM) or a file where a folder must
    be; None when ``exc`` is none of these."""
    path = Path(path)
    folder = _nearest_existing(path.parent)
    code = exc.errno if isinstance(exc, OSError) else None
    torch_failed = isinstance(exc, RuntimeError) and any(text in str(exc) for text in TORCH_WRITE_FAILURES)
    free = _free_bytes(folder)
    elsewhere = "write elsewhere (e.g. another --out)"
    if code in (errno.ENOSPC, errno.EDQUOT) or (torch_failed and free is not None and free < LOW_SPACE_BYTES):
        left = "" if free is None else f" ({free / 2**20:.1f} MiB free on its filesystem)"
        return StorageError(f"disk full: cannot write {path}{left}; free some space or {elsewhere}")
    if code == errno.EROFS:
        return StorageError(f"cannot write {path}: {folder} is on a read-only filesystem; {elsewhere}")
    if code in (errno.EACCES, errno.EPERM):
        return StorageError(f"cannot write {path}: it is read-only to this user (permission denied in {folder}); "
                            f"{elsewhere} or change its permissions")
    if code in (errno.EEXIST, errno.ENOTDIR) and (blocker := _file_in_the_way(path)) is not None:
        return StorageError(f"cannot write {path}: {blocker} is a file, not a folder; {elsewhere}")
    if torch_failed:
        reason = str(exc).strip().splitlines()[-1]
        return StorageError(f"cannot write {path}: torch's writer failed ({reason}); check the disk it is on")
    return None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _file_in_the_way(path: Path) -> Path | None:
    """``path`` or the parent of it that exists and is not a folder, if any."""
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Raise a write of ``path`` in the block that fails for want of space or permission, or through a file, as
    :func:`storage_error`'s one line."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        error = storage_error(exc, path)
        if error is None:
            raise
        raise error from None


def writable(folder: str | Path) -> bool:
    """Whether this process may create files in ``folder`` (in its nearest existing parent while it does not exist):
    not on a read-only filesystem, nor without write permission."""
    existing = _nearest_existing(Path(folder))
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def make_folder(path: str | Path) -> Path:
    """Create the folder ``path`` and its parents unless it exists; a failure is :func:`storage_error`'s one line."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``. Temporary files of
    ``path`` that killed writers left behind are deleted first."""
    with atomic_paths(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """Yield a temporary path beside each of ``paths``; when the block succeeds every one is fsynced and only then
    are they renamed over ``paths``, so the files land together, or none does when one fails to be written. A
    failed write is :func:`storage_error`'s one line."""
    finals = [Path(p) for p in paths]
    temporaries = [p.with_name(f"{p.name}.tmp-{os.getpid()}") for p in finals]
    try:
        with writing(finals[0] if len(finals) == 1 else finals[0].parent):
            for path in finals:
                path.parent.mkdir(parents=True, exist_ok=True)
                _remove_stale_temporaries(path)
            yield temporaries
            for tmp in temporaries:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            for tmp, path in zip(temporaries, finals):
                os.replace(tmp, path)
    finally:
        for tmp in temporaries:
            with contextlib.suppress(OSError):  # on a read-only filesystem even a missing file "cannot" be removed
                tmp.unlink(missing_ok=True)


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
    make_folder(path.parent)
    with writing(path):
        fh = open(path, "a")
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def hold_lock(lock_file: str | Path, what: str) -> None:
    """Hold an exclusive lock on ``lock_file`` (created; it records the holder's pid, and goes when released) until
    :func:`release_lock`, so that one process at a time writes ``what`` (e.g. a run folder). The system releases it
    when the holder dies, so a killed run leaves no stale lock; the same process may take it again (it nests). Another
    process's lock is a :class:`RunFolderError` naming that process."""
    key = Path(lock_file).resolve()
    if key in _held_locks:
        fh, count = _held_locks[key]
        _held_locks[key] = (fh, count + 1)
        return
    while True:
        make_folder(key.parent)  # again: a process that gave up the folder may just have removed it, empty
        with writing(key):
            fh = open(key, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RunFolderError(f"{what} is in use by another ssdd process (pid {holder}); wait for it to end or "
                                 "use another --out") from None
        if _still_there(fh, key):
            break
        fh.close()  # its holder removed the file as this process opened it: lock the new one
    try:
        with writing(key):
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
    except BaseException:
        fh.close()
        raise
    _held_locks[key] = (fh, 1)


def _still_there(fh: IO[str], path: Path) -> bool:
    """Whether the open file ``fh`` is still the file at ``path``."""
    try:
        return os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def release_lock(lock_file: str | Path) -> None:
    """Release a lock taken with :func:`hold_lock` (once per taking; no-op when this process does not hold it); the
    lock file is removed while still held, so a process that opened it meanwhile sees it gone and takes a new one."""
    key = Path(lock_file).resolve()
    if key not in _held_locks:
        return
    fh, count = _held_locks.pop(key)
    if count > 1:
        _held_locks[key] = (fh, count - 1)
        return
    with contextlib.suppress(OSError):
        key.unlink()
    fh.close()  # closing the file releases the lock


def append_text(path: str | Path, text: str, sync: bool = False) -> None:
    """Append ``text`` to the file ``path`` (created if missing); with ``sync`` it is on disk when this returns."""
    with writing(path), open(path, "a") as fh:
        fh.write(text)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())


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


MAX_JSON_DEPTH = 64  # nesting of a header or of the ssdd metadata (sets nest a few levels; deeper is forged)
MAX_JSON_INT_DIGITS = 40  # digits of one integer in a header or metadata (2^64 has 20)


class JsonRefused(ValueError):
    """JSON that :func:`parse_json` refuses; the message is the reason, phrased to follow "the header"."""


def parse_json(raw: bytes | str) -> Any:
    """Parse JSON read from a file: UTF-8 text nested at most :data:`MAX_JSON_DEPTH` levels, integers of at most
    :data:`MAX_JSON_INT_DIGITS` digits and strings (keys too) that are valid Unicode (no lone surrogate), so what it
    returns can be walked, printed and written again; anything else raises :class:`JsonRefused`."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise JsonRefused("is not UTF-8 text") from None
    try:
        value = json.loads(text, parse_int=_bounded_int)
    except RecursionError:  # json's decoder stops cleanly at Python's recursion limit
        raise JsonRefused(f"nests deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError:
        raise JsonRefused("is not JSON") from None
    _check_json_tree(value)
    return value


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise JsonRefused(f"holds an integer of {len(digits.lstrip('-'))} digits, more than {MAX_JSON_INT_DIGITS}")
    return int(digits)


def _check_json_tree(value: Any) -> None:
    """Refuse nesting deeper than :data:`MAX_JSON_DEPTH` and strings that are not valid Unicode (walked without
    recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)) and depth > MAX_JSON_DEPTH:
            raise JsonRefused(f"nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            stack += [(key, depth) for key in node] + [(item, depth + 1) for item in node.values()]
        elif isinstance(node, list):
            stack += [(item, depth + 1) for item in node]
        elif isinstance(node, str) and not node.isascii():
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise JsonRefused("holds a string that is not valid Unicode: a lone surrogate") from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read only the ssdd metadata of a safetensors file (cheap: the header, not the tensors); the header and the
    metadata are parsed by :func:`parse_json`, within its limits."""
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
            header = parse_json(fh.read(header_len))
        except JsonRefused as exc:
            raise ArtefactError(f"{path} is not a valid safetensors file (header {exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise ArtefactError(f"{path} has no ssdd metadata; it was not written by ssdd")
    if not isinstance(meta[METADATA_KEY], str):
        raise ArtefactError(f"{path} has corrupt ssdd metadata (not a JSON string)")
    try:
        data = parse_json(meta[METADATA_KEY])
    except JsonRefused as exc:
        raise ArtefactError(f"{path} has corrupt ssdd metadata (it {exc})") from None
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
        raise ArtefactError(f"{path} has format version {meta.get('format_version')!r}; this ssdd reads version "
                            f"{format_version}")
    missing = [key for key in required if key not in meta]
    if missing:
        raise ArtefactError(f"{path}: metadata lacks {', '.join(map(repr, missing))}; the file is damaged or not "
                            "from ssdd")
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
