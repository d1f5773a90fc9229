"""Safe reading of weight files made by other libraries: ``torch.save`` files through ``weights_only=True`` and
safetensors files, never a pickle that needs code to load.

:func:`read_weights` returns the file's tensors by name, taken out of the container they were saved in (a plain
state dict, a Lightning checkpoint's ``state_dict``, a ``model`` entry, a DDP ``module.`` prefix).
"""

from __future__ import annotations

import hashlib
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ssdd.errors import ArtefactError

CONTAINER_KEYS = ("state_dict", "model")  # where Lightning and plain training scripts keep the weights
DDP_PREFIX = "module."


@dataclass(frozen=True)
class ForeignWeights:
    """The tensors of a foreign file and where they were found."""

    tensors: dict[str, torch.Tensor]
    encoding: str  # "safetensors" or "torch.save"
    container: str  # e.g. "the 'state_dict' entry", "the top level"
    sha256: str


def sha256_of(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its little-endian header length, then the JSON header's ``{``."""
    with open(path, "rb") as fh:
        prefix = fh.read(9)
    if len(prefix) < 9:
        return False
    (length,) = struct.unpack("<Q", prefix[:8])
    return prefix[8:9] == b"{" and length <= path.stat().st_size - 8


def _torch_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``; a pickle that needs code is refused with one line naming what."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols; the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a file ssdd does not read
        message = str(exc)
        if "weights_only" not in message and "Weights only" not in message:
            reason = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
            raise ArtefactError(f"{path} is not a weight file torch can read ({reason})") from None
        advice = ("save the weights alone where you trust the file, e.g. torch.save(torch.load(FILE, "
                  "weights_only=False)['state_dict'], 'weights.pt')")
        named = sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))
        if named:
            raise ArtefactError(f"{path} needs code to unpickle (objects of {', '.join(named)}); ssdd loads only "
                                f"tensors and plain values: {advice}") from None
        reason = re.search(r"WeightsUnpickler error: \s*(.+?)\s*(\n|$)", message)
        raise ArtefactError(f"{path} is not a file torch's weights-only loader can read"
                            + (f" ({reason[1]})" if reason else "") + f"; if it is a checkpoint: {advice}") from None


def _tensors_in(obj: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(obj, dict) else {}


def _unwrap(path: Path, obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a loaded object, and a description of where it was."""
    if not isinstance(obj, dict):
        raise ArtefactError(f"{path} holds a {type(obj).__name__}, not a mapping of weights")
    for key in CONTAINER_KEYS:
        inner = _tensors_in(obj.get(key))
        if inner:
            return inner, f"the {key!r} entry"
    tensors = _tensors_in(obj)
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:6])) or "none"
        raise ArtefactError(f"{path} holds no weights: no tensors at its top level nor under "
                            f"{' or '.join(map(repr, CONTAINER_KEYS))} (its keys: {keys})")
    return tensors, "the top level"


def read_weights(path: str | Path) -> ForeignWeights:
    """Read the tensors of a ``torch.save`` or safetensors file safely (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if _is_safetensors(path):
        try:
            tensors, encoding, container = load_file(str(path)), "safetensors", "the top level"
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtefactError(f"{path} is a damaged safetensors file ({str(exc).splitlines()[0]})") from None
    else:
        encoding = "torch.save" + ("" if zipfile.is_zipfile(path) else " (legacy pickle)")
        tensors, container = _unwrap(path, _torch_load(path))
    if tensors and all(k.startswith(DDP_PREFIX) for k in tensors):
        tensors = {k[len(DDP_PREFIX):]: v for k, v in tensors.items()}
        container += f", {DDP_PREFIX!r} prefix removed"
    return ForeignWeights(tensors, encoding, container, sha256_of(path))
