"""The teacher artefact: a frozen self-supervised encoder with its provenance, as ``teacher.safetensors``."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ssdd.data.dataset import fingerprint_state
from ssdd.data.transforms import PixelSpace
from ssdd.device import device_batches, runs_bf16
from ssdd.errors import ArtefactError, ConfigError, SsddError
from ssdd.io import MAX_IMAGE_SIDE, load_artefact, save_tensors
from ssdd.models import Backbone, create_model
from ssdd.probes import extract_features
from ssdd.teachers.reference import is_reference, reference_path

FORMAT_VERSION = 1
TEACHER_FILE = "teacher.safetensors"
TEACHER_PRECISIONS = ("auto", "float32", "bf16")
TEACHER_PRECISION_VARIABLE = "SSDD_TEACHER_PRECISION"


def teacher_precision() -> str:
    """How :meth:`Teacher.encode` and the teacher-feature cache run the teacher (``SSDD_TEACHER_PRECISION``):

    * ``auto`` (the default): the teacher's own format, as ``ssdd teacher`` trained it: channels_last when it trained
      channels_last, bf16 autocast when it trained with ``amp`` and bf16 is native here (CUDA, or a CPU with
      AVX512-BF16/AMX) and ``--precision`` is not ``float32``; float32 otherwise.
    * ``float32``: float32 in the contiguous format (the released code's way).
    * ``bf16``: bf16 autocast and channels_last everywhere (emulated, hence slow, on a CPU without native bf16).

    Each mode gives slightly different features, so the feature cache is keyed by the mode that ran.
    """
    value = os.environ.get(TEACHER_PRECISION_VARIABLE, "auto") or "auto"
    if value not in TEACHER_PRECISIONS:
        raise ConfigError(f"{TEACHER_PRECISION_VARIABLE}={value!r}: use one of {', '.join(TEACHER_PRECISIONS)}")
    return value


class Teacher(nn.Module):
    """A frozen encoder: ``teacher(x)`` maps images in :attr:`pixel_space` to ``feature_dim`` features.

    :meth:`encode` takes uint8 images (any size/channels: they are converted to the teacher's input shape),
    normalises them and returns features batch by batch without gradients.
    """

    def __init__(self, backbone: Backbone, pixel_space: PixelSpace, metadata: dict[str, Any], path: Path | None = None):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.pixel_space = pixel_space
        self.metadata = metadata
        self.path = path
        self.progress = False  # whether long encoding passes (the feature cache) show a progress bar
        self.train(False)

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.backbone.input_shape

    @property
    def fingerprint(self) -> str:
        return str(self.metadata["fingerprint"])

    def train(self, mode: bool = True) -> Teacher:  # a teacher is always in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(x)

    @torch.no_grad()
    def represent(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Features (N, d) on the CPU of float images already normalised in the teacher's pixel space (a set's)."""
        device = next(self.backbone.parameters()).device
        return torch.cat([self(batch).float().cpu() for batch in device_batches(images, batch_size, device)])

    def encoding(self, device: torch.device | str) -> tuple[bool, bool]:
        """(bf16 autocast, channels_last): how the teacher runs on ``device`` under :func:`teacher_precision`."""
        mode = teacher_precision()
        if mode != "auto":
            return mode == "bf16", mode == "bf16"
        trained = self.metadata.get("config", {})  # a teacher without it: ssdd teacher's defaults (both on)
        bf16 = runs_bf16(torch.device(device), bool(trained.get("amp", True)))
        return bf16, bool(trained.get("channels_last", True))

    @contextlib.contextmanager
    def encoder(self, device: torch.device | str) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """A function from normalised images to features, run as :meth:`encoding` says for ``device`` (the weights
        are channels_last inside the block only)."""
        bf16, channels_last = self.encoding(device)
        device = torch.device(device)
        precision = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        try:
            with precision:
                yield (lambda x: self(x.contiguous(memory_format=torch.channels_last))) if channels_last else self
        finally:
            if channels_last:
                self.backbone.to(memory_format=torch.contiguous_format)

    def encode(self, images: torch.Tensor, batch_size: int = 512, device: torch.device | str | None = None,
               bar: Any = None) -> torch.Tensor:
        """Features (N, d) on the CPU of uint8 images (N, C, H, W), run as :meth:`encoding` says (``bar``: a tqdm
        bar advanced by each batch's images)."""
        from ssdd.data.transforms import convert_images

        c, h, _ = self.input_shape
        if images.shape[1:] != (c, h, h):
            images = convert_images(images, channels=c, size=h)
        device = device or next(self.backbone.parameters()).device
        with self.encoder(device) as encode:
            return extract_features(encode, images, self.pixel_space, batch_size=batch_size, device=device, bar=bar)


def save_network(path: str | Path, backbone: Backbone, pixel_space: PixelSpace, kind: str,
                 info: dict[str, Any]) -> dict[str, Any]:
    """Write a network artefact of ``kind``: ``backbone``'s weights (head included) and metadata (``info`` +
    architecture, pixel space, fingerprint)."""
    from ssdd.version import __version__

    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "architecture": backbone.spec,
        "feature_dim": backbone.feature_dim,
        "pixel_space": pixel_space.to_dict(),
        "fingerprint": fingerprint_state(state),
        "ssdd_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **info,
    }
    save_tensors(path, state, metadata)
    return metadata


def load_network(path: str | Path, kind: str, default_file: str) -> tuple[Backbone, PixelSpace, dict[str, Any], Path]:
    """Load a network artefact of ``kind`` (a file, or a folder holding ``default_file``), checking that its weights
    match its architecture and fingerprint; returns (network, pixel space, metadata, resolved path)."""
    path, tensors, meta = load_artefact(path, kind, default_file,
                                        ("architecture", "pixel_space", "fingerprint", "feature_dim"), FORMAT_VERSION)
    arch = meta["architecture"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise ArtefactError(f"{path}: {kind} metadata 'architecture' must be a mapping with a 'name'")
    source = meta.get("source", {})
    if not isinstance(source, dict) or not all(isinstance(source[k], str) and source[k]
                                               for k in ("dataset", "fingerprint") if k in source):
        raise ArtefactError(f"{path}: {kind} metadata 'source' must map 'dataset' and 'fingerprint' to names")
    image_size = arch.get("image_size", 0)
    if isinstance(image_size, int) and image_size > MAX_IMAGE_SIDE:
        raise ArtefactError(f"{path}: {kind} architecture takes {image_size} px images; ssdd reads at most "
                            f"{MAX_IMAGE_SIDE} px")
    try:
        with torch.device("meta"):  # shapes only: a forged architecture cannot allocate more than the file holds
            expected = create_model(**arch).state_dict()
        pixel_space = PixelSpace.from_dict(meta["pixel_space"])
    except SsddError as exc:
        raise ArtefactError(f"{path}: cannot rebuild the {kind} ({exc})") from None
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise ArtefactError(
            f"{path}: weights do not match architecture {arch['name']} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})"
        )
    if fingerprint_state(tensors) != meta["fingerprint"]:
        raise ArtefactError(f"{path}: weights do not match the recorded fingerprint; the file was modified or damaged")
    backbone = create_model(**arch)
    backbone.load_state_dict(tensors)
    if backbone.feature_dim != meta["feature_dim"]:
        raise ArtefactError(f"{path}: feature_dim {meta['feature_dim']} does not match the architecture's "
                            f"{backbone.feature_dim}")
    return backbone, pixel_space, meta, path


def save_teacher(path: str | Path, backbone: Backbone, pixel_space: PixelSpace, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``backbone``'s weights and metadata (``info`` + architecture, pixel space, fingerprint) to ``path``."""
    return save_network(path, backbone, pixel_space, "teacher", info)


def load_teacher(path: str | Path, device: torch.device | str = "cpu") -> Teacher:
    """Load a teacher artefact (a file, a folder holding ``teacher.safetensors``, or ``reference:<name>``, a teacher
    shipped with ssdd: :mod:`ssdd.teachers.reference`) as a frozen :class:`Teacher`."""
    if is_reference(path):
        path = reference_path(str(path))
    backbone, pixel_space, meta, path = load_network(path, "teacher", TEACHER_FILE)
    return Teacher(backbone.to(device), pixel_space, meta, path=path)
