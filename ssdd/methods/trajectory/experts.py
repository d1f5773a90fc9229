"""Expert trajectories, the first half of trajectory matching (MKDT, MTT); the unroll is :mod:`.unroll`.

* The loss of a training step (:func:`step_loss`) is supervised (``mse`` to representations, ``ce`` to labels) or
  self-supervised (``barlow-twins``, ``simclr``) between two augmented views of the batch (:data:`SSL_VIEWS`, drawn
  per image from the run's generator outside any recomputed region, so checkpointing replays the same views).
* :func:`train_experts` trains K students from independent initialisations and stores every epoch's parameters,
  one safetensors file per expert (``expert_000.safetensors`` with ``epoch_00.<param>`` ...), written atomically
  when the expert is done, so an interrupted run resumes by skipping the experts already on disk.  With
  ``parallel`` > 1 experts train that many at a time as one vmapped computation (``torch.func``; for GPUs), each
  with its own initialisation and batch order and the same SGD (momentum, weight decay, constant lr) as the
  one-at-a-time path, which uses the module and ``torch.optim.SGD`` (about twice as fast on a CPU).
* :func:`expert_loss_scores`: the per-image MSE of the experts' early checkpoints (MKDT's high-loss selection).

The networks must hold no running statistics (BatchNorm buffers would be updated outside the unroll): use
instance-norm (``convnet3``) or norm-free architectures, as the papers do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.func import functional_call, grad, stack_module_state, vmap
from tqdm.auto import tqdm

from ssdd.data.augment import DSAConfig, DSAParams, apply_dsa, sample_dsa_params
from ssdd.device import device_batches, make_generator
from ssdd.distributed import barrier, shard, world
from ssdd.errors import ArtefactError, ConfigError, check_finite
from ssdd.io import read_metadata, save_tensors
from ssdd.models import Backbone
from ssdd.progress import progress_bar
from ssdd.resources import on_device_if_it_fits
from ssdd.runs import folder_lock, on_main
from ssdd.teachers.losses import SSL_LOSSES
from ssdd.training import batch_loss, build_student

Params = dict[str, torch.Tensor]


@dataclass
class ExpertSettings:
    """How the experts are trained (MKDT's defaults: 100 ConvNet-3 of width 128, SGD lr 0.1, momentum 0.9,
    wd 1e-4, batch 256, 20 epochs, no augmentation, parameters after every epoch)."""

    num_experts: int = 100
    epochs: int = 20
    arch: str = "convnet3"
    arch_args: dict[str, Any] = field(default_factory=lambda: {"width": 128})
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256
    parallel: int = 1  # experts trained at once (one vmapped computation)
    projection_dim: int = 128  # outputs of a self-supervised expert's head (supervised ones: the targets' size)

    def __post_init__(self) -> None:
        if min(self.num_experts, self.epochs, self.batch_size, self.parallel, self.projection_dim) < 1 or self.lr <= 0:
            raise ConfigError("experts: num_experts, epochs, batch_size, parallel and projection_dim must be >= 1 "
                              "and lr > 0")


EXPERT_LOSSES = ("mse", "ce", *SSL_LOSSES)
SSL_VIEWS = DSAConfig(strategy="color_crop_flip", mode="all")  # each view of a self-supervised step, per image
Views = tuple[DSAParams, DSAParams]


def is_self_supervised(loss: str) -> bool:
    return loss in SSL_LOSSES


def expert_outputs(loss: str, settings: ExpertSettings, targets: torch.Tensor) -> int:
    """The size of an expert's output: the targets' dimension (``mse``), the number of classes (``ce``), or the
    projection's (self-supervised)."""
    if loss == "mse":
        return targets.shape[1]
    if loss == "ce":
        return int(targets.max()) + 1
    return settings.projection_dim


def draw_views(loss: str, n: int, generator: torch.Generator, device: torch.device | str) -> Views | None:
    """Two independent augmentations of ``n`` images for a self-supervised ``loss``; None for a supervised one."""
    if not is_self_supervised(loss):
        return None
    return sample_dsa_params(n, SSL_VIEWS, generator, device), sample_dsa_params(n, SSL_VIEWS, generator, device)


def step_loss(forward: Any, x: torch.Tensor, y: torch.Tensor, loss: str, views: Views | None) -> torch.Tensor:
    """One training step's loss: ``loss`` of ``forward(x)`` against ``y``, or, with ``views``, the self-supervised
    ``loss`` between ``forward`` of the two augmented views of ``x`` (``y`` unused)."""
    if views is None:
        return batch_loss(forward(x), y, loss, 1.0)
    return SSL_LOSSES[loss]()(forward(apply_dsa(x, views[0])), forward(apply_dsa(x, views[1])))


def expert_file(folder: Path, index: int) -> Path:
    return folder / f"expert_{index:03d}.safetensors"


def _epoch_key(epoch: int, name: str) -> str:
    return f"epoch_{epoch:02d}.{name}"


def make_network(settings: ExpertSettings, num_outputs: int, image_shape: tuple[int, int, int], seed: int) -> Backbone:
    """A network of the experts' architecture, refused when it keeps running statistics."""
    model = build_student(settings.arch, settings.arch_args, num_outputs, image_shape, seed)
    if any(True for _ in model.buffers()):
        raise ConfigError(f"trajectory matching needs a network without running statistics; {settings.arch} has "
                          "buffers (BatchNorm?): use an instance-norm or norm-free architecture such as convnet3")
    return model


class ExpertStore:
    """The experts in a folder: their settings (from the files' metadata) and any epoch's parameters, read lazily."""

    def __init__(self, folder: str | Path, count: int):
        self.folder = Path(folder)
        self.paths = [expert_file(self.folder, k) for k in range(count)]
        missing = [p.name for p in self.paths if not p.exists()]
        if missing:
            raise ArtefactError(f"{self.folder} lacks {len(missing)} of {count} experts ({missing[0]}, ...); "
                                "train them with `ssdd experts` (it skips the ones already there)")
        self.metadata = read_metadata(self.paths[0])
        self.epochs = int(self.metadata["epochs"])

    def __len__(self) -> int:
        return len(self.paths)

    def params(self, expert: int, epoch: int, device: torch.device | str = "cpu") -> Params:
        """Parameters of ``expert`` after ``epoch`` epochs (0: its initialisation)."""
        if not 0 <= epoch <= self.epochs:
            raise ConfigError(f"experts were stored for epochs 0..{self.epochs}; epoch {epoch} does not exist")
        prefix = _epoch_key(epoch, "")
        with safe_open(str(self.paths[expert]), framework="pt", device=str(device)) as f:
            return {key[len(prefix):]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}


def train_experts(
    folder: str | Path,
    settings: ExpertSettings,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss: str,
    seed: int,
    device: torch.device | str = "cpu",
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> ExpertStore:
    """Train the experts not yet in ``folder`` on normalised ``images`` with ``loss`` (``mse`` to representation
    ``targets``, ``ce`` to labels, or a self-supervised loss on two views, ``targets`` unused) and return the store.
    Expert ``k`` is a function of ``seed``, ``k`` and ``parallel`` only (bit for bit; different ``parallel`` values
    agree to float rounding).  Under torchrun the blocks of ``parallel`` experts are dealt round-robin to the
    processes, each writing its own experts' files. While experts are missing the folder is locked, so that one run
    at a time trains into it (a complete folder is only read, and may be read-only)."""
    if loss not in EXPERT_LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; use one of {', '.join(EXPERT_LOSSES)}")
    if is_self_supervised(loss) and settings.parallel > 1:
        raise ConfigError(f"{loss} experts train one at a time (settings.experts.parallel: 1); the vmapped path "
                          "takes supervised losses only")
    folder = Path(folder)
    current = world()

    def missing() -> list[int]:
        return [k for k in range(settings.num_experts) if not expert_file(folder, k).exists()]

    if on_main(missing, current):  # process 0's list, the same on every process
        with folder_lock(folder, current):
            _train_missing(folder, on_main(missing, current), settings, images, targets, loss, seed,
                           torch.device(device), metadata, progress)
    return ExpertStore(folder, settings.num_experts)


def _train_missing(folder: Path, todo: list[int], settings: ExpertSettings, images: torch.Tensor,
                   targets: torch.Tensor, loss: str, seed: int, device: torch.device, metadata: dict[str, Any] | None,
                   progress: bool) -> None:
    """Train the blocks of experts that hold the ``todo`` ones and write those (this process's share of them)."""
    images, targets = on_device_if_it_fits(images, device), on_device_if_it_fits(targets, device)
    num_outputs = expert_outputs(loss, settings, targets)
    n = images.shape[0]
    batch = min(settings.batch_size, n)
    steps_per_epoch = n // batch if n % batch == 1 else -(-n // batch)  # never a one-image batch
    current = world()
    blocks = [block for _, block in shard(sorted({k // settings.parallel for k in todo}), current)]
    bar = progress_bar(total=len(blocks) * settings.epochs * steps_per_epoch, desc="experts", unit="step",
                       disable=not progress or not blocks or not current.is_main)
    for block in blocks:
        # a block of `parallel` experts always trains together, so an expert's bits do not depend on which others
        # were missing; only the missing ones are written
        group = list(range(block * settings.parallel, min((block + 1) * settings.parallel, settings.num_experts)))
        models = [make_network(settings, num_outputs, tuple(images.shape[1:]), seed * 1000 + k).to(device)
                  for k in group]
        generators = [make_generator(seed * 1000 + k) for k in group]
        train = _train_alone if settings.parallel == 1 else _train_vmapped
        history = train(models, generators, settings, images, targets, loss, batch, steps_per_epoch, bar)
        for j, k in enumerate(group):
            if k not in todo:
                continue
            info = {"expert": k, "epochs": settings.epochs, "loss": loss, "seed": seed,
                    "settings": {**settings.__dict__}, **(metadata or {})}
            save_tensors(expert_file(folder, k), history[j], info)
    bar.close()
    barrier(current)  # every process's experts are on disk before anyone reads the store


_EXPERT_ADVICE = "the experts finished before are kept; lower settings.experts.lr (now {}) and run again"


def _train_alone(models: list[Backbone], generators: list[torch.Generator], settings: ExpertSettings,
                 images: torch.Tensor, targets: torch.Tensor, loss: str, batch: int, steps_per_epoch: int,
                 bar: tqdm) -> list[Params]:
    """One expert with its module and ``torch.optim.SGD`` (faster than the functional path on a CPU)."""
    model, generator = models[0], generators[0]
    device = next(model.parameters()).device
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    history = {_epoch_key(0, name): p.detach().clone() for name, p in model.named_parameters()}
    for epoch in range(1, settings.epochs + 1):
        order = torch.randperm(images.shape[0], generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            views = draw_views(loss, idx.numel(), generator, device)
            value = step_loss(model, images[idx].to(device), targets[idx].to(device), loss, views)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            bar.update(1)
        check_finite(value.item(), f"expert training: the loss in epoch {epoch}", _EXPERT_ADVICE.format(settings.lr))
        history.update({_epoch_key(epoch, name): p.detach().clone() for name, p in model.named_parameters()})
    return [history]


def _train_vmapped(models: list[Backbone], generators: list[torch.Generator], settings: ExpertSettings,
                   images: torch.Tensor, targets: torch.Tensor, loss: str, batch: int, steps_per_epoch: int,
                   bar: tqdm) -> list[Params]:
    """Several experts as one vmapped computation, each with its own batches; the same SGD as ``_train_alone``."""
    device = next(models[0].parameters()).device
    params, _ = stack_module_state(models)
    params = {name: p.detach().clone() for name, p in params.items()}
    template = copy.deepcopy(models[0]).to("meta")
    per_expert_grad = vmap(grad(lambda p, x, y: batch_loss(functional_call(template, p, (x,)), y, loss, 1.0)))
    velocity = {name: torch.zeros_like(p) for name, p in params.items()}
    history = [{_epoch_key(0, name): p[j].clone() for name, p in params.items()} for j in range(len(models))]
    for epoch in range(1, settings.epochs + 1):
        orders = torch.stack([torch.randperm(images.shape[0], generator=g) for g in generators])
        for i in range(steps_per_epoch):
            idx = orders[:, i * batch : (i + 1) * batch]
            grads = per_expert_grad(params, images[idx].to(device), targets[idx].to(device))
            with torch.no_grad():
                for name, p in params.items():  # torch.optim.SGD: v = mu v + (g + wd p); p -= lr v
                    velocity[name].mul_(settings.momentum).add_(grads[name] + settings.weight_decay * p)
                    p.sub_(settings.lr * velocity[name])
            bar.update(1)
        check_finite(sum(float(p.sum()) for p in params.values()), f"expert training: the parameters in epoch {epoch}",
                     _EXPERT_ADVICE.format(settings.lr))
        for j in range(len(models)):
            history[j].update({_epoch_key(epoch, name): p[j].clone() for name, p in params.items()})
    return history


def expert_loss_scores(store: ExpertStore, network: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                       epoch: int = 1, device: torch.device | str = "cpu", batch_size: int = 1024) -> torch.Tensor:
    """Per-image MSE of every expert's ``epoch`` checkpoint against ``targets``, averaged over the experts (MKDT's
    high-loss score)."""
    scores = torch.zeros(images.shape[0])
    template = copy.deepcopy(network).to("meta")
    for k in range(len(store)):
        params = store.params(k, epoch, device)
        with torch.no_grad():
            for start, batch in zip(range(0, images.shape[0], batch_size), device_batches(images, batch_size, device)):
                out = functional_call(template, params, (batch,)).float()
                err = (out.cpu() - targets[start : start + batch_size].float()) ** 2
                scores[start : start + batch_size] += err.mean(1)
    return scores / len(store)
