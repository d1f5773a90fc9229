"""Decoders for the on-disk formats datasets come in.

Each reader returns ``(images uint8 (N, C, H, W), labels int64 (N,), class names)``.  Archives are read as
streams and never extracted, so an archive entry cannot write outside the data root.  The official CIFAR
python batches are pickles; they are read with an unpickler that only admits the numpy types those files
contain, so a forged file cannot run code.

Limits: an image whose header declares more than :data:`MAX_IMAGE_PIXELS` pixels is refused before it is decoded;
archive entries are read only as regular files (a link, device or fifo where an image or batch is read is refused, as
is a name that appears twice); an archive entry or a gzipped file yields at most :data:`MAX_FILE_BYTES`; class
names must be valid UTF-8.
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

from ssdd.errors import DataError
from ssdd.io import MAX_IMAGE_SIDE
from ssdd.progress import progress_bar

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
Decoded = tuple[torch.Tensor, torch.Tensor, list[str]]
# The most pixels a dataset image may declare (16.8 million, the artefacts' 4096 px side squared): checked against the
# header before anything is decoded.  Settable: ``ssdd.data.readers.MAX_IMAGE_PIXELS = ...`` before loading.
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
MAX_FILE_BYTES = 1 << 30  # the most bytes read from one archive entry or one gzipped file (a gzip bomb stops here)
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
COLOUR_MODES = {"P", "PA", "CMYK", "YCbCr", "RGBX", "RGBA", "RGBa", "LA", "La", "HSV", "LAB"}  # PIL converts to RGB


def printable(name: str) -> str:
    """``name`` safe to print or store: bytes that are not UTF-8 (file names decoded with surrogate escapes) are shown
    as ``\\xNN`` and lone surrogates as ``\\udNNN``."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file system byte escapes to
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _decode(data: bytes, where: str) -> np.ndarray:
    """Decode one image file to uint8 (H, W, 1) or (H, W, 3) pixels (see :func:`_to_8bit`)."""
    try:
        with warnings.catch_warnings():  # an image over PIL's pixel limit is refused before it is allocated
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                _check_pixel_count(img.size, where)
                img.load()
                arr = _to_8bit(img, where)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image {where} is too large to decode ({exc}); downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = "not an image file" if isinstance(exc, UnidentifiedImageError) else exc  # its text names a BytesIO
        raise DataError(f"cannot decode image {where}: {reason}; remove or replace the file") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _check_pixel_count(size: tuple[int, int], where: str) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"image {where} declares {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} a dataset "
                        "image may have (ssdd.data.readers.MAX_IMAGE_PIXELS); downscale it first")


def _to_8bit(img: Image.Image, where: str) -> np.ndarray:
    """The pixels of ``img`` as uint8 gray (H, W) or RGB (H, W, 3): 16-bit values (and 32-bit integers within
    0..65535, as PIL reads 16-bit PGM) are scaled by 255/65535 and rounded; a transparent pixel is composited over
    black (its colour times its alpha), so what is stored under full transparency never matters; palette, CMYK and
    other colour modes become RGB.  Floating-point and wider integer pixels, whose range is unknown, are refused."""
    mode = img.mode
    if mode in ("L", "RGB") and "transparency" not in img.info:
        return np.asarray(img)
    if mode == "1":
        return np.asarray(img.convert("L"))
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        return _from_16bit(np.asarray(img), where)
    if mode not in COLOUR_MODES | {"L", "RGB"}:
        kind = "floating-point pixels" if mode == "F" else f"pixels of PIL mode {mode}"
        raise DataError(f"image {where} holds {kind}, whose range ssdd cannot know; save it as 8- or 16-bit gray or "
                        "RGB")
    if {"A", "a"} & set(img.getbands()) or "transparency" in img.info:
        gray = mode in ("L", "LA", "La")
        with_alpha = np.asarray(img.convert("LA" if gray else "RGBA")).astype(np.uint32)
        composited = ((with_alpha[..., :-1] * with_alpha[..., -1:] + 127) // 255).astype(np.uint8)
        return composited[..., 0] if gray else composited
    return np.asarray(img.convert("RGB"))


def _from_16bit(values: np.ndarray, where: str) -> np.ndarray:
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise DataError(f"image {where} holds 32-bit pixel values ({low} to {high}) beyond 16 bits; save it as 8- or "
                        "16-bit gray or RGB")
    return ((values.astype(np.int64) * 2 + 257) // 514).astype(np.uint8)  # round(v / 257) = round(v * 255 / 65535)


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
    for cls in classes:  # class names are stored, printed and written into reports
        if printable(cls) != cls:
            raise DataError(f"{what}: class folder name '{printable(cls)}' is not valid UTF-8; rename the folder")
    index = {c: i for i, c in enumerate(classes)}
    arrays, names = [], []
    for cls, name, data in progress_bar(items, desc=f"decoding {what}", unit="img", leave=False):
        names.append(f"{cls}/{printable(name)}")
        arrays.append(_decode(data, f"{names[-1]} in {what}"))
    labels = torch.tensor([index[c] for c, _, _ in items], dtype=torch.int64)
    return _stack(arrays, names, what), labels, classes


def _class_files(split_dir: Path) -> dict[Path, list[Path]]:
    """The image files of each class folder of ``split_dir`` (folders sorted; none empty)."""
    if not split_dir.is_dir():
        raise DataError(f"image folder {split_dir} does not exist")
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise DataError(f"image folder {split_dir} has no class sub-folders (expected {split_dir}/<class>/<images>)")
    files = {d: _image_files(d) for d in class_dirs}
    empty = [printable(d.name) for d, found in files.items() if not found]
    if empty:
        raise DataError(f"image folder {split_dir}: class folder(s) {', '.join(empty)} contain no images")
    return files


def read_image_folder(split_dir: str | Path) -> Decoded:
    """Read ``split_dir/<class>/<image files>`` (class index = position of the folder in sorted order)."""
    split_dir = Path(split_dir)
    members = [(d.name, f.name, f.read_bytes()) for d, found in _class_files(split_dir).items() for f in found]
    return _from_members(members, str(split_dir))


class FolderListing:
    """The images of ``split_dir/<class>/<image files>`` listed, not decoded: labels and class names as
    :func:`read_image_folder` gives them, the first image's shape, and :meth:`read` to decode a range of them."""

    def __init__(self, split_dir: str | Path):
        self.where = str(split_dir)
        found = _class_files(Path(split_dir))
        self.classes = [d.name for d in found]
        for cls in self.classes:
            if printable(cls) != cls:
                raise DataError(f"{self.where}: class folder name '{printable(cls)}' is not valid UTF-8; rename the "
                                "folder")
        self.files = [f for files in found.values() for f in files]
        self.labels = torch.tensor([k for k, files in enumerate(found.values()) for _ in files], dtype=torch.int64)
        first = self._decode(0)
        self.image_shape = (first.shape[2], first.shape[0], first.shape[1])

    def _decode(self, index: int) -> np.ndarray:
        file = self.files[index]
        return _decode(file.read_bytes(), f"{file.parent.name}/{printable(file.name)} in {self.where}")

    def read(self, start: int, stop: int) -> torch.Tensor:
        """The decoded images ``start:stop`` (uint8 (n, C, H, W)); every one must have the first image's size, and
        its channels unless it is grayscale among colour images (repeated to RGB, as :func:`read_image_folder`)."""
        channels, height, width = self.image_shape
        out = np.empty((stop - start, height, width, channels), dtype=np.uint8)
        for row, index in enumerate(range(start, stop)):
            image = self._decode(index)
            if image.shape[2] == 1 and channels == 3:
                image = np.repeat(image, 3, axis=2)
            if image.shape != out.shape[1:]:
                name = f"{self.files[index].parent.name}/{printable(self.files[index].name)}"
                raise DataError(f"{self.where}: {name} is {image.shape[1]}x{image.shape[0]} with {image.shape[2]} "
                                f"channel(s), but the first image is {width}x{height} with {channels}; the "
                                "memory-mapped form needs images of one size and one channel count: resize them "
                                "(and convert gray ones to RGB) first")
            out[row] = image
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _image_files(folder: Path) -> list[Path]:
    """The image files of a class folder, sorted by name; a fifo, device or broken link named like an image is
    refused (a folder named like one is not an image and is skipped)."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.is_dir():
            continue
        if not path.is_file():
            raise DataError(f"image folder {folder}: {printable(path.name)} is not a regular file (a broken link, fifo "
                            "or device); remove it or replace it with the image")
        found.append(path)
    return found


def _member_data(tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path) -> bytes | None:
    """The bytes of a regular-file archive entry, None for a folder; a link, device or fifo is refused, since reading
    around it would silently drop the image it stands for."""
    if member.isdir():
        return None
    if not member.isfile():
        kind = ("a symbolic link" if member.issym() else "a hard link" if member.islnk() else
                "a fifo" if member.isfifo() else "a device file" if member.isdev() else "not a regular file")
        fix = ("with links resolved (tar --dereference --hard-dereference)" if member.issym() or member.islnk() else
               "without it")
        raise DataError(f"archive {archive}: entry {printable(member.name)} is {kind}; ssdd reads only regular files "
                        f"from archives: re-create it {fix}")
    if member.size > MAX_FILE_BYTES:
        raise DataError(f"archive {archive}: entry {printable(member.name)} holds {member.size} bytes, more than the "
                        f"{MAX_FILE_BYTES} ssdd reads from one entry; it is not a dataset file")
    return tar.extractfile(member).read()  # type: ignore[union-attr] - a regular file always has data


def _refuse_duplicate(seen: dict, key: object, name: str, archive: Path) -> None:
    """Record that entry ``name`` provides ``key``; refuse a second entry providing the same ``key``."""
    if key in seen:
        both = f"{name} twice" if seen[key] == name else f"{seen[key]} and {name}, two entries for one file"
        raise DataError(f"archive {archive} holds {printable(both)} (as tar --append makes); re-create the archive "
                        "with one of them")
    seen[key] = name


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
    seen: dict[tuple[str, str], str] = {}
    try:
        with _ArchiveStream(archive) as tar:
            for member in tar:
                parts = _safe_member_parts(member.name, archive)
                if len(parts) == 3 and parts[1] == split and member.isdir():
                    class_names.add(parts[2])
                if len(parts) != 4 or parts[1] != split or PurePosixPath(parts[3]).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                data = _member_data(tar, member, archive)
                if data is not None:
                    _refuse_duplicate(seen, parts[2:], member.name, archive)
                    members.append((parts[2], parts[3], data))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"archive {archive} is corrupt or truncated ({exc}); download or copy it again") from None
    if not members:
        raise DataError(f"archive {archive} has no images under <top>/{split}/<class>/")
    empty = sorted(class_names - {c for c, _, _ in members})
    if empty:
        raise DataError(f"archive {archive}: class folder(s) {', '.join(map(printable, empty))} of split {split} "
                        "contain no images")
    return _from_members(members, f"{archive}:{split}")


def _open_maybe_gz(path: Path) -> bytes:
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}; the file is corrupt or truncated") from None
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"{path} unpacks to more than the {MAX_FILE_BYTES} bytes ssdd reads from one file; it is not "
                        "a dataset file")
    return data


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
        raise DataError(f"{path}: header announces shape {dims} ({count} bytes) but the file holds {len(body)}; "
                        "it is truncated or corrupt")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def read_idx_pair(images_path: Path, labels_path: Path, classes: list[str]) -> Decoded:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} and {labels_path} do not form a dataset "
                        f"(shapes {images.shape}, {labels.shape})")
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
        seen: dict[str, str] = {}
        try:
            with _ArchiveStream(path) as tar:
                for member in tar:
                    parts = _safe_member_parts(member.name, path)
                    data = _member_data(tar, member, path) if parts and parts[-1] in wanted else None
                    if data is not None:
                        _refuse_duplicate(seen, parts[-1], member.name, path)
                        blobs[parts[-1]] = data
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
