"""Relabelling, as the released SRe2L and SC-DD code does it, for sets that name their squeeze model.

The decoupled methods (SRe2L, SC-DD) store the squeeze model's logits of their recovered images and name the squeeze
model itself (``squeeze_model`` in the set's metadata: its file beside the set and its fingerprint).  Under the
``supervised`` protocol such a set trains its student in one of two ways (:class:`RelabelSettings`):

* ``on-the-fly`` (the released code, the default): every batch is cropped and flipped, mixed (mixup, alpha 0.8), and
  labelled by the squeeze model *as the student sees it*; the loss is KL at the set's temperature **without** the
  T^2 factor, the optimiser AdamW (lr 1e-3, weight decay 0.01 on every parameter).  The squeeze model stays in
  train mode, as the released scripts leave it (its BatchNorm layers normalise with each batch's statistics); a
  copy is used, so the file is never changed.  The squeeze model's bytes are not the set's (as in the papers).
* ``stored``: the stored logits of the un-augmented images (counted in the set's bytes), with the protocol's own
  training settings (``supervised``) and KL scaled by T^2.  Soft-label sets that name no squeeze model always
  train this way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ssdd.distilled import DistilledSet
from ssdd.errors import ArtefactError, ConfigError
from ssdd.teachers.artefact import load_network
from ssdd.training import TrainSettings

RELABEL_MODES = ("on-the-fly", "stored")


@dataclass
class RelabelTraining(TrainSettings):
    """On-the-fly relabelling's training; the defaults are the released CIFAR recipe (``relabel_cifar.py``,
    ``post_cifar100.py``): AdamW lr 1e-3 with weight decay 0.01 on every parameter, cosine, batch 128, crop + flip,
    mixup 0.8, KL without T^2, 400 epochs."""

    epochs: int = 400
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 128
    augment: str = "crop-flip"
    mixup: float = 0.8
    optimizer: str = "adamw"
    decay_1d: bool = True
    kl_t_squared: bool = False


@dataclass
class RelabelSettings:
    """How a set that names its squeeze model gets its soft labels under the ``supervised`` protocol."""

    mode: str = "on-the-fly"  # on-the-fly | stored (see the module docstring)
    train: RelabelTraining = field(default_factory=RelabelTraining)  # on-the-fly's training
    squeeze_train_mode: bool = True  # the squeeze model labels in train mode, as the released scripts leave it

    def __post_init__(self) -> None:
        if self.mode not in RELABEL_MODES:
            raise ConfigError(f"relabel.mode must be one of {', '.join(RELABEL_MODES)}, got {self.mode!r}")


def relabels_on_the_fly(distilled: DistilledSet, settings: RelabelSettings) -> bool:
    """Whether ``distilled`` trains with soft labels from its squeeze model on every batch: a soft-label set that
    names its squeeze model, under ``on-the-fly`` (other soft-label sets have only their stored labels)."""
    return (distilled.target_kind == "soft-label" and settings.mode == "on-the-fly"
            and "squeeze_model" in distilled.metadata)


def squeeze_labeller(distilled: DistilledSet, name: str, settings: RelabelSettings,
                     device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that labels a batch with the set's squeeze model (a copy, in train or eval mode); a clear
    error when the set names none, when its file is missing or when it is not the model the set was made with."""
    recorded = distilled.metadata.get("squeeze_model")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("file"), str) or "/" in recorded["file"]:
        raise ArtefactError(f"set {name!r}: metadata 'squeeze_model' must name a file beside the set")
    if distilled.path is None:
        raise ConfigError(f"set {name!r} relabels with its squeeze model, found beside the set's file, but it was "
                          "given in memory; evaluate it from its file, or with relabel.mode: stored")
    path = distilled.path.parent / recorded["file"]
    if not path.is_file():
        raise ConfigError(f"set {name!r} relabels with its squeeze model {path}, which does not exist; copy the "
                          "run folder whole, or evaluate with relabel.mode: stored")
    model, _, meta, _ = load_network(path, "squeeze", recorded["file"])
    if meta["fingerprint"] != recorded.get("fingerprint"):
        raise ArtefactError(f"{path} is not the squeeze model set {name!r} was made with (fingerprint "
                            f"{meta['fingerprint']}, the set records {recorded.get('fingerprint')})")
    model = copy.deepcopy(model).to(device).requires_grad_(False).train(settings.squeeze_train_mode)

    @torch.no_grad()
    def label(x: torch.Tensor) -> torch.Tensor:
        return model(x).float()

    return label
