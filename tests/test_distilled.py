"""The DistilledSet artefact: exact save/load round trips, byte counts checked against the file itself,
the byte budget arithmetic, and a clear ArtefactError for every kind of bad file."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from ssdd.budget import images_for_budget
from ssdd.data import PixelSpace
from ssdd.distilled import DISTILLED_FILE, ENCODINGS, DistilledSet, load_distilled
from ssdd.errors import ArtefactError, SsddError
from ssdd.io import read_metadata, save_tensors
from ssdd.models import create_model
from ssdd.teachers import save_teacher

SPACE = PixelSpace((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
M, C, H = 5, 3, 8  # 5 images of 3 x 8 x 8


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def make_tensors(kind: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    images = randn(M, C, H, H, seed=1, dtype=dtype)
    if kind == "representation":
        return {"images": images, "targets": randn(M, 16, seed=2, dtype=dtype)}
    if kind == "hard-label":
        return {"images": images, "labels": torch.tensor([3, 0, 9, 3, 1], dtype=torch.int64)}
    return {"images": images, "labels": randn(M, 10, seed=3, dtype=dtype)}


def make_set(kind: str = "representation", dtype: torch.dtype = torch.float32, **metadata: object) -> DistilledSet:
    return DistilledSet(make_tensors(kind, dtype), SPACE, kind, "test-method", dict(metadata))


def payload_bytes(path: Path) -> int:
    """File size minus the 8-byte length prefix minus the JSON header: the bytes of the tensor data."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    return len(data) - 8 - header_len


# Hand-computed byte counts: images 5 * 3 * 8 * 8 = 960 values.
#   representation float32: (960 + 5 * 16) * 4 = 4160;  float16: (960 + 80) * 2 = 2080
#   hard-label: 960 * 4 + 5 * 8 (int64) = 3880;          soft-label float32: (960 + 5 * 10) * 4 = 4040
BYTES = {("representation", torch.float32): 4160, ("representation", torch.float16): 2080,
         ("hard-label", torch.float32): 3880, ("soft-label", torch.float32): 4040,
         ("soft-label", torch.bfloat16): 2020}
CASES = list(BYTES)
IDS = [f"{k}-{str(d).removeprefix('torch.')}" for k, d in CASES]


# ---- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "dtype"), CASES, ids=IDS)
def test_save_load_materialize_round_trip_is_exact(tmp_path: Path, kind: str, dtype: torch.dtype) -> None:
    original = make_tensors(kind, dtype)
    distilled = DistilledSet({k: v.clone() for k, v in original.items()}, SPACE, kind, "test-method")
    path = distilled.save(tmp_path / "set.safetensors")
    assert path == tmp_path / "set.safetensors" and path.is_file()
    loaded = load_distilled(path)
    assert loaded.path == path
    assert loaded.target_kind == kind and loaded.method == "test-method"
    assert loaded.pixel_space == SPACE
    assert set(loaded.tensors) == set(original)
    for name, tensor in original.items():
        assert loaded.tensors[name].dtype == tensor.dtype, name
        assert torch.equal(loaded.tensors[name], tensor), name
    images, targets = loaded.materialize()
    assert images.dtype == torch.float32
    assert torch.equal(images, original["images"].float())
    if kind == "representation":
        assert targets.dtype == torch.float32 and torch.equal(targets, original["targets"].float())
    elif kind == "hard-label":
        assert targets.dtype == torch.int64 and torch.equal(targets, original["labels"])
    else:
        assert targets.dtype == torch.float32 and torch.equal(targets, original["labels"].float())
    assert loaded.num_images == M and loaded.image_shape == (C, H, H)


@pytest.mark.parametrize(("kind", "dtype"), CASES, ids=IDS)
def test_byte_count_is_the_stored_tensor_bytes(tmp_path: Path, kind: str, dtype: torch.dtype) -> None:
    distilled = make_set(kind, dtype)
    by_hand = BYTES[(kind, dtype)]
    summed = sum(t.numel() * t.element_size() for t in make_tensors(kind, dtype).values())
    assert summed == by_hand
    assert distilled.byte_count == by_hand
    path = distilled.save(tmp_path / "d")
    assert path == tmp_path / "d" / DISTILLED_FILE
    assert payload_bytes(path) == by_hand
    assert read_metadata(path)["byte_count"] == by_hand
    loaded = load_distilled(tmp_path / "d")  # a folder holding distilled.safetensors
    assert loaded.byte_count == by_hand


def test_saved_metadata_describes_the_set(tmp_path: Path) -> None:
    path = make_set("soft-label", note="hello").save(tmp_path / "s.safetensors")
    meta = read_metadata(path)
    assert meta["kind"] == "distilled" and meta["format_version"] == 1
    assert meta["method"] == "test-method" and meta["target_kind"] == "soft-label"
    assert meta["num_images"] == M and meta["image_shape"] == [C, H, H]
    assert meta["pixel_space"]["mean"] == [0.5, 0.4, 0.3] and meta["pixel_space"]["std"] == [0.2, 0.25, 0.3]
    assert meta["tensors"] == {"images": {"dtype": "float32", "shape": [M, C, H, H]},
                               "labels": {"dtype": "float32", "shape": [M, 10]}}
    assert meta["note"] == "hello"  # user metadata is kept


def test_learned_lr_is_a_stored_scalar_counted_in_the_bytes(tmp_path: Path) -> None:
    assert make_set().learned_lr is None
    tensors = {**make_tensors("representation"), "learned_lr": torch.tensor(0.0375)}
    distilled = DistilledSet(tensors, SPACE, "representation", "test-method")
    assert distilled.byte_count == BYTES[("representation", torch.float32)] + 4
    loaded = load_distilled(distilled.save(tmp_path / "lr.safetensors"))
    assert loaded.learned_lr == pytest.approx(0.0375)
    assert isinstance(loaded.learned_lr, float)
    assert load_distilled(make_set().save(tmp_path / "plain.safetensors")).learned_lr is None


# ---- the byte budget ----------------------------------------------------------------------------------------


def test_images_for_budget_hand_computed() -> None:
    # 3 x 32 x 32 images with 512-d targets, float32: (3072 + 512) * 4 = 14336 bytes per pair.
    pair = 14336
    assert images_for_budget(10 * pair, (3, 32, 32), 512) == 10
    assert images_for_budget(10 * pair - 1, (3, 32, 32), 512) == 9
    assert images_for_budget(10 * pair + pair - 1, (3, 32, 32), 512) == 10
    assert images_for_budget(pair - 1, (3, 32, 32), 512) == 0
    assert images_for_budget(0, (3, 32, 32), 512) == 0
    # half-precision storage: twice as many pairs
    assert images_for_budget(10 * pair, (3, 32, 32), 512, bytes_per_value=2) == 20
    # 1 x 28 x 28 with 128-d targets: (784 + 128) * 4 = 3648 bytes per pair
    assert images_for_budget(3 * 3648 + 100, (1, 28, 28), 128) == 3
    # hard labels stored as no target vector
    assert images_for_budget(12288 * 7, (3, 32, 32), 0) == 7


def test_a_set_exactly_fills_its_own_budget() -> None:
    distilled = make_set("representation")
    assert images_for_budget(distilled.byte_count, distilled.image_shape, 16) == M
    assert images_for_budget(distilled.byte_count - 1, distilled.image_shape, 16) == M - 1


# ---- clear errors for bad sets and files --------------------------------------------------------------------


def error_text(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    assert isinstance(excinfo.value, ArtefactError), type(excinfo.value)
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    return make_set("representation").save(tmp_path / "good.safetensors")


def resave(path: Path, tensors: dict[str, torch.Tensor], **meta_changes: object) -> Path:
    """Rewrite ``path`` with ``tensors`` and the original metadata changed by ``meta_changes``."""
    meta = read_metadata(path)
    meta.update(meta_changes)
    save_tensors(path, tensors, meta)
    return path


def test_teacher_artefact_is_not_a_distilled_set(tmp_path: Path) -> None:
    backbone = create_model("convnet", in_channels=3, image_size=8, widths=[4], norm="batch")
    path = tmp_path / "teacher.safetensors"
    save_teacher(path, backbone, SPACE, {})
    with pytest.raises(ArtefactError) as excinfo:
        load_distilled(path)
    error_text(excinfo, str(path), "teacher", "distilled")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArtefactError) as excinfo:
        load_distilled(tmp_path / "nope.safetensors")
    error_text(excinfo, "nope.safetensors", "does not exist")


def test_missing_images(good_file: Path) -> None:
    tensors = make_tensors("representation")
    resave(good_file, {"targets": tensors["targets"]})
    with pytest.raises(ArtefactError) as excinfo:
        load_distilled(good_file)
    error_text(excinfo, "images")
    with pytest.raises(ArtefactError) as excinfo:
        DistilledSet({"targets": tensors["targets"]}, SPACE, "representation", "m")
    error_text(excinfo, "images")


def test_targets_count_mismatch(good_file: Path) -> None:
    tensors = make_tensors("representation")
    tensors["targets"] = tensors["targets"][:3]
    resave(good_file, tensors)
    with pytest.raises(ArtefactError) as excinfo:
        load_distilled(good_file)
    error_text(excinfo, "5 images", "3 targets")


def test_representation_set_without_targets(good_file: Path) -> None:
    tensors = make_tensors("representation")
    resave(good_file, {"images": tensors["images"], "labels": torch.zeros(M, dtype=torch.int64)})
    with pytest.raises(ArtefactError) as excinfo:
        load_distilled(good_file)
    error_text(excinfo, "targets")


@pytest.mark.parametrize(("kind", "labels"), [
    ("hard-label", torch.zeros(M, dtype=torch.float32)),
    ("hard-label", torch.zeros(M, dtype=torch.int32)),
    ("hard-label", torch.zeros(M, 1, dtype=torch.int64)),
    ("soft-label", torch.zeros(M, 10, dtype=torch.int64)),
    ("soft-label", torch.zeros(M, dtype=torch.float32)),
], ids=["hard-float", "hard-int32", "hard-2d", "soft-int64", "soft-1d"])
def test_labels_of_the_wrong_dtype_or_shape(good_file: Path, kind: str, labels: torch.Tensor) -> None:
    images = make_tensors("representation")["images"]
    resave(good_file, {"images": images, "labels": labels}, target_kind=kind)
    with pytest.raises(ArtefactError) as excinfo:
        load_distilled(good_file)
    error_text(excinfo, "labels", str(labels.dtype).removeprefix("torch."))
    with pytest.raises(ArtefactError):
        DistilledSet({"images": images, "labels": labels}, SPACE, kind, "m")


@pytest.mark.parametrize("where", ["images", "targets"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_values(good_file: Path, where: str, value: float) -> None:
    tensors = make_tensors("representation")
    tensors[where].view(-1)[7] = value
    resave(good_file, tensors)
    with pytest.raises(ArtefactError) as excinfo:
        load_distilled(good_file)
    error_text(excinfo, where, "NaN or infinite")


def test_byte_count_in_metadata_must_agree(good_file: Path) -> None:
    actual = make_set().byte_count
    resave(good_file, make_tensors("representation"), byte_count=actual + 4)
    with pytest.raises(ArtefactError) as excinfo:
        load_distilled(good_file)
    error_text(excinfo, str(actual), str(actual + 4))


def test_unknown_tensor_name(good_file: Path) -> None:
    tensors = make_tensors("representation")
    tensors["extra_stuff"] = torch.zeros(2)
    resave(good_file, tensors)
    with pytest.raises(ArtefactError) as excinfo:
        load_distilled(good_file)
    error_text(excinfo, "extra_stuff")


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_wrong_format_version(good_file: Path, version: object) -> None:
    resave(good_file, make_tensors("representation"), format_version=version)
    with pytest.raises(ArtefactError) as excinfo:
        load_distilled(good_file)
    error_text(excinfo, "format version", repr(version))


@pytest.mark.parametrize("key", ["method", "target_kind", "pixel_space", "byte_count"])
def test_missing_metadata_key(good_file: Path, key: str) -> None:
    meta = read_metadata(good_file)
    del meta[key]
    save_tensors(good_file, make_tensors("representation"), meta)
    with pytest.raises(ArtefactError) as excinfo:
        load_distilled(good_file)
    error_text(excinfo, key)


def test_unknown_target_kind_and_channel_mismatch(good_file: Path) -> None:
    resave(good_file, make_tensors("representation"), target_kind="pixels")
    with pytest.raises(ArtefactError) as excinfo:
        load_distilled(good_file)
    error_text(excinfo, "pixels", "representation")
    with pytest.raises(ArtefactError) as excinfo:
        DistilledSet(make_tensors("representation"), PixelSpace((0.5,), (0.2,)), "representation", "m")
    error_text(excinfo, "3 channels", "1")


def test_integer_images_are_refused() -> None:
    tensors = make_tensors("representation")
    tensors["images"] = (tensors["images"] * 10).to(torch.uint8)
    with pytest.raises(ArtefactError) as excinfo:
        DistilledSet(tensors, SPACE, "representation", "m")
    error_text(excinfo, "images", "uint8")


def test_corrupt_file_is_an_ssdd_error(good_file: Path) -> None:
    data = good_file.read_bytes()
    good_file.write_bytes(data[: len(data) - 100])  # truncated tensor data
    with pytest.raises(SsddError):
        load_distilled(good_file)


@pytest.mark.parametrize("modified", [False, True], ids=["intact", "modified"])
def test_a_set_whose_fingerprint_was_deleted_is_refused(good_file: Path, modified: bool) -> None:
    """Every set ssdd writes records its fingerprint, so deleting it must not switch the integrity check off."""
    tensors = make_tensors("representation")
    if modified:
        tensors["images"] = tensors["images"] + 1
    meta = read_metadata(good_file)
    del meta["fingerprint"]
    save_tensors(good_file, tensors, meta)
    with pytest.raises(ArtefactError, match=r"has no fingerprint: not written by ssdd or edited; ") as excinfo:
        load_distilled(good_file)
    error_text(excinfo, str(good_file))


@pytest.mark.parametrize("fingerprint", ["0" * 16, 7, None, ["x"]])
def test_a_wrong_fingerprint_is_refused(good_file: Path, fingerprint: object) -> None:
    resave(good_file, make_tensors("representation"), fingerprint=fingerprint)
    with pytest.raises(ArtefactError, match="do not match the recorded fingerprint"):
        load_distilled(good_file)


def test_a_labelled_set_says_how_a_student_trains_on_it() -> None:
    hard = DistilledSet({"images": randn(3, 3, 4, 4), "labels": torch.tensor([0, 4, 2])}, SPACE, "hard-label", "m")
    assert (hard.label_loss, hard.temperature, hard.num_classes) == ("ce", None, 5)  # the largest label + 1
    recorded = DistilledSet(dict(hard.tensors), SPACE, "hard-label", "m", {"num_classes": 10})
    assert recorded.num_classes == 10
    soft = DistilledSet({"images": randn(3, 3, 4, 4), "labels": randn(3, 7)}, SPACE, "soft-label", "m",
                        {"temperature": 2.5})
    assert (soft.label_loss, soft.temperature, soft.num_classes) == ("kl", 2.5, 7)
    vectors = DistilledSet(dict(soft.tensors), SPACE, "soft-label", "m", {"label_loss": "mse"})
    assert vectors.label_loss == "mse"


def test_an_unknown_label_loss_is_refused_on_load(tmp_path: Path) -> None:
    path = DistilledSet({"images": randn(3, 3, 4, 4), "labels": randn(3, 7)}, SPACE, "soft-label", "m",
                        {"label_loss": "hinge"}).save(tmp_path / "set.safetensors")
    with pytest.raises(ArtefactError) as info:
        load_distilled(path)
    assert str(info.value) == f"{path}: metadata 'label_loss' must be one of ce, kl, mse, got 'hinge'"


RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def test_the_committed_sets_load_unchanged() -> None:
    paths = sorted(RESULTS.rglob(DISTILLED_FILE))
    assert paths, f"no committed sets under {RESULTS}"
    for path in paths:
        distilled = load_distilled(path)
        images, targets = distilled.materialize()
        assert images.shape[0] == targets.shape[0] == read_metadata(path)["num_images"]
        assert torch.equal(images, distilled.tensors["images"].float())  # stored plainly: made as they are stored


def test_every_encoding_owns_its_tensors_and_makes_its_part() -> None:
    coefficients, bases = randn(M, 2, seed=4), randn(2, C, H, H, seed=5)
    images = DistilledSet({"image_coefficients": coefficients, "image_bases": bases, "targets": randn(M, 6, seed=6)},
                          SPACE, "representation", "m")
    assert images.encoding("images") is ENCODINGS.get("image-bases")
    torch.testing.assert_close(images.images, (coefficients @ bases.flatten(1)).view(M, C, H, H))
    identity, shift = randn(M, 6, seed=7), randn(M, 6, seed=8)
    views = DistilledSet({"images": randn(M, C, H, H), "target_coefficients": torch.eye(M)[:, :4],
                          "target_bases": identity[:4], "view_targets.hflip": identity + shift}, SPACE,
                         "representation", "m", {"views": ["identity", "hflip"]})
    assert [views.encoding(p, "hflip") for p in ("images", "targets", "view")] == [
        ENCODINGS.get("images"), ENCODINGS.get("target-bases"), ENCODINGS.get("view-targets")]
    _, targets = views.materialize()
    torch.testing.assert_close(targets[:4], identity[:4])
    torch.testing.assert_close(targets[M:], identity + shift)
    assert {e.part for e in ENCODINGS.values()} == {"images", "targets", "view"}


@pytest.mark.parametrize(("tensors", "message"), [
    ({"targets": randn(M, 6)}, "holds no images: store 'images' or image coefficients/bases"),
    ({"image_coefficients": randn(M, 2), "targets": randn(M, 6)},
     "holds image coefficients/bases without 'image_bases'"),
    ({"images": randn(M, C, H, H)}, "target kind 'representation' needs targets: store 'targets' or target "
                                    "coefficients/bases"),
    ({"images": randn(M, C, H, H), "targets": randn(M, 6), "target_bases": randn(2, 6)},
     "holds both 'targets' and target coefficients/bases; store one or the other"),
])
def test_a_set_missing_or_doubling_a_part_is_refused_naming_the_encodings(tensors: dict, message: str) -> None:
    with pytest.raises(ArtefactError) as info:
        DistilledSet(tensors, SPACE, "representation", "m")
    assert str(info.value) == f"distilled set: {message}"
