"""The decoupled family: SC-DD (Zhou, Shao, Yin, Shen, 2024) and its baseline SRe2L (Yin, Xing, Shen, 2023).

Both distil in three stages, each resumable:

1. **Squeeze** (``squeeze.safetensors`` in the run folder, reused when present): SC-DD takes the self-supervised
   teacher with its weights *and* BatchNorm statistics frozen and adds a linear classifier fitted on the labelled
   source (L-BFGS logistic regression on the cached teacher features, folded into a ``Linear`` head); SRe2L trains a
   supervised network of the same architecture on the labelled source.
2. **Recover**: for each images-per-class index, one image per class is optimised from Gaussian noise with
   cross-entropy to its class + ``r_bn`` x the distance of every BatchNorm layer's batch statistics to its running
   statistics (the first layer weighted ``first_bn_weight``: 10 in both released codes), under a random shift
   (a roll with wrap-around) of 0 .. ``jitter`` pixels in each direction (no flips on CIFAR, as released), by Adam
   (betas 0.5, 0.9) with a cosine learning rate; pixels are clipped to the valid range after every step.  Each
   outer step of the engine is one such iteration, so a run resumes mid-index.  Under
   torchrun the classes are dealt to the processes: each forwards its own classes' images, the BatchNorm statistics
   are those of the whole batch (summed over the processes), the gradients are summed, and every process applies
   the same Adam step to the whole batch, so the images are the single process's and a checkpoint resumes with any
   number of processes.
3. **Relabel**: the set stores the squeeze model's logits of the recovered images as soft labels (counted in the
   byte budget) with the ``temperature`` to match them at, and names the squeeze model (``squeeze_model``: its file
   in the run folder and fingerprint), so the ``supervised`` protocol can relabel as the released code does: soft
   labels computed on the fly by the squeeze model for every augmented, mixed batch (``relabel: on-the-fly``, the
   default), or from the stored logits (``relabel: stored``).  See :mod:`ssdd.evaluation.relabel`.
"""

from __future__ import annotations

import abc
import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssdd.budget import Budget
from ssdd.config import to_dict
from ssdd.data.transforms import PixelSpace
from ssdd.device import at_least_float32, make_generator
from ssdd.distilled import DistilledSet
from ssdd.distributed import broadcast_object, shard, sum_over_processes, world
from ssdd.errors import ConfigError
from ssdd.io import read_metadata
from ssdd.methods.base import METHODS, DistillContext, Method
from ssdd.models import Backbone, create_model
from ssdd.probes import fit_logistic_regression
from ssdd.teachers.artefact import load_network, save_network
from ssdd.teachers.features import teacher_features
from ssdd.training import TrainSettings, build_student, train_network

SQUEEZE_FILE = "squeeze.safetensors"


class BatchNormStatistics:
    """Forward hooks on every ``BatchNorm2d`` of a network that keep each layer's input, and the recovery loss that
    pulls the batch mean and (biased) variance of those inputs towards the layer's running statistics.  Under
    several processes the batch is the union of every process's: the statistics are summed over the processes,
    and each process's gradient is that of its own images."""

    def __init__(self, network: nn.Module):
        self.layers = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ConfigError("recovering images from BatchNorm statistics needs a network with BatchNorm layers")
        self.inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index: int):  # noqa: ANN202 - a forward hook
        def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.inputs[index] = at_least_float32(inputs[0])
        return keep

    @staticmethod
    def _over_processes(local: torch.Tensor) -> torch.Tensor:
        """The sum of ``local`` over the processes, differentiable through this process's part only."""
        return local + (sum_over_processes(local) - local).detach()

    def statistics(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole batch's per-channel mean and biased variance at layer ``index``.  The variance is taken around
        the detached mean: the mean's own gradient contribution, -2 sum(x - mean) d mean / dx, is zero."""
        x = self.inputs[index]
        if x is None:
            raise ConfigError("no forward pass has been recorded yet")
        count = float(sum_over_processes(torch.tensor(float(x.numel() // x.shape[1]))))
        mean = self._over_processes(x.sum(dim=(0, 2, 3))) / count
        centred = x - mean.detach().view(1, -1, 1, 1)
        return mean, self._over_processes(centred.pow(2).sum(dim=(0, 2, 3))) / count

    def layer_terms(self) -> list[torch.Tensor]:
        """r_l = ||mu_l(x) - mu_l^BN||_2 + ||var_l(x) - var_l^BN||_2 of every layer in the last forward pass."""
        terms = []
        for i, layer in enumerate(self.layers):
            mean, var = self.statistics(i)
            terms.append(torch.linalg.vector_norm(mean - layer.running_mean)
                         + torch.linalg.vector_norm(var - layer.running_var))
        return terms

    def loss(self, first_weight: float = 1.0) -> torch.Tensor:
        """sum_l w_l r_l (:meth:`layer_terms`) with w_1 = ``first_weight`` and the others 1."""
        terms = self.layer_terms()
        return first_weight * terms[0] + sum(terms[1:], torch.zeros((), dtype=terms[0].dtype))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class SqueezeSettings:
    """How the squeeze model is made: SC-DD's linear head (``l2``, ``lbfgs_iterations``) or SRe2L's supervised
    training (``train``), on the teacher's architecture unless ``arch`` is given (SRe2L)."""

    l2: float = 1e-3
    lbfgs_iterations: int = 200
    arch: str | None = None
    arch_args: dict[str, Any] = field(default_factory=dict)
    train: TrainSettings = field(default_factory=lambda: TrainSettings(epochs=30, lr=0.1, weight_decay=5e-4,
                                                                       batch_size=256, augment="crop-flip"))


@dataclass
class RecoverSettings:
    """Recovery; the defaults are the released SRe2L CIFAR values (``recover_cifar.py`` and its command: lr 0.25,
    r_bn 0.01, first BatchNorm layer x10, shifts of 0-4 px, no flips; SC-DD: lr 0.4, r_bn 0.005)."""

    iterations: int = 1000
    lr: float = 0.25
    r_bn: float = 0.01
    first_bn_weight: float = 10.0
    jitter: int = 4  # each iteration rolls the batch by (a, b), a and b drawn from 0 .. jitter
    jitter_signed: bool = False  # draw a and b from -jitter .. jitter instead (ssdd's earlier choice)
    flip: bool = False  # also flip the batch horizontally with p = 0.5 (the released ImageNet recovery does)
    temperature: float = 30.0  # of the soft labels, recorded with the set for the supervised protocol
    squeeze: SqueezeSettings = field(default_factory=SqueezeSettings)

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.lr <= 0 or self.r_bn < 0 or self.jitter < 0 or self.temperature <= 0:
            raise ConfigError("iterations must be >= 1, lr and temperature > 0, r_bn and jitter >= 0")


@dataclass
class SCDDSettings(RecoverSettings):
    """SC-DD's recovery: the released CIFAR command's lr 0.4 and r_bn 0.005 (the rest as SRe2L)."""

    lr: float = 0.4
    r_bn: float = 0.005


class Recover(Method):
    """Squeeze once, then recover one image per class per images-per-class index, then relabel."""

    settings_class = RecoverSettings
    splits_over_processes = True
    prepares = "a squeeze model"

    def __init__(self, settings: RecoverSettings, context: DistillContext, budget: Budget):
        super().__init__(settings, context, budget)
        source = context.source
        if source.num_classes < 2:
            raise ConfigError(f"{self.name} recovers class-conditional images; {source.name} has no labels")
        self.classes = source.num_classes
        self.world = world()
        if self.world.size > self.classes:
            raise ConfigError(f"{self.name} deals its {self.classes} classes to the processes; run at most "
                              f"{self.classes} processes, not {self.world.size}")
        self.own = torch.tensor([c for _, c in shard(list(range(self.classes)), self.world)], device=context.device)
        self.image_shape = context.image_shape
        c, h, w = self.image_shape  # the budget is checked before anything is trained
        self.plan = budget.plan_per_class(budget.value_bytes(c * h * w + self.classes), self.classes, self.name)
        self.ipc = self.plan.per_class
        self.model, self.pixel_space = self.prepare(settings, context)
        self.model.eval().requires_grad_(False)
        self.statistics = BatchNormStatistics(self.model)
        low, high = self.pixel_space.bounds(torch.float64)  # rounded to the images' dtype where they are clipped
        self.low, self.high = low.to(context.device).view(1, -1, 1, 1), high.to(context.device).view(1, -1, 1, 1)
        self.labels = torch.arange(self.classes, device=context.device)
        self.recovered: list[torch.Tensor] = []
        self.current: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.generator = make_generator(context.seed + 2)

    # ---- squeeze ------------------------------------------------------------------------------------------------

    @classmethod
    def squeeze_identity(cls, settings: RecoverSettings, context: DistillContext) -> dict[str, Any]:
        """What a squeeze model is made from; a saved one is reused only when all of it matches."""
        return {"method": cls.name, "source": {"dataset": context.source.name,
                                               "fingerprint": context.source.fingerprint},
                "teacher": context.teacher.fingerprint if context.teacher is not None else None,
                "squeeze_settings": to_dict(settings.squeeze)}

    @classmethod
    def prepare(cls, settings: RecoverSettings, context: DistillContext) -> tuple[Backbone, PixelSpace]:
        """The squeeze model and its pixel space: the main process's (from the run folder, or made now and saved
        there) on every process."""
        current = world()
        made = cls.main_squeeze_model(settings, context) if current.is_main else None
        spec, state, pixel_space = broadcast_object(
            (made[0].spec, {k: v.cpu() for k, v in made[0].state_dict().items()}, made[1]) if made else None, current)
        if made is not None:
            return made
        model = create_model(**spec)
        model.load_state_dict(state)
        return model.to(context.device), pixel_space

    @classmethod
    def main_squeeze_model(cls, settings: RecoverSettings, context: DistillContext) -> tuple[Backbone, PixelSpace]:
        """The squeeze model from the run folder, or made now (and saved there)."""
        identity = json.loads(json.dumps(cls.squeeze_identity(settings, context)))  # as it reads back from the file
        path = context.workdir / SQUEEZE_FILE if context.workdir is not None else None
        if path is not None and path.exists():
            model, pixel_space, meta, _ = load_network(path, "squeeze", SQUEEZE_FILE)
            differs = sorted(k for k in identity if meta.get(k) != identity[k])
            if differs:
                raise ConfigError(f"{path} was made with another {', '.join(differs)} than this run's; "
                                  "use a new run folder")
            return model.to(context.device), pixel_space
        model, pixel_space, info = cls.make_squeeze_model(settings, context)
        if path is not None:
            save_network(path, model, pixel_space, "squeeze", {**identity, **info})
            context.log.info(f"squeeze model written to {path} ({info})")
        return model.to(context.device), pixel_space

    @classmethod
    @abc.abstractmethod
    def make_squeeze_model(cls, settings: RecoverSettings,
                           context: DistillContext) -> tuple[Backbone, PixelSpace, dict[str, Any]]:
        """A fresh squeeze model, its pixel space and a description for the artefact."""

    # ---- recover ------------------------------------------------------------------------------------------------

    def total_steps(self) -> int:
        return self.ipc * self.settings.iterations

    def step(self, step: int) -> dict[str, float]:
        s = self.settings
        index, iteration = divmod(step, s.iterations)
        if iteration == 0:
            self.current = self.starting_images(index).to(self.context.device).requires_grad_(True)
            self.optimizer = torch.optim.Adam([self.current], lr=s.lr, betas=(0.5, 0.9))
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr * 0.5 * (1 + math.cos(math.pi * iteration / s.iterations))
        x = self.jittered(self.current)[self.own]  # this process's classes (all of them for one process)
        out = at_least_float32(self.model(x))
        ce = F.cross_entropy(out, self.labels[self.own], reduction="sum") / self.classes
        bn = self.statistics.loss(s.first_bn_weight)  # of the whole batch
        loss = ce + s.r_bn * bn
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.current.grad = sum_over_processes(self.current.grad, self.world)  # zero outside each one's classes
        self.optimizer.step()
        ce = sum_over_processes(ce.detach(), self.world)
        loss = ce + s.r_bn * bn
        with torch.no_grad():
            low, high = self.low.to(self.current.dtype), self.high.to(self.current.dtype)
            self.current.copy_(torch.maximum(torch.minimum(self.current, high), low))
        if iteration == s.iterations - 1:
            self.recovered.append(self.current.detach().clone())
        return {"loss": loss.item(), "ce": ce.item(), "bn": bn.item(), "index": index}

    def starting_images(self, index: int) -> torch.Tensor:
        """The Gaussian noise that images-per-class index ``index`` starts from (one image per class)."""
        start = make_generator(self.context.seed * 100_003 + index)
        return torch.randn(self.classes, *self.image_shape, generator=start)

    def shift(self) -> tuple[int, int]:
        """This iteration's jitter (a, b): rows and columns to roll the batch by."""
        s = self.settings
        low = -s.jitter if s.jitter_signed else 0
        a, b = (int(v) for v in torch.randint(low, s.jitter + 1, (2,), generator=self.generator))
        return a, b

    def jittered(self, x: torch.Tensor) -> torch.Tensor:
        """The batch rolled by :meth:`shift` (wrapping around) and, with ``flip``, flipped with p = 0.5."""
        s = self.settings
        if s.jitter:
            x = torch.roll(x, shifts=self.shift(), dims=(2, 3))
        if s.flip and bool(torch.rand((), generator=self.generator) < 0.5):
            x = x.flip(3)
        return x

    # ---- state and the set ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"recovered": [r.cpu() for r in self.recovered],
                "current": None if self.current is None else self.current.detach().cpu(),
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.context.device
        self.recovered = [r.to(device) for r in state["recovered"]]
        self.current = None
        self.optimizer = None
        if state["current"] is not None:
            self.current = state["current"].to(device).requires_grad_(True)
            self.optimizer = torch.optim.Adam([self.current], lr=self.settings.lr, betas=(0.5, 0.9))
            self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])

    def distilled_set(self) -> DistilledSet:
        """The images recovered so far (index-major: all classes of index 0, then of index 1, ...) with the squeeze
        model's logits as soft labels."""
        done = self.recovered or [torch.empty(0, *self.image_shape, device=self.context.device)]
        images = torch.cat(done)
        with torch.no_grad():
            logits = self.model(images).float() if images.shape[0] else torch.empty(0, self.classes)
        metadata = {"num_classes": self.classes, "ipc": len(self.recovered), "temperature": self.settings.temperature,
                    "labels": "the squeeze model's logits of the recovered images"}
        squeeze = self.context.workdir / SQUEEZE_FILE if self.context.workdir is not None else None
        if squeeze is not None and squeeze.exists():  # what on-the-fly relabelling loads, beside the set
            metadata["squeeze_model"] = {"file": SQUEEZE_FILE, "fingerprint": read_metadata(squeeze)["fingerprint"]}
        return self.make_set({"images": images, "labels": logits}, "soft-label", metadata, self.pixel_space)


@METHODS.register("sre2l")
class SRe2L(Recover):
    """SRe2L: the squeeze model is a supervised network trained on the labelled source."""

    needs_teacher = False

    @classmethod
    def make_squeeze_model(cls, settings: RecoverSettings,
                           context: DistillContext) -> tuple[Backbone, PixelSpace, dict[str, Any]]:
        s, ctx = settings.squeeze, context
        if s.arch is not None:
            arch, arch_args = s.arch, dict(s.arch_args)
        elif ctx.teacher is not None:
            spec = dict(ctx.teacher.metadata["architecture"])
            arch = spec.pop("name")
            arch_args = {k: v for k, v in spec.items() if k not in ("num_outputs", "in_channels", "image_size")}
        else:
            raise ConfigError("sre2l needs an architecture for its squeeze model: settings.squeeze.arch, or a teacher "
                              "whose architecture to use")
        model = build_student(arch, arch_args, ctx.source.num_classes, ctx.image_shape, ctx.seed)
        BatchNormStatistics(model).remove()  # refuse a network without BatchNorm before training it
        train_network(model, ctx.normalized_source(), ctx.source.labels, s.train, "ce", ctx.seed, ctx.device,
                      desc="squeeze (supervised)", progress=ctx.progress)
        return model.eval(), ctx.pixel_space, {"squeeze": "supervised", "arch": arch, "epochs": s.train.epochs}


@METHODS.register("scdd")
class SCDD(Recover):
    """SC-DD: the squeeze model is the self-supervised teacher, frozen with its BatchNorm statistics, plus a
    linear classifier fitted on the labelled source."""

    settings_class = SCDDSettings

    @classmethod
    def make_squeeze_model(cls, settings: SCDDSettings,
                           context: DistillContext) -> tuple[Backbone, PixelSpace, dict[str, Any]]:
        s, ctx = settings.squeeze, context
        teacher = ctx.teacher
        features = teacher_features(teacher, ctx.source, device=ctx.device).float().cpu()
        mean, std = features.mean(0), features.std(0, unbiased=False).clamp_min(1e-6)
        weight, bias = fit_logistic_regression((features - mean) / std, ctx.source.labels, ctx.source.num_classes, s.l2,
                                               s.lbfgs_iterations)
        model = copy.deepcopy(teacher.backbone).cpu()
        model.reset_head(ctx.source.num_classes)
        with torch.no_grad():  # the head on raw features: W^T ((f - mean) / std) + b
            model.head.weight.copy_((weight / std.double().unsqueeze(1)).T.float())
            model.head.bias.copy_((bias - (mean.double() / std.double()) @ weight).float())
        accuracy = (model.head(features).argmax(1) == ctx.source.labels).float().mean().item() * 100
        return model.eval(), teacher.pixel_space, {"squeeze": "self-supervised teacher + linear head",
                                                   "train_top1": round(accuracy, 2)}

