"""The decoded-dataset cache: every dataset is decoded once into a uint8 safetensors file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ssdd.data.dataset import ImageDataset
from ssdd.errors import ArtefactError
from ssdd.io import load_tensors, save_tensors

CACHE_FORMAT = 2  # 2: 16-bit, transparent and other non-8-bit images decoded anew (they read as 255 before)


def cache_dir() -> Path:
    """``SSDD_CACHE_DIR``, else ``~/.cache/ssdd/decoded`` (kept apart from the data root, which may be read-only)."""
    env = os.environ.get("SSDD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ssdd" / "decoded"


def source_key(paths: list[Path]) -> str:
    """Identifies source files and folders by location, size and modification time of every file in them.

    A folder is walked recursively (a stat per file: fast next to decoding), so editing, adding or removing
    any image invalidates the cache.
    """
    digest = hashlib.sha1()
    for path in paths:
        path = path.resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            digest.update(os.fsencode(file) + f"|{stat.st_size}|{stat.st_mtime_ns}\n".encode())  # any file name
    return digest.hexdigest()[:16]


def cache_path(name: str, split: str, key: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:48]
    return cache_dir() / f"{safe}-{split}-{key}.safetensors"


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
