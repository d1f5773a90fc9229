"""The memory-mapped form of the decoded cache: written in a streaming pass, resumable, read without loading, and
identical to the in-memory form.

The truth is the in-memory loader (itself checked against the fixtures' known pixels in test_data.py) and the
fixtures' arrays: the mapped form must give back the same bytes, labels and classes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from fixtures import expected, make_splits, random_images, write_class_folders, write_image_folder

from ssdd.data import cache, load_dataset, mapped
from ssdd.errors import DataError


def image_folder(base, per_class: int = 5, size: int = 8):
    splits = make_splits(per_class={"train": per_class, "test": 2}, size=size)
    return write_image_folder(base / "folder", splits), splits


def test_image_folder_mapped_equals_in_memory(tmp_path):
    folder, splits = image_folder(tmp_path)
    truth = expected(splits["train"])
    memory = load_dataset(f"imagefolder:{folder}", "train", mapped=False)
    disk = load_dataset(f"imagefolder:{folder}", "train", mapped=True)
    assert disk.mapped and not memory.mapped
    assert torch.equal(disk.images, truth.images) and torch.equal(disk.labels, truth.labels)
    assert disk.classes == memory.classes == truth.classes
    idx = torch.tensor([14, 0, 7, 7, 3])
    assert torch.equal(disk.batch(idx), truth.images[idx])
    assert torch.equal(torch.cat(list(disk.batches(4))), truth.images)
    assert torch.equal(torch.cat(list(disk.batches(2, idx))), truth.images[idx])
    assert [c.tolist() for c in disk.class_indices()] == [list(range(k * 5, k * 5 + 5)) for k in range(3)]
    assert not disk.subset(idx).mapped and torch.equal(disk.subset(idx).images, truth.images[idx])
    again = load_dataset(f"imagefolder:{folder}", "train", mapped=True)
    assert again.fingerprint == disk.fingerprint != memory.fingerprint  # stored at the build, not rehashed


def test_the_fingerprint_follows_the_content(tmp_path):
    folder, splits = image_folder(tmp_path)
    first = load_dataset(f"imagefolder:{folder}", "train", mapped=True).fingerprint
    changed = splits["train"]["apple"][1].copy()
    changed[0, 0, 0] ^= 1
    write_class_folders(folder / "train", {"apple": [splits["train"]["apple"][0], changed]})
    assert load_dataset(f"imagefolder:{folder}", "train", mapped=True).fingerprint != first


def test_the_threshold_decides_and_small_data_keeps_its_fingerprint(tmp_path, monkeypatch):
    folder, _ = image_folder(tmp_path)
    small = load_dataset(f"imagefolder:{folder}", "train")
    assert not small.mapped  # 15 images of 8 px: far below the default threshold
    assert small.fingerprint == load_dataset(f"imagefolder:{folder}", "train", mapped=False).fingerprint
    monkeypatch.setenv("SSDD_MAP_BYTES", str(small.decoded_bytes - 1))
    assert load_dataset(f"imagefolder:{folder}", "train").mapped
    monkeypatch.setenv("SSDD_MAP_BYTES", "lots")
    with pytest.raises(DataError, match="SSDD_MAP_BYTES must be a whole number of bytes"):
        load_dataset(f"imagefolder:{folder}", "train")


def test_sources_without_a_listing_are_mapped_from_their_decoded_tensors(monkeypatch):
    monkeypatch.setenv("SSDD_MAP_BYTES", "0")
    from fixtures import make_cifar_data, write_cifar10_folder

    from ssdd.data.catalog import data_root

    data = make_cifar_data(n_train=10, n_test=4)
    write_cifar10_folder(data_root(), data)
    disk = load_dataset("cifar10", "test")
    memory = load_dataset("cifar10", "test", mapped=False)
    assert disk.mapped and torch.equal(disk.images, memory.images) and torch.equal(disk.labels, memory.labels)


def test_a_killed_build_resumes_at_its_first_unwritten_part(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "PART_BYTES", 8 * 8 * 3 * 2)  # two images a part
    images = torch.from_numpy(np.stack(random_images(9, size=8))).permute(0, 3, 1, 2).contiguous()
    labels = torch.arange(9) % 3
    calls = []

    def read(start, stop, fail_at=None):
        calls.append(start)
        if start == fail_at:
            raise KeyboardInterrupt
        return images[start:stop]

    whole = tmp_path / "whole.mapped.safetensors"
    cache.store_mapped(whole, "d", "train", "test", labels, ["a", "b", "c"], (3, 8, 8), read)
    calls.clear()
    resumed = tmp_path / "resumed.mapped.safetensors"
    with pytest.raises(KeyboardInterrupt):
        cache.store_mapped(resumed, "d", "train", "test", labels, ["a", "b", "c"], (3, 8, 8),
                           lambda start, stop: read(start, stop, fail_at=4))
    assert not resumed.exists() and resumed.with_name(resumed.name + ".partial").exists()
    calls.clear()
    cache.store_mapped(resumed, "d", "train", "test", labels, ["a", "b", "c"], (3, 8, 8), read)
    assert calls == [4, 6, 8]  # parts 0:2 and 2:4 were kept
    assert hashlib.sha256(resumed.read_bytes()).digest() == hashlib.sha256(whole.read_bytes()).digest()
    assert not resumed.with_name(resumed.name + ".progress").exists()
    assert torch.equal(cache.load_mapped(resumed).images, images)


def test_a_damaged_mapped_file_is_rebuilt(tmp_path):
    folder, splits = image_folder(tmp_path)
    disk = load_dataset(f"imagefolder:{folder}", "train", mapped=True)
    path = next(cache.cache_dir().glob("*.mapped.safetensors"))
    del disk
    path.write_bytes(path.read_bytes()[:-10])  # truncated: the images no longer fit the file
    rebuilt = load_dataset(f"imagefolder:{folder}", "train", mapped=True)
    assert torch.equal(rebuilt.images, expected(splits["train"]).images)


def test_mixed_sizes_are_refused_naming_the_file(tmp_path):
    folder = write_class_folders(tmp_path / "mixed", {"a": random_images(2, size=8), "b": random_images(1, size=6)})
    with pytest.raises(DataError, match=r"b/0\.png is 6x6 with 3 channel\(s\), but the first image is 8x8 with 3; "
                                        "the memory-mapped form needs images of one size"):
        load_dataset(f"imagefolder:{folder}", "train", mapped=True, image_size=8)


def test_reads_release_the_pages_they_touched(tmp_path, monkeypatch):
    monkeypatch.setattr(mapped, "RELEASE_BYTES", 1 << 20)
    path = tmp_path / "big.safetensors"
    rows = torch.arange(4096, dtype=torch.int64).repeat_interleave(1024).view(4096, 1024).to(torch.float32)
    mapped.write_streamed(path, {}, "x", (4096, 1024), torch.float32, 512, lambda a, b: rows[a:b], {"kind": "t"},
                          lambda digests: {"kind": "t"}, "test", progress=False)
    tensors, meta = mapped.map_tensors(path)
    x = tensors["x"]
    assert meta == {"kind": "t"} and mapped.is_mapped(x) and mapped.is_mapped(x[5:])
    assert torch.equal(mapped.read_rows(x, torch.tensor([4095, 3])), rows[[4095, 3]])
    for start in range(0, 4096, 256):
        assert torch.equal(mapped.read_range(x, start, start + 256), rows[start : start + 256])
    assert mapped._mapping(x).unreleased < (1 << 20)  # 16 MiB read, released every MiB
