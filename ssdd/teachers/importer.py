"""Import a self-supervised network trained elsewhere (torchvision, timm, solo-learn, KRR-ST / MKDT, Mix-BT,
lightly, or a plain state dict of a zoo model) as an ordinary ssdd teacher artefact.

The file is read safely (:mod:`ssdd.teachers.foreign`), its backbone brought to canonical names
(:mod:`ssdd.teachers.layouts`), and every tensor of the ssdd backbone must be matched by name and shape: a tensor
of the file's backbone with no place in the model is an error, a missing one too unless ``allow_missing`` (then
it keeps its random initialisation, and the artefact says which). The artefact records the source format, the
file's SHA-256, the mapping's coverage, the pixel space and the post-import check (:mod:`ssdd.teachers.check`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssdd.data import load_dataset
from ssdd.data.dataset import ImageDataset
from ssdd.data.transforms import PixelSpace
from ssdd.device import resolve_device
from ssdd.errors import ArtefactError, ConfigError, RunFolderError
from ssdd.io import make_folder
from ssdd.models import Backbone, create_model
from ssdd.teachers.artefact import TEACHER_FILE, Teacher, save_teacher
from ssdd.teachers.check import check_teacher
from ssdd.teachers.foreign import read_weights
from ssdd.teachers.layouts import (
    CIFAR_STEM,
    FORMATS,
    PIXEL_SPACE,
    RESNET_FORMATS,
    ZOO_RESNETS,
    Layout,
    detect_format,
    read_layout,
    resnet_shape,
    to_canonical,
    to_ssdd,
)

IMAGENET = PixelSpace((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PIXEL_SPACES = ("imagenet", "dataset")
COUNTER = "num_batches_tracked"  # BatchNorm's step counter: no effect on features, filled with 0 when absent


@dataclass
class _Model:
    """The ssdd model a file is loaded into, and how its names relate to the file's canonical ones."""

    backbone: Backbone
    resnet: bool

    def canonical(self, name: str) -> str:
        return to_canonical(name) if self.resnet else name

    def own(self, name: str) -> str:
        return to_ssdd(name) if self.resnet else name


def _build(format: str, layout: Layout, file: str, arch: str | None, stem: str | None, image_size: int | None,
           arch_args: dict[str, Any]) -> _Model:
    """The zoo model for the file: a ResNet's architecture, width, input channels and stem are read from the
    weights unless given; a ``state-dict`` needs ``arch`` (and the options it was built with)."""
    if format not in RESNET_FORMATS:
        if arch is None:
            raise ConfigError(f"format state-dict needs --arch: the zoo model whose names {file} uses")
        if stem is not None:
            raise ConfigError("format state-dict takes the stem among the model's options: --arch-args '{stem: ...}'")
        model = create_model(arch, 0, 3, image_size or 32, **arch_args)
        first = next((k for k, v in model.state_dict().items() if v.dim() == 4), None)  # the input layer
        given = layout.tensors.get(first or "")
        if given is not None and given.dim() == 4 and given.shape[1] != 3:
            model = create_model(arch, 0, int(given.shape[1]), image_size or 32, **arch_args)
        return _Model(model, False)
    shape = resnet_shape(layout.tensors, file)
    described = f"{'bottleneck' if shape.bottleneck else 'basic'} blocks {'-'.join(map(str, shape.blocks))}"
    if shape.arch is None:
        zoo = ", ".join(sorted(ZOO_RESNETS.values()))
        raise ArtefactError(f"{file} holds a ResNet of {described}, which the zoo does not have ({zoo})")
    if arch is not None and arch != shape.arch:
        raise ArtefactError(f"{file} holds a {shape.arch} ({described}), not a {arch}; leave out --arch or give "
                            f"--arch {shape.arch}")
    stem = stem or ("imagenet" if shape.kernel == 7 else CIFAR_STEM[format])
    options: dict[str, Any] = {**({"width": shape.width} if shape.width != 64 else {}),
                               **({"stem": stem} if stem != "cifar" else {}),
                               **({"stem_relu": False} if not layout.stem_relu else {}), **arch_args}
    size = image_size or (224 if stem == "imagenet" else 32)
    return _Model(create_model(shape.arch, 0, shape.in_channels, size, **options), True)


def _match(model: _Model, layout: Layout, file: str, allow_missing: bool) -> dict[str, Any]:
    """Load the file's tensors into the model, every one matched by name and shape; returns the coverage."""
    expected = {model.canonical(k): v for k, v in model.backbone.state_dict().items()}
    given = layout.tensors
    name = model.backbone.spec["name"] if model.backbone.spec else "the model"
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (", ..." if len(unexpected) > 3 else "")
        raise ArtefactError(f"{file}: {len(unexpected)} tensor(s) of its backbone have no place in {name} "
                            f"({shown}); is it another architecture (--arch) or format (--format)?")
    for key in sorted(set(given) & set(expected)):
        if given[key].shape != expected[key].shape:
            hint = " (the stem: --stem imagenet is 7x7, the cifar stems 3x3)" if key == "conv1.weight" else ""
            raise ArtefactError(f"{file}: {key} has shape {tuple(given[key].shape)}, {name} expects "
                                f"{tuple(expected[key].shape)}{hint}")
    missing = sorted(k for k in set(expected) - set(given) if not k.endswith(COUNTER))
    if missing and not allow_missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ArtefactError(f"{file}: {len(missing)} tensor(s) of {name} are missing ({shown}); --allow-missing "
                            "keeps their random initialisation")
    state = model.backbone.state_dict()
    for key, value in given.items():
        state[model.own(key)] = value.to(state[model.own(key)].dtype)
    model.backbone.load_state_dict(state)
    counted = [k for k in expected if not k.endswith(COUNTER)]
    return {"matched": len(counted) - len(missing), "expected": len(counted),
            "fraction": round((len(counted) - len(missing)) / max(len(counted), 1), 6),
            "missing": missing, "allow_missing": allow_missing, "dropped": layout.dropped,
            "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in given.values()})}


def _pixel_space(choice: str | PixelSpace, train: ImageDataset | None, in_channels: int) -> tuple[PixelSpace, str]:
    """The pixel space and how it was chosen."""
    if isinstance(choice, PixelSpace):
        space, how = choice, "given"
    elif choice == "imagenet":
        space, how = IMAGENET, "imagenet"
    elif choice == "dataset" and train is not None:
        space, how = PixelSpace.of(train.images), f"dataset {train.name} (train split statistics)"
    else:
        raise ConfigError(f"unknown pixel space {choice!r}; use one of {', '.join(PIXEL_SPACES)} or a mean and std")
    if len(space.mean) != in_channels:
        raise ConfigError(f"the pixel space has {len(space.mean)} channel(s) but the teacher takes {in_channels}")
    return space, how


def import_teacher(file: str | Path, out: str | Path, format: str = "auto", arch: str | None = None,
                   stem: str | None = None, pixel_space: str | PixelSpace | None = None,
                   image_size: int | None = None, arch_args: dict[str, Any] | None = None,
                   dataset: str = "cifar10", data_root: str | None = None, check: bool = True,
                   check_images: int = 2000, allow_missing: bool = False, overwrite: bool = False,
                   device: str = "auto") -> Path:
    """Import the network in ``file`` as ``out/teacher.safetensors``, an ordinary teacher; returns its path.

    ``format`` is one of :data:`~ssdd.teachers.layouts.FORMATS` or ``auto`` (chosen from the keys). A ResNet's
    architecture, width and stem are read from the weights; ``stem`` picks between the CIFAR stems a 3x3 conv
    allows (default: the format's). ``pixel_space``: ``imagenet``, ``dataset`` (``dataset``'s train statistics)
    or a :class:`PixelSpace` (default: ImageNet for torchvision, timm, lightly and any ImageNet stem, else
    ``dataset``). ``image_size`` defaults to 224 for the ImageNet stem, else 32. ``dataset`` is recorded as the
    teacher's source and, unless ``check`` is false, the kNN check runs on ``check_images`` of its images.
    """
    file, target = Path(file), Path(out) / TEACHER_FILE
    if format != "auto" and format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}; use auto or one of {', '.join(FORMATS)}")
    if target.exists() and not overwrite:
        raise RunFolderError(f"{target} exists; give --overwrite to replace it, or another --out")
    weights = read_weights(file)
    detected = None
    if format == "auto":
        format, detected = detect_format(weights.tensors, str(file))
    layout = read_layout(format, weights.tensors, str(file))
    model = _build(format, layout, str(file), arch, stem, image_size, dict(arch_args or {}))
    coverage = _match(model, layout, str(file), allow_missing)
    backbone = model.backbone.eval()
    spec = backbone.spec or {}
    default_space = "imagenet" if spec.get("stem") == "imagenet" else PIXEL_SPACE[format]
    choice = pixel_space if pixel_space is not None else default_space
    train = load_dataset(dataset, "train", root=data_root) if check or choice == "dataset" else None
    space, space_how = _pixel_space(choice, train, backbone.in_channels)
    report = None
    if train is not None and check:
        test = load_dataset(dataset, "test", root=data_root)
        teacher = Teacher(backbone.to(resolve_device(device)), space, {})
        report = check_teacher(teacher, train, test, check_images)
        backbone = backbone.cpu()
    source: dict[str, Any] = {"dataset": train.name if train is not None else dataset}
    if train is not None:
        source.update(fingerprint=train.fingerprint, images=len(train), image_shape=list(train.image_shape))
    info = {
        "imported": {"file": str(file), "sha256": weights.sha256, "format": format, "detected": detected,
                     "encoding": weights.encoding, "container": weights.container, "prefix": layout.prefix,
                     "stem_relu": layout.stem_relu, "coverage": coverage, "pixel_space": space_how,
                     "check": report},
        "source": source,
    }
    make_folder(target.parent)
    save_teacher(target, backbone, space, info)
    return target
