"""Dataset loading: every on-disk format, the decoded cache, conversions, statistics and clear errors.

Every dataset here is a tiny fixture written by ``tests/fixtures.py`` whose exact pixels and labels are known.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import (
    CLASSES,
    ShellPayload,
    cifar10_members,
    expected,
    idx_bytes,
    make_cifar_data,
    make_idx_data,
    make_splits,
    marker_command,
    png_bytes,
    random_images,
    write_cifar10_archive,
    write_cifar10_folder,
    write_class_folders,
    write_idx,
    write_image_folder,
    write_image_folder_archive,
    write_mnist_idx,
    zero_png,
)
from PIL import Image

import ssdd.data.readers as readers
from ssdd.data import ImageDataset, PixelSpace, convert_images, dataset_status, load_dataset, make_synthetic
from ssdd.data.catalog import MNIST_CLASSES, data_root
from ssdd.errors import DataError, SsddError, UnknownNameError

SORTED = sorted(CLASSES)


def assert_matches(ds: ImageDataset, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
    assert ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64
    assert tuple(ds.images.shape) == tuple(images.shape)
    assert torch.equal(ds.images, images)
    assert torch.equal(ds.labels, labels)
    assert ds.classes == list(classes)


def assert_data_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    assert isinstance(excinfo.value, SsddError)
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message {message!r}"


def bump_mtime(path: Path, seconds: int = 100) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns + seconds * 10**9, st.st_mtime_ns + seconds * 10**9))


# ---- each format gives back exactly what was written --------------------------------------------------------


def test_fixture_truth_is_sorted_by_class_name() -> None:
    # The independent truth used below: labels index the sorted class names, not creation order.
    splits = make_splits()
    truth = expected(splits["train"])
    assert truth.classes == ["apple", "mango", "zebra"]
    assert truth.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    first_apple = torch.from_numpy(splits["train"]["apple"][0]).permute(2, 0, 1)
    assert torch.equal(truth.images[0], first_apple)


@pytest.mark.parametrize("split", ["train", "test"])
def test_image_folder_by_name_gives_exact_pixels(data_dir: Path, split: str) -> None:
    splits = make_splits(size=8, channels=3, seed=1)
    write_image_folder(data_dir / "cifar10", splits)
    ds = load_dataset("cifar10", split)
    truth = expected(splits[split])
    assert_matches(ds, truth.images, truth.labels, SORTED)
    assert ds.name == "cifar10" and ds.split == split
    assert "image folder" in ds.source


def test_grayscale_image_folder_has_one_channel(data_dir: Path) -> None:
    splits = make_splits(size=8, channels=1, seed=2)
    write_image_folder(data_dir / "mnist", splits)
    ds = load_dataset("mnist", "train")
    truth = expected(splits["train"])
    assert ds.image_shape == (1, 8, 8)
    assert_matches(ds, truth.images, truth.labels, SORTED)


def test_image_folder_sorts_files_by_name_within_a_class(data_dir: Path) -> None:
    # 12 files: "10.png" and "11.png" sort between "1.png" and "2.png".
    images = random_images(12, size=8, channels=3, seed=3)
    write_class_folders(data_dir / "cifar10" / "train", {"only": images})
    ds = load_dataset("cifar10", "train")
    order = sorted(range(12), key=lambda i: f"{i}.png")
    assert order[:4] == [0, 1, 10, 11]
    want = torch.stack([torch.from_numpy(images[i]).permute(2, 0, 1) for i in order])
    assert torch.equal(ds.images, want)
    assert ds.labels.tolist() == [0] * 12


@pytest.mark.parametrize("split", ["train", "test"])
def test_image_folder_archive_gives_exact_pixels(data_dir: Path, split: str) -> None:
    splits = make_splits(size=8, channels=3, seed=4)
    write_image_folder_archive(data_dir / "cifar10.tar.gz", "cifar10", splits)
    ds = load_dataset("cifar10", split)
    truth = expected(splits[split])
    assert_matches(ds, truth.images, truth.labels, SORTED)
    assert "archive" in ds.source


def test_archive_and_folder_of_same_images_have_same_fingerprint(tmp_path: Path) -> None:
    splits = make_splits(seed=5)
    write_image_folder(tmp_path / "a" / "cifar10", splits)
    write_image_folder_archive(tmp_path / "b" / "cifar10.tar.gz", "cifar10", splits)
    from_folder = load_dataset("cifar10", "train", root=tmp_path / "a")
    from_archive = load_dataset("cifar10", "train", root=tmp_path / "b")
    assert "image folder" in from_folder.source and "archive" in from_archive.source
    assert torch.equal(from_folder.images, from_archive.images)
    assert from_folder.fingerprint == from_archive.fingerprint


def test_root_argument_overrides_environment(tmp_path: Path, data_dir: Path) -> None:
    assert data_root() == data_dir
    assert data_root(tmp_path / "other") == tmp_path / "other"
    splits = make_splits(seed=6)
    write_image_folder(tmp_path / "other" / "cifar10", splits)
    with pytest.raises(DataError):
        load_dataset("cifar10", "train")  # nothing under SSDD_DATA_ROOT
    ds = load_dataset("cifar10", "train", root=tmp_path / "other")
    assert torch.equal(ds.images, expected(splits["train"]).images)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_idx_files(data_dir: Path, gz: bool, split: str) -> None:
    data = make_idx_data(seed=7)
    write_mnist_idx(data_dir / "mnist", data, gz=gz)
    ds = load_dataset("mnist", split)
    images = getattr(data, f"{split}_images")
    labels = getattr(data, f"{split}_labels")
    assert ds.image_shape == (1, 28, 28)
    assert_matches(ds, torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), MNIST_CLASSES)
    assert "IDX" in ds.source


def test_idx_header_is_big_endian() -> None:
    # The fixture writer itself, checked against hand-written bytes.
    arr = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    assert idx_bytes(arr) == bytes([0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 1, 2, 3, 4, 5])
    assert idx_bytes(np.array([7, 9], dtype=np.uint8)) == bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9])


@pytest.mark.parametrize("form", ["archive", "folder"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_python_release(data_dir: Path, form: str, split: str) -> None:
    data = make_cifar_data(seed=8)
    (write_cifar10_archive if form == "archive" else write_cifar10_folder)(data_dir, data)
    ds = load_dataset("cifar10", split)
    images = getattr(data, f"{split}_images")
    labels = getattr(data, f"{split}_labels")
    assert ds.image_shape == (3, 32, 32)
    assert_matches(ds, torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64), list(data.label_names))
    assert ("archive" if form == "archive" else "folder") in ds.source


def test_cifar_rows_are_channel_major(tmp_path: Path) -> None:
    # Independent check of the row layout: first 1024 values are red, next 1024 green, last 1024 blue.
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    blob = pickle.dumps({b"data": row[None, :], b"labels": [3]}, protocol=2)
    meta = pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (tmp_path / name).write_bytes(blob)
    (tmp_path / "batches.meta").write_bytes(meta)
    images, labels, classes = readers.read_cifar_python(tmp_path, "cifar10", "train")
    assert images.shape == (5, 3, 32, 32)
    assert images[:, 0].unique().tolist() == [10]
    assert images[:, 1].unique().tolist() == [20]
    assert images[:, 2].unique().tolist() == [30]
    assert labels.tolist() == [3] * 5
    assert classes == [f"c{i}" for i in range(10)]


# ---- imagefolder:PATH ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_imagefolder_with_train_and_test(tmp_path: Path, split: str) -> None:
    splits = make_splits(seed=9)
    write_image_folder(tmp_path / "mine", splits)
    ds = load_dataset(f"imagefolder:{tmp_path / 'mine'}", split)
    truth = expected(splits[split])
    assert_matches(ds, truth.images, truth.labels, SORTED)


def test_imagefolder_flat_class_folders_is_train_only(tmp_path: Path) -> None:
    classes = make_splits(seed=10)["train"]
    write_class_folders(tmp_path / "flat", classes)
    ds = load_dataset(f"imagefolder:{tmp_path / 'flat'}", "train")
    truth = expected(classes)
    assert_matches(ds, truth.images, truth.labels, SORTED)
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"imagefolder:{tmp_path / 'flat'}", "test")
    assert_data_error(excinfo, str(tmp_path / "flat"), "'train'")


@pytest.mark.parametrize("split", ["train", "test"])
def test_imagefolder_archive(tmp_path: Path, split: str) -> None:
    splits = make_splits(seed=11)
    archive = write_image_folder_archive(tmp_path / "mine.tar.gz", "anything", splits)
    ds = load_dataset(f"imagefolder:{archive}", split)
    truth = expected(splits[split])
    assert_matches(ds, truth.images, truth.labels, SORTED)


def test_imagefolder_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"imagefolder:{tmp_path / 'nothing-here'}", "train")
    assert_data_error(excinfo, str(tmp_path / "nothing-here"))


# ---- the decoded cache --------------------------------------------------------------------------------------


def test_second_load_reads_the_cache_not_the_source(
        data_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = make_splits(seed=12)
    write_image_folder_archive(data_dir / "cifar10.tar.gz", "cifar10", splits)
    first = load_dataset("cifar10", "train")
    cached = list(cache_dir.glob("*.safetensors"))
    assert len(cached) == 1 and cached[0].name.startswith("cifar10-train-")

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the source was decoded again")

    monkeypatch.setattr(readers, "read_image_folder_archive", boom)
    second = load_dataset("cifar10", "train")
    assert torch.equal(second.images, first.images)
    assert torch.equal(second.labels, first.labels)
    assert second.classes == first.classes
    assert second.fingerprint == first.fingerprint
    assert second.source == first.source
    # A split that is not cached yet does need the decoder.
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("cifar10", "test")


def test_cache_rebuilt_when_archive_changes(data_dir: Path) -> None:
    archive = data_dir / "cifar10.tar.gz"
    old = make_splits(seed=13)
    write_image_folder_archive(archive, "cifar10", old)
    assert torch.equal(load_dataset("cifar10", "train").images, expected(old["train"]).images)
    new = make_splits(seed=14, per_class={"train": 4, "test": 2})
    write_image_folder_archive(archive, "cifar10", new)
    bump_mtime(archive)
    ds = load_dataset("cifar10", "train")
    truth = expected(new["train"])
    assert_matches(ds, truth.images, truth.labels, SORTED)


def test_corrupt_cache_file_is_rebuilt(data_dir: Path, cache_dir: Path) -> None:
    splits = make_splits(seed=15)
    write_image_folder_archive(data_dir / "cifar10.tar.gz", "cifar10", splits)
    load_dataset("cifar10", "train")
    (cache_file,) = cache_dir.glob("*.safetensors")
    cache_file.write_bytes(b"\x00garbage" * 10)
    ds = load_dataset("cifar10", "train")
    assert torch.equal(ds.images, expected(splits["train"]).images)


def test_cache_rebuilt_when_an_image_is_overwritten_in_place(data_dir: Path) -> None:
    splits = make_splits(seed=16)
    write_image_folder(data_dir / "cifar10", splits)
    assert torch.equal(load_dataset("cifar10", "train").images, expected(splits["train"]).images)
    # Replace the pixels of one existing file (same name; folder listings unchanged).
    replacement = np.full((8, 8, 3), 7, dtype=np.uint8)
    target = data_dir / "cifar10" / "train" / "apple" / "0.png"
    target.write_bytes(png_bytes(replacement))
    bump_mtime(target)
    splits["train"]["apple"][0] = replacement
    fresh = torch.equal(load_dataset("cifar10", "train").images, expected(splits["train"]).images)
    assert fresh, "stale cache: train/apple/0.png was overwritten but the old pixels were returned"


def test_cache_of_test_split_rebuilt_when_test_folder_changes(data_dir: Path) -> None:
    splits = make_splits(seed=17)
    write_image_folder(data_dir / "cifar10", splits)
    assert len(load_dataset("cifar10", "test")) == 6
    extra = random_images(1, seed=99)[0]
    (data_dir / "cifar10" / "test" / "apple" / "9.png").write_bytes(png_bytes(extra))
    count = len(load_dataset("cifar10", "test"))
    assert count == 7, f"stale cache: an image was added to test/apple/ but {count} images were returned"


def test_cache_of_idx_test_split_rebuilt_when_test_file_changes(data_dir: Path) -> None:
    data = make_idx_data(seed=18)
    paths = write_mnist_idx(data_dir / "mnist", data)
    assert torch.equal(load_dataset("mnist", "test").images, torch.from_numpy(data.test_images).unsqueeze(1))
    new_images = 255 - data.test_images
    write_idx(paths["test_images"], new_images)
    bump_mtime(paths["test_images"])
    fresh = torch.equal(load_dataset("mnist", "test").images, torch.from_numpy(new_images).unsqueeze(1))
    assert fresh, "stale cache: t10k-images-idx3-ubyte.gz was replaced but the old pixels were returned"


# ---- fingerprint, conversions, pixel statistics, synthetic data ---------------------------------------------


def _dataset(images: torch.Tensor, labels: torch.Tensor, classes: list[str], name: str = "x") -> ImageDataset:
    return ImageDataset(name=name, split="train", images=images, labels=labels, classes=classes)


def test_fingerprint_depends_on_content_only() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.tensor([0, 1, 0, 1])
    base = _dataset(images, labels, ["a", "b"], name="one")
    assert len(base.fingerprint) == 16
    assert _dataset(images.clone(), labels.clone(), ["a", "b"], name="two").fingerprint == base.fingerprint
    changed = images.clone()
    changed[2, 1, 3, 4] ^= 1
    assert _dataset(changed, labels, ["a", "b"]).fingerprint != base.fingerprint
    assert _dataset(images, torch.tensor([0, 1, 1, 1]), ["a", "b"]).fingerprint != base.fingerprint
    assert _dataset(images, labels, ["a", "c"]).fingerprint != base.fingerprint
    assert base.subset([0, 1, 2, 3]).fingerprint == base.fingerprint
    assert base.subset([0, 1]).fingerprint != base.fingerprint


def test_converted_gray28_to_rgb32() -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=gen)
    ds = _dataset(images, torch.zeros(5, dtype=torch.long), ["a"])
    out = ds.converted(channels=3, size=32)
    assert out.images.dtype == torch.uint8
    assert tuple(out.images.shape) == (5, 3, 32, 32)
    # Grayscale -> RGB replicates the channel exactly, and equals the 1-channel resize.
    assert torch.equal(out.images[:, 0], out.images[:, 1])
    assert torch.equal(out.images[:, 0], out.images[:, 2])
    assert torch.equal(out.images[:, :1], ds.converted(channels=1, size=32).images)
    assert out.fingerprint != ds.fingerprint
    assert torch.equal(out.labels, ds.labels)
    assert ds.images.shape == (5, 1, 28, 28)  # the original is untouched


def test_converted_channels_only_is_exact_repetition() -> None:
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = _dataset(images, torch.zeros(3, dtype=torch.long), ["a"]).converted(channels=3)
    assert torch.equal(out.images, images.expand(-1, 3, -1, -1))


def test_load_mnist_as_three_channels_without_resize(data_dir: Path) -> None:
    data = make_idx_data(seed=38)
    write_mnist_idx(data_dir / "mnist", data)
    ds = load_dataset("mnist", "train", channels=3)
    assert torch.equal(ds.images, torch.from_numpy(data.train_images).unsqueeze(1).expand(-1, 3, -1, -1))


def test_converted_no_op_returns_same_dataset() -> None:
    ds = _dataset(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), ["a"])
    assert ds.converted(channels=3, size=8) is ds
    assert ds.converted() is ds


@pytest.mark.parametrize("value", [0, 1, 77, 128, 254, 255])
@pytest.mark.parametrize("src,dst", [(28, 32), (32, 28), (28, 14), (8, 32)])
def test_constant_image_stays_constant_after_resize(value: int, src: int, dst: int) -> None:
    images = torch.full((2, 1, src, src), value, dtype=torch.uint8)
    out = convert_images(images, channels=3, size=dst)
    assert out.shape == (2, 3, dst, dst)
    assert out.unique().tolist() == [value]


def test_rgb_to_gray_uses_luma_weights() -> None:
    rgb = torch.tensor([100, 200, 50], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 4, 4).contiguous()
    gray = convert_images(rgb, channels=1, size=4)
    # 0.299 * 100 + 0.587 * 200 + 0.114 * 50 = 153.0
    assert gray.shape == (1, 1, 4, 4)
    assert gray.unique().tolist() == [153]


def test_load_dataset_converts_on_request(data_dir: Path) -> None:
    data = make_idx_data(seed=19)
    write_mnist_idx(data_dir / "mnist", data)
    ds = load_dataset("mnist", "train", image_size=32, channels=3)
    assert tuple(ds.images.shape) == (6, 3, 32, 32)
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])
    plain = load_dataset("mnist", "train")
    assert torch.equal(ds.images, convert_images(plain.images, channels=3, size=32))


def test_pixel_space_of_hand_built_tensor() -> None:
    images = torch.zeros((2, 3, 2, 2), dtype=torch.uint8)
    # channel 0: half 0, half 255 -> mean 0.5, std 0.5
    images[0, 0] = 255
    # channel 1: half 0, half 102 (= 0.4) -> mean 0.2, std 0.2
    images[1, 1] = 102
    # channel 2: one pixel in four is 0, the rest 255 -> mean 0.75, std sqrt(0.75 - 0.75**2)
    images[:, 2] = 255
    images[0, 2, 0, 0] = 0
    images[1, 2, 1, 1] = 0
    frac = (images[:, 2] == 255).double().mean().item()
    assert frac == 0.75
    space = PixelSpace.of(images)
    assert space.mean == pytest.approx((0.5, 0.2, 0.75), abs=1e-6)
    assert space.std == pytest.approx((0.5, 0.2, (0.75 - 0.75**2) ** 0.5), abs=1e-6)


def test_pixel_space_of_matches_population_statistics() -> None:
    images = torch.randint(0, 256, (7, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    x = images.double() / 255
    space = PixelSpace.of(images)
    assert space.mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()), abs=1e-6)
    assert space.std == pytest.approx(tuple(x.std(dim=(0, 2, 3), unbiased=False).tolist()), abs=1e-6)


def test_pixel_space_normalize_round_trip() -> None:
    space = PixelSpace((0.5, 0.2, 0.75), (0.5, 0.2, 0.25))
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    z = space.normalize(x)
    assert torch.allclose(z[:, 1], (x[:, 1] - 0.2) / 0.2, atol=1e-6)
    assert torch.allclose(space.denormalize(z), x, atol=1e-6)
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(space.normalize(u8), space.normalize(u8.float() / 255), atol=1e-6)
    low, high = space.bounds()
    assert torch.allclose(space.normalize(torch.zeros(1, 3, 1, 1))[0], low, atol=1e-6)
    assert torch.allclose(space.normalize(torch.ones(1, 3, 1, 1))[0], high, atol=1e-6)
    assert PixelSpace.from_dict(space.to_dict()) == space


def test_synthetic_is_deterministic_with_ten_classes() -> None:
    a = load_dataset("synthetic", "train")
    b = load_dataset("synthetic", "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.fingerprint == b.fingerprint
    assert a.num_classes == 10 and len(a.classes) == 10
    assert torch.equal(a.labels.bincount(), torch.full((10,), 32))
    assert a.images.dtype == torch.uint8 and a.image_shape == (3, 32, 32)
    test = load_dataset("synthetic", "test")
    assert not torch.equal(a.images, test.images)
    other_seed = make_synthetic("train", seed=1)
    assert not torch.equal(a.images, other_seed.images)
    assert torch.equal(make_synthetic("train", seed=1).images, other_seed.images)


def test_synthetic_converted_size() -> None:
    ds = load_dataset("synthetic", "train", image_size=16, channels=1)
    assert tuple(ds.images.shape) == (320, 1, 16, 16)


# ---- dataset_status -----------------------------------------------------------------------------------------


def _status(name: str) -> dict:
    return {row["name"]: row for row in dataset_status()}[name]


def test_dataset_status_unavailable_lists_where_it_looked(data_dir: Path) -> None:
    row = _status("cifar10")
    assert row["available"] is False
    assert row["source"] is None
    looked = "\n".join(row["looked_in"])
    assert str(data_dir / "cifar-10-python.tar.gz") in looked
    assert str(data_dir / "cifar10.tar.gz") in looked
    assert row["downloadable"] is True
    assert _status("synthetic")["available"] is True
    assert _status("mnist")["available"] is False


def test_dataset_status_available_when_archive_exists(data_dir: Path) -> None:
    archive = write_cifar10_archive(data_dir, make_cifar_data())
    row = _status("cifar10")
    assert row["available"] is True
    assert str(archive) in row["source"]
    write_image_folder_archive(data_dir / "mnist.tar.gz", "mnist", make_splits(channels=1))
    row = _status("mnist")
    assert row["available"] is True and str(data_dir / "mnist.tar.gz") in row["source"]
    assert _status("cifar100")["available"] is False


def test_dataset_status_explicit_root(tmp_path: Path) -> None:
    write_cifar10_folder(tmp_path, make_cifar_data())
    rows = {r["name"]: r for r in dataset_status(tmp_path)}
    assert rows["cifar10"]["available"] is True
    assert str(tmp_path / "cifar-10-batches-py") in rows["cifar10"]["source"]
    assert _status("cifar10")["available"] is False  # the env data root is still empty


# ---- clear errors -------------------------------------------------------------------------------------------


def test_unknown_dataset_name_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as excinfo:
        load_dataset("cifar11", "train")
    assert_data_error(excinfo, "'cifar11'", "cifar10", "mnist", "synthetic", "Did you mean")


def test_missing_dataset_says_where_and_how(data_dir: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    assert_data_error(excinfo, "'cifar10'", str(data_dir / "cifar-10-python.tar.gz"), "--download", "SSDD_DATA_ROOT")


def test_unknown_split() -> None:
    with pytest.raises(DataError) as excinfo:
        load_dataset("synthetic", "validation")
    assert_data_error(excinfo, "'validation'", "train", "test")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_image_in_folder_names_the_file(data_dir: Path, damage: str) -> None:
    splits = make_splits(size=32, seed=20)
    write_image_folder(data_dir / "cifar10", splits)
    bad = data_dir / "cifar10" / "train" / "mango" / "1.png"
    good = bad.read_bytes()
    bad.write_bytes({"garbage": b"not a png at all" * 8, "truncated": good[: len(good) // 2], "empty": b""}[damage])
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    assert_data_error(excinfo, "mango/1.png")


def test_corrupt_image_in_archive_names_the_file(data_dir: Path) -> None:
    splits = make_splits(seed=21)
    write_image_folder_archive(data_dir / "cifar10.tar.gz", "cifar10", splits,
                               extra={"cifar10/train/apple/broken.png": b"\x89PNG\r\n\x1a\nnope"})
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    assert_data_error(excinfo, "apple/broken.png")


def test_archive_with_corrupted_bytes(data_dir: Path) -> None:
    archive = write_image_folder_archive(data_dir / "cifar10.tar.gz", "cifar10", make_splits(seed=22))
    data = bytearray(archive.read_bytes())
    for i in range(40, len(data) - 40, 7):
        data[i] ^= 0x5A
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    assert_data_error(excinfo, str(archive))


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_archive_truncated_mid_stream(data_dir: Path, fraction: float) -> None:
    archive = write_image_folder_archive(data_dir / "cifar10.tar.gz", "cifar10", make_splits(seed=23))
    data = archive.read_bytes()
    archive.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    assert_data_error(excinfo, str(archive))


def test_not_an_archive_at_all(data_dir: Path) -> None:
    archive = data_dir / "cifar10.tar.gz"
    archive.write_bytes(b"this is plain text, not gzip" * 20)
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    assert_data_error(excinfo, str(archive))


def test_archive_truncated_at_a_member_boundary_is_an_error(data_dir: Path) -> None:
    """A download cut off where the compressed stream happens to end on a tar header boundary.

    The gzip stream is written with a flush point at the header of the last test image, so the prefix up to that
    point is exactly what an interrupted download of this (valid) file would leave.  A correct reader notices the
    gzip stream never ended; it must not quietly return a dataset with images missing.
    """
    splits = make_splits(seed=24)
    staging = data_dir / "staging.tar.gz"
    write_image_folder_archive(staging, "cifar10", splits)
    raw = gzip.decompress(staging.read_bytes())
    staging.unlink()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("cifar10/test/")]
    cut = members[-1].offset  # start of the last test image's header
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    head = comp.compress(raw[:cut]) + comp.flush(zlib.Z_SYNC_FLUSH)
    full = head + comp.compress(raw[cut:]) + comp.flush()
    archive = data_dir / "cifar10.tar.gz"
    archive.write_bytes(full)
    assert len(load_dataset("cifar10", "test")) == 6  # the complete file is fine
    archive.write_bytes(head)  # the same file, cut off
    bump_mtime(archive)
    with pytest.raises(DataError) as excinfo:
        ds = load_dataset("cifar10", "test")
        pytest.fail(f"truncated archive loaded silently with {len(ds)} of 6 images")
    assert_data_error(excinfo, str(archive))


@pytest.mark.parametrize("evil", ["../evil.png", "cifar10/train/apple/../../../evil.png", "ABSOLUTE"])
def test_archive_path_traversal_is_refused(data_dir: Path, tmp_path: Path, evil: str) -> None:
    if evil == "ABSOLUTE":
        evil = str(tmp_path / "abs" / "evil.png")
    payload = png_bytes(np.zeros((8, 8, 3), dtype=np.uint8))
    archive = write_image_folder_archive(data_dir / "cifar10.tar.gz", "cifar10", make_splits(seed=25),
                                         extra={evil: payload})
    before = {p for p in data_dir.parent.rglob("*")} | {p for p in tmp_path.rglob("*")}
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    assert_data_error(excinfo, str(archive), evil)
    after = {p for p in data_dir.parent.rglob("*")} | {p for p in tmp_path.rglob("*")}
    assert not [p for p in after - before if p.name == "evil.png"]
    assert not (data_dir.parent / "evil.png").exists()
    assert not (tmp_path / "abs").exists()
    assert not Path("evil.png").exists()


def test_cifar_archive_path_traversal_is_refused(data_dir: Path) -> None:
    data = make_cifar_data(seed=26)
    archive = write_cifar10_archive(data_dir, data, overrides={"../../evil.png": b"x"})
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    assert_data_error(excinfo, str(archive), "evil.png")
    assert not (data_dir / "evil.png").exists() and not (data_dir.parent / "evil.png").exists()


def test_empty_class_folder_is_named(data_dir: Path) -> None:
    write_image_folder(data_dir / "cifar10", make_splits(seed=27))
    (data_dir / "cifar10" / "train" / "kiwi").mkdir()
    (data_dir / "cifar10" / "train" / "kiwi" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    assert_data_error(excinfo, "kiwi")


def test_empty_class_folder_in_archive_is_named(data_dir: Path) -> None:
    splits = make_splits(seed=28)
    splits["train"]["kiwi"] = []
    write_image_folder_archive(data_dir / "cifar10.tar.gz", "cifar10", splits)
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    assert_data_error(excinfo, "kiwi")


def test_folder_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "0.png").write_bytes(png_bytes(np.zeros((8, 8, 3), dtype=np.uint8)))
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"imagefolder:{tmp_path / 'loose'}", "train")
    assert_data_error(excinfo, str(tmp_path / "loose"))


def test_mixed_image_sizes_are_named(data_dir: Path) -> None:
    splits = make_splits(size=8, seed=29)
    splits["train"]["mango"][2] = random_images(1, size=10, seed=5)[0]
    write_image_folder(data_dir / "cifar10", splits)
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    assert_data_error(excinfo, "mango/2.png", "10x10", "8x8")


def test_mixed_gray_and_colour_becomes_colour(data_dir: Path) -> None:
    gray = random_images(1, size=8, channels=1, seed=30)[0]
    colour = random_images(1, size=8, channels=3, seed=31)[0]
    write_class_folders(data_dir / "cifar10" / "train", {"a": [gray], "b": [colour]})
    ds = load_dataset("cifar10", "train")
    assert ds.image_shape == (3, 8, 8)
    assert torch.equal(ds.images[0], torch.from_numpy(gray).permute(2, 0, 1).expand(3, -1, -1))
    assert torch.equal(ds.images[1], torch.from_numpy(colour).permute(2, 0, 1))


@pytest.mark.parametrize("field,magic", [("train_images", 0x00000903), ("train_images", 0x00000D03),
                                         ("train_labels", 0x01000801)])
def test_idx_wrong_magic(data_dir: Path, field: str, magic: int) -> None:
    data = make_idx_data(seed=32)
    paths = write_mnist_idx(data_dir / "mnist", data)
    write_idx(paths[field], getattr(data, field), magic=magic)
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "train")
    assert_data_error(excinfo, str(paths[field]), "magic")


@pytest.mark.parametrize("how", ["short-body", "cut-gzip", "header-only"])
def test_idx_truncated(data_dir: Path, how: str) -> None:
    data = make_idx_data(seed=33)
    paths = write_mnist_idx(data_dir / "mnist", data)
    target = paths["train_images"]
    raw = idx_bytes(data.train_images)
    if how == "short-body":
        target.write_bytes(gzip.compress(raw[:-100]))
    elif how == "cut-gzip":
        blob = gzip.compress(raw)
        target.write_bytes(blob[: len(blob) // 2])
    else:
        target.write_bytes(gzip.compress(raw[:10]))
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "train")
    assert_data_error(excinfo, str(target))


def test_idx_label_count_mismatch(data_dir: Path) -> None:
    data = make_idx_data(seed=34)
    paths = write_mnist_idx(data_dir / "mnist", data)
    write_idx(paths["train_labels"], data.train_labels[:-1])
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "train")
    assert_data_error(excinfo, str(paths["train_labels"]))


def test_shell_payload_is_live(tmp_path: Path) -> None:
    # Proof that the forged pickle below would create the marker if it were unpickled normally.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(ShellPayload(marker_command(marker)), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("form", ["folder", "archive"])
@pytest.mark.parametrize("victim", ["data_batch_1", "batches.meta", "test_batch"])
@pytest.mark.parametrize("nested", [False, True])
def test_forged_cifar_pickle_does_not_execute(
        data_dir: Path, tmp_path: Path, form: str, victim: str, nested: bool) -> None:
    marker = tmp_path / "pwned"
    payload = ShellPayload(marker_command(marker))
    obj = {b"data": payload, b"labels": [0]} if nested else payload
    forged = pickle.dumps(obj, protocol=2)
    data = make_cifar_data(seed=35)
    (write_cifar10_archive if form == "archive" else write_cifar10_folder)(data_dir, data, overrides={victim: forged})
    split = "test" if victim == "test_batch" else "train"
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", split)
    assert_data_error(excinfo, victim)
    assert not marker.exists(), "the forged pickle ran code"


def test_cifar_missing_batch_is_named(data_dir: Path) -> None:
    folder = write_cifar10_folder(data_dir, make_cifar_data(seed=36))
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    assert_data_error(excinfo, "data_batch_3")


def test_cifar_batch_with_wrong_row_length(data_dir: Path) -> None:
    bad = pickle.dumps({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, protocol=2)
    write_cifar10_folder(data_dir, make_cifar_data(seed=37), overrides={"data_batch_2": bad})
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    assert_data_error(excinfo, "data_batch_2", "3072")


# ---- pixel modes other than 8-bit L / RGB: converted exactly or refused ---------------------------------------


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def load_one(tmp_path: Path, data: bytes, suffix: str = ".png") -> torch.Tensor:
    """Load a folder holding the one image ``data`` (class ``a``) and return its (C, H, W) pixels."""
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True, exist_ok=True)
    (folder / "a" / f"0{suffix}").write_bytes(data)
    return load_dataset(f"imagefolder:{folder}", "train").images[0]


SIXTEEN = np.array([[0, 1, 128, 129], [256, 257, 385, 386], [32767, 32768, 65278, 65535], [127, 383, 12345, 65407]],
                   dtype=np.uint16)
SIXTEEN_TO_8 = np.rint(SIXTEEN.astype(np.float64) * 255 / 65535)  # the independent truth: round(v * 255 / 65535)


def pgm16(values: np.ndarray) -> bytes:
    """A binary PGM with maxval 65535 (PIL reads it as mode I)."""
    return f"P5\n{values.shape[1]} {values.shape[0]}\n65535\n".encode() + values.astype(">u2").tobytes()


@pytest.mark.parametrize("source", ["png-I;16", "tiff-I;16", "tiff-I;16B", "pgm-I"])
def test_16_bit_gray_is_scaled_to_8_bits_not_clipped(tmp_path: Path, source: str) -> None:
    """16-bit PNGs decoded as all 255 before; each value v must become round(v * 255 / 65535)."""
    fmt, mode = source.split("-")
    if fmt == "pgm":
        data = pgm16(SIXTEEN)
    else:
        img = Image.fromarray(SIXTEEN)
        img = img if mode == "I;16" else Image.frombytes("I;16B", img.size, SIXTEEN.astype(">u2").tobytes())
        data = encoded(img, "PNG" if fmt == "png" else "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    pixels = load_one(tmp_path, data, f".{fmt}")
    assert pixels.shape == (1, 4, 4)
    assert pixels[0].numpy().tolist() == SIXTEEN_TO_8.tolist()


def test_alpha_is_composited_over_black(tmp_path: Path) -> None:
    """The colour under a transparent pixel never shows: each channel becomes round(colour * alpha / 255)."""
    rgb = np.tile(np.array([[[200, 100, 50], [255, 255, 255], [10, 20, 30]]], dtype=np.uint8), (3, 1, 1))
    alpha = np.tile(np.array([[255, 0, 128]], dtype=np.uint8), (3, 1))
    truth = np.rint(rgb.astype(np.float64) * alpha[..., None] / 255).astype(np.uint8)
    rgba = load_one(tmp_path / "rgba", encoded(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")))
    assert rgba.permute(1, 2, 0).numpy().tolist() == truth.tolist()
    gray = load_one(tmp_path / "la", encoded(Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")))
    assert gray.shape == (1, 3, 3) and gray[0].numpy().tolist() == truth[..., 0].tolist()


def test_palette_with_a_transparent_entry(tmp_path: Path) -> None:
    img = Image.new("P", (3, 3))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    img.putdata([0, 1, 2] * 3)
    img.info["transparency"] = 1  # the green entry is fully transparent
    pixels = load_one(tmp_path, encoded(img))
    assert pixels.permute(1, 2, 0).numpy().tolist() == [[[255, 0, 0], [0, 0, 0], [0, 0, 255]]] * 3


def test_cmyk_and_one_bit_images(tmp_path: Path) -> None:
    cmy = np.tile(np.array([[[0, 0, 0], [255, 0, 0], [10, 120, 200]]], dtype=np.uint8), (3, 1, 1))
    cmyk = Image.fromarray(np.dstack([cmy, np.zeros((3, 3), np.uint8)]), "CMYK")
    pixels = load_one(tmp_path / "cmyk", encoded(cmyk, "TIFF"), ".tif")
    assert pixels.permute(1, 2, 0).numpy().tolist() == (255 - cmy).tolist()  # with no black ink, RGB = 255 - CMY
    bits = Image.fromarray(np.array([[True, False, True]] * 3))
    assert load_one(tmp_path / "bits", encoded(bits))[0].numpy().tolist() == [[255, 0, 255]] * 3


@pytest.mark.parametrize(("make", "words"), [
    (lambda: encoded(Image.fromarray(np.full((2, 2), 0.5, np.float32)), "TIFF"), "holds floating-point pixels"),
    (lambda: encoded(Image.fromarray(np.array([[0, 70000], [1, 2]], np.int32)), "TIFF"),
     "32-bit pixel values (0 to 70000)"),
    (lambda: encoded(Image.fromarray(np.array([[-5, 3], [0, 1]], np.int32)), "TIFF"), "32-bit pixel values (-5 to 3)"),
], ids=["float", "32-bit-over", "32-bit-negative"])
def test_pixels_of_unknown_range_are_refused(tmp_path: Path, make, words: str) -> None:  # noqa: ANN001
    with pytest.raises(DataError) as excinfo:
        load_one(tmp_path, make(), ".tif")
    assert_data_error(excinfo, f"image a/0.tif in {tmp_path / 'images'} ", words, "save it as 8- or 16-bit")


# ---- decoded-pixel cap ----------------------------------------------------------------------------------------


def test_image_over_the_pixel_cap_is_refused_before_decoding(tmp_path: Path) -> None:
    """Two 9000 x 9000 PNGs took 1.7 GB to load (6 GB through distill); the header's size is checked first."""
    for cls in ("a", "b"):
        (tmp_path / "big" / cls).mkdir(parents=True)
        (tmp_path / "big" / cls / "0.png").write_bytes(zero_png(9000, 9000))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as excinfo:
            load_dataset(f"imagefolder:{tmp_path / 'big'}", "train")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_data_error(excinfo, f"image a/0.png in {tmp_path / 'big'} declares 9000x9000 pixels, more than the "
                      f"{4096 * 4096} a dataset image may have (ssdd.data.readers.MAX_IMAGE_PIXELS)")
    assert peak < 50 * 2**20  # the two files' bytes, never their 81 million pixels


def test_pixel_cap_is_settable_and_inclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_IMAGE_PIXELS", 64)
    assert load_one(tmp_path / "ok", zero_png(8, 8)).shape == (1, 8, 8)
    with pytest.raises(DataError) as excinfo:
        load_one(tmp_path / "over", zero_png(9, 8))
    assert_data_error(excinfo, "a/0.png", "declares 9x8 pixels, more than the 64")


def test_pil_decompression_bomb_check_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # PIL warns above 10 pixels and refuses above 20
    for width, kind in ((4, "DecompressionBombWarning"), (8, "DecompressionBombError")):
        with pytest.raises(DataError) as excinfo:
            load_one(tmp_path / kind, zero_png(width, 4))
        message = str(excinfo.value)
        assert "\n" not in message and "a/0.png" in message and "too large to decode" in message, message


# ---- archive entries that are not regular files, and entries given twice ------------------------------------


def tar_with(archive: Path, entries: list[tuple[str, str, bytes | str]]) -> Path:
    """A tar.gz of (name, type, data) entries: type file (data: bytes), symlink / hardlink (data: target), fifo,
    chardev, blockdev or dir."""
    types = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
             "chardev": tarfile.CHRTYPE, "blockdev": tarfile.BLKTYPE, "dir": tarfile.DIRTYPE}
    with tarfile.open(archive, "w:gz") as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))  # type: ignore[arg-type]
            else:
                info.type, info.linkname = types[kind], data if isinstance(data, str) else ""
                tar.addfile(info)
    return archive


PNG = png_bytes(np.full((4, 4, 3), 7, np.uint8))
REGULAR = [("top/train/a/0.png", "file", PNG), ("top/train/b/0.png", "file", PNG)]


@pytest.mark.parametrize(("kind", "target", "words"), [
    ("symlink", "0.png", "is a symbolic link; ssdd reads only regular files from archives: re-create it with links "
                         "resolved (tar --dereference --hard-dereference)"),
    ("hardlink", "top/train/a/0.png", "is a hard link;"),
    ("fifo", "", "is a fifo; ssdd reads only regular files from archives: re-create it without it"),
    ("chardev", "", "is a device file;"), ("blockdev", "", "is a device file;"),
])
def test_link_or_device_where_an_image_is_read_is_refused(tmp_path: Path, kind: str, target: str, words: str) -> None:
    archive = tar_with(tmp_path / "mine.tar.gz", REGULAR + [("top/train/a/1.png", kind, target)])
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"imagefolder:{archive}", "train")
    assert_data_error(excinfo, f"archive {archive}: entry top/train/a/1.png {words}")


def test_links_elsewhere_in_an_archive_change_nothing(tmp_path: Path) -> None:
    archive = tar_with(tmp_path / "mine.tar.gz", [("top/README", "symlink", "docs/README"),
                                                  ("top/test/a/0.png", "symlink", "../../train/a/0.png"),
                                                  ("top/train/a/notes.txt", "fifo", "")] + REGULAR)
    ds = load_dataset(f"imagefolder:{archive}", "train")
    assert len(ds) == 2 and ds.classes == ["a", "b"]


@pytest.mark.parametrize("second", ["top/train/a/0.png", "./top/train/a/0.png", "other/train/a/0.png"])
def test_an_image_given_twice_in_an_archive_is_refused(tmp_path: Path, second: str) -> None:
    """tar --append adds a second entry of one name; counting both would train on the image twice."""
    archive = tar_with(tmp_path / "mine.tar.gz", REGULAR + [(second, "file", png_bytes(np.zeros((4, 4, 3), np.uint8)))])
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"imagefolder:{archive}", "train")
    both = "top/train/a/0.png twice" if second == REGULAR[0][0] else f"top/train/a/0.png and {second}"
    assert_data_error(excinfo, f"archive {archive} holds {both}", "re-create the archive with one of them")


@pytest.mark.parametrize("kind", ["duplicate", "symlink"])
def test_cifar_batch_given_twice_or_as_a_link_is_refused(data_dir: Path, kind: str) -> None:
    members = cifar10_members(make_cifar_data(seed=40))
    entries = [(f"cifar-10-batches-py/{name}", "file", blob) for name, blob in members.items()]
    extra = ("cifar-10-batches-py/data_batch_1", "file", members["data_batch_2"]) if kind == "duplicate" else \
        ("cifar-10-batches-py/data_batch_9", "symlink", "data_batch_1")
    entries = entries + [extra] if kind == "duplicate" else \
        [e for e in entries if not e[0].endswith("data_batch_1")] + [(extra[0][:-1] + "1", "symlink", "x")]
    archive = tar_with(data_dir / "cifar-10-python.tar.gz", entries)
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", "train")
    words = "holds cifar-10-batches-py/data_batch_1 twice" if kind == "duplicate" else \
        "entry cifar-10-batches-py/data_batch_1 is a symbolic link"
    assert_data_error(excinfo, str(archive), words)


def test_archive_entry_and_gzip_file_sizes_are_capped(tmp_path: Path, data_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_FILE_BYTES", 1000)
    archive = tar_with(tmp_path / "mine.tar.gz", REGULAR + [("top/train/a/1.png", "file", b"\0" * 1001)])
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"imagefolder:{archive}", "train")
    assert_data_error(excinfo, "entry top/train/a/1.png holds 1001 bytes, more than the 1000")
    paths = write_mnist_idx(data_dir / "mnist", make_idx_data(), gz=True)
    with pytest.raises(DataError) as excinfo:
        load_dataset("mnist", "train")
    assert_data_error(excinfo, "unpacks to more than the 1000 bytes")
    assert any(str(p) in str(excinfo.value) for p in paths.values())


# ---- special files and names in image folders ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "broken-link"])
def test_a_special_file_named_like_an_image_is_refused(tmp_path: Path, kind: str) -> None:
    folder = write_class_folders(tmp_path / "images", {"a": random_images(1), "b": random_images(1, seed=1)})
    special = folder / "a" / "9.png"
    os.mkfifo(special) if kind == "fifo" else special.symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"imagefolder:{folder}", "train")
    assert_data_error(excinfo, f"image folder {folder / 'a'}: 9.png is not a regular file")


def test_class_folder_name_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    folder = write_class_folders(tmp_path / "images", {"tea": random_images(1)})
    os.makedirs(os.fsencode(folder) + b"/caf\xe9")
    (folder / os.fsdecode(b"caf\xe9") / "0.png").write_bytes(png_bytes(random_images(1)[0]))
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"imagefolder:{folder}", "train")
    assert_data_error(excinfo, f"{folder}: class folder name 'caf\\xe9' is not valid UTF-8; rename the folder")


def test_file_name_that_is_not_utf8_is_read(tmp_path: Path) -> None:
    folder = write_class_folders(tmp_path / "images", {"a": [], "b": random_images(1, seed=2)})
    image = random_images(1, seed=3)[0]
    (folder / os.fsdecode(b"a/\xff.png")).write_bytes(png_bytes(image))
    ds = load_dataset(f"imagefolder:{folder}", "train")
    assert torch.equal(ds.images[0], torch.from_numpy(image).permute(2, 0, 1))


def test_imagefolder_path_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    folder = write_class_folders(Path(os.fsdecode(os.fsencode(tmp_path) + b"/d\xe9j\xe0")), {"a": random_images(1)})
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"imagefolder:{folder}", "train")
    assert_data_error(excinfo, "d\\xe9j\\xe0: the path is not valid UTF-8; rename it")


def test_evaluation_split_of_a_flat_folder_says_how_to_lay_it_out(tmp_path: Path) -> None:
    flat = write_class_folders(tmp_path / "flat", {"a": random_images(1), "b": random_images(1, seed=1)})
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"imagefolder:{flat}", "test")
    assert_data_error(excinfo, f"imagefolder:{flat} has no test/ folder: a folder of class folders is one 'train' "
                      f"split", f"split it into {flat}/train/<class>/<images> and {flat}/test/<class>/<images>")
    write_class_folders(tmp_path / "half" / "train", {"a": random_images(1)})
    with pytest.raises(DataError) as excinfo:
        load_dataset(f"imagefolder:{tmp_path / 'half'}", "test")
    assert_data_error(excinfo, "has train/ but no test/ folder; add", f"{tmp_path / 'half'}/test/<class>/<images>")


def test_images_that_are_not_square_are_refused_not_squashed(tmp_path: Path) -> None:
    """A 6 x 2 image was silently resized to 2 x 2 on load."""
    image = Image.fromarray(np.zeros((2, 6, 3), np.uint8))
    with pytest.raises(DataError) as excinfo:
        load_one(tmp_path, encoded(image))
    assert_data_error(excinfo, "has images of 6x2 pixels; ssdd's models take square images: crop or pad them")
    (tmp_path / "images" / "a" / "0.png").write_bytes(encoded(image))
    assert load_dataset(f"imagefolder:{tmp_path / 'images'}", "train", image_size=4).image_shape == (3, 4, 4)
