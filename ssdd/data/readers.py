"""Decoders for the on-disk formats datasets come in.

Each reader returns ``(images uint8 (N, C, H, W), labels int64 (N,), class names)``.  Archives are read as
streams and never extracted, so an archive entry cannot write outside the data root.  The official CIFAR
python batches are pickles; they are read with an unpickler that only admits the numpy types those files
contain, so a forged file cannot run code.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import tarfile
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ssdd.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
Decoded = tuple[torch.Tensor, torch.Tensor, list[str]]


def _decode(data: bytes, where: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():  # an image over PIL's pixel limit is refused before it is allocated
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                if img.mode not in ("L", "RGB"):
                    img = img.convert("L" if img.mode in ("1", "I", "I;16", "F") else "RGB")
                arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        reason = "not an image file" if isinstance(exc, UnidentifiedImageError) else exc  # its text names a BytesIO
        raise DataError(f"cannot decode image {where}: {reason}; remove or replace the file") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _stack(arrays: list[np.ndarray], names: list[str], what: str) -> torch.Tensor:
    if not arrays:
        raise DataError(f"{what} contains no images")
    channels = {a.shape[2] for a in arrays}
    if len(channels) > 1:  # mixed grayscale and colour: colour wins
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        first = arrays[0].shape[:2]
        odd = next(n for a, n in zip(arrays, names) if a.shape[:2] != first)
        raise DataError(
            f"{what} mixes image sizes ({names[0]} is {first[1]}x{first[0]}, {odd} is "
            f"{arrays[names.index(odd)].shape[1]}x{arrays[names.index(odd)].shape[0]}); resize them to one size first"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _from_members(members: Iterable[tuple[str, str, bytes]], what: str) -> Decoded:
    """Build a dataset from (class name, file name, bytes) triples, sorted by class then file name."""
    items = sorted(members, key=lambda m: (m[0], m[1]))
    classes = sorted({c for c, _, _ in items})
    if not classes:
        raise DataError(f"{what} contains no class folders with images")
    index = {c: i for i, c in enumerate(classes)}
    arrays, names = [], []
    for cls, name, data in tqdm(items, desc=f"decoding {what}", unit="img", leave=False, mininterval=1.0,
                                disable=None):  # shown on a terminal only: never mixed into redirected stderr
        arrays.append(_decode(data, f"{cls}/{name} in {what}"))
        names.append(f"{cls}/{name}")
    labels = torch.tensor([index[c] for c, _, _ in items], dtype=torch.int64)
    return _stack(arrays, names, what), labels, classes


def read_image_folder(split_dir: str | Path) -> Decoded:
    """Read ``split_dir/<class>/<image files>`` (class index = position of the folder in sorted order)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"image folder {split_dir} does not exist")
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise DataError(f"image folder {split_dir} has no class sub-folders (expected {split_dir}/<class>/<images>)")
    files = {d: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
             for d in class_dirs}
    empty = [d.name for d, found in files.items() if not found]
    if empty:
        raise DataError(f"image folder {split_dir}: class folder(s) {', '.join(empty)} contain no images")
    members = [(d.name, f.name, f.read_bytes()) for d, found in files.items() for f in found]
    return _from_members(members, str(split_dir))


def _safe_member_parts(name: str, archive: Path) -> tuple[str, ...]:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise DataError(f"archive {archive} contains an unsafe path {name!r}; refusing to read it")
    return tuple(p for p in path.parts if p not in ("", "."))


class _StrictTarInfo(tarfile.TarInfo):
    """Tar headers that raise where tarfile would quietly end the archive: at a damaged header (bad checksum) and
    where the data ends before the end-of-archive marker."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the end-of-archive marker
            raise
        except tarfile.HeaderError as exc:
            raise tarfile.ReadError(f"damaged or missing entry header at byte {tar.offset}: {exc}") from None


class _ArchiveStream:
    """A tar archive (optionally gzipped) read as a stream; on exit it reads to the end so that a truncated gzip
    stream raises instead of looking like a shorter archive."""

    def __init__(self, path: Path):
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"PK\x03\x04":
            raise DataError(f"archive {path} is a zip file; ssdd reads tar or tar.gz archives, or unpack it into a "
                            "folder")
        gzipped = magic[:2] == b"\x1f\x8b"
        self.raw = gzip.open(path, "rb") if gzipped else open(path, "rb")
        try:
            self.tar = tarfile.open(fileobj=self.raw, mode="r|", tarinfo=_StrictTarInfo)
        except BaseException:
            self.raw.close()
            raise

    def __enter__(self) -> tarfile.TarFile:
        return self.tar

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        try:
            if exc_type is None:
                while self.raw.read(1 << 20):
                    pass
        finally:
            self.tar.close()
            self.raw.close()


def read_image_folder_archive(archive: str | Path, split: str) -> Decoded:
    """Read the ``<top>/<split>/<class>/<file>`` entries of a tar(.gz) archive without extracting it."""
    archive = Path(archive)
    members: list[tuple[str, str, bytes]] = []
    class_names: set[str] = set()
    try:
        with _ArchiveStream(archive) as tar:
            for member in tar:
                parts = _safe_member_parts(member.name, archive)
                if len(parts) >= 3 and parts[1] == split and member.isdir() and len(parts) == 3:
                    class_names.add(parts[2])
                if not member.isfile() or len(parts) != 4 or parts[1] != split:
                    continue
                if PurePosixPath(parts[3]).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                members.append((parts[2], parts[3], fh.read()))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"archive {archive} is corrupt or truncated ({exc}); download or copy it again") from None
    if not members:
        raise DataError(f"archive {archive} has no images under <top>/{split}/<class>/")
    empty = sorted(class_names - {c for c, _, _ in members})
    if empty:
        raise DataError(f"archive {archive}: class folder(s) {', '.join(empty)} of split {split} contain no images")
    return _from_members(members, f"{archive}:{split}")


def _open_maybe_gz(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}; the file is corrupt or truncated") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST format, optionally gzipped) of unsigned bytes."""
    path = Path(path)
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (wrong magic number)")
    ndim = data[3]
    if ndim < 1 or ndim > 4 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is not a valid IDX file ({ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    count = math.prod(dims)  # Python integers: a forged header cannot overflow into a small count
    body = data[4 + 4 * ndim :]
    if len(body) != count:
        raise DataError(f"{path}: header announces shape {dims} ({count} bytes) but the file holds {len(body)}; it is truncated or corrupt")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def read_idx_pair(images_path: Path, labels_path: Path, classes: list[str]) -> Decoded:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} and {labels_path} do not form a dataset (shapes {images.shape}, {labels.shape})")
    if labels.size and int(labels.max()) >= len(classes):
        raise DataError(f"{labels_path} has label {int(labels.max())} but the dataset has {len(classes)} classes")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), classes


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR python batches contain: numpy arrays, dtypes and builtin containers."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def _load_cifar_batch(data: bytes, where: str) -> dict:
    try:
        batch = _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - any failure means "not a CIFAR batch"
        raise DataError(f"{where} is not a CIFAR python batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{where} is not a CIFAR python batch (not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


CIFAR_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "meta": "batches.meta",
                "label_key": "labels", "names_key": "label_names"},
    "cifar100": {"train": ["train"], "test": ["test"], "meta": "meta",
                 "label_key": "fine_labels", "names_key": "fine_label_names"},
}


def read_cifar_python(path: str | Path, variant: str, split: str) -> Decoded:
    """Read the official CIFAR-10/100 python release, as its ``.tar.gz`` or its unpacked folder."""
    path = Path(path)
    spec = CIFAR_FILES[variant]
    wanted = set(spec[split]) | {spec["meta"]}
    blobs: dict[str, bytes] = {}
    if path.is_dir():
        for name in wanted:
            if (path / name).is_file():
                blobs[name] = (path / name).read_bytes()
    else:
        try:
            with _ArchiveStream(path) as tar:
                for member in tar:
                    parts = _safe_member_parts(member.name, path)
                    if member.isfile() and parts and parts[-1] in wanted:
                        fh = tar.extractfile(member)
                        if fh is not None:
                            blobs[parts[-1]] = fh.read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise DataError(f"archive {path} is corrupt or truncated ({exc}); download it again") from None
    missing = sorted(wanted - set(blobs))
    if missing:
        raise DataError(f"{path} is missing {', '.join(missing)}; it is not a complete CIFAR python release")
    meta = _load_cifar_batch(blobs[spec["meta"]], f"{path}:{spec['meta']}")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(spec["names_key"], [])]
    images, labels = [], []
    for name in spec[split]:
        batch = _load_cifar_batch(blobs[name], f"{path}:{name}")
        data, lab = batch.get("data"), batch.get(spec["label_key"])
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}:{name} does not hold uint8 image rows of 3072 values")
        if lab is None or len(lab) != data.shape[0]:
            raise DataError(f"{path}:{name} has {data.shape[0]} images but a different number of labels")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.as_tensor(np.asarray(lab, dtype=np.int64)))
    return torch.cat(images), torch.cat(labels), classes
