"""Memory limits: a request that cannot fit is refused before anything is allocated, and an allocator's failure
reaches the user as one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import one_line, user_error

from ssdd import resources
from ssdd.data import make_synthetic
from ssdd.errors import ResourceError
from ssdd.methods.engine import Distillation
from ssdd.resources import GIB, available_bytes, ensure_fits, out_of_memory_message
from ssdd.teachers import load_teacher, teacher_features

TINY_ITEM_VALUES = 3 * 32 * 32 + 1024  # a tiny-teacher item: a 3x32x32 image and its 1024-d target


def test_available_cpu_memory_is_positive_and_below_the_physical_memory() -> None:
    free = available_bytes("cpu")
    assert free is not None
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_ensure_fits_refuses_only_what_exceeds_the_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "available_bytes", lambda device: 2 * GIB)
    ensure_fits(2 * GIB, "a request", "cpu", "ask for less")
    with pytest.raises(ResourceError) as info:
        ensure_fits(3 * GIB, "a request", "cpu", "ask for less")
    assert one_line(info.value) == "a request needs about 3.0 GiB but only 2.0 GiB is free on cpu; ask for less"
    monkeypatch.setattr(resources, "available_bytes", lambda device: None)  # unknown: nothing is refused
    ensure_fits(10**18, "a request", "cpu", "ask for less")


def test_a_budget_larger_than_the_memory_is_refused_before_any_output(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_teacher: Path) -> None:
    images = 10**9
    free = available_bytes("cpu")
    expected = 4 * 4 * images * TINY_ITEM_VALUES  # float32 values, gradients and two Adam moments, by hand
    assert expected > free
    line = user_error(capsys, ["distill", "--method", "krr-st", "--preset", "tiny", "--teacher", str(tiny_teacher),
                               "--images", str(images), "--device", "cpu", "--out", str(tmp_path / "out")], status=3)
    assert line.startswith(f"ssdd: error: a budget of {images} images needs about {expected / GIB:.1f} GiB but only ")
    assert line.endswith("free on cpu; lower --images or --bytes, or distil on a larger machine")
    assert not (tmp_path / "out").exists()


def test_teacher_features_that_cannot_fit_are_refused(monkeypatch: pytest.MonkeyPatch, tiny_teacher: Path) -> None:
    teacher = load_teacher(tiny_teacher)
    dataset = make_synthetic(num_classes=4, per_class=5)
    needed = 2 * 3 * 20 * teacher.feature_dim * 4  # 3 views, the blocks and their stacked copy, float32
    monkeypatch.setattr(resources, "available_bytes", lambda device: needed - 1)
    with pytest.raises(ResourceError) as info:
        teacher_features(teacher, dataset, views=("identity", "rot90", "rot180"), use_cache=False)
    assert one_line(info.value).startswith(f"3 x 20 teacher features of dimension {teacher.feature_dim} needs about")
    monkeypatch.setattr(resources, "available_bytes", lambda device: needed)
    assert teacher_features(teacher, dataset, views=("identity", "rot90", "rot180"), use_cache=False).shape == (
        3, 20, teacher.feature_dim)


def test_allocator_failures_become_one_line() -> None:
    gpu = out_of_memory_message(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"))
    assert gpu == ("the GPU ran out of memory; lower the batch size or the budget, or use --device cpu "
                   "(CUDA out of memory. Tried to allocate 2.00 GiB)")
    cpu = out_of_memory_message(RuntimeError("[enforce fail] DefaultCPUAllocator: not enough memory: you tried to "
                                             "allocate 1099511627776 bytes."))
    assert cpu is not None and cpu.startswith("the machine ran out of memory; lower the batch size or the budget")
    assert out_of_memory_message(RuntimeError("shape mismatch")) is None


def test_the_cli_reports_a_gpu_out_of_memory_as_one_line(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        tiny_teacher: Path) -> None:
    def out_of_memory(self: Distillation) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Distillation, "run", out_of_memory)
    line = user_error(capsys, ["distill", "--method", "krr-st", "--preset", "tiny", "--teacher", str(tiny_teacher),
                               "--device", "cpu", "--out", str(tmp_path / "out")], status=3)
    assert line == ("ssdd: error: the GPU ran out of memory; lower the batch size or the budget, or use --device cpu "
                    "(CUDA out of memory. Tried to allocate 20.00 GiB)")


def test_other_runtime_errors_still_raise(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_teacher: Path) -> None:
    """Only allocator failures are translated: a bug must keep its traceback."""
    from ssdd.cli import main

    def bug(self: Distillation) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Distillation, "run", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["distill", "--method", "krr-st", "--preset", "tiny", "--teacher", str(tiny_teacher), "--device", "cpu",
              "--out", str(tmp_path / "out")])


def test_a_tensor_stays_where_it_is_on_a_cpu() -> None:
    data = torch.zeros(4, 3)
    assert resources.on_device_if_it_fits(data, "cpu") is data


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_tensor_moves_to_a_gpu_only_when_it_takes_at_most_its_share_of_the_free_memory() -> None:
    data = torch.zeros(4, 3)
    assert resources.on_device_if_it_fits(data, "cuda").device.type == "cuda"
    too_small = (data.numel() * data.element_size() - 1) / resources.available_bytes("cuda")
    assert resources.on_device_if_it_fits(data, "cuda", share=too_small) is data
