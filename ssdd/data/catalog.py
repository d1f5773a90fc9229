"""The dataset registry: where each dataset is looked for, how it is decoded, and ``load_dataset``."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ssdd.data import cache, readers
from ssdd.data.dataset import ImageDataset
from ssdd.data.synthetic import make_synthetic
from ssdd.errors import DataError
from ssdd.registry import Registry

SPLITS = ("train", "test")
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


DATA_ROOT_FILE = "ssdd-data-root"  # in the environment's prefix (.venv/): the data root scripts/install.sh found


def data_root(root: str | Path | None = None) -> Path:
    """``root`` if given, else ``$SSDD_DATA_ROOT``, else the path in ``<sys.prefix>/ssdd-data-root`` (written by
    scripts/install.sh into .venv, so it holds with or without activating it), else ``~/.cache/ssdd``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("SSDD_DATA_ROOT")
    if env:
        return Path(env).expanduser()
    recorded = Path(sys.prefix) / DATA_ROOT_FILE
    if not recorded.exists():
        return Path.home() / ".cache" / "ssdd"
    try:
        path = recorded.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{recorded} (the installed data root) cannot be read ({exc}); write the path of your data "
                        "folder into it, or delete it") from None
    if not path or "\n" in path:
        raise DataError(f"{recorded} (the installed data root) must hold one path; write the path of your data "
                        "folder into it, or delete it")
    return Path(path).expanduser()


@dataclass
class Source:
    """One place a dataset may be found: a path, a description, and how to decode a split from it."""

    path: Path
    kind: str
    decode: Callable[[str], readers.Decoded]
    present: Callable[[], bool] | None = None  # defaults to "path exists"
    key_paths: list[Path] | None = None  # files/folders whose state identifies the content (default: path)
    listing: Callable[[str], readers.FolderListing] | None = None  # a split's images listed, decoded as streamed

    def exists(self) -> bool:
        return self.present() if self.present is not None else self.path.exists()


@dataclass
class DatasetSpec:
    """A registered dataset: its candidate sources under a data root, in order of preference."""

    name: str
    description: str
    sources: Callable[[Path], list[Source]]
    downloads: list[tuple[str, str, str]] = field(default_factory=list)  # (url, file name under the root, its MD5)


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _image_folder_sources(root: Path, name: str) -> list[Source]:
    archive = root / f"{name}.tar.gz"
    folder = root / name
    return [
        Source(archive, "image-folder archive", lambda split: readers.read_image_folder_archive(archive, split)),
        Source(folder / "train", "image folder", lambda split: readers.read_image_folder(folder / split),
               key_paths=[folder], listing=lambda split: readers.FolderListing(folder / split)),
    ]


def _idx_source(folder: Path, classes: list[str]) -> Source:
    def find(stem: str) -> Path:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.exists():
                return candidate
        return folder / f"{stem}.gz"

    def decode(split: str) -> readers.Decoded:
        images_stem, labels_stem = IDX_FILES[split]
        return readers.read_idx_pair(find(images_stem), find(labels_stem), classes)

    def present() -> bool:
        return all(find(stem).exists() for pair in IDX_FILES.values() for stem in pair)

    def key_paths() -> list[Path]:
        return [find(stem) for pair in IDX_FILES.values() for stem in pair]

    source = Source(find(IDX_FILES["train"][0]), "IDX files", decode, present)
    source.key_paths = key_paths() if present() else None
    return source


def _cifar_sources(root: Path, name: str, official: str, unpacked: str) -> list[Source]:
    return _image_folder_sources(root, name) + [
        Source(root / official, "official python archive",
               lambda split: readers.read_cifar_python(root / official, name, split)),
        Source(root / unpacked, "official python folder",
               lambda split: readers.read_cifar_python(root / unpacked, name, split)),
    ]


DATASETS.add("cifar10", DatasetSpec(
    "cifar10", "CIFAR-10: 50k/10k colour images, 32 px, 10 classes",
    lambda root: _cifar_sources(root, "cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py"),
    [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
      "c58f30108f718f92721af3b95e74349a")],
))
DATASETS.add("cifar100", DatasetSpec(
    "cifar100", "CIFAR-100: 50k/10k colour images, 32 px, 100 classes (fine labels)",
    lambda root: _cifar_sources(root, "cifar100", "cifar-100-python.tar.gz", "cifar-100-python"),
    [("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
      "eb9058c3a382ffc7106e4002c42a8d85")],
))
DATASETS.add("mnist", DatasetSpec(
    "mnist", "MNIST: 60k/10k grayscale digits, 28 px, 10 classes",
    lambda root: _image_folder_sources(root, "mnist") + [_idx_source(root / "mnist", MNIST_CLASSES)],
    [(f"https://ossci-datasets.s3.amazonaws.com/mnist/{stem}.gz", f"mnist/{stem}.gz", md5) for stem, md5 in (
        ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
        ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
        ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"))],
))
DATASETS.add("fashion-mnist", DatasetSpec(
    "fashion-mnist", "Fashion-MNIST: 60k/10k grayscale clothing images, 28 px, 10 classes",
    lambda root: _image_folder_sources(root, "fashion-mnist") + [
        _idx_source(root / "fashion-mnist", FASHION_CLASSES), _idx_source(FASHION_SYSTEM_DIR, FASHION_CLASSES)],
    [(f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{stem}.gz", f"fashion-mnist/{stem}.gz", md5)
     for stem, md5 in (
        ("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        ("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe"),
        ("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79"),
        ("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310"))],
))


def _digits_source(_: Path) -> list[Source]:
    def decode(split: str) -> readers.Decoded:
        from ssdd.data.builtin import read_sklearn_digits

        return read_sklearn_digits(split)

    def present() -> bool:
        return importlib.util.find_spec("sklearn") is not None

    return [Source(Path("sklearn.datasets.load_digits"), "scikit-learn package", decode, present)]


DATASETS.add("digits", DatasetSpec("digits", "scikit-learn's 8x8 digits (1797 images; needs scikit-learn)",
                                   _digits_source))
DATASETS.add("synthetic", DatasetSpec("synthetic", "seeded class-structured noise, 32 px, 10 classes (for tests)",
                                      lambda root: []))


def _split_folder(path: Path, split: str) -> Path:
    if not (path / split).is_dir():
        raise DataError(f"imagefolder:{path} has train/ but no {split}/ folder; add {path}/{split}/<class>/<images> "
                        "(held-out images of the same classes)")
    return path / split


def _imagefolder_sources(path: Path) -> list[Source]:
    if path.is_file():
        return [Source(path, "image-folder archive", lambda split: readers.read_image_folder_archive(path, split))]
    if (path / "train").is_dir():
        return [Source(path / "train", "image folder",
                       lambda split: readers.read_image_folder(_split_folder(path, split)), key_paths=[path],
                       listing=lambda split: readers.FolderListing(_split_folder(path, split)))]

    def folder(split: str) -> Path:
        if split != "train":
            raise DataError(f"imagefolder:{path} has no {split}/ folder: a folder of class folders is one 'train' "
                            f"split (all its images); to evaluate on it, split it into "
                            f"{path}/train/<class>/<images> and {path}/test/<class>/<images> (held-out images)")
        return path

    return [Source(path, "image folder (all images as train)", lambda split: readers.read_image_folder(folder(split)),
                   listing=lambda split: readers.FolderListing(folder(split)))]


def dataset_sources(name: str, root: str | Path | None = None) -> list[Source]:
    """Every place ``name`` is looked for under ``root``, in order of preference."""
    if name.startswith("imagefolder:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        if not str(path) or str(path) == ".":
            raise DataError("imagefolder: needs a path, e.g. imagefolder:/data/my_images")
        if readers.printable(str(path)) != str(path):  # its name is stored in every set and report made from it
            raise DataError(f"imagefolder:{readers.printable(str(path))}: the path is not valid UTF-8; rename it")
        return _imagefolder_sources(path)
    return DATASETS.get(name).sources(data_root(root))


def list_datasets() -> list[str]:
    return DATASETS.names()


def dataset_status(root: str | Path | None = None) -> list[dict]:
    """For each registered dataset: description, where it is looked for, the source that would be used, its size on
    disk, and per split the decoded size (None until it is decoded) and whether its memory-mapped form exists."""
    rows = []
    for name in DATASETS.names():
        spec = DATASETS.get(name)
        sources = spec.sources(data_root(root))
        found = next((s for s in sources if s.exists()), None)
        row = {
            "name": name,
            "description": spec.description,
            "available": name == "synthetic" or found is not None,
            "source": "generated" if name == "synthetic" else (f"{found.kind}: {found.path}" if found else None),
            "looked_in": [f"{s.kind}: {s.path}" for s in sources],
            "downloadable": bool(spec.downloads),
        }
        if found is not None:
            key, row["disk_bytes"] = cache.source_key(found.key_paths or [found.path])
            row["splits"] = {}
            for split in SPLITS:
                path = cache.cache_path(name, split, key)
                on_map = cache.mapped_path(path)
                row["splits"][split] = {"decoded_bytes": cache.decoded_bytes(on_map) or cache.decoded_bytes(path),
                                        "mapped": on_map.is_file()}
        rows.append(row)
    return rows


def load_dataset(
    name: str,
    split: str = "train",
    root: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
    mapped: bool | None = None,
) -> ImageDataset:
    """Load a dataset split as uint8 images (N, C, H, W), int64 labels and class names.

    The first load decodes the source and caches the result (see :func:`ssdd.data.cache.cache_dir`); later loads
    read the cache.  ``image_size`` / ``channels`` convert the images (e.g. MNIST to 32 px RGB to evaluate a
    CIFAR-trained network).  ``download=True`` fetches the official files into the data root when no local copy
    exists; nothing is downloaded otherwise.  ``mapped`` reads the images from a memory-mapped file built in a
    streaming pass (True), holds them in memory (False), or (None) maps those whose decoded size is over
    :func:`ssdd.data.cache.map_above_bytes`.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if name == "synthetic":
        dataset = make_synthetic(split)
    else:
        dataset = _load_from_sources(name, split, root, download, mapped)
    _, height, width = dataset.image_shape
    if height != width and image_size is None:  # converted() would squash them to height x height
        raise DataError(f"dataset {name!r} has images of {width}x{height} pixels; ssdd's models take square images: "
                        "crop or pad them to squares first")
    return dataset.converted(channels=channels, size=image_size)


def _load_from_sources(name: str, split: str, root: str | Path | None, download: bool,
                       mapped: bool | None) -> ImageDataset:
    sources = dataset_sources(name, root)
    found = next((s for s in sources if s.exists()), None)
    if found is None and download and not name.startswith("imagefolder:"):
        from ssdd.data.download import download_dataset

        download_dataset(DATASETS.get(name), data_root(root))
        found = next((s for s in sources if s.exists()), None)
    if found is None:
        looked = "; ".join(f"{s.kind} {s.path}" for s in sources)
        if name.startswith("imagefolder:"):
            hint = "check the path"
        else:
            hint = "put a copy there or set SSDD_DATA_ROOT / --data-root" + (
                f", or fetch it with `ssdd datasets --download {name}`" if DATASETS.get(name).downloads else "")
        raise DataError(f"dataset {name!r} not found (looked for {looked}); {hint}")
    key, _ = cache.source_key(found.key_paths or [found.path])
    path = cache.cache_path(name, split, key)
    on_map = cache.mapped_path(path)
    if mapped is None:
        size = cache.decoded_bytes(path) or cache.decoded_bytes(on_map)
        if size is None and found.listing is not None:
            listing = found.listing(split)
            size = len(listing.files) * math.prod(listing.image_shape)
        mapped = None if size is None else size > cache.map_above_bytes()
    loaded = cache.load_mapped(on_map) if mapped else cache.load_cached(path)
    if loaded is not None:
        return loaded
    where = f"{found.kind}: {found.path}"
    if mapped:
        on_map.unlink(missing_ok=True)  # absent, or damaged: rebuilt
    if mapped and found.listing is not None:
        listing = found.listing(split)
        cache.store_mapped(on_map, name, split, where, listing.labels, listing.classes, listing.image_shape,
                           listing.read)
        return cache.opened_mapped(on_map)
    images, labels, classes = found.decode(split)
    if mapped or (mapped is None and images.numel() > cache.map_above_bytes()):
        cache.store_mapped(on_map, name, split, where, labels, classes, tuple(images.shape[1:]),
                           lambda start, stop: images[start:stop])
        return cache.opened_mapped(on_map)
    dataset = ImageDataset(name=name, split=split, images=images, labels=labels, classes=classes, source=where)
    cache.store(path, dataset)
    return dataset

