"""Malformed and malicious input, fuzzed through the command line with hypothesis.

Every case writes a damaged or forged input into a fresh folder, runs ``ssdd.cli.main`` on it in-process and checks
what came out against the files and streams themselves: exit status 2 and stderr exactly one line
``ssdd: error: ...`` that names the culprit, no traceback, no warning, no output file, no code run by a pickle
(its marker file never appears) and no large allocation.  Some damage no format check can see (a flipped bit in
JPEG data or in a free-text metadata field); there the command may succeed, but only if what ssdd read equals the
intact original wherever the format carries a checksum.  A valid input in an unusual form (a 16-bit or transparent
image, a file name that is not UTF-8, a link outside what is read) must be read, to the values computed here.

``SSDD_FUZZ_EXAMPLES`` sets the examples per test (default 6); ``benchmarks/fuzz_inputs.py`` runs the same categories
(:data:`CATEGORIES`) with many more examples and counts the outcomes.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import logging
import math
import os
import pickle
import resource
import struct
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fixtures import (
    ShellPayload,
    cifar10_members,
    idx_bytes,
    make_cifar_data,
    make_idx_data,
    marker_command,
    png_bytes,
    random_images,
    write_class_folders,
    zero_png,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from ssdd.cli import main
from ssdd.data import PixelSpace, load_dataset
from ssdd.distilled import DistilledSet, load_distilled
from ssdd.io import load_tensors, save_tensors
from ssdd.models import create_model
from ssdd.teachers import load_teacher, save_teacher
from ssdd.text import terminal_safe

EXAMPLES = int(os.environ.get("SSDD_FUZZ_EXAMPLES", "6"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MAX_GROWTH_BYTES = 1 << 30  # peak memory a refused input may add (a forged 10^12-element tensor would add 4 TB)
SPACE = PixelSpace((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
COMMON = ["--device", "cpu", "--no-progress"]


# ---- running one case -------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One command on one bad input, and what a correct refusal leaves behind."""

    argv: list[str]
    culprit: str | tuple[str, ...]  # what the error line must name (any one of): the file, entry or folder at fault
    outputs: list[Path] = field(default_factory=list)  # must not exist after a refusal
    marker: Path | None = None  # created only if a pickle payload ran
    check_success: Callable[[], str | None] | None = None  # set when success is allowed: a problem, or None
    must_succeed: bool = False  # an input that is valid: refusing it is a problem too


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(case: Case) -> tuple[int | str, list[str]]:
    """Run ``case`` through the CLI: its exit status (or the exception that escaped) and the problems found (empty:
    handled correctly)."""
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)  # logged warnings reach stderr, as in a real run
    logging.getLogger().addHandler(handler)
    before = peak_rss()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            try:
                status: Any = main(case.argv)
            except BaseException as exc:  # noqa: BLE001 - escaping main() is a traceback for the user
                status = f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        logging.getLogger().removeHandler(handler)
    found = []
    if case.marker is not None and case.marker.exists():
        found.append("the pickle payload ran")
    if peak_rss() - before > MAX_GROWTH_BYTES:
        found.append(f"peak memory grew by {(peak_rss() - before) >> 20} MiB")
    if isinstance(status, str):
        return status, found + [f"raised {status}"]
    lines = err.getvalue().splitlines() + [f"{w.category.__name__}: {w.message}" for w in caught]
    if status == 0 and case.check_success is not None:
        problem = case.check_success()
        return status, found + ([problem] if problem else [])
    if case.must_succeed:
        found.append(f"a valid input was refused: {lines!r}")
    if status != 2:
        found.append(f"exit status {status}")
    if len(lines) != 1 or not lines[0].startswith("ssdd: error: "):
        found.append(f"stderr is not one 'ssdd: error:' line: {lines!r}")
    elif not any(c in lines[0] for c in ((case.culprit,) if isinstance(case.culprit, str) else case.culprit)):
        found.append(f"the error line does not name {case.culprit}: {lines[0]}")
    found += [f"{p} was written" for p in case.outputs if p.exists()]
    return status, found


def check(build: Callable[[Any, Path], Case], spec: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _, problems = run_case(build(spec, Path(tmp)))
    assert not problems, problems


# ---- intact artefacts and the commands that read them -------------------------------------------------------------


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@functools.cache
def good_artefact(kind: str) -> bytes:
    """The bytes of an intact artefact: ``set`` (representation targets), ``bases-set`` (images as coefficients x
    4 px bases, upsampled to the 8 px of its metadata ``image_shape``), ``labelled-set`` (soft labels) or ``teacher``
    (an untrained tiny convnet whose source is the synthetic dataset)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.safetensors"
        if kind == "teacher":
            with torch.random.fork_rng():
                torch.manual_seed(0)
                backbone = create_model("convnet", in_channels=3, image_size=32, widths=[8, 16], norm="batch")
            save_teacher(path, backbone, SPACE, {"source": {"dataset": "synthetic"}})
        elif kind == "bases-set":
            tensors = {"image_coefficients": _randn(4, 2, seed=1), "image_bases": _randn(2, 3, 4, 4, seed=2),
                       "targets": _randn(4, 6, seed=3)}
            DistilledSet(tensors, SPACE, "representation", "fuzz", {"image_shape": [3, 8, 8]}).save(path)
        else:
            targets = {"targets": _randn(4, 6, seed=2)} if kind == "set" else {"labels": _randn(4, 10, seed=3)}
            target_kind = "representation" if kind == "set" else "soft-label"
            DistilledSet({"images": _randn(4, 3, 8, 8, seed=1), **targets}, SPACE, target_kind, "fuzz").save(path)
        return path.read_bytes()


def good_tensors(kind: str) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.safetensors"
        path.write_bytes(good_artefact(kind))
        return load_tensors(path)[0]


def artefact_case(kind: str, command: str, path: Path, tmp: Path,
                  check_success: Callable[[], str | None] | None = None) -> Case:
    """The command ``command`` reading the artefact at ``path`` (of ``kind``)."""
    if command == "show":
        argv = ["show", str(path), "--grid", str(tmp / "grid.png")]
        outputs = [tmp / "grid.png"]
    elif command == "evaluate" and kind == "labelled-set":
        argv = ["evaluate", str(path), "--protocol", "supervised", "--preset", "tiny", "--seeds", "0",
                "--out", str(tmp / "eval"), *COMMON]
        outputs = [tmp / "eval"]
    elif command == "evaluate":
        argv = ["evaluate", "--baselines", "random", "--teacher", str(path), "--images", "4", "--preset", "tiny",
                "--seeds", "0", "--fractions", "1", "--out", str(tmp / "eval"), *COMMON]
        outputs = [tmp / "eval"]
    else:  # a coreset in the teacher's feature space (one image of each of the synthetic dataset's 10 classes)
        argv = ["distill", "--method", "coreset", "--preset", "tiny", "--teacher", str(path), "--images", "10",
                "--out", str(tmp / "run"), *COMMON]
        outputs = [tmp / "run"]
    # The source dataset a teacher records is looked up by the command, whose error names the dataset instead.
    culprit = (str(path), "dataset") if kind == "teacher" else str(path)
    return Case(argv, culprit, outputs, check_success=check_success)


COMMANDS = {"set": ["show"], "bases-set": ["show"], "labelled-set": ["show", "evaluate"],
            "teacher": ["distill", "evaluate"]}


@st.composite
def artefact_and_command(draw: st.DrawFn, kinds: tuple[str, ...] = ("set", "teacher")) -> tuple[str, str]:
    kind = draw(st.sampled_from(kinds))
    return kind, draw(st.sampled_from(COMMANDS[kind]))


def same_tensors_as(kind: str, path: Path) -> Callable[[], str | None]:
    """A success check: what ssdd loads from ``path`` holds the intact artefact's tensors."""
    def check_loaded() -> str | None:
        if kind == "teacher":
            loaded = load_teacher(path).backbone.state_dict()
        else:
            loaded = load_distilled(path).tensors
        original = good_tensors(kind)
        same = loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)
        return None if same else "a damaged file was accepted with other tensors"
    return check_loaded


# ---- safetensors artefacts: truncated, bit-flipped, forged headers, wrong metadata -------------------------------


@st.composite
def truncations(draw: st.DrawFn) -> dict:
    kind, command = draw(artefact_and_command(("set", "bases-set", "teacher")))
    return {"kind": kind, "command": command, "keep": draw(st.integers(0, len(good_artefact(kind)) - 1))}


def build_truncated(spec: dict, tmp: Path) -> Case:
    path = tmp / f"{spec['kind']}.safetensors"
    path.write_bytes(good_artefact(spec["kind"])[: spec["keep"]])
    return artefact_case(spec["kind"], spec["command"], path, tmp)


@st.composite
def bit_flips(draw: st.DrawFn) -> dict:
    kind, command = draw(artefact_and_command(("set", "bases-set", "teacher")))
    blob = good_artefact(kind)
    (header_len,) = struct.unpack("<Q", blob[:8])
    region = draw(st.sampled_from(["header", "data", "anywhere"]))
    low, high = {"header": (0, 8 + header_len - 1), "data": (8 + header_len, len(blob) - 1),
                 "anywhere": (0, len(blob) - 1)}[region]
    flips = draw(st.lists(st.tuples(st.integers(low, high), st.integers(0, 7)), min_size=1, max_size=8, unique=True))
    return {"kind": kind, "command": command, "flips": flips}


def build_bit_flipped(spec: dict, tmp: Path) -> Case:
    data = bytearray(good_artefact(spec["kind"]))
    for position, bit in spec["flips"]:
        data[position] ^= 1 << bit
    path = tmp / f"{spec['kind']}.safetensors"
    path.write_bytes(bytes(data))
    return artefact_case(spec["kind"], spec["command"], path, tmp, same_tensors_as(spec["kind"], path))


SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TENSOR_NAMES = ["images", "targets", "labels", "learned_lr", "image_coefficients", "image_bases", "view_targets.rot90",
                "hidden.weight", "features.0.weight", "x"]
HUGE = st.sampled_from([10**6, 10**12, 2**32, 2**63 - 1, 2**64, 2**64 + 1])


@st.composite
def forged_tensor(draw: st.DrawFn, start: int) -> tuple[dict, bytes]:
    """One header entry and its bytes: consistent with its data (so safetensors accepts it and ssdd must judge it),
    or forged (unknown dtype, huge or negative dimensions, offsets out of range or disagreeing with the shape)."""
    dtype = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)))
    if draw(st.booleans()):
        shape = draw(st.lists(st.integers(0, 6), max_size=4))
        size = int(np.prod(shape, dtype=np.int64)) * SAFETENSORS_DTYPES[dtype]
        data = draw(st.binary(min_size=size, max_size=size))
        return {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}, data
    dtype = draw(st.one_of(st.just(dtype), st.text(max_size=5), st.integers()))
    shape = draw(st.one_of(st.lists(st.one_of(st.integers(0, 8), HUGE, st.integers(-3, -1)), max_size=5),
                           st.just([10**6, 10**6]), st.text(max_size=3)))
    end = draw(st.one_of(st.integers(start, start + 64), HUGE, st.integers(-5, start)))
    offsets = draw(st.one_of(st.just([start, end]), st.lists(st.integers(-2, 2**65), max_size=3)))
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}, draw(st.binary(max_size=64))


@st.composite
def forged_headers(draw: st.DrawFn) -> dict:
    kind, command = draw(artefact_and_command())
    entries, data = {}, b""
    for _ in range(draw(st.integers(1, 3))):
        entry, blob = draw(forged_tensor(len(data)))
        entries[draw(st.sampled_from(TENSOR_NAMES))] = entry
        data += blob
    return {"kind": kind, "command": command, "tensors": entries, "data": data,
            "trailing": draw(st.binary(max_size=8))}


def ssdd_header(kind: str) -> dict:
    blob = good_artefact(kind)
    (header_len,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + header_len])["__metadata__"]


def build_forged(spec: dict, tmp: Path) -> Case:
    header = json.dumps({"__metadata__": ssdd_header(spec["kind"]), **spec["tensors"]}).encode()
    path = tmp / f"{spec['kind']}.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + spec["data"] + spec["trailing"])
    return artefact_case(spec["kind"], spec["command"], path, tmp)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
# Values a forger would pick: right types with absurd sizes, and names that do not exist.
TARGETED = {
    "architecture": st.sampled_from([
        {"name": "convnet", "in_channels": 3, "image_size": 32, "widths": [100000, 100000], "norm": "batch"},
        {"name": "convnet", "in_channels": 3, "image_size": 10**6, "widths": [8, 16], "norm": "batch"},
        {"name": "resnet10", "in_channels": 3, "image_size": 10**6},
        {"name": "convnet", "in_channels": 3, "image_size": 32, "widths": [8, 16], "norm": "batch", "bogus": 1},
        {"name": "no-such-model"}, {"name": 5}, {"widths": [8, 16]}]),
    "source": st.sampled_from([{"dataset": 5}, {"dataset": ""}, {"dataset": ["synthetic"]}, {"fingerprint": 7},
                               {"dataset": "synthetic", "fingerprint": ["x"]}, {"dataset": "no-such-dataset"}]),
    "pixel_space": st.sampled_from([{"mean": [0.5] * 3, "std": [float("nan")] * 3}, {"mean": [float("inf")] * 3,
                                    "std": [1.0] * 3}, {"mean": [0.5], "std": [0.2]}, {"mean": "abc", "std": "abc"}]),
    "image_shape": st.sampled_from([[3, 10**6, 10**6], [3, 8], [3, 8, 8, 8], ["a", "b", "c"], [3, -8, -8]]),
    "views": st.sampled_from([["identity", "rot90"], ["rot90"], ["identity", "identity"], [["identity"]]]),
    "num_classes": st.sampled_from([0, -1, "ten", 10**12, 2.5, [10]]),
    "temperature": st.sampled_from([0, -1.0, "hot", float("nan"), float("inf"), [4]]),
    "label_loss": st.sampled_from(["mse", "ce", 5, None, ["mse"]]),
}
OPTIONAL_KEYS = {"set": ["views"], "bases-set": ["views"], "labelled-set": ["num_classes", "temperature", "label_loss"],
                 "teacher": []}


def good_metadata(kind: str) -> dict:
    return json.loads(ssdd_header(kind)["ssdd"])


@st.composite
def metadata_changes(draw: st.DrawFn) -> dict:
    """A key of an intact artefact's metadata replaced, deleted, or (for a mapping) one of its entries replaced."""
    kind, command = draw(artefact_and_command(("set", "bases-set", "labelled-set", "teacher")))
    meta = good_metadata(kind)
    key = draw(st.sampled_from(sorted(meta) + OPTIONAL_KEYS[kind]))
    action = draw(st.sampled_from(["replace", "delete"] + (["nested"] if isinstance(meta.get(key), dict) else [])))
    spec = {"kind": kind, "command": command, "key": key, "action": action}
    if action == "nested":
        spec["inner"] = draw(st.sampled_from(sorted(meta[key]) + ["extra"]))
        spec["value"] = draw(JSON)
    elif action == "replace":
        spec["value"] = draw(st.one_of(TARGETED[key], JSON) if key in TARGETED else JSON)
    return spec


def build_metadata(spec: dict, tmp: Path) -> Case:
    meta = good_metadata(spec["kind"])
    key = spec["key"]
    if spec["action"] == "nested":
        meta[key] = {**meta[key], spec["inner"]: spec["value"]}
    elif spec["action"] == "delete":
        meta.pop(key, None)
    else:
        meta[key] = spec["value"]
    path = tmp / f"{spec['kind']}.safetensors"
    save_tensors(path, good_tensors(spec["kind"]), meta)
    # Metadata a file may legitimately carry (another creation date, a set of the right kind) is no error; a changed
    # or deleted fingerprint always is (every artefact ssdd writes records one).
    allowed = None if key == "fingerprint" else lambda: None
    return artefact_case(spec["kind"], spec["command"], path, tmp, check_success=allowed)


# ---- pickles with a code-running payload, under the names ssdd reads ----------------------------------------------


@st.composite
def pickle_payloads(draw: st.DrawFn) -> dict:
    return {
        "container": draw(st.sampled_from(["pickle-0", "pickle-2", "pickle-4", "pickle-5", "torch-zip",
                                           "torch-legacy"])),
        "nesting": draw(st.sampled_from(["top", "dict", "list", "deep"])),
        "place": draw(st.sampled_from(["set.safetensors", "teacher.safetensors", "teacher.pt", "checkpoint.pt"])),
    }


def build_pickle(spec: dict, tmp: Path) -> Case:
    marker = tmp / "pwned"
    payload = ShellPayload(marker_command(marker))
    obj = {"top": payload, "dict": {"step": 1, "w": payload}, "list": [torch.zeros(2), payload],
           "deep": {"method": {"state": [{"x": payload}]}}}[spec["nesting"]]
    place = tmp / "run" / spec["place"] if spec["place"] == "checkpoint.pt" else tmp / spec["place"]
    place.parent.mkdir(parents=True, exist_ok=True)
    container = spec["container"]
    if container.startswith("pickle-"):
        place.write_bytes(pickle.dumps(obj, protocol=int(container.removeprefix("pickle-"))))
    else:
        torch.save(obj, place, _use_new_zipfile_serialization=container == "torch-zip")
    if spec["place"] == "set.safetensors":
        case = artefact_case("set", "show", place, tmp)
    elif spec["place"].startswith("teacher"):
        case = artefact_case("teacher", "distill", place, tmp)
    else:  # resuming a run whose checkpoint was replaced
        case = Case(["distill", "--method", "coreset", "--preset", "tiny", "--dataset", "synthetic", "--set",
                     "settings.space=pixel", "--set", "settings.targets=labels", "--out", str(place.parent),
                     "--resume", *COMMON], str(place), [place.parent / "distilled.safetensors"])
    case.marker = marker
    return case


# ---- archives: path traversal and damage ---------------------------------------------------------------------------


def pixel_distill(dataset: str, tmp: Path, root: Path | None = None) -> list[str]:
    """``ssdd distill`` of a pixel-space coreset with hard labels: reads ``dataset``, needs no teacher."""
    return ["distill", "--method", "coreset", "--preset", "tiny", "--dataset", dataset, "--set", "settings.space=pixel",
            "--set", "settings.targets=labels", "--set", "settings.per_class=false", "--images", "1",
            "--out", str(tmp / "run"), *COMMON,
            *(["--data-root", str(root)] if root is not None else [])]


def image_archive_members() -> tuple[dict[str, bytes], np.ndarray]:
    """``cifar10/train/<class>/<i>.png`` entries of 3 classes x 2 images, and the train images in loader order."""
    members, images = {}, []
    for c, cls in enumerate(("a", "b", "c")):
        for i, arr in enumerate(random_images(2, size=8, seed=c)):
            members[f"cifar10/train/{cls}/{i}.png"] = png_bytes(arr)
            images.append(arr.transpose(2, 0, 1))
    return members, np.stack(images)


def tar_bytes(members: list[tuple[str, bytes | None, str]], gz: bool) -> bytes:
    """A tar (gzipped when ``gz``) of (name, data, type) entries; type is ``file``, ``dir``, ``symlink`` or
    ``hardlink`` (whose data is the link target), ``fifo``, ``chardev`` or ``blockdev``."""
    special = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
               "fifo": tarfile.FIFOTYPE, "chardev": tarfile.CHRTYPE, "blockdev": tarfile.BLKTYPE}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind in special:
                info.type = special[kind]
                info.linkname = (data or b"").decode() if kind.endswith("link") else ""
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


# format -> (file name, gzipped, whether it is read as imagefolder:PATH rather than as the dataset cifar10)
ARCHIVE_FORMATS = {"cifar10.tar.gz": ("data/cifar10.tar.gz", True, False),
                   "cifar10.tar": ("data/cifar10.tar.gz", False, False),  # an uncompressed tar under the usual name
                   "imagefolder.tar.gz": ("mine.tar.gz", True, True),
                   "cifar-10-python.tar.gz": ("data/cifar-10-python.tar.gz", True, False)}


def write_archive(fmt: str, tmp: Path, extra: list[tuple[str, bytes | None, str]] = (),
                  first: bool = False) -> tuple[Path, list[str]]:
    """An archive of format ``fmt`` with ``extra`` entries (before the others when ``first``), and the argv that
    reads it."""
    name, gz, as_imagefolder = ARCHIVE_FORMATS[fmt]
    archive = tmp / name
    if fmt == "cifar-10-python.tar.gz":
        regular = [(f"cifar-10-batches-py/{n}", blob, "file") for n, blob in cifar10_members(make_cifar_data()).items()]
    else:
        regular = [(n, blob, "file") for n, blob in image_archive_members()[0].items()]
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(tar_bytes([*extra, *regular] if first else [*regular, *extra], gz))
    argv = pixel_distill(f"imagefolder:{archive}" if as_imagefolder else "cifar10", tmp, tmp / "data")
    return archive, argv


@st.composite
def traversals(draw: st.DrawFn) -> dict:
    return {"format": draw(st.sampled_from([*ARCHIVE_FORMATS, "imagefolder.zip"])),
            "style": draw(st.sampled_from(["relative", "inside", "absolute", "dot-slash"])),
            "up": draw(st.integers(1, 6)),
            "name": draw(st.sampled_from(["escape.png", "a/escape.png", "cifar10/train/a/escape.png"])),
            "type": draw(st.sampled_from(["file", "dir", "symlink"])), "first": draw(st.booleans())}


def build_traversal(spec: dict, tmp: Path) -> Case:
    name = spec["name"]
    evil = {"relative": "../" * spec["up"] + name, "inside": f"cifar10/train/{'../' * spec['up']}{name}",
            "absolute": str(tmp / "outside" / name), "dot-slash": "./" + "../" * spec["up"] + name}[spec["style"]]
    data = png_bytes(np.zeros((8, 8, 3), dtype=np.uint8)) if spec["type"] == "file" else b"/etc/passwd"
    if spec["format"] == "imagefolder.zip":
        archive = tmp / "mine.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for member, blob in [*image_archive_members()[0].items(), (evil, data)]:
                zf.writestr(member, blob)
        argv = pixel_distill(f"imagefolder:{archive}", tmp)
    else:
        archive, argv = write_archive(spec["format"], tmp, [(evil, data, spec["type"])], spec["first"])
    # where an extracting reader would have written the entry: beside the archive, or in the working directory
    escaped = [(base / evil).resolve() for base in (archive.parent, Path.cwd())]
    return Case(argv, str(archive), [tmp / "run", tmp / "outside", *escaped])


@functools.cache
def archive_size(fmt: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return write_archive(fmt, Path(tmp))[0].stat().st_size


@st.composite
def archive_damage(draw: st.DrawFn) -> dict:
    fmt = draw(st.sampled_from(sorted(ARCHIVE_FORMATS)))
    size = archive_size(fmt)
    if draw(st.booleans()):
        return {"format": fmt, "keep": draw(st.integers(0, size - 1))}
    return {"format": fmt, "flips": draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 7)),
                                                  min_size=1, max_size=6, unique=True))}


def build_archive_damage(spec: dict, tmp: Path) -> Case:
    archive, argv = write_archive(spec["format"], tmp)
    data = bytearray(archive.read_bytes())
    if "keep" in spec:
        data = data[: spec["keep"]]
    for position, bit in spec.get("flips", []):
        data[position] ^= 1 << bit
    archive.write_bytes(bytes(data))
    # a flip the formats cannot see (e.g. a gzip header's time stamp) changes nothing
    return Case(argv, str(archive), [tmp / "run"], check_success=intact_archive(spec["format"], tmp))


def intact_archive(fmt: str, tmp: Path) -> Callable[[], str | None]:
    """A success check: the archive of format ``fmt`` written by :func:`write_archive` reads as the images it held."""
    dataset = f"imagefolder:{tmp / ARCHIVE_FORMATS[fmt][0]}" if ARCHIVE_FORMATS[fmt][2] else "cifar10"
    truth = make_cifar_data().train_images if "python" in fmt else image_archive_members()[1]

    def same_pixels() -> str | None:
        loaded = load_dataset(dataset, "train", root=tmp / "data").images.numpy()
        return None if loaded.shape == truth.shape and (loaded == truth).all() else \
            f"the archive was read as {loaded.shape[0]} images that differ from the {truth.shape[0]} it held"
    return same_pixels


# ---- image folders: damaged files, empty classes, mixed sizes and modes -------------------------------------------


def jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose valid header announces ``width`` x ``height`` pixels and whose data is empty."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@st.composite
def damaged_images(draw: st.DrawFn) -> dict:
    fmt = draw(st.sampled_from(["png", "jpg"]))
    size = len(png_bytes(random_images(1)[0]) if fmt == "png" else jpeg_bytes(random_images(1)[0]))
    damage = draw(st.sampled_from(["truncate", "flip", "garbage", "empty", "huge-header"]))
    spec = {"format": fmt, "damage": damage, "victim": draw(st.sampled_from(["a/0", "b/1", "c/0"]))}
    if damage == "truncate":
        spec["keep"] = draw(st.integers(0, size - 1))
    elif damage == "flip":
        spec["flips"] = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 7)), min_size=1, max_size=6,
                                      unique=True))
    elif damage == "garbage":
        spec["bytes"] = draw(st.binary(max_size=300))
    elif damage == "huge-header":
        spec["dims"] = draw(st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)))
    return spec


def build_damaged_image(spec: dict, tmp: Path) -> Case:
    folder = tmp / "images"
    encode = png_bytes if spec["format"] == "png" else jpeg_bytes
    victim = f"{spec['victim']}.{spec['format']}"
    for c, cls in enumerate(("a", "b", "c")):
        (folder / cls).mkdir(parents=True)
        for i, arr in enumerate(random_images(2, size=8, seed=c)):
            (folder / cls / f"{i}.{spec['format']}").write_bytes(encode(arr))
    good = (folder / victim).read_bytes()
    bad = bytearray(good)
    if spec["damage"] == "truncate":
        bad = bad[: spec["keep"]]
    elif spec["damage"] == "flip":
        for position, bit in spec["flips"]:
            bad[position % len(bad)] ^= 1 << bit  # the victim's encoding may be shorter than the one sized above
    elif spec["damage"] == "garbage":
        bad = bytearray(spec["bytes"])
    elif spec["damage"] == "empty":
        bad = bytearray()
    else:
        bad = bytearray(png_header_only(*spec["dims"]))
    (folder / victim).write_bytes(bytes(bad))

    def intact_or_jpeg() -> str | None:  # PNG carries CRCs: a change it accepted must leave the pixels as they were
        ds = load_dataset(f"imagefolder:{folder}", "train")
        if ds.images.shape != (6, 3, 8, 8):
            return f"decoded as {tuple(ds.images.shape)}"
        index = ["a/0", "a/1", "b/0", "b/1", "c/0", "c/1"].index(spec["victim"])
        original = np.asarray(Image.open(io.BytesIO(good)).convert("RGB")).transpose(2, 0, 1)
        same = (ds.images[index].numpy() == original).all()
        return None if spec["format"] == "jpg" or same else "a damaged PNG was decoded to other pixels"
    return Case(pixel_distill(f"imagefolder:{folder}", tmp), victim, [tmp / "run"], check_success=intact_or_jpeg)


MODES = {"L": 1, "RGB": 3, "RGBA": 4, "P": 3, "LA": 2, "1": 1, "I;16": 1}  # mode -> channels it is made from
GRAY_MODES = {"L", "1", "I;16", "LA"}  # decoded to one channel; every other mode to RGB
BMP_LESS = {"LA", "I;16"}  # modes BMP cannot store (written as PNG instead)


@st.composite
def folder_layouts(draw: st.DrawFn) -> dict:
    image = st.tuples(st.sampled_from([8, 8, 8, 10]), st.sampled_from(sorted(MODES)),
                      st.sampled_from(["png", "bmp", "tif"]))
    classes = draw(st.dictionaries(st.sampled_from(["ant", "bee", "cat", "dog"]),
                                   st.tuples(st.lists(image, max_size=3),
                                             st.sampled_from(["", "notes.txt", "folder.png", "sub"])),
                                   min_size=2, max_size=4))
    return {"classes": classes}


def build_layout(spec: dict, tmp: Path) -> Case:
    folder = tmp / "images"
    rng = np.random.default_rng(0)
    for cls, (images, clutter) in spec["classes"].items():
        (folder / cls).mkdir(parents=True)
        for i, (size, mode, fmt) in enumerate(images):
            array = rng.integers(0, 256, (size, size, MODES[mode]), dtype=np.uint8)
            img = Image.fromarray(array[:, :, 0] if MODES[mode] == 1 else array).convert(mode)
            img.save(folder / cls / f"{i}.{'png' if fmt == 'bmp' and mode in BMP_LESS else fmt}")
        if clutter == "notes.txt":
            (folder / cls / "notes.txt").write_text("not an image")
        elif clutter:
            (folder / cls / clutter).mkdir()
    empty = sorted(cls for cls, (images, _) in spec["classes"].items() if not images)
    sizes = {size for images, _ in spec["classes"].values() for size, _, _ in images}
    culprit = empty[0] if empty else str(folder)
    if empty or len(sizes) > 1:
        return Case(pixel_distill(f"imagefolder:{folder}", tmp), culprit, [tmp / "run"])

    def counted_and_converted() -> str | None:
        ds = load_dataset(f"imagefolder:{folder}", "train")
        modes = {mode for images, _ in spec["classes"].values() for _, mode, _ in images}
        channels = 1 if modes <= GRAY_MODES else 3
        counts = [len(images) for _, (images, _) in sorted(spec["classes"].items())]
        want = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        side = next(iter(sizes))
        if ds.image_shape != (channels, side, side) or not torch.equal(ds.labels, want):
            return f"read as {ds.image_shape} with labels {ds.labels.tolist()}"
        return None
    return Case(pixel_distill(f"imagefolder:{folder}", tmp), culprit, [tmp / "run"],
                check_success=counted_and_converted)


# ---- IDX (MNIST) files ---------------------------------------------------------------------------------------------


IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


@st.composite
def idx_damage(draw: st.DrawFn) -> dict:
    victim = draw(st.sampled_from(["train_images", "train_labels"]))
    damage = draw(st.sampled_from(["magic", "dims", "truncate", "append", "gzip-truncate", "gzip-flip"]))
    spec = {"victim": victim, "damage": damage, "gz": damage.startswith("gzip") or draw(st.booleans())}
    if damage == "magic":
        spec["magic"] = draw(st.binary(min_size=4, max_size=4).filter(lambda m: m[:3] != b"\x00\x00\x08"))
    elif damage == "dims":
        spec["ndim"] = draw(st.integers(0, 255))
        spec["dims"] = draw(st.lists(st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)), max_size=5))
        spec["body"] = draw(st.booleans())
    elif damage in ("truncate", "gzip-truncate"):
        spec["fraction"] = draw(st.floats(0, 1, exclude_max=True))
    elif damage == "append":
        spec["extra"] = draw(st.binary(min_size=1, max_size=64))
    else:
        spec["flips"] = draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=4,
                                      unique=True))
    return spec


def build_idx(spec: dict, tmp: Path) -> Case:
    data = make_idx_data()
    folder = tmp / "data" / "mnist"
    folder.mkdir(parents=True)
    suffix = ".gz" if spec["gz"] else ""
    for name, stem in IDX_FILES.items():
        if name != spec["victim"]:
            (folder / f"{stem}{suffix}").write_bytes(gzip.compress(idx_bytes(getattr(data, name)), mtime=0)
                                                     if spec["gz"] else idx_bytes(getattr(data, name)))
    raw = idx_bytes(getattr(data, spec["victim"]))
    if spec["damage"] == "magic":
        raw = spec["magic"] + raw[4:]
    elif spec["damage"] == "dims":
        body = raw[4 + 4 * getattr(data, spec["victim"]).ndim :] if spec["body"] else b""
        raw = struct.pack(">I", 0x800 | spec["ndim"]) + struct.pack(f">{len(spec['dims'])}I", *spec["dims"]) + body
    elif spec["damage"] == "truncate":
        raw = raw[: int(len(raw) * spec["fraction"])]
    elif spec["damage"] == "append":
        raw = raw + spec["extra"]
    blob = bytearray(gzip.compress(raw, mtime=0) if spec["gz"] else raw)
    if spec["damage"] == "gzip-truncate":
        blob = blob[: int(len(blob) * spec["fraction"])]
    for position, bit in spec.get("flips", []):
        blob[position % len(blob)] ^= 1 << bit
    path = folder / f"{IDX_FILES[spec['victim']]}{suffix}"
    path.write_bytes(bytes(blob))
    truth = getattr(data, spec["victim"])

    def unchanged() -> str | None:  # only a flip gzip ignores (its header's time stamp or flags) may pass
        ds = load_dataset("mnist", "train", root=tmp / "data")
        loaded = ds.images[:, 0].numpy() if spec["victim"] == "train_images" else ds.labels.numpy()
        return None if loaded.shape == truth.shape and (loaded == truth).all() else "a damaged IDX file was read"
    if spec["damage"] == "dims" and spec["body"] and [spec["ndim"], *spec["dims"]] == [truth.ndim, *truth.shape]:
        return Case(pixel_distill("mnist", tmp, tmp / "data"), str(path), [tmp / "run"], check_success=unchanged)
    return Case(pixel_distill("mnist", tmp, tmp / "data"), str(path), [tmp / "run"],
                check_success=unchanged if spec["damage"] == "gzip-flip" else None)


# ---- pixel modes other than 8-bit L / RGB: converted exactly, or refused where their range is unknown -------------


PIXEL_MODES = ["I;16", "I;16B", "I-pgm", "I-wide", "F", "LA", "RGBA", "P-transparent", "CMYK", "1"]


@st.composite
def pixel_modes(draw: st.DrawFn) -> dict:
    return {"mode": draw(st.sampled_from(PIXEL_MODES)), "seed": draw(st.integers(0, 2**32 - 1)),
            "images": draw(st.integers(1, 3))}


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def sixteen_bit_image(mode: str, rng: np.random.Generator) -> tuple[bytes, str, np.ndarray | None]:
    values = rng.integers(0, 65535, (8, 8), endpoint=True)
    truth = np.rint(values * 255 / 65535)[None]  # round(v * 255 / 65535), computed apart from the reader
    if mode == "I-pgm":  # PIL reads a 16-bit PGM as mode I
        return b"P5\n8 8\n65535\n" + values.astype(">u2").tobytes(), ".pgm", truth
    if mode == "I-wide":  # 32-bit integers beyond 16 bits: no range to scale from
        values[rng.integers(0, 8), rng.integers(0, 8)] = rng.integers(65536, 2**31 - 1)
        return encoded(Image.fromarray(values.astype(np.int32)), "TIFF"), ".tif", None
    raw = values.astype("<u2" if mode == "I;16" else ">u2").tobytes()
    img = Image.frombytes(mode, (8, 8), raw)
    return (encoded(img, "PNG"), ".png", truth) if mode == "I;16" else (encoded(img, "TIFF"), ".tif", truth)


def mode_image(mode: str, rng: np.random.Generator) -> tuple[bytes, str, np.ndarray | None]:
    """One 8 x 8 image of ``mode`` with random pixels: its file bytes, its suffix and the uint8 (C, H, W) pixels a
    correct decoder gives, computed here from the raw values (None where the file must be refused)."""
    if mode.startswith("I"):
        return sixteen_bit_image(mode, rng)
    channels = {"F": 1, "LA": 2, "RGBA": 4, "CMYK": 3, "1": 1, "P-transparent": 1}[mode]
    raw = rng.integers(0, 256, (8, 8, channels), dtype=np.uint8)
    if mode == "F":
        return encoded(Image.fromarray(rng.random((8, 8), dtype=np.float32)), "TIFF"), ".tif", None
    if mode == "1":
        bits = raw[..., 0] > 127
        return encoded(Image.fromarray(bits), "PNG"), ".png", bits[None] * 255
    if mode == "CMYK":  # no black ink: RGB = 255 - CMY
        img = Image.fromarray(np.dstack([raw, np.zeros((8, 8), np.uint8)]), "CMYK")
        return encoded(img, "TIFF"), ".tif", (255 - raw).transpose(2, 0, 1)
    if mode == "P-transparent":
        palette, hidden = rng.integers(0, 256, (256, 3), dtype=np.uint8), int(raw[0, 0, 0])
        img = Image.fromarray(raw[..., 0], "P")
        img.putpalette(palette.ravel().tolist())
        img.info["transparency"] = hidden
        shown = np.where((raw[..., 0] == hidden)[..., None], 0, palette[raw[..., 0]])
        return encoded(img, "PNG"), ".png", shown.transpose(2, 0, 1)
    colour, alpha = raw[..., :-1].astype(np.float64), raw[..., -1:].astype(np.float64)
    img = Image.fromarray(raw, mode)
    return encoded(img, "PNG"), ".png", np.rint(colour * alpha / 255).transpose(2, 0, 1)  # over black


def build_pixel_modes(spec: dict, tmp: Path) -> Case:
    rng = np.random.default_rng(spec["seed"])
    folder = tmp / "images"
    truths = []
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(spec["images"]):
            data, suffix, truth = mode_image(spec["mode"], rng)
            (folder / cls / f"{i}{suffix}").write_bytes(data)
            truths.append(truth)
    refused = any(t is None for t in truths)

    def exact() -> str | None:
        if refused:
            return f"pixels of unknown range ({spec['mode']}) were read"
        images = load_dataset(f"imagefolder:{folder}", "train").images
        same = torch.equal(images, torch.from_numpy(np.stack(truths).astype(np.uint8)))
        return None if same else f"{spec['mode']} pixels decoded to other values"
    return Case(pixel_distill(f"imagefolder:{folder}", tmp), f"a/0{suffix}", [tmp / "run"], check_success=exact,
                must_succeed=not refused)


# ---- images over the decoded-pixel cap (valid files of a few KB each) ---------------------------------------------


@st.composite
def oversized_images(draw: st.DrawFn) -> dict:
    width = draw(st.integers(1400, 12000))
    height = draw(st.integers(4096 * 4096 // width + 1, 12000))
    return {"dims": (width, height), "victims": draw(st.lists(st.sampled_from(["a/0", "b/0", "b/1"]), min_size=1,
                                                               max_size=3, unique=True))}


def build_oversized(spec: dict, tmp: Path) -> Case:
    folder = write_class_folders(tmp / "images", {"a": random_images(1), "b": random_images(2, seed=1)})
    for victim in spec["victims"]:
        (folder / f"{victim}.png").write_bytes(zero_png(*spec["dims"]))
    return Case(pixel_distill(f"imagefolder:{folder}", tmp), tuple(f"{v}.png" for v in spec["victims"]), [tmp / "run"])


# ---- archive entries that are links, devices or fifos, and entries given twice -----------------------------------


@st.composite
def special_members(draw: st.DrawFn) -> dict:
    return {"format": draw(st.sampled_from(sorted(ARCHIVE_FORMATS))),
            "kind": draw(st.sampled_from(["symlink", "hardlink", "fifo", "chardev", "blockdev", "duplicate"])),
            "read": draw(st.booleans()), "first": draw(st.booleans())}


def build_special_member(spec: dict, tmp: Path) -> Case:
    """An extra entry where the reader reads (an image, a CIFAR batch: refused) or elsewhere (read as if absent)."""
    python = "python" in spec["format"]
    existing = "cifar-10-batches-py/data_batch_1" if python else "cifar10/train/a/0.png"
    if spec["read"]:
        name = existing if spec["kind"] == "duplicate" else \
            ("other/data_batch_1" if python else "cifar10/train/a/7.png")
    else:
        name = "cifar-10-batches-py/readme.html" if python else "cifar10/LICENSE"
    kind = "file" if spec["kind"] == "duplicate" else spec["kind"]
    extra = [(name, b"text", "file")] if spec["kind"] == "duplicate" and not spec["read"] else []
    archive, argv = write_archive(spec["format"], tmp, [*extra, (name, existing.encode(), kind)], spec["first"])
    return Case(argv, str(archive), [tmp / "run"], check_success=intact_archive(spec["format"], tmp),
                must_succeed=not spec["read"])


# ---- JSON beyond the limits in a header or in the ssdd metadata ---------------------------------------------------


@st.composite
def json_beyond_limits(draw: st.DrawFn) -> dict:
    kind, command = draw(artefact_and_command(("set", "teacher")))
    attack = draw(st.sampled_from(["deep", "digits", "surrogate-key", "surrogate-value", "not-utf8"]))
    spec = {"kind": kind, "command": command, "attack": attack,
            "place": "header" if attack == "not-utf8" else draw(st.sampled_from(["header", "metadata"]))}
    sizes = {"deep": st.integers(65, 200_000), "digits": st.integers(41, 20_000), "not-utf8": st.integers(0x80, 0xFF)}
    spec["size"] = draw(sizes.get(attack, st.integers(0xD800, 0xDFFF)))  # depth, digits, byte or surrogate
    return spec


def build_json_beyond_limits(spec: dict, tmp: Path) -> Case:
    size = spec["size"]
    entry = {"deep": f'"x": {"[" * size}{"]" * size}', "digits": f'"x": -{"7" * size}',
             "surrogate-key": f'"\\u{size:04x}": 1', "surrogate-value": f'"x": "\\u{size:04x}"'}.get(spec["attack"])
    blob = good_artefact(spec["kind"])
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    if spec["place"] == "metadata":
        header["__metadata__"]["ssdd"] = header["__metadata__"]["ssdd"][:-1] + f", {entry}}}"
        text = json.dumps(header).encode()
    elif spec["attack"] == "not-utf8":  # one byte that cannot start or continue a UTF-8 character here
        text = json.dumps(header).encode()[:-1] + b', "x": "' + bytes([size]) + b'"}'
    else:
        text = json.dumps(header).encode()[:-1] + f", {entry}}}".encode()
    path = tmp / f"{spec['kind']}.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + header_len :])
    return artefact_case(spec["kind"], spec["command"], path, tmp)


# ---- configuration files: binary, alias bombs, deep nesting, bad strings and numbers ------------------------------


@st.composite
def hostile_configs(draw: st.DrawFn) -> dict:
    attack = draw(st.sampled_from(["binary", "alias-bomb", "deep", "self-alias", "surrogate", "digits", "date"]))
    spec = {"attack": attack, "command": draw(st.sampled_from(["teacher", "distill"]))}
    if attack == "binary":
        spec["text"] = draw(st.text(max_size=60))
        spec["bad"] = draw(st.sampled_from([b"\0", b"\x80", b"\xff", b"\xc3(", b"\xed\xa0\x80"]))
        spec["at"] = draw(st.integers(0, 60))
    elif attack == "alias-bomb":
        spec["width"] = draw(st.integers(2, 12))
        spec["levels"] = draw(st.integers(math.ceil(math.log(100_001) / math.log(spec["width"])), 40))
    elif attack == "deep":
        spec["flow"] = draw(st.booleans())
        spec["depth"] = draw(st.integers(33, 100_000 if spec["flow"] else 1000))  # block style: a line per level
    elif attack == "self-alias":
        spec["value"] = draw(st.sampled_from(["&a [*a]", "&a {k: *a}", "&a [1, [2, {k: *a}]]"]))
    elif attack == "surrogate":
        spec["code"], spec["in_key"] = draw(st.integers(0xD800, 0xDFFF)), draw(st.booleans())
    elif attack == "digits":
        spec["digits"] = draw(st.integers(4301, 20_000))
    else:
        spec["date"] = draw(st.sampled_from(["2024-13-01", "2024-02-30", "2023-00-10", "2023-04-31"]))
    return spec


def hostile_yaml(spec: dict) -> bytes:
    attack = spec["attack"]
    if attack == "binary":
        text = f"epochs: 1\n# {spec['text']}\n".encode()
        return text[: spec["at"]] + spec["bad"] + text[spec["at"] :]
    if attack == "alias-bomb":
        items = lambda item: "[" + ", ".join([item] * spec["width"]) + "]"  # noqa: E731
        lines = [f"  l{i}: &l{i} {items(f'*l{i - 1}' if i else 'lol')}" for i in range(spec["levels"])]
        return ("arch_args:\n" + "\n".join(lines) + "\n").encode()
    if attack == "deep" and spec["flow"]:
        return f"arch_args: {{x: {'[' * spec['depth']}{']' * spec['depth']}}}\n".encode()
    if attack == "deep":
        return ("arch_args:\n" + "".join(f"{' ' * i}  k{i}:\n" for i in range(spec["depth"])) + "\n").encode()
    if attack == "self-alias":
        return f"arch_args: {spec['value']}\n".encode()
    if attack == "surrogate":
        escaped = f'"\\u{spec["code"]:04x}"'
        return (f"arch_args: {{{escaped}: 1}}\n" if spec["in_key"] else f"arch: {escaped}\n").encode()
    if attack == "digits":
        return f"epochs: {'9' * spec['digits']}\n".encode()
    return f"epochs: 1\ncreated: {spec['date']}\n".encode()


def build_hostile_config(spec: dict, tmp: Path) -> Case:
    path = tmp / "config.yaml"
    path.write_bytes(hostile_yaml(spec))
    command = ["teacher"] if spec["command"] == "teacher" else ["distill", "--method", "coreset"]
    return Case([*command, "--config", str(path), "--out", str(tmp / "run"), *COMMON], str(path), [tmp / "run"])


# ---- names that are not UTF-8: class folders refused, file names read ------------------------------------------


def not_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return b"/" not in raw and b"\0" not in raw
    return False


@st.composite
def undecodable_names(draw: st.DrawFn) -> dict:
    return {"name": draw(st.binary(min_size=1, max_size=6).filter(not_utf8)),
            "where": draw(st.sampled_from(["class", "file"]))}


def build_undecodable_name(spec: dict, tmp: Path) -> Case:
    folder = write_class_folders(tmp / "images", {"a": random_images(1), "b": random_images(1, seed=1)})
    image = random_images(1, seed=2)[0]
    name = os.fsdecode(spec["name"])
    target = folder / name / "0.png" if spec["where"] == "class" else folder / "a" / f"{name}.png"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(png_bytes(image))
    files = sorted(["0.png", f"{name}.png"]) if spec["where"] == "file" else []

    def read_in_order() -> str | None:  # the image is placed among class a's files by its name, like any other
        loaded = load_dataset(f"imagefolder:{folder}", "train").images[files.index(f"{name}.png")]
        return None if torch.equal(loaded, torch.from_numpy(image).permute(2, 0, 1)) else "read as other pixels"
    shown = terminal_safe(spec["name"].decode("utf-8", "backslashreplace"))  # as the error line writes it
    return Case(pixel_distill(f"imagefolder:{folder}", tmp), shown,
                [tmp / "run"], check_success=read_in_order, must_succeed=spec["where"] == "file")


# ---- an evaluation target without a test split, and a teacher's subset of no or too many images ------------------


@st.composite
def target_layouts(draw: st.DrawFn) -> dict:
    return {"layout": draw(st.sampled_from(["flat", "train-only"])), "classes": draw(st.integers(1, 3))}


def build_target_layout(spec: dict, tmp: Path) -> Case:
    root = tmp / "target"
    classes = {f"c{i}": random_images(2, seed=i) for i in range(spec["classes"])}
    write_class_folders(root if spec["layout"] == "flat" else root / "train", classes)
    path = tmp / "set.safetensors"
    path.write_bytes(good_artefact("set"))
    argv = ["evaluate", str(path), "--targets", f"imagefolder:{root}", "--preset", "tiny", "--seeds", "0",
            "--out", str(tmp / "eval"), *COMMON]
    return Case(argv, f"{root}/test/<class>/<images>", [tmp / "eval" / "results.json", tmp / "eval" / "results.md"])


@st.composite
def subset_sizes(draw: st.DrawFn) -> dict:
    via = draw(st.sampled_from(["flag", "config"]))
    too_many = st.integers(321, 10**12)  # the synthetic train split has 320 images
    return {"via": via, "n": draw(too_many if via == "flag" else st.one_of(st.just(0), st.integers(-10**6, -1),
                                                                           too_many))}


def build_subset_size(spec: dict, tmp: Path) -> Case:
    config = tmp / "config.yaml"
    config.write_text(f"train_images: {spec['n']}\n")
    given = ["--train-images", str(spec["n"])] if spec["via"] == "flag" else ["--config", str(config)]
    argv = ["teacher", "--dataset", "synthetic", "--preset", "tiny", "--epochs", "1", *given, "--out", str(tmp / "run"),
            *COMMON]
    return Case(argv, "train_images", [tmp / "run" / "teacher.safetensors"])


# ---- the categories and their tests ---------------------------------------------------------------------------------


CATEGORIES: dict[str, tuple[st.SearchStrategy, Callable[[Any, Path], Case]]] = {
    "safetensors-truncated": (truncations(), build_truncated),
    "safetensors-bit-flipped": (bit_flips(), build_bit_flipped),
    "safetensors-forged-header": (forged_headers(), build_forged),
    "ssdd-metadata": (metadata_changes(), build_metadata),
    "pickle-payload": (pickle_payloads(), build_pickle),
    "archive-path-traversal": (traversals(), build_traversal),
    "archive-damaged": (archive_damage(), build_archive_damage),
    "image-damaged": (damaged_images(), build_damaged_image),
    "image-folder-layout": (folder_layouts(), build_layout),
    "idx-malformed": (idx_damage(), build_idx),
    "image-pixel-modes": (pixel_modes(), build_pixel_modes),
    "image-oversized": (oversized_images(), build_oversized),
    "archive-special-members": (special_members(), build_special_member),
    "json-beyond-limits": (json_beyond_limits(), build_json_beyond_limits),
    "config-hostile": (hostile_configs(), build_hostile_config),
    "name-not-utf8": (undecodable_names(), build_undecodable_name),
    "evaluation-target-layout": (target_layouts(), build_target_layout),
    "teacher-subset-size": (subset_sizes(), build_subset_size),
}


@FUZZ
@given(spec=truncations())
def test_truncated_safetensors_is_refused(spec: dict) -> None:
    check(build_truncated, spec)


@FUZZ
@example(spec={"kind": "set", "command": "show", "flips": [(-1, 0)]})  # tensor data: caught by the fingerprint
@example(spec={"kind": "teacher", "command": "distill", "flips": [(-1, 0)]})
@given(spec=bit_flips())
def test_bit_flipped_safetensors_is_refused_or_intact(spec: dict) -> None:
    check(build_bit_flipped, spec)


@FUZZ
@example(spec={"kind": "set", "command": "show", "data": b"\0" * 16, "trailing": b"",
               "tensors": {"images": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}})
@example(spec={"kind": "teacher", "command": "distill", "data": b"\0" * 16, "trailing": b"",
               "tensors": {"features.0.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 10**12]}}})
@example(spec={"kind": "set", "command": "show", "data": b"", "trailing": b"",
               "tensors": {"images": {"dtype": "F32", "shape": [0, 3, 10**9, 10**9], "data_offsets": [0, 0]}}})
@given(spec=forged_headers())
def test_forged_safetensors_header_is_refused_before_allocating(spec: dict) -> None:
    check(build_forged, spec)


@FUZZ
@example(spec={"kind": "teacher", "command": "distill", "key": "architecture", "action": "nested", "inner": "widths",
               "value": [100000, 100000]})  # 360 GB of weights if it were built
@example(spec={"kind": "teacher", "command": "evaluate", "key": "architecture", "action": "nested",
               "inner": "image_size", "value": 10**6})
@example(spec={"kind": "teacher", "command": "distill", "key": "architecture", "action": "nested", "inner": "name",
               "value": {"a": 1}})
@example(spec={"kind": "teacher", "command": "distill", "key": "source", "action": "nested", "inner": "dataset",
               "value": ["synthetic"]})
@example(spec={"kind": "teacher", "command": "evaluate", "key": "pixel_space", "action": "nested", "inner": "std",
               "value": [float("nan")] * 3})
@example(spec={"kind": "labelled-set", "command": "evaluate", "key": "temperature", "action": "replace", "value": 0})
@example(spec={"kind": "bases-set", "command": "show", "key": "image_shape", "action": "replace",
               "value": [3, 10**6, 10**6]})  # bases upsampled to 10^12 pixels
@example(spec={"kind": "set", "command": "show", "key": "fingerprint", "action": "delete"})  # unchecked before
@given(spec=metadata_changes())
def test_metadata_of_the_wrong_type_or_missing_is_a_clear_error(spec: dict) -> None:
    check(build_metadata, spec)


@FUZZ
@example(spec={"container": "pickle-5", "nesting": "top", "place": "checkpoint.pt"})  # torch warns about protocol 5
@given(spec=pickle_payloads())
def test_pickle_payload_never_runs(spec: dict) -> None:
    check(build_pickle, spec)


@FUZZ
@example(spec={"format": "imagefolder.zip", "style": "relative", "up": 1, "name": "escape.png", "type": "file",
               "first": True})
@given(spec=traversals())
def test_archive_path_traversal_is_refused(spec: dict) -> None:
    check(build_traversal, spec)


@FUZZ
@example(spec={"format": "cifar10.tar", "flips": [(5120, 0)]})  # the last entry's header: tar would stop there quietly
@example(spec={"format": "cifar10.tar", "keep": 5120})  # cut where the last entry begins
@example(spec={"format": "imagefolder.tar.gz", "flips": [(0, 1)]})  # not gzip, not tar
@given(spec=archive_damage())
def test_damaged_archive_is_refused_or_intact(spec: dict) -> None:
    check(build_archive_damage, spec)


@FUZZ
@example(spec={"format": "png", "damage": "huge-header", "victim": "a/0", "dims": (30000, 30000)})
@example(spec={"format": "png", "damage": "huge-header", "victim": "b/1", "dims": (10000, 10000)})
@given(spec=damaged_images())
def test_damaged_image_is_named(spec: dict) -> None:
    check(build_damaged_image, spec)


@FUZZ
@example(spec={"classes": {"ant": ([], "folder.png"), "bee": ([(8, "RGB", "png")], "")}})  # a folder named *.png
@given(spec=folder_layouts())
def test_image_folder_layout_is_read_or_refused(spec: dict) -> None:
    check(build_layout, spec)


@FUZZ
@example(spec={"victim": "train_labels", "damage": "dims", "gz": False, "ndim": 4, "dims": [65536] * 4,
               "body": False})  # 2^64 values: a 64-bit count would wrap to 0
@example(spec={"victim": "train_labels", "damage": "gzip-flip", "gz": True, "flips": [(12345, 0), (5667, 7)]})
@given(spec=idx_damage())
def test_malformed_idx_is_refused(spec: dict) -> None:
    check(build_idx, spec)


@FUZZ
@example(spec={"mode": "I;16", "seed": 0, "images": 2})  # every pixel read as 255 before
@example(spec={"mode": "F", "seed": 0, "images": 1})
@given(spec=pixel_modes())
def test_pixel_modes_are_converted_exactly_or_refused(spec: dict) -> None:
    check(build_pixel_modes, spec)


@FUZZ
@example(spec={"dims": (9000, 9000), "victims": ["a/0", "b/1"]})  # two 79 KB files took 6 GB through distill
@given(spec=oversized_images())
def test_image_over_the_pixel_cap_is_refused_unread(spec: dict) -> None:
    check(build_oversized, spec)


@FUZZ
@example(spec={"format": "imagefolder.tar.gz", "kind": "symlink", "read": True, "first": False})  # skipped before
@example(spec={"format": "cifar10.tar.gz", "kind": "duplicate", "read": True, "first": False})  # counted twice
@example(spec={"format": "cifar-10-python.tar.gz", "kind": "hardlink", "read": True, "first": True})
@example(spec={"format": "cifar10.tar", "kind": "fifo", "read": False, "first": True})
@given(spec=special_members())
def test_link_device_or_repeated_archive_entry_is_refused(spec: dict) -> None:
    check(build_special_member, spec)


@FUZZ
@example(spec={"kind": "set", "command": "show", "attack": "deep", "place": "header", "size": 100_000})
@example(spec={"kind": "teacher", "command": "distill", "attack": "deep", "place": "metadata", "size": 100_000})
@example(spec={"kind": "set", "command": "show", "attack": "digits", "place": "header", "size": 5000})
@example(spec={"kind": "set", "command": "show", "attack": "surrogate-value", "place": "metadata", "size": 0xD800})
@given(spec=json_beyond_limits())
def test_json_beyond_the_limits_is_refused(spec: dict) -> None:
    check(build_json_beyond_limits, spec)


@FUZZ
@example(spec={"attack": "alias-bomb", "command": "teacher", "width": 9, "levels": 9})  # 387 million strings
@example(spec={"attack": "binary", "command": "distill", "text": "", "bad": b"\xff", "at": 0})
@example(spec={"attack": "deep", "command": "teacher", "depth": 100_000, "flow": True})
@given(spec=hostile_configs())
def test_hostile_config_file_is_refused(spec: dict) -> None:
    check(build_hostile_config, spec)


@FUZZ
@example(spec={"name": b"caf\xe9", "where": "class"})
@example(spec={"name": b"\xff", "where": "file"})
@given(spec=undecodable_names())
def test_names_that_are_not_utf8(spec: dict) -> None:
    check(build_undecodable_name, spec)


@FUZZ
@given(spec=target_layouts())
def test_evaluation_target_without_a_test_split_says_how_to_add_one(spec: dict) -> None:
    check(build_target_layout, spec)


@FUZZ
@example(spec={"via": "config", "n": 0})  # trained on every image before
@example(spec={"via": "flag", "n": 10**6})
@given(spec=subset_sizes())
def test_teacher_subset_of_no_or_too_many_images_is_refused(spec: dict) -> None:
    check(build_subset_size, spec)


def test_judge_catches_what_it_must(tmp_path: Path) -> None:
    """The checks above are live: a payload that runs, a traceback and a stray output file are all reported."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(ShellPayload(marker_command(marker))))
    assert marker.exists()
    (tmp_path / "out").mkdir()
    status, found = run_case(Case(["show", str(tmp_path / "missing.safetensors")], "elsewhere", [tmp_path / "out"],
                                  marker))
    assert status == 2
    assert any("payload ran" in p for p in found) and any("does not name elsewhere" in p for p in found)
    assert any("out was written" in p for p in found)
    _, found = run_case(Case(["show", str(tmp_path / "missing.safetensors")], "missing", must_succeed=True))
    assert found and found[0].startswith("a valid input was refused")


def test_pickle_renamed_to_safetensors_in_a_real_process(tmp_path: Path) -> None:
    """The whole command in its own process: real stderr, real exit status, and the payload never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "set.safetensors"
    path.write_bytes(pickle.dumps({"images": ShellPayload(marker_command(marker))}))
    result = subprocess.run([sys.executable, "-m", "ssdd", "show", str(path)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(f"ssdd: error: {path}")
    assert not marker.exists() and not (tmp_path / "grid.png").exists()
