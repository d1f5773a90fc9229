"""Seconds per KRR-ST outer step and peak memory: ssdd's step against a straightforward version of the same step.

The straightforward step is what a direct transcription of the paper does: the teacher is run on every augmented
real batch, the synthetic and real images go through the pool network in one forward pass (so the real features
carry autograd state), K_ts is formed explicitly and (K_ss + lambda I) is inverted explicitly, all in float32.
ssdd's step reads the teacher's features of cached crop+flip copies, computes real features without autograd,
solves by Cholesky, and runs the networks under bf16 autocast where the CPU has native bf16.

The floor (:func:`floor_step`) is the work a step cannot avoid, run on ssdd's method object: the gap between it and
ssdd's step is what the step adds (the kernel, the solve, the optimiser).

Each variant runs in its own process (so peak memory is its own); all use the same preset, data and seed.

    python benchmarks/krr_st_step.py --teacher runs/teacher-cifar10-cpu --steps 10
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def naive_step(method, step: int) -> float:  # noqa: ANN001 - a KRRST instance
    """One outer step written directly from the paper (see the module docstring)."""
    from ssdd.data.augment import random_crop_flip
    from ssdd.methods.kernel_ridge.krr import with_bias_column

    s = method.settings
    ctx = method.context
    member = int(torch.randint(0, s.pool.size, (1,), generator=method.generator))
    method.pool.reinitialise_if_due(member)
    network = method.pool.models[member].eval()
    images = method.real.images
    idx = torch.randint(0, images.shape[0], (s.real_batch,), generator=method.generator)
    real = random_crop_flip(images[idx].float().div(255.0), method.generator)
    real = ctx.teacher.pixel_space.normalize(real)
    with torch.no_grad():
        real_targets = ctx.teacher(real)
    syn_images, syn_targets = method.learned["images"], method.learned["targets"]
    features = network.features(torch.cat([syn_images, real]))
    fs = with_bias_column(features[: syn_images.shape[0]])
    ft = with_bias_column(features[syn_images.shape[0]:])
    k_ss = fs @ fs.T
    k_ts = ft @ fs.T
    lam = s.ridge * torch.trace(k_ss).detach()
    inverse = torch.linalg.inv(k_ss + lam * torch.eye(k_ss.shape[0]))
    loss = F.mse_loss(k_ts @ inverse @ syn_targets, real_targets)
    method.set_learning_rates(step)
    method.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.optimizer.step()
    method.pool.train_online(member, syn_images.detach(), syn_targets.detach())
    return loss.item()


def floor_step(method, step: int) -> None:  # noqa: ANN001 - a KRRST instance
    """The work an outer step cannot avoid, in plain PyTorch: the pool member's forward of the synthetic images and
    its input-only backward, the real batch's forward without autograd, and the member's online SGD step (no kernel,
    no solve, no optimiser step)."""
    from ssdd.device import autocast

    s = method.settings
    member = int(torch.randint(0, s.pool.size, (1,), generator=method.generator))
    network = method.pool.models[member].eval()
    syn_images, syn_targets = method.inner_set(method.generator)
    real_images, _ = method.real.sample(method.generator)
    with torch.no_grad(), autocast(method.context.device, s.amp):
        network.features(real_images)
    with autocast(method.context.device, s.amp):
        syn_features = network.features(syn_images)
    syn_features.float().sum().backward(inputs=list(method.learned.values()))
    with autocast(method.context.device, s.amp):
        method.pool.train_online(member, syn_images.detach(), syn_targets.detach())


STEPS = {"naive": naive_step, "floor": floor_step}


def run_variant(args: argparse.Namespace) -> dict:
    from ssdd.budget import Budget
    from ssdd.config import from_dict, preset_dict
    from ssdd.data import load_dataset
    from ssdd.methods import DistillContext
    from ssdd.methods.kernel_ridge.krr_st import KRRST, KRRSTSettings
    from ssdd.teachers import load_teacher

    torch.set_num_threads(args.threads)
    preset = preset_dict("distill", args.preset)
    settings = from_dict(KRRSTSettings, preset.get("settings", {}))
    if args.variant == "naive":  # fp32, no feature cache (the teacher runs on every batch)
        settings.amp = False
        settings.teacher_copies = 0
    teacher = load_teacher(args.teacher)
    source = load_dataset(teacher.metadata["source"]["dataset"], "train")
    context = DistillContext(source, teacher, torch.device("cpu"), 0, logging.getLogger("bench"))
    before_init = time.perf_counter()
    method = KRRST(settings, context, Budget(images=preset.get("images", 500)))
    init_seconds = time.perf_counter() - before_init
    rss_after_init = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        STEPS.get(args.variant, KRRST.step)(method, step)
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
    return {"variant": args.variant, "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "min_s": min(times), "cpu_s": statistics.median(cpu_times), "steps": args.steps,
            "init_s": round(init_seconds, 1),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_init_mib": rss_after_init / 1024,
            "num_images": method.num_images, "real_batch": settings.real_batch, "pool": settings.pool.arch,
            "pool_args": settings.pool.arch_args}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--preset", default="krr-st/cifar10-cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=("ssdd", "naive", "floor"))
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = []
    for variant in ("ssdd", "naive", "floor"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "variant" and v is not None]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    fast, naive, floor = results
    print(f"ssdd {fast['median_s']:.2f} s/step, straightforward {naive['median_s']:.2f} s/step: "
          f"{naive['median_s'] / fast['median_s']:.2f}x; floor {floor['median_s']:.2f} s/step: ssdd / floor "
          f"{fast['median_s'] / floor['median_s']:.2f}; by process CPU time (steadier on a shared machine; run with "
          f"--threads 1): straightforward / ssdd {naive['cpu_s'] / fast['cpu_s']:.2f}x, ssdd / floor "
          f"{fast['cpu_s'] / floor['cpu_s']:.2f}; peak RSS {fast['peak_rss_mib']:.0f} vs "
          f"{naive['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
