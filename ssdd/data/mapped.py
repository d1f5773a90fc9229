"""Tensors read from a file without loading it: safetensors files written part by part and read through a memory map.

The layout is safetensors' (an 8-byte header size, a JSON header, then the raw bytes of each tensor), so a tensor's
bytes lie at a known offset and ``numpy.frombuffer`` over an ``mmap`` of the file is the tensor: nothing is read
until a row is used, and the operating system keeps the file in its page cache, shared by every process that opens
it. A file is written by :func:`write_streamed` one part at a time (a progress file beside it records the SHA-256 of
every part written, so a killed build continues at its first unwritten part), and opened by :func:`map_tensors`.

Pages read through the map stay in the process's resident memory (Linux maps whole folios around a fault, so even
scattered rows map many pages), so the batch readers :func:`read_rows` and :func:`read_range` copy rows of a mapped
tensor from the file with ``preadv`` instead: the copies are the only memory they take, whatever the file's size.
Indexing the mapped tensor itself still works (any code that takes a tensor does), at the cost of resident pages.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssdd.errors import ArtefactError
from ssdd.io import METADATA_KEY, JsonRefused, atomic_write_text, locked, parse_json, writing
from ssdd.progress import progress_bar

HEADER_SPARE = 1024  # header bytes reserved beyond the first header, for what the finished file's metadata adds
DTYPES = {"U8": (torch.uint8, np.uint8), "I64": (torch.int64, np.int64), "F32": (torch.float32, np.float32)}
CODES = {torch_dtype: code for code, (torch_dtype, _) in DTYPES.items()}


class _Mapping:
    """A file open for reading, and one private (copy-on-write, never written) memory map of it."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)  # writable: torch.from_numpy takes it silently
        self.base = np.frombuffer(self.map, np.uint8, 1).ctypes.data  # the address of the file's first byte

    def read(self, out: memoryview, offset: int) -> None:
        if os.preadv(self.fd, [out], offset) != len(out):
            raise ArtefactError(f"a memory-mapped file ended early at byte {offset} (it was truncated after opening)")


_MAPPINGS: dict[int, _Mapping] = {}  # storage address of each mapped tensor -> its mapping (kept for the process)
_OPEN: dict[tuple, _Mapping] = {}  # (path, inode, size, mtime) -> its mapping: a file opened again is not mapped again


def _mapping(tensor: torch.Tensor) -> _Mapping | None:
    return _MAPPINGS.get(tensor.untyped_storage().data_ptr())


def is_mapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (or the tensor it is a view of) was opened by :func:`map_tensors`."""
    return _mapping(tensor) is not None


def mapped_file(tensor: torch.Tensor) -> Path | None:
    """The file ``tensor`` was opened from by :func:`map_tensors` (None for an in-memory tensor)."""
    mapping = _mapping(tensor)
    return None if mapping is None else mapping.path


def read_rows(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor[indices]`` (rows along the first dimension); rows of a mapped tensor are read from its file,
    each run of consecutive indices with one ``preadv``."""
    indices = torch.as_tensor(indices, dtype=torch.long).flatten()
    mapping = _mapping(tensor)
    if mapping is None or not tensor.is_contiguous() or not indices.numel():
        return tensor[indices]
    count = tensor.shape[0]
    if int(indices.min()) < -count or int(indices.max()) >= count:
        raise IndexError(f"index out of range for {count} rows")
    indices = torch.where(indices < 0, indices + count, indices)
    out = torch.empty((indices.shape[0], *tensor.shape[1:]), dtype=tensor.dtype)
    row = out[0].numel() * out.element_size()
    buffer = memoryview(out.numpy()).cast("B")
    breaks = (torch.nonzero(indices[1:] != indices[:-1] + 1).flatten() + 1).tolist()
    start = tensor.data_ptr() - mapping.base
    for first, stop in zip([0, *breaks], [*breaks, indices.shape[0]]):
        mapping.read(buffer[first * row : stop * row], start + int(indices[first]) * row)
    return out


def read_range(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``tensor[start:stop]``: a view of an in-memory tensor, a copy read from the file of a mapped one."""
    if _mapping(tensor) is None:
        return tensor[start:stop]
    return read_rows(tensor, torch.arange(*slice(start, stop).indices(tensor.shape[0])))


def layout(path: Path) -> tuple[dict[str, tuple[str, list[int], list[int]]], dict[str, Any], int]:
    """(name -> (dtype code, shape, data offsets), ssdd metadata, where the data begins) of a safetensors file,
    checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ArtefactError(f"{path} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ArtefactError(f"{path} is not a valid safetensors file (header length {header_len} is out of range)")
        try:
            header = parse_json(fh.read(header_len))
            meta = parse_json(header["__metadata__"][METADATA_KEY])
        except (JsonRefused, KeyError, TypeError) as exc:
            raise ArtefactError(f"{path} has a corrupt header ({exc})") from None
    begin, tensors = 8 + header_len, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (start, stop) = entry["dtype"], [int(v) for v in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtefactError(f"{path}: tensor {name!r} has a corrupt entry ({exc})") from None
        width = DTYPES[code][1]().itemsize if code in DTYPES else None
        if width is None or stop - start != math.prod(shape) * width or not 0 <= start <= stop <= size - begin:
            raise ArtefactError(f"{path}: tensor {name!r} ({code} {shape}) does not fit the file; it is damaged")
        tensors[name] = (code, shape, [start, stop])
    return tensors, meta, begin


def map_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of the safetensors file ``path`` read through one memory map (nothing is read until used), and its
    ssdd metadata."""
    path = Path(path)
    entries, meta, begin = layout(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    mapping = _OPEN.get(key) or _OPEN.setdefault(key, _Mapping(path))
    tensors = {}
    for name, (code, shape, (start, _)) in entries.items():
        array = np.frombuffer(mapping.map, dtype=DTYPES[code][1], count=math.prod(shape), offset=begin + start)
        tensor = torch.from_numpy(array).view(shape)
        if tensor.numel():
            _MAPPINGS[tensor.untyped_storage().data_ptr()] = mapping
        tensors[name] = tensor
    return tensors, meta


def _header(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], meta: dict[str, Any], size: int) -> bytes:
    """The safetensors header of tensors ``specs`` (in order) with ``meta``, padded with spaces to ``size`` bytes (a
    multiple of 8, or 0 for the smallest such) and prefixed with its length."""
    header: dict[str, Any] = {"__metadata__": {METADATA_KEY: json.dumps(meta, sort_keys=True)}}
    offset = 0
    for name, (dtype, shape) in specs.items():
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    size = size or -(-(len(text) + HEADER_SPARE) // 8) * 8
    if len(text) > size:
        raise ArtefactError(f"the metadata of the file grew past its reserved header ({len(text)} > {size} bytes)")
    return struct.pack("<Q", size) + text + b" " * (size - len(text))


def write_streamed(path: str | Path, fixed: dict[str, torch.Tensor], name: str, shape: tuple[int, ...],
                   dtype: torch.dtype, rows_per_part: int, produce: Callable[[int, int], torch.Tensor],
                   meta: dict[str, Any], finish: Callable[[list[str]], dict[str, Any]], desc: str,
                   progress: bool = True, block_rows: int | None = None) -> None:
    """Write a safetensors file holding the small ``fixed`` tensors and a large tensor ``name`` of ``shape`` and
    ``dtype`` whose rows ``produce(start, stop)`` returns, ``rows_per_part`` at a time, so that memory holds one part
    (the parts of each block of ``block_rows`` rows, default all, start at the block's first row).

    The file is written as ``<path>.partial``; ``<path>.progress`` records the SHA-256 of each part written, so a
    build that was killed continues at its first unwritten part (a build of other tensors or metadata starts over).
    Once every part is written the header is rewritten with ``finish(part digests)`` as metadata and the file is
    renamed to ``path``. Processes that build the same file take turns (a lock file beside it); one that finds it
    built does nothing.
    """
    path = Path(path)
    partial, record = path.with_name(path.name + ".partial"), path.with_name(path.name + ".progress")
    specs = {key: (t.dtype, tuple(t.shape)) for key, t in fixed.items()} | {name: (dtype, shape)}
    head = _header(specs, meta, 0)
    block_rows = block_rows or shape[0]
    parts = [(start, min(start + rows_per_part, block + block_rows)) for block in range(0, shape[0], block_rows)
             for start in range(block, block + block_rows, rows_per_part)]
    identity = hashlib.sha256(f"{rows_per_part}:{block_rows}:".encode() + head
                              + b"".join(t.contiguous().numpy().tobytes() for t in fixed.values())).hexdigest()
    row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
    total = len(head) + sum(t.numel() * t.element_size() for t in fixed.values()) + shape[0] * row_bytes
    with locked(path.with_name(path.name + ".lock")), writing(path):
        if path.exists():
            return
        digests = _resumed(record, partial, identity, total)
        with open(partial, "r+b" if digests else "wb") as fh:
            if not digests:
                fh.truncate(total)
                fh.write(head)
                for tensor in fixed.values():
                    fh.write(tensor.contiguous().numpy().tobytes())
            stream_at = total - shape[0] * row_bytes
            bar = progress_bar(total=shape[0], initial=sum(stop - start for start, stop in parts[: len(digests)]),
                               desc=desc, unit="row", disable=not progress, leave=False)
            with bar:
                for start, stop in parts[len(digests) :]:
                    rows = produce(start, stop)
                    if rows.dtype != dtype or tuple(rows.shape) != (stop - start, *shape[1:]):
                        raise ArtefactError(f"{desc}: rows {start}:{stop} came as {rows.dtype} "
                                            f"{tuple(rows.shape)}, not {dtype} {(stop - start, *shape[1:])}")
                    data = rows.contiguous().numpy()  # written and hashed through the buffer: no copy
                    fh.seek(stream_at + start * row_bytes)
                    fh.write(data)
                    fh.flush()
                    digests.append(hashlib.sha256(data).hexdigest())
                    atomic_write_text(record, json.dumps({"identity": identity, "parts": digests}))
                    bar.update(stop - start)
            fh.seek(0)
            fh.write(_header(specs, finish(digests), len(head) - 8))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
        record.unlink(missing_ok=True)


def _resumed(record: Path, partial: Path, identity: str, total: int) -> list[str]:
    """The part digests of an unfinished build of the same file (empty when there is none to continue)."""
    try:
        progress = json.loads(record.read_text())
        if progress["identity"] == identity and partial.stat().st_size == total:
            return [str(d) for d in progress["parts"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return []
