"""CPU seconds of one MKDT unroll with ConvNet-3's layers written in other ways, interleaved in one process.

Each variant replaces layers of the unrolled network (the parameters and the numbers stay the same; the printed
image-gradient norm checks it) and the variants run in turn, ``--repeats`` times, timed by process CPU time so the
other jobs of a shared machine count less:

* ``base``: ``nn.GroupNorm(C, C)`` (instance norm), ``nn.ReLU``, ``nn.AvgPool2d(2)``, as ssdd and the official code;
* ``mask``: ReLU as ``x * (x > 0)`` (its second derivative has no ``zeros_like`` term, unlike ``threshold_backward``);
* ``pool``: 2 x 2 average pooling as a reshape and a mean;
* ``norm``: instance norm from elementary ops (``var_mean``, ``rsqrt``);
* ``fused-norm``: instance norm as an ``autograd.Function`` whose backward is the closed form in elementary ops
  (recomputing the normalised input, so its own derivative is right);
* ``channels-last``: the images in channels_last memory format.

    python benchmarks/unroll_layers.py --width 128 --batch 256 --steps 2 --variants base,mask,fused-norm
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn


class MaskReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x > 0).to(x.dtype)


class ReshapePool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, c, h // 2, 2, w // 2, 2).mean((3, 5))


def _normalised(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(x, (2, 3), unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + 1e-5)
    return (x - mean) * rstd, rstd


class ElementaryNorm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _normalised(x)[0] * self.weight[:, None, None] + self.bias[:, None, None]


class _ClosedFormNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, w)
        return _normalised(x)[0] * w[:, None, None] + b[:, None, None]

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        x, w = ctx.saved_tensors
        xhat, rstd = _normalised(x)
        g = gy * w[:, None, None]
        dx = rstd * (g - g.mean((2, 3), keepdim=True) - xhat * (g * xhat).mean((2, 3), keepdim=True))
        return dx, (gy * xhat).sum((0, 2, 3)), gy.sum((0, 2, 3))


class FusedNorm(ElementaryNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ClosedFormNorm.apply(x, self.weight, self.bias)


REPLACE = {"mask": (nn.ReLU, lambda m: MaskReLU()), "pool": (nn.AvgPool2d, lambda m: ReshapePool()),
           "norm": (nn.GroupNorm, lambda m: ElementaryNorm(m.num_channels)),
           "fused-norm": (nn.GroupNorm, lambda m: FusedNorm(m.num_channels))}


def variant_network(base: nn.Module, variant: str) -> nn.Module:
    network = copy.deepcopy(base)
    for part in variant.split("+"):
        if part in REPLACE:
            kind, make = REPLACE[part]
            for i, layer in enumerate(network.body):
                if isinstance(layer, kind):
                    network.body[i] = make(layer)
    return network


def main() -> None:
    from ssdd.device import make_generator
    from ssdd.methods.trajectory.experts import ExpertSettings, make_network
    from ssdd.methods.trajectory.unroll import matching_loss, unrolled_sgd

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--outputs", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="base,mask,fused-norm,channels-last")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = make_network(ExpertSettings(arch="convnet3", arch_args={"width": args.width}), args.outputs, (3, 32, 32), 0)
    start = {k: v.detach() for k, v in base.named_parameters()}
    target = {k: v + 0.01 * torch.randn_like(v) for k, v in start.items()}
    images = torch.randn(1000, 3, 32, 32, requires_grad=True)
    targets = torch.randn(1000, args.outputs, requires_grad=True)
    lr = torch.tensor(0.01, requires_grad=True)
    variants = args.variants.split(",")
    networks = {v: variant_network(base, v) for v in variants}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        for v in variants:
            x = images.contiguous(memory_format=torch.channels_last) if "channels-last" in v else images
            images.grad = None
            started = time.process_time()
            student = unrolled_sgd(networks[v], start, x, targets, lr, args.steps, args.batch, "mse",
                                   make_generator(repeat))
            matching_loss(student, start, target).backward()
            seconds[v].append(time.process_time() - started)
            print(f"{v} repeat {repeat}: {seconds[v][-1]:.2f} CPU s, image-gradient norm {images.grad.norm():.7e}",
                  flush=True)
    for v in variants:
        print(f"{v}: median {statistics.median(seconds[v]):.2f} CPU s over {args.repeats}")


if __name__ == "__main__":
    main()
