"""Seconds and peak memory of one MKDT iteration: ssdd's against a straightforward transcription of the official one.

The official MTT / MKDT iteration keeps the student's parameters as ONE flat vector: each of ``syn_steps`` steps
runs the network with views into the latest vector, takes ``autograd.grad(loss, vector, create_graph=True)`` and
appends ``vector - syn_lr * grad``; the loss is ``mse_loss(last, target, sum) / mse_loss(start, target, sum)``
(both over the number of parameters) and one backward reaches the images, the targets and the step size.
:func:`official_iteration` writes that down (ConvNet-3, GroupNorm(C, C) as instance norm, ReLU, average pooling,
a linear head to the targets, MSE), written here from the algorithm.  ssdd's iteration is
:func:`ssdd.methods.trajectory.unroll.unrolled_sgd` + :func:`matching_loss` on the same inputs, with the settings
given.

Each variant runs in its own process, so its peak resident memory is its own; ``--rounds`` alternates them
(A B, B A, ...) and the ratio is taken per round, of wall and of process CPU time (the steadier one on a shared
machine: run it with `--threads 1`).

    python benchmarks/mkdt_step.py --rounds 3 --steps 10 --width 128 --batch 256
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def official_forward(flat: torch.Tensor, shapes: list[tuple[int, ...]], x: torch.Tensor) -> torch.Tensor:
    """ConvNet-3 with instance norm run on views into one flat parameter vector (the official ReparamModule)."""
    params, offset = [], 0
    for shape in shapes:
        size = 1
        for s in shape:
            size *= s
        params.append(flat[offset : offset + size].view(shape))
        offset += size
    *blocks, head_w, head_b = params
    for i in range(0, len(blocks), 4):
        conv_w, conv_b, norm_w, norm_b = blocks[i : i + 4]
        x = F.conv2d(x, conv_w, conv_b, padding=1)
        x = F.group_norm(x, conv_w.shape[0], norm_w, norm_b)
        x = F.avg_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), head_w, head_b)


def official_iteration(start: dict, target: dict, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                       syn_steps: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """One official iteration (see the module docstring); returns the matching loss after its backward pass."""
    shapes = [tuple(p.shape) for p in start.values()]
    starting = torch.cat([p.reshape(-1) for p in start.values()])
    target_flat = torch.cat([p.reshape(-1) for p in target.values()])
    student = [starting.clone().requires_grad_(True)]
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(images.shape[0], generator=generator), batch))
        idx = chunks.pop()
        out = official_forward(student[-1], shapes, images[idx])
        loss = F.mse_loss(out, targets[idx])
        grad = torch.autograd.grad(loss, student[-1], create_graph=True)[0]
        student.append(student[-1] - lr * grad)
    num = starting.numel()
    param_loss = F.mse_loss(student[-1], target_flat, reduction="sum") / num
    param_dist = F.mse_loss(starting, target_flat, reduction="sum") / num
    loss = param_loss / param_dist
    loss.backward()
    return loss.detach()


def run_variant(args: argparse.Namespace) -> dict:
    from ssdd.device import make_generator
    from ssdd.methods.trajectory.experts import ExpertSettings, make_network
    from ssdd.methods.trajectory.unroll import matching_loss, unrolled_sgd

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    network = make_network(ExpertSettings(arch="convnet3", arch_args={"width": args.width}), args.outputs,
                           (3, 32, 32), 0)
    start = {k: v.detach() for k, v in network.named_parameters()}
    target = {k: v + 0.01 * torch.randn_like(v) for k, v in start.items()}
    images = torch.randn(args.images, 3, 32, 32, requires_grad=True)
    targets = torch.randn(args.images, args.outputs, requires_grad=True)
    lr = torch.tensor(0.01, requires_grad=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times, losses = [], [], []
    for i in range(args.warmup + args.iterations):
        generator = make_generator(i)
        started, cpu_started = time.perf_counter(), time.process_time()
        if args.variant == "official":
            loss = official_iteration(start, target, images, targets, lr, args.steps, args.batch, generator)
        else:
            student = unrolled_sgd(network, start, images, targets, lr, args.steps, args.batch, "mse", generator,
                                   args.checkpointed, amp=args.amp)
            loss = matching_loss(student, start, target)
            loss.backward()
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
        losses.append(float(loss))
        images.grad = targets.grad = lr.grad = None
    return {"variant": args.variant, "checkpointed": args.checkpointed, "amp": args.amp,
            "median_s": statistics.median(times), "min_s": min(times), "cpu_s": statistics.median(cpu_times),
            "losses": losses,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mib": rss_before / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="unrolled steps (syn_steps)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--outputs", type=int, default=1024, help="the targets' dimension (the teacher's features)")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointed", action="store_true", help="ssdd's variant checkpoints every step")
    parser.add_argument("--amp", action="store_true", help="ssdd's variant runs bf16 autocast where bf16 is native")
    parser.add_argument("--variant", choices=("official", "ssdd"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    common = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", "checkpointed", "amp", "rounds")]
    ratios, cpu_ratios, rows = [], [], []
    for r in range(args.rounds):
        order = ("official", "ssdd") if r % 2 == 0 else ("ssdd", "official")
        result = {}
        for variant in order:
            extra = [f"--{flag}" for flag in ("checkpointed", "amp") if getattr(args, flag) and variant == "ssdd"]
            out = subprocess.run([sys.executable, __file__, "--variant", variant, *common, *extra], check=True,
                                 capture_output=True, text=True).stdout
            result[variant] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps({"round": r, "load": round(__import__("os").getloadavg()[0], 2), **result[variant]}),
                  flush=True)
        ratios.append(result["official"]["median_s"] / result["ssdd"]["median_s"])
        cpu_ratios.append(result["official"]["cpu_s"] / result["ssdd"]["cpu_s"])
        rows.append(result)
    print(f"official / ssdd per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"median {statistics.median(ratios):.2f}x; by process CPU time: "
          f"{', '.join(f'{x:.2f}' for x in cpu_ratios)}, median {statistics.median(cpu_ratios):.2f}x;"
          f" peak RSS official {rows[-1]['official']['peak_rss_mib']:.0f} MiB, "
          f"ssdd {rows[-1]['ssdd']['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
