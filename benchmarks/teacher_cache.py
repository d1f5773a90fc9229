"""Images/s of one teacher-feature caching pass (``teacher_features``, nothing read from or written to the cache).

The teacher runs as ``SSDD_TEACHER_PRECISION`` says (auto, float32 or bf16); compare two modes side by side with
the paired runner, e.g.

    python benchmarks/paired.py --rounds 5 --names float32,auto \\
        -a 'SSDD_TEACHER_PRECISION=float32 python benchmarks/teacher_cache.py --teacher runs/teacher-cifar10-cpu' \\
        -b 'SSDD_TEACHER_PRECISION=auto python benchmarks/teacher_cache.py --teacher runs/teacher-cifar10-cpu'
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from ssdd.data import load_dataset
    from ssdd.teachers import load_teacher, teacher_features

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--images", type=int, default=5000, help="the first this many source images")
    parser.add_argument("--copies", type=int, default=4, help="crop+flip copies (as KRR-ST caches them)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher)
    source = load_dataset(teacher.metadata["source"]["dataset"], "train")
    source = source.subset(torch.arange(min(args.images, len(source))))
    started = time.perf_counter()
    features = teacher_features(teacher, source, crop_flip=args.copies, use_cache=False)
    seconds = time.perf_counter() - started
    bf16, channels_last = teacher.encoding("cpu")
    print(json.dumps({"images": features.shape[0] * features.shape[1], "seconds": round(seconds, 2),
                      "images_per_s": round(features.shape[0] * features.shape[1] / seconds, 1), "bf16": bf16,
                      "channels_last": channels_last}))


if __name__ == "__main__":
    main()
