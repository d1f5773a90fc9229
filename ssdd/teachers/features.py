"""The teacher-feature cache: a teacher's features of a dataset are computed once and stored beside it (or, when the
teacher's folder is read-only, in the user's cache folder).

Features are deterministic given the teacher, the images and the view specification, so they are keyed by
teacher fingerprint + dataset fingerprint + views and reused by every method and evaluation.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ssdd.data.augment import SSLViews, apply_crop_flip, apply_view, crop_flip_params
from ssdd.data.cache import PART_BYTES, cache_dir
from ssdd.data.dataset import ImageDataset
from ssdd.data.mapped import map_tensors, read_range, write_streamed
from ssdd.device import make_generator
from ssdd.errors import ArtefactError
from ssdd.io import load_tensors, save_tensors, writable
from ssdd.probes import extract_features
from ssdd.progress import progress_bar
from ssdd.resources import ensure_fits
from ssdd.teachers.artefact import Teacher
from ssdd.teachers.reference import shipped_folder

FEATURES_DIR = "features"
log = logging.getLogger(__name__)


def _encoding_name(bf16: bool, channels_last: bool) -> str:
    return f"{'bf16' if bf16 else 'float32'}{'+channels_last' if channels_last else ''}"


def _views_key(views: Sequence[str] | None, augmented: int, seed: int, crop_flip: int = 0,
               encoding: tuple[bool, bool] = (False, False)) -> str:
    spec = f"views={','.join(views) if views is not None else '-'};augmented={augmented};seed={seed}"
    if crop_flip:
        spec += f";crop_flip={crop_flip}"
    if any(encoding):  # float32 in the contiguous format keeps the key it had before the encoding was recorded
        spec += f";encoding={_encoding_name(*encoding)}"
    return hashlib.sha1(spec.encode()).hexdigest()[:12]


def crop_flip_copies(num_images: int, copies: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed crop+flip parameters of ``copies`` augmented copies of a dataset (see :func:`teacher_features`)."""
    gen = make_generator(seed)
    return [crop_flip_params(num_images, gen) for _ in range(copies)]


def feature_cache_path(teacher: Teacher, dataset: ImageDataset, views: Sequence[str] | None,
                       augmented: int = 0, seed: int = 0, crop_flip: int = 0,
                       encoding: tuple[bool, bool] = (False, False)) -> Path | None:
    """Where the features of ``dataset`` under ``views``, computed with ``encoding`` ((bf16, channels_last), see
    :meth:`Teacher.encoding`), are cached (None for a teacher not loaded from a file)."""
    return derived_cache_path(teacher, dataset, _views_key(views, augmented, seed, crop_flip, encoding))


def read_cached(path: Path | None, name: str, teacher: Teacher, dataset: ImageDataset) -> torch.Tensor | None:
    """Tensor ``name`` cached at ``path`` for ``teacher`` and ``dataset``; None when absent, made for another
    teacher or dataset, or unreadable (then recomputed, with a warning)."""
    if path is None or not path.exists():
        return None
    try:
        tensors, meta = load_tensors(path)
        if meta.get("teacher") == teacher.fingerprint and meta.get("dataset") == dataset.fingerprint:
            return tensors[name]
    except (ArtefactError, KeyError):
        log.warning("cache %s is unreadable; recomputing", path)
    return None


def write_cached(path: Path | None, name: str, tensor: torch.Tensor, teacher: Teacher, dataset: ImageDataset,
                 info: dict) -> None:
    """Cache ``tensor`` as ``name`` at ``path`` (nothing when None), recording the teacher, dataset and ``info``."""
    if path is not None:
        save_tensors(path, {name: tensor}, {**info, "teacher": teacher.fingerprint, "dataset": dataset.fingerprint})


def derived_cache_path(teacher: Teacher, dataset: ImageDataset, key: str, prefix: str = "") -> Path | None:
    """Where something computed deterministically from ``teacher`` and ``dataset`` (told apart by ``key``, a hash
    of how it was computed) is cached: the teacher's feature folder; when that folder is read-only and does not hold
    it, or the teacher is one ssdd ships, ``features/<teacher fingerprint>/`` in the cache folder
    (:func:`ssdd.data.cache.cache_dir`). None for a teacher not loaded from a file."""
    if teacher.path is None:
        return None
    name = f"{prefix}{dataset.name.replace(':', '_').replace('/', '_')}-{dataset.split}-{dataset.fingerprint}-{key}"
    beside = teacher.path.parent / FEATURES_DIR / f"{name}.safetensors"
    if teacher.path.parent != shipped_folder() and (beside.exists() or writable(beside.parent)):
        return beside
    return cache_dir() / FEATURES_DIR / teacher.fingerprint / f"{name}.safetensors"


def teacher_features(
    teacher: Teacher,
    dataset: ImageDataset,
    views: Sequence[str] | None = None,
    augmented: int = 0,
    seed: int = 0,
    crop_flip: int = 0,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Teacher features of every image of ``dataset`` (converted to the teacher's input shape).

    * ``views=None, augmented=0``: (N, d) features of the plain images.
    * ``views=("identity", "rot90", ...)``: (V, N, d), one block per predefined view.
    * ``augmented=k``: (k, N, d) features of k random SSL views per image, drawn from a generator seeded
      with ``seed`` (combined with ``views`` the result is (V + k, N, d)).
    * ``crop_flip=k``: (k, N, d) features of k fixed crop+flip copies, whose parameters are
      ``crop_flip_copies(N, k, seed)`` (so a method can rebuild any copied image); stacked after the others.

    The teacher runs in its own precision and memory format (``SSDD_TEACHER_PRECISION``, see
    :func:`ssdd.teachers.artefact.teacher_precision`), which the cache key records; the features are float32.
    A pass that computes them shows a progress bar in images/s when ``teacher.progress`` is set.  The features of a
    memory-mapped dataset of the teacher's input shape (all but ``augmented`` views) are streamed to their cache file
    and returned memory-mapped (see :func:`mapped_features`).
    """
    device = device or next(teacher.backbone.parameters()).device
    encoding = teacher.encoding(device)
    path = feature_cache_path(teacher, dataset, views, augmented, seed, crop_flip, encoding) if use_cache else None
    if dataset.mapped and path is not None and not augmented and dataset.image_shape == teacher.input_shape:
        return mapped_features(teacher, dataset, path, list(views or ()), crop_flip, seed, batch_size, device,
                               encoding)
    cached = read_cached(path, "features", teacher, dataset)
    if cached is not None:
        return cached
    copies = max(1, len(views or ()) + augmented + crop_flip)
    ensure_fits(2 * copies * len(dataset) * teacher.feature_dim * 4,  # the blocks and their stacked copy
                f"{copies} x {len(dataset)} teacher features of dimension {teacher.feature_dim}", "cpu",
                "use fewer source images (source_images), views or copies")
    c, h, _ = teacher.input_shape
    images = dataset.converted(channels=c, size=h).images
    blocks = []
    started = time.perf_counter()
    bar = progress_bar(total=copies * len(dataset), desc=f"teacher features ({_encoding_name(*encoding)})", unit="img",
                       disable=not teacher.progress, leave=False, dynamic_ncols=True, smoothing=0)  # rate: whole pass
    with bar, teacher.encoder(device) as encode:
        for view in views or ():
            rotated = apply_view(images, view)
            blocks.append(extract_features(encode, rotated, teacher.pixel_space, batch_size, device, bar))
        if augmented:
            augment = SSLViews()
            gen = make_generator(seed)
            for _ in range(augmented):
                out = []
                for start in range(0, images.shape[0], batch_size):
                    x = augment(images[start : start + batch_size].float().div(255.0), gen)
                    out.append(extract_features(encode, x, teacher.pixel_space, batch_size, device, bar))
                blocks.append(torch.cat(out))
        for shifts, flips in crop_flip_copies(len(dataset), crop_flip, seed):
            out = []
            for start in range(0, images.shape[0], batch_size):
                part = slice(start, start + batch_size)
                x = apply_crop_flip(images[part].float().div(255.0), shifts[part], flips[part])
                out.append(extract_features(encode, x, teacher.pixel_space, batch_size, device, bar))
            blocks.append(torch.cat(out))
        if not blocks:
            blocks.append(extract_features(encode, images, teacher.pixel_space, batch_size, device, bar))
    rate = copies * len(dataset) / (time.perf_counter() - started)
    log.info("teacher features of %d images x %d computed at %.0f images/s (%s)", len(dataset), copies, rate,
             _encoding_name(*encoding))
    features = blocks[0] if not (views or augmented or crop_flip) else torch.stack(blocks)
    write_cached(path, "features", features, teacher, dataset,
                 {"kind": "teacher-features", "views": list(views or []), "augmented": augmented, "seed": seed,
                  "crop_flip": crop_flip, "encoding": _encoding_name(*encoding)})
    return features


def mapped_features(teacher: Teacher, dataset: ImageDataset, path: Path, views: list[str], crop_flip: int, seed: int,
                    batch_size: int, device: torch.device | str, encoding: tuple[bool, bool]) -> torch.Tensor:
    """:func:`teacher_features` of ``dataset`` (plain, or its ``views`` then its ``crop_flip`` copies, stacked) in the
    cache file ``path``, read through a memory map; computed first when absent, a part of rows at a time written as
    computed (a killed pass continues at its first unwritten part), in the same batches as in memory, so memory never
    holds them all and the values are the in-memory pass's."""
    meta = {"kind": "teacher-features", "views": views, "augmented": 0, "seed": seed, "crop_flip": crop_flip,
            "encoding": _encoding_name(*encoding), "teacher": teacher.fingerprint, "dataset": dataset.fingerprint}
    count, dim = len(dataset), teacher.feature_dim
    copies = crop_flip_copies(count, crop_flip, seed)
    blocks = [lambda x, part, view=view: apply_view(x, view) for view in views] + [
        lambda x, part, shifts=shifts, flips=flips: apply_crop_flip(x.float().div(255.0), shifts[part], flips[part])
        for shifts, flips in copies] or [lambda x, part: x]
    stacked = (len(blocks), count, dim) if views or crop_flip else (count, dim)
    if path.exists():
        try:
            tensors, stored = map_tensors(path)
            if stored.get("teacher") == teacher.fingerprint and stored.get("dataset") == dataset.fingerprint:
                return tensors["features"].view(stacked)
        except (ArtefactError, KeyError, RuntimeError):
            pass
        log.warning("cache %s is unreadable or of another teacher; recomputing", path)
        path.unlink()
    rows = max(batch_size, PART_BYTES // (4 * dim) // batch_size * batch_size)
    with teacher.encoder(device) as encode:
        def produce(start: int, stop: int) -> torch.Tensor:
            block, first = divmod(start, count)
            out = []
            for at in range(first, first + stop - start, batch_size):  # the in-memory pass's batches
                part = slice(at, min(at + batch_size, first + stop - start))
                x = blocks[block](read_range(dataset.images, part.start, part.stop), part)
                out.append(extract_features(encode, x, teacher.pixel_space, batch_size, device))
            return torch.cat(out)

        write_streamed(path, {}, "features", (len(blocks) * count, dim), torch.float32, rows, produce, meta,
                       lambda digests: meta, f"teacher features ({_encoding_name(*encoding)})", teacher.progress,
                       block_rows=count)
    return map_tensors(path)[0]["features"].view(stacked)
