"""The key layouts of the libraries self-supervised teachers are trained with, and their translation to ssdd's
ResNet names.

Every ResNet layout is first brought to torchvision's names (``conv1``, ``bn1``, ``layerI.J.convK``,
``layerI.J.downsample.{0,1}``), the *canonical* names: error messages use them, since they are the names users
know. :func:`to_ssdd` and :func:`to_canonical` translate between them and ssdd's ``stem.{0,1}`` /
``stages.{I-1}.J`` / ``shortcut``. The ``state-dict`` format holds ssdd's own names for any model of the zoo.

The formats (facts of each library's files):

* ``torchvision``, ``timm``: torchvision's names at the top level, ``fc`` the classifier;
* ``krr-st``: the same names (KRR-ST / MKDT save a torchvision ResNet whose ``fc`` is an identity);
* ``solo-learn``: a Lightning checkpoint whose backbone is under ``backbone.`` (older files: ``encoder.``), next to
  ``projector.``, ``classifier.``, momentum copies...;
* ``mix-bt``: Mix-BT / Barlow-Twins-HSIC's ``Sequential`` ``f`` = (conv1, bn1, relu, layer1..4, avgpool), so
  ``f.0`` / ``f.1`` / ``f.3``..``f.6``, and the projector ``g``;
* ``lightly``: ``ResNetGenerator`` names (``shortcut`` for ``downsample``, ``linear`` the head), or its benchmarks'
  ``Sequential(*children()[:-1])`` (``0`` conv1, ``1`` bn1, ``2``..``5`` layer1..4, optionally under
  ``backbone.``), a graph without the ReLU after the stem;
* ``state-dict``: ssdd's own names (``head.`` is left out).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ssdd.errors import ArtefactError, ConfigError

FORMATS = ("torchvision", "timm", "solo-learn", "krr-st", "mix-bt", "lightly", "state-dict")
RESNET_FORMATS = FORMATS[:-1]

# The stem a 3x3 first conv gets by default (a 7x7 one is always the ImageNet stem), and the pixel space each
# format is trained in by default: "imagenet" mean/std, or "dataset" (the source dataset's own statistics).
CIFAR_STEM = {"torchvision": "cifar", "timm": "cifar", "solo-learn": "cifar-pad2", "krr-st": "cifar-pad2",
              "mix-bt": "cifar", "lightly": "cifar"}
PIXEL_SPACE = {"torchvision": "imagenet", "timm": "imagenet", "solo-learn": "dataset", "krr-st": "dataset",
               "mix-bt": "dataset", "lightly": "imagenet", "state-dict": "dataset"}

MIX_BT_INDICES = {"0": "conv1", "1": "bn1", "3": "layer1", "4": "layer2", "5": "layer3", "6": "layer4"}
LIGHTLY_INDICES = {"0": "conv1", "1": "bn1", "2": "layer1", "3": "layer2", "4": "layer3", "5": "layer4"}
BACKBONE_PREFIXES = {"solo-learn": ("backbone.", "encoder."), "lightly": ("backbone.", "")}


@dataclass
class Layout:
    """A file's backbone tensors under canonical names, what was left out, and the graph details found."""

    tensors: dict[str, torch.Tensor]
    prefix: str = ""  # where the backbone was in the file
    dropped: dict[str, int] = field(default_factory=dict)  # tensors that are not the backbone, counted by group
    stem_relu: bool = True  # False: lightly's Sequential graph


def _group(key: str) -> str:
    """``projector.0.weight`` -> ``projector``: how dropped tensors are counted."""
    return key.split(".", 1)[0]


def _count(keys: Iterable[str], prefix: str = "") -> dict[str, int]:
    return dict(sorted(Counter(prefix + _group(k) for k in keys).items()))


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _renumbered(tensors: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """``N.rest`` -> ``names[N].rest`` (an index without a name stays as it is, and is then unexpected)."""
    out = {}
    for key, value in tensors.items():
        index, _, rest = key.partition(".")
        out[f"{names[index]}.{rest}" if index in names else key] = value
    return out


def _without_head(tensors: dict[str, torch.Tensor], head: str, prefix: str = "") -> Layout:
    """The layout of a torchvision-named backbone whose classifier is ``head``."""
    backbone = {k: v for k, v in tensors.items() if not k.startswith(head + ".")}
    return Layout(backbone, prefix, _count((k for k in tensors if k.startswith(head + ".")), prefix))


def _find_prefix(tensors: dict[str, torch.Tensor], prefixes: Iterable[str], firsts: Iterable[str]) -> str | None:
    """The first of ``prefixes`` under which one of the ``firsts`` keys (a stem conv's name) exists."""
    return next((p for p in prefixes for first in firsts if p + first in tensors), None)


def read_layout(format: str, tensors: dict[str, torch.Tensor], file: str) -> Layout:
    """The backbone of ``tensors`` saved in ``format``, under canonical names (see the module docstring)."""
    if format in ("torchvision", "timm", "krr-st"):
        return _without_head(tensors, "fc")
    if format == "state-dict":
        return _without_head(tensors, "head")
    if format == "solo-learn":
        prefix = _find_prefix(tensors, BACKBONE_PREFIXES["solo-learn"], ("conv1.weight",))
        if prefix is None:
            raise ArtefactError(f"{file} is not a solo-learn checkpoint: no 'backbone.conv1.weight' nor "
                                "'encoder.conv1.weight'")
        layout = _without_head(_under(tensors, prefix), "fc", prefix)
        layout.dropped.update(_count(k for k in tensors if not k.startswith(prefix)))
        return layout
    if format == "mix-bt":
        if "f.0.weight" not in tensors:
            raise ArtefactError(f"{file} is not a Mix-BT checkpoint: no 'f.0.weight' (the stem conv)")
        return Layout(_renumbered(_under(tensors, "f."), MIX_BT_INDICES), "f.",
                      _count(k for k in tensors if not k.startswith("f.")))
    if format == "lightly":
        return _lightly(tensors, file)
    raise ConfigError(f"unknown format {format!r}; use auto or one of {', '.join(FORMATS)}")


def _lightly(tensors: dict[str, torch.Tensor], file: str) -> Layout:
    prefix = _find_prefix(tensors, BACKBONE_PREFIXES["lightly"], ("0.weight", "conv1.weight"))
    if prefix is None:
        raise ArtefactError(f"{file} is not a lightly ResNet: no 'conv1.weight', '0.weight' nor "
                            "'backbone.0.weight'")
    outside = _count(k for k in tensors if not k.startswith(prefix))
    inner = {k.replace(".shortcut.", ".downsample."): v for k, v in _under(tensors, prefix).items()}
    if prefix + "0.weight" in tensors:  # Sequential(children[:-1]): no ReLU after the stem
        return Layout(_renumbered(inner, LIGHTLY_INDICES), prefix, outside, stem_relu=False)
    layout = _without_head(inner, "linear", prefix)
    layout.dropped.update(outside)
    return layout


def detect_format(tensors: dict[str, torch.Tensor], file: str) -> tuple[str, str]:
    """The format of ``tensors`` from their names, and the reason it was chosen."""
    keys = set(tensors)
    if "f.0.weight" in keys and any(k.startswith("f.3.") for k in keys):
        return "mix-bt", "a Sequential 'f.N' backbone" + (" and a projector 'g.*'" if any(
            k.startswith("g.") for k in keys) else "")
    for prefix in ("", "backbone."):
        if prefix + "0.weight" in keys and prefix + "2.0.conv1.weight" in keys:
            return "lightly", f"lightly's Sequential(children[:-1]) backbone ('{prefix}0.weight', " \
                              f"'{prefix}2.0.conv1.weight')"
    if "conv1.weight" in keys and ("linear.weight" in keys or any(".shortcut." in k for k in keys)):
        return "lightly", "lightly ResNetGenerator names ('shortcut', 'linear')"
    for prefix in BACKBONE_PREFIXES["solo-learn"]:
        if prefix + "conv1.weight" in keys:
            return "solo-learn", f"a torchvision ResNet under '{prefix}'"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        if tensors["conv1.weight"].shape[-1] == 7:
            return "torchvision", "torchvision ResNet names with a 7x7 stem (timm's ResNets share them)"
        return "krr-st", "torchvision ResNet names with a 3x3 stem (KRR-ST / MKDT's CIFAR ResNet)"
    if any(k.startswith("stem.") or k.startswith("stages.") or k.startswith("body.") for k in keys):
        return "state-dict", "ssdd's own model names"
    shown = ", ".join(sorted(keys)[:4])
    raise ArtefactError(f"cannot tell the format of {file} from its keys ({shown}, ...); give --format "
                        f"({', '.join(FORMATS)})")


_LAYER = re.compile(r"^layer(\d+)\.(\d+)\.(.*)$")
_STAGE = re.compile(r"^stages\.(\d+)\.(\d+)\.(.*)$")
_STEM = {"conv1.": "stem.0.", "bn1.": "stem.1."}


def to_ssdd(name: str) -> str:
    """A canonical (torchvision) ResNet name as ssdd's; a name with no ssdd counterpart is returned as it is."""
    for old, new in _STEM.items():
        if name.startswith(old):
            return new + name[len(old):]
    match = _LAYER.match(name)
    if match and int(match[1]) >= 1:
        return f"stages.{int(match[1]) - 1}.{match[2]}.{match[3].replace('downsample.', 'shortcut.', 1)}"
    return name


def to_canonical(name: str) -> str:
    """ssdd's ResNet name as torchvision's (the inverse of :func:`to_ssdd`)."""
    for old, new in _STEM.items():
        if name.startswith(new):
            return old + name[len(new):]
    match = _STAGE.match(name)
    if match:
        return f"layer{int(match[1]) + 1}.{match[2]}.{match[3].replace('shortcut.', 'downsample.', 1)}"
    return name


@dataclass(frozen=True)
class ResNetShape:
    """What the canonical names and shapes of a ResNet say about it."""

    arch: str | None  # the zoo's name for its block counts, None when the zoo has none
    blocks: tuple[int, ...]
    bottleneck: bool
    width: int
    in_channels: int
    kernel: int  # the stem conv's kernel: 7 for the ImageNet stem, 3 for the CIFAR stems


ZOO_RESNETS = {((1, 1, 1, 1), False): "resnet10", ((2, 2, 2, 2), False): "resnet18",
               ((3, 4, 6, 3), True): "resnet50"}


def resnet_shape(tensors: dict[str, torch.Tensor], file: str) -> ResNetShape:
    """Block counts, block type, width, input channels and stem kernel of a canonical ResNet state."""
    stem = tensors.get("conv1.weight")
    if stem is None or stem.dim() != 4:
        raise ArtefactError(f"{file} has no ResNet stem: no 4-D 'conv1.weight' among the backbone's tensors")
    counts: dict[int, int] = {}
    for key in tensors:
        match = _LAYER.match(key)
        if match:
            counts[int(match[1])] = max(counts.get(int(match[1]), 0), int(match[2]) + 1)
    blocks = tuple(counts.get(stage, 0) for stage in range(1, max(counts, default=0) + 1))
    bottleneck = "layer1.0.conv3.weight" in tensors
    return ResNetShape(ZOO_RESNETS.get((blocks, bottleneck)), blocks, bottleneck, int(stem.shape[0]),
                       int(stem.shape[1]), int(stem.shape[-1]))
