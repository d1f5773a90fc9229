"""Label controls for recovered (SC-DD / SRe2L) sets: the same images with hard labels (the class each image was
recovered for) and with the stored soft labels read at another temperature. This is the diagnosis in
docs/results/cifar10-ipc-cpu.md; evaluate the written sets with the suite's own protocol:

    python benchmarks/recovered_label_controls.py runs/bench/cifar10-ipc-cpu/sets/scdd \
        runs/bench/cifar10-ipc-cpu/sets/sre2l --out runs/ipc-controls --temperature 4
    ssdd evaluate scdd-hard=runs/ipc-controls/scdd-hard ... \
        --config runs/bench/cifar10-ipc-cpu/evaluations/supervised/config.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ssdd.distilled import DistilledSet, load_distilled
from ssdd.errors import ConfigError

# written again by DistilledSet.save for the new tensors
DERIVED = ("created", "fingerprint", "byte_count", "tensors", "num_images")


def label_controls(recovered: DistilledSet, temperature: float) -> tuple[DistilledSet, DistilledSet]:
    """The set with hard labels (the recovery's class order: index-major, every class once per index) and the set
    with its soft labels to be read at ``temperature``."""
    if recovered.target_kind != "soft-label" or "num_classes" not in recovered.metadata:
        raise ConfigError(f"{recovered.path} is not a recovered set with soft labels (method {recovered.method})")
    metadata = {k: v for k, v in recovered.metadata.items() if k not in DERIVED}
    classes = torch.arange(recovered.num_images) % int(metadata["num_classes"])
    agree = int((recovered.tensors["labels"].float().argmax(1) == classes).sum())
    print(f"{recovered.path}: the squeeze model gives {agree} of {recovered.num_images} images the class they were "
          "recovered for")
    hard = DistilledSet({"images": recovered.tensors["images"], "labels": classes}, recovered.pixel_space,
                        "hard-label", recovered.method, {k: v for k, v in metadata.items() if k != "temperature"})
    soft = DistilledSet(dict(recovered.tensors), recovered.pixel_space, "soft-label", recovered.method,
                        {**metadata, "temperature": temperature})
    return hard, soft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+", help="run folders (or .safetensors files) of recovered sets")
    parser.add_argument("--out", required=True, help="folder for <name>-hard/ and <name>-t<T>/")
    parser.add_argument("--temperature", type=float, default=4.0)
    args = parser.parse_args()
    for path in args.sets:
        hard, soft = label_controls(load_distilled(path), args.temperature)
        name = Path(path).stem if path.endswith(".safetensors") else Path(path).name
        for suffix, distilled in (("hard", hard), (f"t{args.temperature:g}", soft)):
            folder = Path(args.out) / f"{name}-{suffix}"
            folder.mkdir(parents=True, exist_ok=True)
            print(f"wrote {distilled.save(folder)}")


if __name__ == "__main__":
    main()
