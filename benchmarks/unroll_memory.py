"""Peak memory and seconds of one trajectory-matching iteration against the length of the unroll (syn_steps),
with and without per-step gradient checkpointing.

One iteration = ``syn_steps`` differentiable SGD steps of a ConvNet-3 on batches of synthetic CIFAR-size images,
the normalised matching loss, and its backward pass to the images, targets and step size.  Each configuration runs
in its own process, so the peak resident memory it reports is its own (on a GPU, peak allocated CUDA memory).

    python benchmarks/unroll_memory.py --steps 5,10,20,40 --width 32 --batch 50
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def one_config(syn_steps: int, checkpointed: bool, width: int, batch: int, images: int, device: str) -> dict:
    from ssdd.device import make_generator
    from ssdd.methods.trajectory.experts import ExpertSettings, make_network
    from ssdd.methods.trajectory.unroll import matching_loss, unrolled_sgd

    torch.manual_seed(0)
    network = make_network(ExpertSettings(arch="convnet3", arch_args={"width": width}), 512, (3, 32, 32), 0).to(device)
    start = {k: v.detach() for k, v in network.named_parameters()}
    target = {k: v + 0.01 * torch.randn_like(v) for k, v in start.items()}
    x = torch.randn(images, 3, 32, 32, device=device, requires_grad=True)
    y = torch.randn(images, 512, device=device, requires_grad=True)
    lr = torch.tensor(0.1, device=device, requires_grad=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    student = unrolled_sgd(network, start, x, y, lr, syn_steps, batch, "mse", make_generator(0), checkpointed)
    matching_loss(student, start, target).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"syn_steps": syn_steps, "checkpointed": checkpointed, "seconds": round(seconds, 2),
            "peak_mib": round(peak, 1), "rss_before_mib": round(rss_before / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="5,10,20,40")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = parser.parse_args()
    if args.one:
        steps, checkpointed = args.one.split(":")
        print(json.dumps(one_config(int(steps), checkpointed == "1", args.width, args.batch, args.images, args.device)))
        return
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for checkpointed in (False, True):
            out = subprocess.run([sys.executable, __file__, "--one", f"{steps}:{int(checkpointed)}", "--width",
                                  str(args.width), "--batch", str(args.batch), "--images", str(args.images),
                                  "--device", args.device], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print("\n| syn_steps | checkpointed | seconds | peak memory (MiB) | of which the iteration (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        growth = r["peak_mib"] - (r["rss_before_mib"] if args.device == "cpu" else 0)
        print(f"| {r['syn_steps']} | {'yes' if r['checkpointed'] else 'no'} | {r['seconds']} | {r['peak_mib']} | "
              f"{growth:.0f} |")


if __name__ == "__main__":
    main()
