"""Differentiable unrolled training, the second half of trajectory matching (MKDT, MTT).

* :func:`unrolled_sgd` takes ``steps`` differentiable SGD steps of a network given as a parameter dict
  (``torch.func.functional_call`` + ``autograd.grad(create_graph=True)``) on mini-batches in the released code's
  order (:func:`released_minibatches`), optionally checkpointing each step so memory does not grow with the
  unroll's activations.
* :func:`matching_loss` is MTT's normalised parameter distance.

The networks must hold no running statistics (BatchNorm buffers would be updated outside the unroll): use
instance-norm (``convnet3``) or norm-free architectures, as the papers do.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from ssdd.device import at_least_float32, autocast, runs_bf16
from ssdd.methods.trajectory.experts import Params, Views, draw_views, step_loss


def released_minibatches(n: int, batch_size: int, permutation: Callable[[], torch.Tensor]) -> Iterator[torch.Tensor]:
    """Index batches in the released MTT / MKDT order: each new ``permutation()`` of 0..n-1 is split into chunks of
    ``batch_size`` and the chunks are used from the last one backwards, so when ``n`` is not a multiple of
    ``batch_size`` the short chunk comes first; a new permutation is drawn when none is left."""
    while True:
        chunks = list(torch.split(permutation(), batch_size))
        while chunks:
            yield chunks.pop()


def unrolled_sgd(
    network: torch.nn.Module,
    start: Params,
    images: torch.Tensor,
    targets: torch.Tensor,
    lr: torch.Tensor,
    steps: int,
    batch_size: int,
    loss: str,
    generator: torch.Generator,
    checkpointed: bool = False,
    permutation: Callable[[], torch.Tensor] | None = None,
    amp: bool = False,
) -> Params:
    """``steps`` SGD steps of ``network`` from ``start`` on mini-batches of (``images``, ``targets``) with ``loss``
    (:func:`step_loss`), every step differentiable in the images, targets, ``lr`` and ``start``.  Batches come in
    :func:`released_minibatches` order from permutations drawn from ``generator`` (or given by ``permutation``).
    ``checkpointed`` recomputes each step's activations in the backward pass instead of keeping them (less memory,
    one more forward per step).  ``amp`` runs the network's forward in bf16 where bf16 is native
    (:func:`ssdd.device.runs_bf16`): its parameters cast to bf16 (the normalisation layers' too, so no activation
    goes back to float32 inside the network), channels-last batches, under autocast; its outputs, the loss, the
    parameter updates and every learned tensor stay float32."""
    names = list(start)
    template = network if next(iter(network.parameters())).device.type == "meta" else copy.deepcopy(network).to("meta")
    params = [p if p.requires_grad else p.detach().requires_grad_(True) for p in start.values()]
    n = images.shape[0]
    batches = released_minibatches(n, min(batch_size, n),
                                   permutation or (lambda: torch.randperm(n, generator=generator)))
    low_precision = runs_bf16(images.device, amp)

    def one_step(idx: torch.Tensor, step_lr: torch.Tensor, views: Views | None,
                 *current: torch.Tensor) -> tuple[torch.Tensor, ...]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            weights = current
            if low_precision:  # every parameter (norms' too) and activation in bf16: no float32 round trips
                weights = tuple(p.to(torch.bfloat16) for p in current)
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(x.device, amp):
                return at_least_float32(functional_call(template, dict(zip(names, weights)), (x,)))

        value = step_loss(forward, images[idx], targets[idx], loss, views)
        grads = torch.autograd.grad(value, current, create_graph=True)
        return tuple(p - step_lr * g for p, g in zip(current, grads))

    for _ in range(steps):
        idx = next(batches).to(images.device)
        views = draw_views(loss, idx.numel(), generator, images.device)
        if checkpointed:
            params = list(checkpoint(one_step, idx, lr, views, *params, use_reentrant=False))
        else:
            params = list(one_step(idx, lr, views, *params))
    return dict(zip(names, params))


def matching_loss(student: Params, start: Params, target: Params) -> torch.Tensor:
    """||student - target||^2 / ||start - target||^2 over all parameters (0 when the student lands on the
    expert's later checkpoint, 1 when it has not moved)."""
    num = sum(((student[k] - target[k]) ** 2).sum() for k in target)
    den = sum(((start[k] - target[k]) ** 2).sum() for k in target)
    return num / den
