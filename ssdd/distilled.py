"""The DistilledSet artefact: what a distillation method (or a baseline) produces and every protocol consumes.

A set is stored as one safetensors file: tensors plus JSON metadata under the ``ssdd`` header key.  The stored
tensors (every name a set may hold) are, for M stored images:

* images, either ``images`` (M, C, H, W) in the set's pixel space, or ``image_coefficients`` (M, U) times
  ``image_bases`` (U, C, h, w); bases at a lower resolution than the set's ``image_shape`` are upsampled
  (bilinear) after they are combined;
* targets, by ``target_kind``: ``targets`` (M, d) representations, or ``target_coefficients`` (M, V) times
  ``target_bases`` (V, d); or ``labels``: (M,) int64 hard labels or (M, K) soft labels / teacher logits;
* predefined views (metadata ``views``, the first one ``identity``): every other view's targets are either stored
  as ``view_targets.<view>`` (M, d) or predicted by an approximation network ``approx.<view>.{hidden,out}.
  {weight,bias}`` (a 2-layer ReLU MLP that maps the identity target to the view's shift from it);
* ``learned_lr``: a 0-d learning rate learned with the set (used by the ``linear`` protocol's pre-training).

:meth:`DistilledSet.materialize` returns plain ``(images, targets)`` tensors whatever is stored (every view of
every image, view-major), and :attr:`DistilledSet.byte_count` is the exact number of bytes of the stored tensors,
the budget every comparison is made at.

Each way of storing a part (the images, the representation targets, one view's targets) is an :class:`Encoding`
registered in ``ENCODINGS``: the tensors it owns, their check and the plain tensor they make.
"""

from __future__ import annotations

import abc
import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ssdd.data.augment import PREDEFINED_VIEWS, apply_view
from ssdd.data.dataset import fingerprint_state
from ssdd.data.transforms import PixelSpace
from ssdd.errors import ArtefactError, ShapeError, SsddError
from ssdd.io import MAX_IMAGE_SIDE, load_artefact, save_tensors
from ssdd.registry import Registry

FORMAT_VERSION = 1
DISTILLED_FILE = "distilled.safetensors"
TARGET_KINDS = ("representation", "hard-label", "soft-label")
LABEL_LOSSES = ("ce", "kl", "mse")  # what a labelled set may record as its ``label_loss`` (training.LOSSES)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
APPROX_PARAMS = ("hidden.weight", "hidden.bias", "out.weight", "out.bias")
OTHER_TENSORS = ("labels", "learned_lr")  # the tensors no encoding owns


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# Metadata read after loading (the evaluation reads the last three), with what each must be when present.
METADATA_TYPES = {
    "method": (lambda v: isinstance(v, str), "a string"),
    "image_shape": (lambda v: isinstance(v, list), "a list"),
    "views": (lambda v: isinstance(v, list), "a list"),
    "num_classes": (lambda v: _positive(v) and isinstance(v, int), "a positive integer"),
    "temperature": (_positive, "a positive number"),
    "label_loss": (lambda v: v in LABEL_LOSSES, f"one of {', '.join(LABEL_LOSSES)}"),
}


def approximate_shift(identity_targets: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The approximation network's prediction of a view's target shift: out(relu(hidden(y)))."""
    hidden = F.relu(F.linear(identity_targets, weights["hidden.weight"], weights["hidden.bias"]))
    return F.linear(hidden, weights["out.weight"], weights["out.bias"])


def combine_bases(coefficients: torch.Tensor, bases: torch.Tensor,
                  image_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``coefficients @ bases`` over the bases' trailing dimensions; image bases are upsampled to ``image_shape``."""
    combined = (coefficients.float() @ bases.float().flatten(1)).view(coefficients.shape[0], *bases.shape[1:])
    if image_shape is not None and tuple(combined.shape[-2:]) != tuple(image_shape[-2:]):
        combined = F.interpolate(combined, size=tuple(image_shape[-2:]), mode="bilinear", align_corners=False)
    return combined


Fail = Callable[[str], ArtefactError]  # the error factory of DistilledSet.validate (its message prefixed with the set)


class Encoding(abc.ABC):
    """One way a set stores one of its parts: ``images``, ``targets`` (representations) or ``view`` (one predefined
    view's targets).  ``owns(view)`` names its tensors; ``check`` validates them (returning the images' shape, the
    targets' dimension, or None) and ``make`` gives the plain tensor: images, targets or the view's targets."""

    part: str
    summary: str  # the encoding in words, for messages ("{view}" stands for the view)

    @abc.abstractmethod
    def owns(self, view: str = "") -> tuple[str, ...]:
        """See the class docstring."""

    @abc.abstractmethod
    def check(self, distilled: DistilledSet, fail: Fail, m: int, dim: int, view: str) -> Any:
        """See the class docstring."""

    @abc.abstractmethod
    def make(self, distilled: DistilledSet, identity: torch.Tensor | None, view: str) -> torch.Tensor:
        """See the class docstring."""


ENCODINGS: Registry[Encoding] = Registry("set encoding")


class PlainImages(Encoding):
    part, summary = "images", "'images'"

    def owns(self, view: str = "") -> tuple[str, ...]:
        return ("images",)

    def check(self, distilled: DistilledSet, fail: Fail, m: int, dim: int, view: str) -> tuple[int, ...]:
        images = distilled.tensors["images"]
        if images.dim() != 4:
            raise fail(f"'images' must be a float (M, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        return tuple(images.shape[1:])

    def make(self, distilled: DistilledSet, identity: torch.Tensor | None, view: str) -> torch.Tensor:
        return distilled.tensors["images"].float()


class ImageBases(Encoding):
    """``image_coefficients`` (M, U) times ``image_bases`` (U, C, h, w), upsampled to the set's ``image_shape``."""

    part, summary = "images", "image coefficients/bases"

    def owns(self, view: str = "") -> tuple[str, ...]:
        return ("image_coefficients", "image_bases")

    def check(self, distilled: DistilledSet, fail: Fail, m: int, dim: int, view: str) -> tuple[int, ...]:
        coef, bases = distilled.tensors["image_coefficients"], distilled.tensors["image_bases"]
        if coef.dim() != 2 or bases.dim() != 4 or coef.shape[1] != bases.shape[0]:
            raise fail(f"image coefficients (M, U) {tuple(coef.shape)} do not fit image bases (U, C, h, w) "
                       f"{tuple(bases.shape)}")
        shape = distilled.image_shape
        if len(shape) != 3 or shape[0] != bases.shape[1] or shape[1] < bases.shape[2] or shape[2] < bases.shape[3]:
            raise fail(f"image_shape {list(shape)} does not fit image bases {tuple(bases.shape)}")
        return shape

    def make(self, distilled: DistilledSet, identity: torch.Tensor | None, view: str) -> torch.Tensor:
        t = distilled.tensors
        return combine_bases(t["image_coefficients"], t["image_bases"], distilled.image_shape)


class PlainTargets(Encoding):
    part, summary = "targets", "'targets'"

    def owns(self, view: str = "") -> tuple[str, ...]:
        return ("targets",)

    def check(self, distilled: DistilledSet, fail: Fail, m: int, dim: int, view: str) -> int:
        targets = distilled.tensors["targets"]
        if targets.dim() != 2:
            raise fail(f"targets must be a float (M, d) tensor, got {tuple(targets.shape)}")
        if targets.shape[0] != m:
            raise fail(f"{m} images but {targets.shape[0]} targets")
        return int(targets.shape[1])

    def make(self, distilled: DistilledSet, identity: torch.Tensor | None, view: str) -> torch.Tensor:
        return distilled.tensors["targets"].float()


class TargetBases(Encoding):
    """``target_coefficients`` (M, V) times ``target_bases`` (V, d)."""

    part, summary = "targets", "target coefficients/bases"

    def owns(self, view: str = "") -> tuple[str, ...]:
        return ("target_coefficients", "target_bases")

    def check(self, distilled: DistilledSet, fail: Fail, m: int, dim: int, view: str) -> int:
        coef, bases = distilled.tensors["target_coefficients"], distilled.tensors["target_bases"]
        if coef.dim() != 2 or bases.dim() != 2 or coef.shape != (m, bases.shape[0]):
            raise fail(f"target coefficients {tuple(coef.shape)} do not fit {m} images and target bases "
                       f"{tuple(bases.shape)}")
        return int(bases.shape[1])

    def make(self, distilled: DistilledSet, identity: torch.Tensor | None, view: str) -> torch.Tensor:
        return combine_bases(distilled.tensors["target_coefficients"], distilled.tensors["target_bases"])


class StoredViewTargets(Encoding):
    part, summary = "view", "'view_targets.{view}'"

    def owns(self, view: str = "") -> tuple[str, ...]:
        return (f"view_targets.{view}",)

    def check(self, distilled: DistilledSet, fail: Fail, m: int, dim: int, view: str) -> None:
        stored = distilled.tensors[f"view_targets.{view}"]
        if tuple(stored.shape) != (m, dim):
            raise fail(f"'view_targets.{view}' must have shape ({m}, {dim}), got {tuple(stored.shape)}")

    def make(self, distilled: DistilledSet, identity: torch.Tensor | None, view: str) -> torch.Tensor:
        return distilled.tensors[f"view_targets.{view}"].float()


class ApproximatedViewTargets(Encoding):
    """A 2-layer ReLU MLP ``approx.<view>.*`` that maps the identity target to the view's shift from it."""

    part, summary = "view", "approximation weights 'approx.{view}.*'"

    def owns(self, view: str = "") -> tuple[str, ...]:
        return tuple(f"approx.{view}.{p}" for p in APPROX_PARAMS)

    def check(self, distilled: DistilledSet, fail: Fail, m: int, dim: int, view: str) -> None:
        approx = distilled.approximation_weights(view)
        if set(approx) != set(APPROX_PARAMS):
            raise fail(f"approximation network of view {view!r} needs {', '.join(APPROX_PARAMS)}")
        hidden = approx["hidden.weight"].shape
        expected = {"hidden.weight": (hidden[0], dim), "hidden.bias": (hidden[0],), "out.weight": (dim, hidden[0]),
                    "out.bias": (dim,)}
        for name, shape in expected.items():
            if tuple(approx[name].shape) != shape:
                raise fail(f"'approx.{view}.{name}' must have shape {shape}, got {tuple(approx[name].shape)}")

    def make(self, distilled: DistilledSet, identity: torch.Tensor | None, view: str) -> torch.Tensor:
        weights = {k: v.float() for k, v in distilled.approximation_weights(view).items()}
        return identity + approximate_shift(identity, weights)


for _name, _encoding in (("images", PlainImages()), ("image-bases", ImageBases()), ("targets", PlainTargets()),
                         ("target-bases", TargetBases()), ("view-targets", StoredViewTargets()),
                         ("view-approximation", ApproximatedViewTargets())):
    ENCODINGS.add(_name, _encoding)


def encodings_of(part: str) -> list[Encoding]:
    """The registered encodings of ``part`` (images, targets, view), in registration order."""
    return [e for e in ENCODINGS.values() if e.part == part]


@dataclass
class DistilledSet:
    """Synthetic (or selected real) images with their targets, a pixel space, and provenance metadata.

    ``views`` and ``image_shape`` live in ``metadata`` (``image_shape`` is needed only when image bases are stored
    at a lower resolution than the images they make).
    """

    tensors: dict[str, torch.Tensor]
    pixel_space: PixelSpace
    target_kind: str
    method: str
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def views(self) -> list[str]:
        return list(self.metadata.get("views") or ["identity"])

    def encoding(self, part: str, view: str = "") -> Encoding | None:
        """The encoding of ``part`` (images, targets, view) whose tensors the set holds (the first, when it holds the
        tensors of several, which :meth:`validate` refuses); None when it holds none."""
        return next((e for e in encodings_of(part) if any(n in self.tensors for n in e.owns(view))), None)

    @property
    def parameterized(self) -> bool:
        """Whether images are stored as coefficients times bases."""
        return "images" not in self.tensors

    @property
    def num_images(self) -> int:
        """Stored images M (each materialises into one image per view)."""
        stored = self.tensors.get("images", self.tensors.get("image_coefficients"))
        return int(stored.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if "images" in self.tensors:
            return tuple(self.tensors["images"].shape[1:])  # type: ignore[return-value]
        shape = self.metadata.get("image_shape") or self.tensors["image_bases"].shape[1:]
        return tuple(int(s) for s in shape)  # type: ignore[return-value]

    @property
    def images(self) -> torch.Tensor:
        """The identity view of every stored image (float32, pixel space)."""
        return self.encoding("images").make(self, None, "")

    @property
    def byte_count(self) -> int:
        """Exact bytes of every stored tensor (the storage budget the set uses)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def learned_lr(self) -> float | None:
        value = self.tensors.get("learned_lr")
        return None if value is None else float(value)

    @property
    def num_classes(self) -> int:
        """Classes of a labelled set: the soft labels' width, else as recorded, else the largest hard label + 1."""
        labels = self.tensors["labels"]
        if self.target_kind == "soft-label":
            return int(labels.shape[1])
        return int(self.metadata.get("num_classes") or int(labels.max()) + 1)

    @property
    def temperature(self) -> float | None:
        """The soft labels' temperature the set records (None: the protocol's)."""
        value = self.metadata.get("temperature")
        return None if value is None else float(value)

    @property
    def label_loss(self) -> str:
        """The loss a student trains on a labelled set's labels with: the set's recorded ``label_loss`` (FRePo's
        label vectors: ``mse``), else ``ce`` on hard labels and ``kl`` on soft labels."""
        return self.metadata.get("label_loss") or ("ce" if self.target_kind == "hard-label" else "kl")

    def approximation_weights(self, view: str) -> dict[str, torch.Tensor] | None:
        prefix = f"approx.{view}."
        found = {name[len(prefix):]: t for name, t in self.tensors.items() if name.startswith(prefix)}
        return found or None

    def validate(self) -> None:
        """Check that the tensors fit together and with the declared kinds; raise a clear error otherwise."""
        where = f"distilled set {self.path}" if self.path else "distilled set"

        def fail(message: str) -> ArtefactError:
            return ArtefactError(f"{where}: {message}")

        if self.target_kind not in TARGET_KINDS:
            raise fail(f"unknown target kind {self.target_kind!r}; expected one of {', '.join(TARGET_KINDS)}")
        t = self.tensors
        views = self.views
        if views[0] != "identity" or len(set(views)) != len(views) or not set(views) <= set(PREDEFINED_VIEWS):
            raise fail(f"views must start with 'identity' and name distinct views of "
                       f"{', '.join(PREDEFINED_VIEWS)}; got {views}")
        allowed = set(OTHER_TENSORS) | {n for e in ENCODINGS.values() if e.part != "view" for n in e.owns()} | {
            n for e in encodings_of("view") for v in views[1:] for n in e.owns(v)}
        unknown = sorted(set(t) - allowed)
        if unknown:
            raise fail(f"unexpected tensors {', '.join(unknown)}")
        for name, tensor in t.items():
            if name != "labels" and tensor.dtype not in FLOAT_DTYPES:
                raise fail(f"{name!r} must be a float tensor, got {tensor.dtype}")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise fail(f"tensor {name!r} contains NaN or infinite values")
        m = self._check_images(fail)
        c, h, w = self.image_shape
        if h != w and {"rot90", "rot270"} & set(views):
            raise fail(f"views rot90/rot270 need square images, got {h}x{w}")
        self._check_targets(fail, m)
        if "learned_lr" in t and (t["learned_lr"].dim() != 0 or float(t["learned_lr"]) <= 0):
            raise fail(f"'learned_lr' must be a positive scalar, got shape {tuple(t['learned_lr'].shape)}")

    def _one(self, part: str, fail: Fail, view: str = "") -> Encoding:
        """The one encoding of ``part`` the set holds, refused when it holds several or none."""
        held = [e for e in encodings_of(part) if any(n in self.tensors for n in e.owns(view))]
        words = [e.summary.format(view=view) for e in encodings_of(part)]
        if part == "view" and len(held) != 1:
            raise fail(f"view {view!r} needs either {' or '.join(words)}, not {'both' if held else 'neither'}")
        if len(held) > 1:
            raise fail(f"holds both {held[0].summary} and {held[1].summary}; store one or the other")
        if not held:
            subject = "holds no images" if part == "images" else f"target kind {self.target_kind!r} needs targets"
            raise fail(f"{subject}: store {' or '.join(words)}")
        missing = [n for n in held[0].owns(view) if n not in self.tensors]
        if missing and part != "view":
            raise fail(f"holds {held[0].summary} without {', '.join(repr(n) for n in missing)}")
        return held[0]

    def _check_images(self, fail: Fail) -> int:
        shape = self._one("images", fail).check(self, fail, 0, 0, "")
        channels = len(self.pixel_space.mean)
        if shape[0] != channels:
            raise fail(f"images have {shape[0]} channels but the pixel space has {channels}")
        return self.num_images

    def _check_targets(self, fail: Fail, m: int) -> None:
        t = self.tensors
        if self.target_kind != "representation":
            labels = t.get("labels")
            if labels is None:
                raise fail(f"target kind {self.target_kind!r} needs a 'labels' tensor")
            if labels.shape[0] != m:
                raise fail(f"{m} images but {labels.shape[0]} labels")
            if self.target_kind == "hard-label" and (labels.dim() != 1 or labels.dtype != torch.int64):
                raise fail(f"hard labels must be an int64 (M,) tensor, got {labels.dtype} {tuple(labels.shape)}")
            if self.target_kind == "soft-label" and (labels.dim() != 2 or labels.dtype not in FLOAT_DTYPES):
                raise fail(f"labels must be a float (M, d) tensor, got {labels.dtype} {tuple(labels.shape)}")
            if len(self.views) > 1:
                raise fail("predefined views are defined for representation targets only")
            return
        if "labels" in t:
            raise fail("a representation set stores 'targets', not 'labels'")
        dim = self._one("targets", fail).check(self, fail, m, 0, "")
        for view in self.views[1:]:
            self._one("view", fail, view).check(self, fail, m, dim, view)

    def identity_targets(self) -> torch.Tensor:
        """Targets (or labels) of the identity view of every stored image."""
        if self.target_kind == "hard-label":
            return self.tensors["labels"]
        if self.target_kind == "soft-label":
            return self.tensors["labels"].float()
        return self.encoding("targets").make(self, None, "")

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain ``(images, targets)``: float32 images in the set's pixel space and their targets or labels, one
        block of M per view (view-major), whatever encodings are stored."""
        images = self.images
        targets = self.identity_targets()
        if len(self.views) == 1:
            return images, targets
        image_blocks, target_blocks = [images], [targets]
        for view in self.views[1:]:
            image_blocks.append(apply_view(images, view))
            target_blocks.append(self.encoding("view", view).make(self, targets, view))
        return torch.cat(image_blocks), torch.cat(target_blocks)

    def save(self, path: str | Path) -> Path:
        """Write the set to ``path`` (a ``.safetensors`` file, or a folder to hold ``distilled.safetensors``)."""
        from ssdd.version import __version__

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / DISTILLED_FILE
        meta = {
            **self.metadata,
            "format_version": FORMAT_VERSION,
            "kind": "distilled",
            "method": self.method,
            "target_kind": self.target_kind,
            "pixel_space": self.pixel_space.to_dict(),
            "image_shape": list(self.image_shape),
            "views": self.views,
            "num_images": self.num_images,
            "byte_count": self.byte_count,
            "fingerprint": fingerprint_state(self.tensors),
            "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                        for k, v in self.tensors.items()},
            "ssdd_version": __version__,
            "created": (self.metadata.get("created")
                        or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")),
        }
        save_tensors(path, {k: v.contiguous() for k, v in self.tensors.items()}, meta)
        self.metadata = meta
        self.path = path
        return path


def load_distilled(path: str | Path) -> DistilledSet:
    """Load and validate a distilled set (a file, or a folder holding ``distilled.safetensors``); its tensors must
    match the fingerprint its metadata records, so a set without one (edited, or not from ssdd) is refused."""
    path, tensors, meta = load_artefact(path, "distilled", DISTILLED_FILE,
                                        ("method", "target_kind", "pixel_space", "byte_count"), FORMAT_VERSION)
    try:
        pixel_space = PixelSpace.from_dict(meta["pixel_space"])
    except ShapeError as exc:
        raise ArtefactError(f"{path}: {exc}") from None
    for key, (valid, what) in METADATA_TYPES.items():
        if key in meta and not valid(meta[key]):
            raise ArtefactError(f"{path}: metadata {key!r} must be {what}, got {meta[key]!r:.60}")
    empty = sorted(name for name, tensor in tensors.items() if tensor.numel() == 0)
    if empty:
        raise ArtefactError(f"{path}: tensors {', '.join(empty)} are empty; a saved set holds at least one image")
    try:
        distilled = DistilledSet(tensors, pixel_space, meta["target_kind"], meta["method"], meta, path=path)
    except SsddError as exc:
        raise ArtefactError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise ArtefactError(f"{path}: malformed metadata ({exc})") from None
    if max(distilled.image_shape[1:]) > MAX_IMAGE_SIDE:  # before anything upsamples bases to that size
        raise ArtefactError(f"{path}: images of {'x'.join(map(str, distilled.image_shape[1:]))} pixels are larger than "
                            f"the {MAX_IMAGE_SIDE} px ssdd reads")
    if distilled.byte_count != meta["byte_count"]:
        raise ArtefactError(f"{path}: stored tensors hold {distilled.byte_count} bytes but the metadata says "
                            f"{meta['byte_count']}")
    if "fingerprint" not in meta:  # every set ssdd writes records one (the sets shipped in docs/results too)
        raise ArtefactError(f"{path} has no fingerprint: not written by ssdd or edited; use the file ssdd wrote, "
                            "or make the set again")
    if fingerprint_state(tensors) != meta["fingerprint"]:
        raise ArtefactError(f"{path}: tensors do not match the recorded fingerprint; the file was modified or damaged")
    return distilled
