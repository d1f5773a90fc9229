"""How large MKDT's image gradients are, per expert and start epoch: one iteration's matching loss and the norm of
its gradient with respect to the images (all of them, and the largest / median per image) and to the step size,
for a stored set and its experts.  This is the diagnosis in docs/results/mkdt-cifar10-cpu.md.

    python benchmarks/matching_gradients.py runs/mkdt-init-cifar10-cpu runs/mkdt-cifar10-cpu/experts \
        --syn-steps 10 --batch-syn 50
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ssdd.device import make_generator
from ssdd.distilled import load_distilled
from ssdd.io import read_metadata
from ssdd.methods.trajectory.experts import ExpertSettings, ExpertStore, expert_file, make_network
from ssdd.methods.trajectory.unroll import matching_loss, unrolled_sgd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("set", help="a stored MKDT set (its images, targets and step size start the unroll)")
    parser.add_argument("experts", help="the experts' folder")
    parser.add_argument("--syn-steps", type=int, default=10)
    parser.add_argument("--batch-syn", type=int, default=50)
    parser.add_argument("--expert-epochs", type=int, default=2)
    args = parser.parse_args()
    distilled = load_distilled(args.set)
    images, targets = distilled.tensors["images"].float(), distilled.tensors["targets"].float()
    recorded = read_metadata(expert_file(Path(args.experts), 0))
    settings = ExpertSettings(**recorded["settings"])
    store = ExpertStore(args.experts, settings.num_experts)
    network = make_network(settings, targets.shape[1], tuple(images.shape[1:]), 0).to("meta")
    lr0 = float(distilled.learned_lr) if distilled.learned_lr is not None else 0.1
    print(f"{len(images)} images, |X| = {images.norm():.4g} ({images.flatten(1).norm(dim=1).median():.4g} per image), "
          f"step size {lr0:.4g}")
    print("| expert | start epoch | matching loss | |dL/dX| | largest per image | median per image | dL/dlr |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for expert in range(len(store)):
        for start_epoch in range(store.epochs - args.expert_epochs + 1):
            start, target = store.params(expert, start_epoch), store.params(expert, start_epoch + args.expert_epochs)
            x = images.clone().requires_grad_(True)
            lr = torch.tensor(lr0, requires_grad=True)
            student = unrolled_sgd(network, start, x, targets, lr, args.syn_steps, args.batch_syn, "mse",
                                   make_generator(1))
            loss = matching_loss(student, start, target)
            gx, glr = torch.autograd.grad(loss, [x, lr])
            per_image = gx.flatten(1).norm(dim=1)
            print(f"| {expert} | {start_epoch} | {loss.item():.4f} | {gx.norm():.3g} | {per_image.max():.3g} | "
                  f"{per_image.median():.3g} | {glr.item():.3g} |", flush=True)


if __name__ == "__main__":
    main()
