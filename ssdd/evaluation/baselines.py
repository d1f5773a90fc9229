"""Baselines every self-supervised table needs, built as DistilledSets from the real source data.

* ``none``: no pre-training (handled by the evaluator: there is no set).
* ``random``, ``herding``, ``kcenter``, ``high-loss``: real images chosen at the **same byte budget** as the set
  they are compared with, stored as float32 in the teacher's pixel space, with the teacher's features as targets;
  the first three are the coreset selections of :mod:`ssdd.selection` (the ``coreset`` method's too), measured in
  the teacher's feature space.
* ``full``: every source image with its teacher features (the knowledge-distillation upper bound).
* Under the ``supervised`` protocol, ``random`` and ``herding`` are class-balanced labelled sets instead: the same
  number of real images per class (herding in teacher-feature space, per class) with their hard labels.
* ``teacher``: no set either; the protocol reads out the teacher's own frozen network (the reference that
  distilled sets approach from below; evaluated once, under the first architecture's table).
"""

from __future__ import annotations

import torch

from ssdd.budget import images_for_budget, labelled_images_per_class
from ssdd.data.dataset import ImageDataset
from ssdd.data.mapped import read_rows
from ssdd.distilled import DistilledSet
from ssdd.errors import ConfigError
from ssdd.selection import HighLossSettings, high_loss_scores, select, select_per_class, select_top_loss
from ssdd.teachers.artefact import Teacher

BASELINES = ("none", "random", "herding", "kcenter", "high-loss", "full", "teacher")
LABELLED_BASELINES = ("random", "herding")  # under the supervised protocol: class-balanced, hard labels
SETLESS = ("none", "teacher")  # baselines that are a network, not a set built from the source


def real_set(source: ImageDataset, indices: torch.Tensor, features: torch.Tensor, teacher: Teacher,
             method: str, extra: dict | None = None) -> DistilledSet:
    """A set of real source images (float32, teacher pixel space) with teacher-feature targets."""
    images = teacher.pixel_space.normalize(source.batch(indices))
    return DistilledSet(
        {"images": images.float().contiguous(), "targets": read_rows(features, indices).float().contiguous()},
        teacher.pixel_space, "representation", method,
        {"source": {"dataset": source.name, "fingerprint": source.fingerprint, "images": len(source)},
         "teacher": {"fingerprint": teacher.fingerprint, "feature_dim": teacher.feature_dim},
         "selected_indices": indices.tolist() if indices.numel() <= 100_000 else None, **(extra or {})},
    )


def make_baseline(name: str, source: ImageDataset, teacher: Teacher, features: torch.Tensor, budget_bytes: int | None,
                  seed: int, device: torch.device, high_loss: HighLossSettings | None = None) -> DistilledSet:
    """Build baseline ``name`` (not one of :data:`SETLESS`) from ``source`` with teacher ``features`` at
    ``budget_bytes``."""
    if name == "full":
        return real_set(source, torch.arange(len(source)), features, teacher, "full")
    if name not in BASELINES or name in SETLESS:
        raise ConfigError(f"unknown baseline {name!r}; use one of {', '.join(BASELINES)}")
    if budget_bytes is None:
        raise ConfigError(f"baseline {name!r} needs a byte budget: give a distilled set to compare with, "
                          "or --images / --bytes")
    n = images_for_budget(budget_bytes, source.image_shape, features.shape[1])
    if n < 1:
        raise ConfigError(f"a budget of {budget_bytes} bytes holds no image + target pair")
    n = min(n, len(source))
    if name == "high-loss":
        idx = select_top_loss(high_loss_scores(source, features, teacher, high_loss or HighLossSettings(), seed,
                                               device), n)
    else:  # the coreset selections, in the teacher's feature space
        idx = select(name, features, n, seed)
    return real_set(source, idx, features, teacher, name, {"budget_bytes": budget_bytes})


def make_labelled_baseline(name: str, source: ImageDataset, teacher: Teacher, features: torch.Tensor,
                           budget_bytes: int | None, seed: int) -> DistilledSet:
    """A class-balanced ``random`` or ``herding`` set of real images with hard labels, as many per class as
    ``budget_bytes`` holds (float32 images + int64 labels)."""
    if name not in LABELLED_BASELINES:
        raise ConfigError(f"baseline {name!r} has no labelled form; the supervised protocol takes "
                          f"{', '.join(LABELLED_BASELINES)}")
    if budget_bytes is None:
        raise ConfigError(f"baseline {name!r} needs a byte budget: give a distilled set to compare with, "
                          "or --images / --bytes")
    classes = source.num_classes
    ipc = labelled_images_per_class(budget_bytes, source.image_shape, classes)
    if ipc < 1:
        raise ConfigError(f"a budget of {budget_bytes} bytes holds fewer than one image per class ({classes} classes)")
    idx = select_per_class(source.labels, classes, ipc,
                           lambda members, k: select(name, read_rows(features, members), ipc, seed * 1000 + k),
                           source.name)
    images = teacher.pixel_space.normalize(source.batch(idx)).float().contiguous()
    return DistilledSet({"images": images, "labels": source.labels[idx].clone()}, teacher.pixel_space, "hard-label",
                        name, {"num_classes": classes, "ipc": ipc, "selected_indices": idx.tolist(),
                               "budget_bytes": budget_bytes})
