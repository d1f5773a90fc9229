"""The in-memory dataset type every loader returns."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from ssdd.data.mapped import is_mapped, read_range, read_rows
from ssdd.data.transforms import PixelSpace, convert_images
from ssdd.errors import ShapeError
from ssdd.resources import on_device_if_it_fits


def fingerprint_tensors(*parts: torch.Tensor | str) -> str:
    """A short, stable content hash of tensors and strings (16 hex digits)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            digest.update(part.encode())
        else:
            t = part.detach().contiguous().cpu()
            digest.update(str((tuple(t.shape), str(t.dtype))).encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes of any dtype, bfloat16 too
    return digest.hexdigest()[:16]


def fingerprint_state(state: dict[str, torch.Tensor]) -> str:
    """The fingerprint of named tensors (names, shapes, dtypes and values; the order of the dict does not matter):
    what an artefact records to notice later that its tensors were modified or damaged."""
    return fingerprint_tensors(*(t for _, t in sorted(state.items())), *sorted(state))


@dataclass
class ImageDataset:
    """Images as a uint8 tensor (N, C, H, W), int64 labels (N,), class names, and a content fingerprint.

    ``fingerprint`` identifies the pixel content (not the path it came from), so caches keyed by it are shared
    across copies of the same data and invalidated by any change to it.  ``images`` is in memory, or read from the
    decoded cache's memory-mapped file (:attr:`mapped`); consumers read images through :meth:`batch` and
    :meth:`batches`, which keep a mapped source's resident memory bounded (labels are always in memory).
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    fingerprint: str = ""
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ShapeError(f"dataset {self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ShapeError(f"dataset {self.name}: {self.images.shape[0]} images but labels of shape "
                             f"{tuple(self.labels.shape)}")
        self.labels = self.labels.to(torch.int64)
        if not self.fingerprint:
            self.fingerprint = fingerprint_tensors(self.images, self.labels, "\n".join(self.classes))

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mapped(self) -> bool:
        """Whether the images are read from a memory-mapped file rather than held in memory."""
        return is_mapped(self.images)

    def batch(self, indices: torch.Tensor | list[int]) -> torch.Tensor:
        """The uint8 images at ``indices`` (a copy)."""
        return read_rows(self.images, torch.as_tensor(indices, dtype=torch.long))

    def batches(self, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Consecutive uint8 batches of the images at ``indices`` (default: every image, in order)."""
        if indices is None:
            for start in range(0, len(self), batch_size):
                yield read_range(self.images, start, start + batch_size)
        else:
            for start in range(0, indices.shape[0], batch_size):
                yield self.batch(indices[start : start + batch_size])

    def class_indices(self) -> list[torch.Tensor]:
        """The indices of each class's images (from the labels alone)."""
        return [(self.labels == c).nonzero().flatten() for c in range(self.num_classes)]

    def subset(self, indices: torch.Tensor | list[int]) -> ImageDataset:
        """The images at ``indices``, in memory (fingerprint recomputed)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return replace(self, images=self.batch(idx), labels=self.labels[idx], fingerprint="")

    def converted(self, channels: int | None = None, size: int | None = None) -> ImageDataset:
        """The same images with ``channels`` channels and ``size`` x ``size`` pixels (no-op when they match); a
        memory-mapped dataset's converted into another memory-mapped file, once."""
        channels = channels or self.image_shape[0]
        size = size or self.image_shape[1]
        if (channels, size, size) == self.image_shape:
            return self
        if self.mapped:  # converted a part at a time into a memory-mapped file beside this one
            from ssdd.data.cache import converted_mapped

            return converted_mapped(self, channels, size)
        images = convert_images(self.images, channels=channels, size=size)
        fp = fingerprint_tensors(self.fingerprint, f"converted:c{channels}:s{size}")
        return replace(self, images=images, fingerprint=fp)

    def float_images(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        return self.images.float().div_(255.0)


class NormalizedImages:
    """A dataset's images in ``pixel_space`` (at ``shape``, default the dataset's), indexed like a tensor
    (``images[indices]``, on ``device``): an in-memory dataset's held normalised (on the GPU when they fit), a
    memory-mapped one's read from its file and normalised per batch (the same values: normalising is elementwise)."""

    def __init__(self, source: ImageDataset, pixel_space: PixelSpace, device: torch.device | str,
                 shape: tuple[int, ...] | None = None):
        self.source = source.converted(*(shape[:2] if shape else ()))
        self.pixel_space, self.device = pixel_space, torch.device(device)
        self.held = None if self.source.mapped else on_device_if_it_fits(
            pixel_space.normalize(self.source.images.float().div(255.0)), self.device)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        if self.held is not None:
            return self.held[indices].to(self.device)
        batch = self.source.batch(indices.cpu()).to(self.device)
        return self.pixel_space.normalize(batch.float().div(255.0))
