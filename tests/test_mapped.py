"""The memory-mapped form of the decoded cache: written in a streaming pass, resumable, read without loading, and
identical to the in-memory form.

The truth is the in-memory loader (itself checked against the fixtures' known pixels in test_data.py) and the
fixtures' arrays: the mapped form must give back the same bytes, labels and classes.
"""

from __future__ import annotations

import hashlib
import os

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
    monkeypatch.setenv("SSDD_MAP_BYTES", str(small.images.numel() - 1))
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


def test_batch_readers_read_the_rows_indexing_gives(tmp_path):
    path = tmp_path / "rows.safetensors"
    rows = torch.arange(4096 * 1024, dtype=torch.float32).view(4096, 1024)
    mapped.write_streamed(path, {}, "x", (4096, 1024), torch.float32, 512, lambda a, b: rows[a:b], {"kind": "t"},
                          lambda digests: {"kind": "t"}, "test", progress=False)
    tensors, meta = mapped.map_tensors(path)
    x = tensors["x"]
    assert meta == {"kind": "t"} and mapped.is_mapped(x) and mapped.is_mapped(x[5:])
    for idx in ([4095, 3, 4, 5, 4095, -1], [7], list(range(100, 200)), []):
        assert torch.equal(mapped.read_rows(x, torch.tensor(idx, dtype=torch.long)), rows[idx])
        assert torch.equal(mapped.read_rows(x[10:20], torch.tensor(idx[:1], dtype=torch.long) % 10),
                           rows[10:20][torch.tensor(idx[:1], dtype=torch.long) % 10])
    assert torch.equal(mapped.read_range(x, 4000, 5000), rows[4000:])
    with pytest.raises(IndexError, match="index out of range for 4096 rows"):
        mapped.read_rows(x, torch.tensor([4096]))


@pytest.fixture
def synthetic_folder(tmp_path):
    """The synthetic dataset (what the tiny teacher was trained on) as PNG class folders."""
    from ssdd.data import make_synthetic

    for split in ("train", "test"):
        data = make_synthetic(split)
        write_class_folders(tmp_path / "synthetic" / split, {
            cls: [image.permute(1, 2, 0).numpy() for image in data.images[data.labels == k]]
            for k, cls in enumerate(data.classes)})
    return tmp_path / "synthetic"


def test_results_are_identical_in_memory_and_memory_mapped(tiny_teacher, synthetic_folder, monkeypatch):
    from ssdd import selection
    from ssdd.config import resolve_config
    from ssdd.evaluation import EvaluationConfig, evaluate
    from ssdd.methods import Distillation, DistillConfig
    from ssdd.teachers import load_teacher, teacher_features

    name = f"imagefolder:{synthetic_folder}"
    monkeypatch.setattr(selection, "CHUNK_ROWS", 70)  # several chunks per selection pass

    def everything():
        source = load_dataset(name, "train")
        teacher = load_teacher(tiny_teacher)
        features = teacher_features(teacher, source).clone()
        views = teacher_features(teacher, source, views=("identity", "rot90"), crop_flip=2, seed=5).clone()
        krr = Distillation(resolve_config(DistillConfig, "distill", "krr-st/tiny", overrides={  # crop-flip copies
            "device": "cpu", "dataset": name, "teacher": str(tiny_teacher), "settings": {"steps": 3}}), None,
            progress=False).run()
        others = {method: Distillation(resolve_config(DistillConfig, "distill", f"{method}/tiny", overrides={
            "device": "cpu", "dataset": name, "settings": {"steps" if method == "frepo" else "iterations": 3}}),
            None, progress=False).run() for method in ("frepo", "dm")}
        coreset = {kind: Distillation(resolve_config(DistillConfig, "distill", "coreset/tiny", overrides={
            "device": "cpu", "dataset": name, "teacher": str(tiny_teacher),
            "settings": {"selection": kind, "per_class": False}}), None, progress=False).run()
            for kind in ("herding", "kcenter")}
        scores = selection.high_loss_scores(source, features, teacher, selection.HighLossSettings(
            num_experts=1, arch="convnet", arch_args={"widths": [8, 16]}, batch_size=64), 0, torch.device("cpu"))
        cells = [cell for protocol in ("linear", "finetune") for cell in evaluate([krr], resolve_config(
            EvaluationConfig, "evaluate", "tiny", overrides={"device": "cpu", "targets": [name], "seeds": [0],
                                                             "protocol": protocol}), progress=False)]
        accuracies = [(cell.protocol, cell.fraction, cell.accuracies) for cell in cells]
        return source, (features, views, scores), krr, coreset | others, accuracies

    memory = everything()
    monkeypatch.setenv("SSDD_MAP_BYTES", "0")
    disk = everything()
    assert not memory[0].mapped and disk[0].mapped
    assert all(torch.equal(a, b) for a, b in zip(memory[1], disk[1]))
    assert memory[1][1].shape == (4, 320, memory[1][0].shape[1])
    for key, tensor in memory[2].tensors.items():
        assert torch.equal(tensor, disk[2].tensors[key]), key
    for kind in ("herding", "kcenter"):
        assert memory[3][kind].metadata["selected_indices"] == disk[3][kind].metadata["selected_indices"]
    for kind in ("herding", "kcenter", "frepo", "dm"):
        assert memory[3][kind].tensors.keys() == disk[3][kind].tensors.keys()
        assert all(torch.equal(t, disk[3][kind].tensors[key]) for key, t in memory[3][kind].tensors.items()), kind
    assert memory[4] == disk[4]


RSS_SCRIPT = r"""
import sys
import torch
from pathlib import Path
from ssdd.data import cache, mapped
from ssdd.data.transforms import PixelSpace
from ssdd.probes import dataset_features
from ssdd.selection import select_kcenter

cache.PART_BYTES = 4 << 20
path, count, through_map = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "map"
pattern = torch.arange(3 * 32 * 32, dtype=torch.int64)

def read(start, stop):
    return ((torch.arange(start, stop)[:, None] * 7 + pattern) % 251).to(torch.uint8).view(-1, 3, 32, 32)

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

cache.store_mapped(path, "big", "train", "test", torch.arange(count) % 10, [str(k) for k in range(10)],
                   (3, 32, 32), read)
dataset = cache.load_mapped(path)
Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
before = status("VmRSS:")
space = PixelSpace.of(dataset.images)
generator = torch.Generator().manual_seed(0)
if through_map:  # what code that indexes the mapped tensor itself does
    features = torch.cat([dataset.images[s : s + 1024].float().mean((2, 3)) for s in range(0, count, 1024)])
    for _ in range(100):
        dataset.images[torch.randint(0, count, (256,), generator=generator)].sum()
else:
    features = dataset_features(lambda x: x.mean((2, 3)), dataset, space, batch_size=256)
    for _ in range(100):
        dataset.batch(torch.randint(0, count, (256,), generator=generator)).sum()
select_kcenter(features, 5, seed=0)
expected = read(count - 3, count)
assert torch.equal(dataset.batch(torch.arange(count - 3, count)), expected)
print(status("VmHWM:") - before, path.stat().st_size)
"""


def peak_growth(tmp_path, count: int, through: str) -> tuple[int, int]:
    import subprocess
    import sys

    # glibc keeps freed buffers of a few MB for reuse unless every allocation of 128 KiB or more is its own mapping,
    # given back when freed: so the peak counts what the code holds, not what the allocator kept
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "big.mapped.safetensors"), str(count),
                           through], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    growth, size = map(int, done.stdout.split())
    return growth, size


def test_a_mapped_source_larger_than_the_memory_allowed_is_read_within_it(tmp_path):
    """Passes over a 150 MiB mapped source through the batch readers (statistics, features of every image, random
    batches, k-center on the features) grow the peak resident memory by less than 40 MiB; the same passes indexing
    the mapped tensor itself keep most of the file resident (so the check can tell)."""
    count = 52_000  # 3 KiB images: 152 MiB
    growth, size = peak_growth(tmp_path, count, "batches")
    assert size > 150 << 20 and growth < 40 << 20, (growth, size)
    through_map, _ = peak_growth(tmp_path, count, "map")
    assert through_map > 100 << 20, through_map


def test_datasets_reports_sizes_and_the_mapped_form(data_dir, capsys):
    from ssdd.cli import main
    from ssdd.data import dataset_status

    folder, splits = image_folder(data_dir, per_class=4)
    (data_dir / "folder").rename(data_dir / "mnist")  # the registered image-folder source of mnist
    on_disk = sum(f.stat().st_size for f in (data_dir / "mnist").rglob("*.png"))

    def row():
        return next(r for r in dataset_status() if r["name"] == "mnist")

    assert row()["disk_bytes"] == on_disk
    assert row()["splits"] == {"train": {"decoded_bytes": None, "mapped": False},
                               "test": {"decoded_bytes": None, "mapped": False}}
    load_dataset("mnist", "train", mapped=True)
    load_dataset("mnist", "test", mapped=False)
    assert row()["splits"] == {"train": {"decoded_bytes": 12 * 3 * 8 * 8, "mapped": True},
                               "test": {"decoded_bytes": 6 * 3 * 8 * 8, "mapped": False}}
    assert main(["datasets"]) == 0
    expected = f"source files {on_disk / 1024:.1f} KiB; decoded: train 2.2 KiB (memory-mapped), test 1.1 KiB"
    out = capsys.readouterr().out
    assert expected in out, out


def test_normalized_images_are_the_same_read_from_a_mapped_source(tmp_path):
    from ssdd.data import PixelSpace
    from ssdd.data.dataset import NormalizedImages

    folder, _ = image_folder(tmp_path, per_class=6)
    memory = load_dataset(f"imagefolder:{folder}", "train", mapped=False)
    disk = load_dataset(f"imagefolder:{folder}", "train", mapped=True)
    space = PixelSpace((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    held, read = (NormalizedImages(d, space, "cpu") for d in (memory, disk))
    assert held.held is not None and read.held is None and len(read) == 18
    idx = torch.tensor([17, 0, 5, 5])
    assert torch.equal(read[idx], held[idx])
    assert torch.equal(read[idx], space.normalize(memory.images[idx].float() / 255))


def test_a_file_cut_short_or_unreadable_after_writing_is_one_clear_line(tmp_path, monkeypatch):
    from ssdd.errors import ArtefactError

    folder, _ = image_folder(tmp_path)
    disk = load_dataset(f"imagefolder:{folder}", "train", mapped=True)
    path = next(cache.cache_dir().glob("*.mapped.safetensors"))
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 8 * 8 * 3)  # the last image is gone
    with pytest.raises(ArtefactError, match="a memory-mapped file ended early at byte .* truncated after opening"):
        disk.batch(torch.tensor([len(disk) - 1]))
    path.unlink()
    monkeypatch.setattr(cache, "load_mapped", lambda path: None)
    with pytest.raises(DataError, match=r"the memory-mapped dataset .*\.mapped\.safetensors just written cannot be "
                                        "read; delete it and load again"):
        load_dataset(f"imagefolder:{folder}", "train", mapped=True)


def test_a_mapped_dataset_is_converted_into_another_mapped_file(tmp_path):
    folder, _ = image_folder(tmp_path, per_class=6)
    memory = load_dataset(f"imagefolder:{folder}", "train", mapped=False)
    disk = load_dataset(f"imagefolder:{folder}", "train", mapped=True)
    small = disk.converted(channels=1, size=6)
    assert small.mapped and small.image_shape == (1, 6, 6)
    assert torch.equal(small.images, memory.converted(channels=1, size=6).images)
    assert torch.equal(small.labels, memory.labels) and small.classes == memory.classes
    assert len(list(cache.cache_dir().glob("*-c1-s6.mapped.safetensors"))) == 1
    again = load_dataset(f"imagefolder:{folder}", "train", mapped=True, image_size=6, channels=1)
    assert again.fingerprint == small.fingerprint and torch.equal(again.images, small.images)


def test_loading_a_mapped_dataset_again_opens_nothing_more(tmp_path):
    folder, _ = image_folder(tmp_path)
    first = load_dataset(f"imagefolder:{folder}", "train", mapped=True)
    descriptors = len(os.listdir("/proc/self/fd"))
    again = [load_dataset(f"imagefolder:{folder}", "train", mapped=True) for _ in range(20)]
    assert len(os.listdir("/proc/self/fd")) == descriptors
    assert all(torch.equal(d.batch(torch.tensor([3])), first.batch(torch.tensor([3]))) for d in again)
