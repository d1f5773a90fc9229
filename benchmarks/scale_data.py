"""Peak resident memory of the data-heavy stages on a memory-mapped source of N 32 px images, for several N.

For each size, in a process of its own: a synthetic source of N class-structured 32 px RGB images is written to disk
in one streaming pass (the memory-mapped decoded form, ``ssdd.data.cache.store_mapped``), plus a 10,000-image test
split; then, each stage with its peak resident memory (``environment.PeakMemory``: VmHWM after a reset), the tiny
teacher's features of the source (streamed to their memory-mapped cache file), KRR-ST steps drawing real batches
from it, k-center and herding selections in the teacher's feature space, and the ``linear`` read-out (the teacher's
features of 2,000 labelled source images, a fraction 2,000 / N, and of the test split; full-batch L-BFGS holds the
labelled features, so a fixed fraction would grow with N by design). If the data side scales, the peaks do not grow
with N. The tiny teacher is trained once (seconds, on the in-memory synthetic set) into ``--out``.

    python benchmarks/scale_data.py --images 20000,60000,200000 --out /tmp/scale-data

Not part of the test suite; at the default sizes it takes a few minutes on 2 CPU cores and ~1 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

TEST_IMAGES = 10_000
LABELLED = 2_000  # labelled images of the linear read-out


def synthetic_images(start: int, stop: int, seed: int) -> torch.Tensor:
    """Images ``start:stop`` of the benchmark's source: image i is class i % 10's smooth pattern (the same in every
    split) plus noise that is a function of (seed, i) only, so any range is made alone, 1,024 images at a time."""
    low = torch.rand((10, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    patterns = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    out = torch.empty((stop - start, 3, 32, 32), dtype=torch.uint8)
    for first in range(start, stop, 1024):
        index = torch.arange(first, min(first + 1024, stop))
        noise = ((index[:, None] * 2654435761 + torch.arange(3 * 32 * 32) * 40503 + seed * 7919) % 65521) / 65521
        images = patterns[index % 10] * 0.8 + 0.2 * noise.float().view(-1, 3, 32, 32)
        out[first - start : first - start + index.shape[0]] = (images * 255).round().to(torch.uint8)
    return out


def resident_bytes() -> int:
    """The process's resident memory now (VmRSS)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def write_source(path: Path, count: int, seed: int, split: str) -> None:
    from ssdd.data import cache

    cache.store_mapped(path, "scale", split, f"benchmarks/scale_data.py seed {seed}", torch.arange(count) % 10,
                       [f"class{k}" for k in range(10)], (3, 32, 32), lambda a, b: synthetic_images(a, b, seed))


def teacher_path(out: Path) -> Path:
    from ssdd.config import resolve_config
    from ssdd.teachers import TeacherConfig, train_teacher

    path = out / "teacher" / "teacher.safetensors"
    if not path.exists():
        config = resolve_config(TeacherConfig, "teacher", "tiny",
                                overrides={"device": "cpu", "epochs": 1, "probe": False, "monitor_every": 0})
        train_teacher(config, out / "teacher", progress=False)
    return path


def one_size(args: argparse.Namespace) -> dict:
    from ssdd.budget import Budget
    from ssdd.config import from_dict, preset_dict
    from ssdd.data import cache
    from ssdd.environment import PeakMemory
    from ssdd.evaluation.protocols import PROTOCOLS, ProtocolSettings, ReadoutContext, Target
    from ssdd.methods import DistillContext
    from ssdd.methods.kernel_ridge.krr_st import KRRST, KRRSTSettings
    from ssdd.selection import select_herding, select_kcenter
    from ssdd.teachers import load_teacher, teacher_features

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    folder = args.out / str(args.images)
    record: dict = {"images": args.images}
    stages: dict = {}

    def stage(name: str, run):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        with PeakMemory(cpu) as peak:
            start = resident_bytes()
            result = run()
        stages[name] = {"start_mib": round(start / 2**20), "peak_mib": round(peak.bytes / 2**20),
                        "seconds": round(time.perf_counter() - started, 1)}
        return result

    teacher = load_teacher(teacher_path(args.out))
    teacher.progress = False
    stage("write source", lambda: (write_source(folder / "train.mapped.safetensors", args.images, 0, "train"),
                                   write_source(folder / "test.mapped.safetensors", TEST_IMAGES, 1, "test")))
    source = cache.load_mapped(folder / "train.mapped.safetensors")
    test = cache.load_mapped(folder / "test.mapped.safetensors")
    record["source_mib"] = round((folder / "train.mapped.safetensors").stat().st_size / 2**20)
    features = stage("teacher features", lambda: teacher_features(teacher, source, device=cpu))

    def krr_st() -> None:
        settings = from_dict(KRRSTSettings, preset_dict("distill", "krr-st/tiny")["settings"])
        settings.real_augment, settings.teacher_copies, settings.steps = "none", 0, args.steps
        context = DistillContext(source, teacher, cpu, 0, logging.getLogger("bench"), progress=False)
        method = KRRST(settings, context, Budget(images=100))
        for step in range(args.steps):
            method.step(step)

    stage(f"KRR-ST ({args.steps} steps)", krr_st)
    stage(f"k-center + herding ({args.select} each)",
          lambda: (select_kcenter(features, args.select, 0), select_herding(features, args.select)))
    fraction = min(1.0, LABELLED / args.images)  # the read-out holds its labelled images' features: as many at any N
    readout = ReadoutContext(teacher.backbone.eval(), Target("scale", source, test), teacher.pixel_space,
                             ProtocolSettings(fractions=[fraction], lbfgs_iterations=50), 0, cpu)
    record["linear_top1"] = stage("linear read-out", lambda: PROTOCOLS.get("linear")(readout))
    record["stages"] = stages
    record["peak_rss_mib"] = round(__import__("resource").getrusage(0).ru_maxrss / 1024)
    return record


def table(records: list[dict]) -> str:
    names = list(records[0]["stages"])
    lines = ["| images | source file | " + " | ".join(names) + " | process peak |",  # stage: RSS at start -> peak
             "| --- " * (len(names) + 3) + "|"]
    for r in records:
        cells = [f"{s['start_mib']:,} -> {s['peak_mib']:,} MiB ({s['seconds']} s)"
                 for s in (r["stages"][n] for n in names)]
        lines.append(f"| {r['images']:,} | {r['source_mib']:,} MiB | " + " | ".join(cells)
                     + f" | {r['peak_rss_mib']:,} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="20000,60000,200000", help="source sizes (comma list)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the sources, teacher and its features")
    parser.add_argument("--steps", type=int, default=100, help="KRR-ST steps")
    parser.add_argument("--select", type=int, default=10, help="images chosen by k-center and by herding")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sizes = [int(n) for n in args.images.split(",")]
    if len(sizes) == 1:
        args.images = sizes[0]
        print(json.dumps(one_size(args)))
        return
    records = []
    for n in sizes:  # each size in its own process, so each peak is its own
        done = subprocess.run([sys.executable, __file__, "--images", str(n), "--out", str(args.out), "--steps",
                               str(args.steps), "--select", str(args.select), "--threads", str(args.threads)],
                              check=True, capture_output=True, text=True)
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(records[-1]), flush=True)
    print(table(records))


if __name__ == "__main__":
    main()
