"""Shared test setup: every test gets its own empty cache and data root, so no test reads ~/.cache or the network."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/fixtures.py (the on-disk fixture writers) is imported as ``fixtures`` by the test modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Teacher-feature caches as the float32 teacher gives them, on every CPU (module fixtures and subprocesses too): tests
# compare them with the teacher's own forward pass; the tests of the precision setting set it themselves.
os.environ["SSDD_TEACHER_PRECISION"] = "float32"


@pytest.fixture(autouse=True)
def isolated_ssdd_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Point SSDD_CACHE_DIR and SSDD_DATA_ROOT at fresh temporary folders for every test."""
    cache = tmp_path_factory.mktemp("ssdd-cache")
    data = tmp_path_factory.mktemp("ssdd-data")
    monkeypatch.setenv("SSDD_CACHE_DIR", str(cache))
    monkeypatch.setenv("SSDD_DATA_ROOT", str(data))
    return {"cache": cache, "data": data}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Safety net: any attempt to open a URL fails loudly instead of reaching the network."""
    import urllib.request

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"test tried to use the network: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def cache_dir(isolated_ssdd_dirs: dict[str, Path]) -> Path:
    return isolated_ssdd_dirs["cache"]


@pytest.fixture
def data_dir(isolated_ssdd_dirs: dict[str, Path]) -> Path:
    return isolated_ssdd_dirs["data"]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One seconds-long teacher (tiny preset, 1 epoch, all 320 synthetic training images, CPU) per test module
    that asks for it; returns the path of its ``teacher.safetensors``.  Tests must not modify the file (the
    teacher-feature cache beside it may be written)."""
    from ssdd.config import resolve_config
    from ssdd.teachers import TeacherConfig, train_teacher

    out = tmp_path_factory.mktemp("tiny-teacher")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSDD_CACHE_DIR", str(tmp_path_factory.mktemp("teacher-cache")))
        mp.setenv("SSDD_DATA_ROOT", str(tmp_path_factory.mktemp("teacher-data")))
        config = resolve_config(TeacherConfig, "teacher", "tiny",
                                overrides={"device": "cpu", "epochs": 1, "probe": False, "monitor_every": 0})
        return train_teacher(config, out, progress=False)


@pytest.fixture(autouse=True)
def release_held_locks() -> Iterator[None]:
    """Close the lock files a test left held (a test that stops a command half way, or starts a run folder it never
    closes), as the process's exit would, so none stays open into the next test."""
    from ssdd import io

    yield
    for fh, _ in io._held_locks.values():
        fh.close()
    io._held_locks.clear()
