"""The decoded-dataset cache: every dataset is decoded once into a uint8 safetensors file.

A small dataset's file is loaded whole into memory.  A large one's (see :func:`map_above_bytes`) is written image
part by image part in a streaming pass and read through a memory map (:mod:`ssdd.data.mapped`): its fingerprint
combines the SHA-256 of each part, computed while writing, so opening it hashes nothing.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ssdd.data.dataset import ImageDataset, fingerprint_tensors
from ssdd.data.mapped import layout, map_tensors, mapped_file, read_range, write_streamed
from ssdd.data.transforms import convert_images
from ssdd.errors import ArtefactError, DataError
from ssdd.io import load_tensors, save_tensors

CACHE_FORMAT = 2  # 2: 16-bit, transparent and other non-8-bit images decoded anew (they read as 255 before)
MAPPED_FORMAT = 1
PART_BYTES = 64 << 20  # image bytes per hashed part of a memory-mapped file
MAP_ABOVE_BYTES = 4 << 30  # decoded sizes above which a dataset is memory-mapped, unless SSDD_MAP_BYTES says


def cache_dir() -> Path:
    """``SSDD_CACHE_DIR``, else ``~/.cache/ssdd/decoded`` (kept apart from the data root, which may be read-only)."""
    env = os.environ.get("SSDD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ssdd" / "decoded"


def source_key(paths: list[Path]) -> tuple[str, int]:
    """Identifies source files and folders by location, size and modification time of every file in them; with
    their total size on disk.

    A folder is walked recursively (a stat per file: fast next to decoding), so editing, adding or removing
    any image invalidates the cache.
    """
    digest = hashlib.sha1()
    total = 0
    for path in paths:
        path = path.resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            total += stat.st_size
            digest.update(os.fsencode(file) + f"|{stat.st_size}|{stat.st_mtime_ns}\n".encode())  # any file name
    return digest.hexdigest()[:16], total


def map_above_bytes() -> int:
    """``SSDD_MAP_BYTES`` (0 maps every dataset), else :data:`MAP_ABOVE_BYTES`: datasets whose decoded images take
    more bytes are memory-mapped."""
    env = os.environ.get("SSDD_MAP_BYTES")
    if env is None:
        return MAP_ABOVE_BYTES
    if not env.isdigit():
        raise DataError(f"SSDD_MAP_BYTES must be a whole number of bytes (0 maps every dataset), got {env!r}")
    return int(env)


def cache_path(name: str, split: str, key: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:48]
    return cache_dir() / f"{safe}-{split}-{key}.safetensors"


def mapped_path(path: Path) -> Path:
    """The memory-mapped form's file beside the in-memory cache file ``path``."""
    return path.with_name(path.name.removesuffix(".safetensors") + ".mapped.safetensors")


def decoded_bytes(path: Path) -> int | None:
    """The size of the decoded images in the cache file ``path`` (read from its header), or None."""
    try:
        return math.prod(layout(path)[0]["images"][1])
    except (OSError, ArtefactError, KeyError):
        return None


def load_cached(path: Path) -> ImageDataset | None:
    """The cached dataset at ``path``, or None if absent or unreadable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        tensors, meta = load_tensors(path)
    except ArtefactError:
        return None
    if meta.get("format") != CACHE_FORMAT or "images" not in tensors or "labels" not in tensors:
        return None
    return ImageDataset(
        name=meta["name"], split=meta["split"], images=tensors["images"], labels=tensors["labels"],
        classes=list(meta["classes"]), fingerprint=meta["fingerprint"], source=meta["source"],
    )


def store(path: Path, dataset: ImageDataset) -> None:
    meta = {
        "format": CACHE_FORMAT, "kind": "decoded-dataset", "name": dataset.name, "split": dataset.split,
        "classes": dataset.classes, "fingerprint": dataset.fingerprint, "source": dataset.source,
    }
    try:
        save_tensors(path, {"images": dataset.images, "labels": dataset.labels}, meta)
    except OSError:
        return  # an unwritable cache only costs time, never correctness


def load_mapped(path: Path) -> ImageDataset | None:
    """The memory-mapped dataset at ``path`` (its images unread, its labels in memory), or None if absent or
    unreadable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        tensors, meta = map_tensors(path)
    except ArtefactError:
        return None
    if meta.get("format") != MAPPED_FORMAT or meta.get("kind") != "mapped-dataset" or "fingerprint" not in meta:
        return None
    images, labels = tensors.get("images"), tensors.get("labels")
    if images is None or labels is None or images.dtype != torch.uint8 or images.dim() != 4:
        return None
    return ImageDataset(name=meta["name"], split=meta["split"], images=images, labels=labels.clone(),
                        classes=list(meta["classes"]), fingerprint=meta["fingerprint"], source=meta["source"])


def store_mapped(path: Path, name: str, split: str, source: str, labels: torch.Tensor, classes: list[str],
                 image_shape: tuple[int, int, int], read: Callable[[int, int], torch.Tensor]) -> None:
    """Write the memory-mapped form of a dataset whose images ``read(start, stop)`` decodes, a part at a time (a
    killed build continues where it stopped); its fingerprint combines the labels, classes and part digests."""
    per_part = max(1, PART_BYTES // math.prod(image_shape))
    meta = {"format": MAPPED_FORMAT, "kind": "mapped-dataset", "name": name, "split": split, "classes": classes,
            "source": source, "rows_per_part": per_part}

    def finish(digests: list[str]) -> dict:
        content = f"mapped:{tuple(image_shape)}:{per_part}:" + ",".join(digests)
        return {**meta, "fingerprint": fingerprint_tensors(labels, "\n".join(classes), content)}

    write_streamed(path, {"labels": labels.to(torch.int64)}, "images", (labels.shape[0], *image_shape), torch.uint8,
                   per_part, read, meta, finish, desc=f"memory-mapping {name} {split}")


def converted_mapped(dataset: ImageDataset, channels: int, size: int) -> ImageDataset:
    """The memory-mapped ``dataset`` converted to ``channels`` x ``size`` x ``size`` (see
    :func:`ssdd.data.transforms.convert_images`), written a part at a time beside its file on first use."""
    source = mapped_file(dataset.images)
    path = source.with_name(f"{source.name.removesuffix('.mapped.safetensors')}-c{channels}-s{size}.mapped.safetensors")
    converted = load_mapped(path)
    if converted is not None:
        return converted
    path.unlink(missing_ok=True)  # absent, or damaged: rebuilt
    store_mapped(path, dataset.name, dataset.split, dataset.source, dataset.labels, dataset.classes,
                 (channels, size, size),
                 lambda start, stop: convert_images(read_range(dataset.images, start, stop), channels, size))
    return opened_mapped(path)


def opened_mapped(path: Path) -> ImageDataset:
    """The memory-mapped dataset just written at ``path``."""
    dataset = load_mapped(path)
    if dataset is None:
        raise DataError(f"the memory-mapped dataset {path} just written cannot be read; delete it and load again")
    return dataset
