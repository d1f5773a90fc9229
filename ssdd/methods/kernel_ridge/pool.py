"""A model pool: the networks whose features define the kernel of KRR-ST, PAA and FRePo.

Each member is trained online (one SGD step per time it is chosen, every parameter weight-decayed as in the
released KRR-ST code) on the current synthetic set.  How members age is ``ageing``:

* ``reset`` (ssdd's rule): a member is re-initialised after ``online_iterations`` online steps and its counter
  starts over, so kernels come from networks trained 0 .. ``online_iterations`` - 1 steps, evenly.
* ``released`` (the released KRR-ST code's rule): when the pool is built each member is trained a random
  1 .. ``online_iterations`` steps on the initial set, and its counter is never reset, so once a member has reached
  the limit it is re-initialised every time it is chosen and its kernels come from untrained networks from then on
  (about 96 % of them at the paper's settings).
* ``fresh``: a freshly initialised network every step, never trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ssdd.device import make_generator, seeded
from ssdd.errors import ConfigError
from ssdd.models import Backbone, create_model
from ssdd.optim import make_optimizer


@dataclass
class PoolSettings:
    """Size, architecture and online training of the pool."""

    size: int = 10
    arch: str = "convnet-widening"
    arch_args: dict[str, Any] = field(default_factory=dict)
    online_iterations: int = 1000
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3
    decay_1d: bool = True  # weight-decay biases and norm parameters too, as the released code does
    ageing: str = "reset"  # reset | released | fresh (see the module docstring)

    def __post_init__(self) -> None:
        if self.ageing not in AGEING_RULES:
            raise ConfigError(f"pool.ageing must be one of {', '.join(AGEING_RULES)}, got {self.ageing!r}")


AGEING_RULES = ("reset", "released", "fresh")


class ModelPool:
    """``size`` networks of one architecture with per-member SGD states and online-step counters.

    Member initialisations come from a generator seeded with ``seed``, so the pool is a function of the seed
    and of the sequence of calls only.
    """

    def __init__(self, settings: PoolSettings, num_outputs: int, image_shape: tuple[int, int, int], seed: int,
                 device: torch.device, memory_format: torch.memory_format = torch.contiguous_format):
        self.settings = settings
        self.memory_format = memory_format  # channels_last where the members run bf16 (faster convolutions there)
        self.num_outputs = num_outputs
        self.image_shape = image_shape
        self.device = device
        self.init_generator = make_generator(seed)
        self.models: list[Backbone] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.counters = [0] * settings.size
        self.reinitialisations = 0
        self.warmed = settings.ageing != "released"  # the released rule's warm start is still to come
        for _ in range(settings.size):
            model = self._fresh_model()
            self.models.append(model)
            self.optimizers.append(self._optimizer(model))

    def _fresh_model(self) -> Backbone:
        seed = int(torch.randint(0, 2**62, (1,), generator=self.init_generator))
        c, h, _ = self.image_shape
        with seeded(seed):
            model = create_model(self.settings.arch, num_outputs=self.num_outputs, in_channels=c, image_size=h,
                                 **self.settings.arch_args)
        return model.to(self.device, memory_format=self.memory_format)

    def _optimizer(self, model: Backbone) -> torch.optim.Optimizer:
        s = self.settings
        return make_optimizer("sgd", model, s.lr, s.weight_decay, s.momentum, decay_1d=s.decay_1d)

    @property
    def trains_online(self) -> bool:
        """Whether chosen members take online steps (not under ``fresh``, whose networks are never reused)."""
        return self.settings.ageing != "fresh"

    def warm_start(self, images: torch.Tensor, targets: torch.Tensor) -> int:
        """The released rule's start: train each member a random 1 .. ``online_iterations`` online steps on the
        initial set (once; later calls do nothing).  Returns the number of online steps taken."""
        if self.warmed:
            return 0
        steps = [int(torch.randint(1, self.settings.online_iterations + 1, (1,), generator=self.init_generator))
                 for _ in self.models]
        for index, count in enumerate(steps):
            for _ in range(count):
                self.train_online(index, images, targets)
        self.warmed = True
        return sum(steps)

    def reinitialise_if_due(self, index: int) -> bool:
        """Re-initialise member ``index`` when its ageing rule says so; returns whether it was."""
        if self.settings.ageing != "fresh" and self.counters[index] < self.settings.online_iterations:
            return False
        self.models[index] = self._fresh_model()
        self.optimizers[index] = self._optimizer(self.models[index])
        if self.settings.ageing == "reset":
            self.counters[index] = 0
        self.reinitialisations += 1
        return True

    def train_online(self, index: int, images: torch.Tensor, targets: torch.Tensor) -> float:
        """One SGD step of member ``index`` on MSE(head(features(images)), targets) (train mode); returns the loss."""
        model = self.models[index]
        model.train()
        loss = F.mse_loss(model(images), targets)
        self.optimizers[index].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers[index].step()
        model.eval()
        self.counters[index] += 1
        return loss.item()

    def state_dict(self) -> dict[str, Any]:
        return {
            "models": [m.state_dict() for m in self.models],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "counters": list(self.counters),
            "reinitialisations": self.reinitialisations,
            "warmed": self.warmed,
            "init_generator": self.init_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for model, weights in zip(self.models, state["models"], strict=True):
            model.load_state_dict(weights)
        for optimizer, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(opt_state)
        self.counters = list(state["counters"])
        self.reinitialisations = int(state["reinitialisations"])
        self.warmed = bool(state.get("warmed", True))
        self.init_generator.set_state(state["init_generator"])
