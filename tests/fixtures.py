"""Writers of tiny on-disk datasets in every format ssdd reads, with the tensors a loader must return.

Every writer takes the pixel arrays explicitly (or makes seeded ones), so a test knows exactly which uint8
values and labels a correct loader gives back.  PNG is lossless, so decoded values must match bit for bit.

Loader order (the truth the tests check against): classes sorted by name, label = index of the class in that
sorted list, images ordered by class then by file name.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Deliberately not in sorted order, so a loader that keeps creation order is caught.
CLASSES = ("zebra", "apple", "mango")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# split -> class name -> list of (H, W, C) uint8 arrays; file i of a class is written as f"{i}.png".
Splits = dict[str, dict[str, list[np.ndarray]]]


@dataclass
class Expected:
    """What a correct loader returns for one split."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]


def random_images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> list[np.ndarray]:
    """``n`` seeded random (size, size, channels) uint8 images covering the full 0..255 range."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8) for _ in range(n)]


def make_splits(
    classes: tuple[str, ...] = CLASSES,
    per_class: dict[str, int] | None = None,
    size: int = 8,
    channels: int = 3,
    seed: int = 0,
) -> Splits:
    """Train and test splits of seeded random images (train: 3 per class, test: 2 per class by default)."""
    per_class = per_class or {"train": 3, "test": 2}
    out: Splits = {}
    for s, (split, n) in enumerate(sorted(per_class.items())):
        out[split] = {
            cls: random_images(n, size, channels, seed=seed * 1000 + s * 100 + c)
            for c, cls in enumerate(classes)
        }
    return out


def expected(split_images: dict[str, list[np.ndarray]]) -> Expected:
    """The tensors a loader must return for one split (classes sorted, images by class then file name)."""
    classes = sorted(split_images)
    images, labels = [], []
    for label, cls in enumerate(classes):
        arrays = split_images[cls]
        order = sorted(range(len(arrays)), key=lambda i: f"{i}.png")  # file-name order
        for i in order:
            images.append(torch.from_numpy(arrays[i].copy()).permute(2, 0, 1))
            labels.append(label)
    return Expected(torch.stack(images).contiguous(), torch.tensor(labels, dtype=torch.int64), classes)


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG of an (H, W, 1) grayscale or (H, W, 3) RGB uint8 array."""
    if array.ndim == 3 and array.shape[2] == 1:
        img = Image.fromarray(array[:, :, 0], mode="L")
    else:
        img = Image.fromarray(array, mode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_class_folders(folder: Path, classes: dict[str, list[np.ndarray]]) -> Path:
    """Write ``folder/<class>/<i>.png``."""
    folder = Path(folder)
    for cls, arrays in classes.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(arrays):
            (folder / cls / f"{i}.png").write_bytes(png_bytes(arr))
    return folder


def write_image_folder(base: Path, splits: Splits) -> Path:
    """Write ``base/<split>/<class>/<i>.png`` for every split; returns ``base``."""
    base = Path(base)
    for split, classes in splits.items():
        write_class_folders(base / split, classes)
    return base


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_image_folder_archive(archive: Path, top: str, splits: Splits, extra: dict[str, bytes] | None = None) -> Path:
    """Write a tar.gz with ``<top>/<split>/<class>/<i>.png`` (directory entries included).

    ``extra`` adds raw entries (name -> bytes) after the images, e.g. a hostile ``../evil.png``.
    """
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        _add_dir(tar, top)
        for split, classes in splits.items():
            _add_dir(tar, f"{top}/{split}")
            for cls, arrays in classes.items():
                _add_dir(tar, f"{top}/{split}/{cls}")
                for i, arr in enumerate(arrays):
                    _add_bytes(tar, f"{top}/{split}/{cls}/{i}.png", png_bytes(arr))
        for name, data in (extra or {}).items():
            _add_bytes(tar, name, data)
    return archive


def write_tar_gz(archive: Path, members: dict[str, bytes]) -> Path:
    """A tar.gz holding exactly ``members`` (name -> bytes), no directory entries."""
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            _add_bytes(tar, name, data)
    return archive


# ---- IDX (MNIST) -------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """IDX encoding of a uint8 array: big-endian magic 0x000008<ndim>, big-endian u32 dims, raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x00000800 | array.ndim if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """Write an IDX file, gzipped when ``path`` ends in ``.gz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@dataclass
class IdxData:
    train_images: np.ndarray  # (N, 28, 28) uint8
    train_labels: np.ndarray  # (N,) uint8
    test_images: np.ndarray
    test_labels: np.ndarray


def make_idx_data(n_train: int = 6, n_test: int = 4, size: int = 28, seed: int = 0) -> IdxData:
    rng = np.random.default_rng(seed)
    return IdxData(
        rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    )


IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def write_mnist_idx(folder: Path, data: IdxData, gz: bool = True) -> dict[str, Path]:
    """The four MNIST IDX files in ``folder`` (``.gz`` when ``gz``); returns field name -> path."""
    folder = Path(folder)
    suffix = ".gz" if gz else ""
    return {
        field: write_idx(folder / f"{stem}{suffix}", getattr(data, field))
        for field, stem in IDX_NAMES.items()
    }


# ---- CIFAR python pickles ----------------------------------------------------------------------------------


@dataclass
class CifarData:
    train_images: np.ndarray  # (N, 3, 32, 32) uint8, N divisible by 5
    train_labels: list[int]
    test_images: np.ndarray
    test_labels: list[int]
    label_names: tuple[str, ...] = CIFAR10_NAMES


def make_cifar_data(n_train: int = 10, n_test: int = 4, seed: int = 0) -> CifarData:
    rng = np.random.default_rng(seed)
    return CifarData(
        rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
        [int(v) for v in rng.integers(0, 10, n_train)],
        rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
        [int(v) for v in rng.integers(0, 10, n_test)],
    )


def _cifar_batch(images: np.ndarray, labels: list[int], name: str) -> bytes:
    """One batch as the official release stores it: a protocol-2 pickle of a dict with bytes keys."""
    batch = {
        b"batch_label": name.encode(),
        b"labels": list(labels),
        b"data": images.reshape(images.shape[0], 3072).copy(),  # channel-major rows: 1024 R, 1024 G, 1024 B
        b"filenames": [f"img_{i}.png".encode() for i in range(images.shape[0])],
    }
    return pickle.dumps(batch, protocol=2)


def cifar10_members(data: CifarData) -> dict[str, bytes]:
    """File name -> bytes of the seven files of ``cifar-10-batches-py``."""
    chunks = np.array_split(np.arange(data.train_images.shape[0]), 5)
    files = {}
    for i, idx in enumerate(chunks, start=1):
        files[f"data_batch_{i}"] = _cifar_batch(
            data.train_images[idx], [data.train_labels[j] for j in idx], f"training batch {i} of 5")
    files["test_batch"] = _cifar_batch(data.test_images, data.test_labels, "testing batch 1 of 1")
    meta = {
        b"num_cases_per_batch": len(chunks[0]),
        b"label_names": [n.encode() for n in data.label_names],
        b"num_vis": 3072,
    }
    files["batches.meta"] = pickle.dumps(meta, protocol=2)
    return files


def write_cifar10_folder(root: Path, data: CifarData, overrides: dict[str, bytes] | None = None) -> Path:
    """``root/cifar-10-batches-py/`` with the official file names; ``overrides`` replaces some files."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in {**cifar10_members(data), **(overrides or {})}.items():
        (folder / name).write_bytes(blob)
    return folder


def write_cifar10_archive(root: Path, data: CifarData, overrides: dict[str, bytes] | None = None) -> Path:
    """``root/cifar-10-python.tar.gz`` with top folder ``cifar-10-batches-py/``."""
    archive = Path(root) / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        _add_dir(tar, "cifar-10-batches-py")
        for name, blob in {**cifar10_members(data), **(overrides or {})}.items():
            _add_bytes(tar, f"cifar-10-batches-py/{name}", blob)
    return archive


class ShellPayload:
    """Pickles to a call of ``os.system(command)``: what a forged pickle would use to run code on load."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        import os

        return (os.system, (self.command,))


def marker_command(marker: Path) -> str:
    """A harmless shell command whose only effect is creating ``marker``."""
    import shlex

    return f"touch {shlex.quote(str(marker))}"


def zero_png(width: int, height: int) -> bytes:
    """A valid gray PNG of ``width`` x ``height`` zeros, compressed row by row (9000 x 9000 is about 80 KB)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte 0, then the row's pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
