"""Seconds per outer step and peak memory of one distillation method built from a preset (KRR-ST, PAA, ...).

The method is built as ``ssdd distill`` builds it (the preset's settings and budget, the teacher's source data or
``--dataset``), then ``--warmup`` steps run untimed and ``--steps`` timed; one JSON line is printed. On CUDA the
peak is ``torch.cuda.max_memory_allocated`` over the timed steps' process (setup included), on the CPU the peak RSS.

    python benchmarks/method_step.py --preset krr-st/cifar100-gpu --dataset cifar10 --teacher T --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import time

import torch


def main() -> None:
    from ssdd.budget import Budget
    from ssdd.config import from_dict, preset_dict
    from ssdd.data import load_dataset
    from ssdd.device import precision, resolve_device
    from ssdd.methods import METHODS, DistillContext
    from ssdd.teachers import load_teacher

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, help="a distill preset, e.g. krr-st/cifar100-gpu")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--dataset", help="source dataset (default: the preset's, else the teacher's)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except Exception as exc:  # noqa: BLE001 - say why and stop, without a traceback
        sys.exit(f"method_step: {exc}")
    preset = preset_dict("distill", args.preset)
    method_cls = METHODS.get(preset["method"])
    settings = from_dict(method_cls.settings_class, preset.get("settings", {}))
    teacher = load_teacher(args.teacher, device=device)
    source = load_dataset(args.dataset or preset.get("dataset") or teacher.metadata["source"]["dataset"], "train")
    budget = Budget(preset.get("images"), preset.get("bytes"), preset.get("storage_dtype", "float32"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    method = method_cls(settings, DistillContext(source, teacher, device, 0, logging.getLogger("bench"),
                                                 progress=False), budget)
    setup_s = time.perf_counter() - started
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        method.step(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    print(json.dumps({"preset": args.preset, "dataset": source.name, "device": str(device),
                      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "precision": precision(), "setup_s": round(setup_s, 1), "steps": args.steps,
                      "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
                      "peak_mib": round(peak, 1)}))


if __name__ == "__main__":
    main()
