"""PAA (Yu, Yao, Chiu, ICLR 2025): KRR-ST + Parameterization + predefined Augmentation + Approximation networks.

No reference code exists; every choice below is a setting, and the defaults are ssdd's design:

* **Parameterization** (``parameterization``): images X = C_x B_x with U image bases (optionally at a lower
  resolution ``basis_size``, upsampled bilinearly after combining) and targets Y = C_y B_y with V bases, all four
  learned.  ``pca`` initialises the bases by uncentred PCA of ``pca_images`` random real images (resp. their teacher
  features) and the coefficients by projecting the M chosen images (features) onto them; ``random`` uses random
  orthonormal bases with the same projection; ``none`` stores images and targets directly (KRR-ST's form).
* **Predefined augmentation** (``views``): the inner regression sees every view a_j(X) of every image with its own
  targets Y^(j), initialised from the teacher's features of the correspondingly viewed real images (feature cache).
  The real batches show each real image under a random view with the teacher's features of that view
  (``real_augment: views``), so every view's targets are scored against real data.
* **Approximation** (``approximation``): instead of storing Y^(j) for j > 0, one 2-layer MLP per view
  (``approx_hidden`` units) predicts the shift Y^(j) - Y^(0) from Y^(0).  ``joint``: the MLPs are fitted to the
  teacher's view targets at initialisation and then learned in the outer loop with everything else; ``post``: free
  view targets are learned and the MLPs are fitted to them after distillation; ``stored``: the view targets are
  stored as they are (no networks).
* **Initialisation** (``init``, shared with KRR-ST): the M images (and their views' targets) start from a seeded
  random subset of the source, or with ``high-loss`` from the M images that students trained one epoch to regress
  the teacher fit worst (MKDT's selection; ``high_loss`` sets the students; the scores are cached).  Their targets
  (``target_init``) are the teacher's features of the real images (``real``) or of the set's own initial images
  under each view (``projected``: exact for the PCA projections the set actually starts as).
* **Budget**: the set stores bases, coefficients and approximation weights; M (``images``) is the largest number of
  images that fits the byte budget for the given U and V (or is given and checked), so comparisons with KRR-ST are
  at equal bytes.  The artefact records how the bytes were spent.
* **Learning rates** (``relative_lr``): bases (entries about 0.02 for 3,072-long unit rows) and coefficients
  (entries about 4) differ in scale by 200x, and Adam moves every entry by about its learning rate per step; so each
  learned tensor gets ``lr_images`` / ``lr_targets`` times its own initial RMS.  With one absolute rate for all
  (``relative_lr: false``, the first cifar10-cpu runs) the bases moved 69 % (images) and 91 % (targets) from their
  PCA start in 1,000 steps while the coefficients moved 0.5 %, which turned the images into noise.
* **Drift**: what is logged is the change of what the set *is* (the materialised images and identity targets of
  ``drift_rows`` images, and each basis), not of its coefficients.
* **Speed**: with M x views larger than ``inner_samples``, each outer step regresses on a random subset of that many
  (image, view) pairs, so the step's cost does not grow with M.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ssdd.budget import Budget, Plan
from ssdd.data.augment import PREDEFINED_VIEWS, apply_view
from ssdd.data.mapped import read_rows
from ssdd.device import make_generator, seeded
from ssdd.distilled import APPROX_PARAMS, DistilledSet, approximate_shift, combine_bases
from ssdd.errors import ConfigError
from ssdd.methods.base import METHODS, DistillContext
from ssdd.methods.kernel_ridge.base import KernelRidgeMethod, KernelRidgeSettings
from ssdd.selection import select_random
from ssdd.teachers.features import teacher_features

log = logging.getLogger(__name__)

PARAMETERIZATIONS = ("pca", "random", "none")
APPROXIMATIONS = ("joint", "post", "stored")
TARGET_INITS = ("real", "projected")


@dataclass
class PAASettings(KernelRidgeSettings):
    """PAA's settings: the KRR family's plus the three parts (see the module docstring)."""

    real_augment: str = "views"
    parameterization: str = "pca"
    image_bases: int = 128  # U
    target_bases: int = 128  # V
    basis_size: int | None = None  # side of the image bases (None: the image size)
    images: int | None = None  # M (None: as many as the budget holds)
    pca_images: int = 5000
    views: list[str] = field(default_factory=lambda: ["identity", "rot90", "rot180", "rot270"])
    approximation: str = "joint"
    approx_hidden: int = 64
    approx_steps: int = 500  # Adam steps of each fit of the approximation networks
    approx_lr: float = 1e-3
    # the targets the set starts with: the teacher's features of the real images (real) or of the set's own initial
    # images (projected: the images as the bases reconstruct them, under every view), so that every pair starts exact
    target_init: str = "real"
    inner_samples: int | None = None  # (image, view) pairs per inner regression (None: all M x views)
    relative_lr: bool = True  # each learned tensor's lr is lr_images / lr_targets x its initial RMS
    drift_rows: int = 256  # images whose materialised image and target drift is logged every step

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.parameterization not in PARAMETERIZATIONS:
            raise ConfigError(f"parameterization must be one of {', '.join(PARAMETERIZATIONS)}, "
                              f"got {self.parameterization!r}")
        if self.approximation not in APPROXIMATIONS:
            raise ConfigError(f"approximation must be one of {', '.join(APPROXIMATIONS)}, "
                              f"got {self.approximation!r}")
        views = list(self.views)
        if (not views or views[0] != "identity" or len(set(views)) != len(views)
                or not set(views) <= set(PREDEFINED_VIEWS)):
            raise ConfigError(f"views must start with identity and name distinct views of "
                              f"{', '.join(PREDEFINED_VIEWS)}, got {views}")
        if min(self.image_bases, self.target_bases, self.approx_hidden, self.pca_images) < 1:
            raise ConfigError("image_bases, target_bases, approx_hidden and pca_images must be >= 1")
        if self.basis_size is not None and self.basis_size < 1:
            raise ConfigError(f"basis_size must be >= 1 (or unset for the image size), got {self.basis_size}")
        if self.target_init not in TARGET_INITS:
            raise ConfigError(f"target_init must be one of {', '.join(TARGET_INITS)}, got {self.target_init!r}")
        if self.approx_steps < 0 or self.approx_lr <= 0:
            raise ConfigError("approx_steps must be >= 0 and approx_lr > 0")
        if (self.images is not None and self.images < 1) or (self.inner_samples is not None and self.inner_samples < 1):
            raise ConfigError("images and inner_samples must be >= 1 when given")


def principal_directions(rows: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` leading right singular vectors of ``rows`` (uncentred PCA), as orthonormal rows."""
    gram = rows.double().T @ rows.double()
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors[:, -count:].flip(1).T.float().contiguous()


def random_directions(dim: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random orthonormal rows of length ``dim``."""
    q, _ = torch.linalg.qr(torch.randn(dim, count, generator=generator, dtype=torch.float64))
    return q.T.float().contiguous()


def init_approximation(dim: int, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """Weights of a fresh 2-layer MLP ``dim -> hidden -> dim`` (PyTorch's default Linear initialisation)."""
    with seeded(seed):
        first, second = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)
    return {"hidden.weight": first.weight.detach(), "hidden.bias": first.bias.detach(),
            "out.weight": second.weight.detach(), "out.bias": second.bias.detach()}


def fit_approximation(inputs: torch.Tensor, shifts: torch.Tensor, weights: dict[str, torch.Tensor], steps: int,
                      lr: float) -> tuple[dict[str, torch.Tensor], float, float]:
    """Fit an approximation network (full-batch Adam on MSE) from ``weights``; returns the fitted weights and the
    mean squared error before and after."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    inputs, shifts = inputs.detach(), shifts.detach()
    with torch.no_grad():
        before = F.mse_loss(approximate_shift(inputs, params), shifts).item()
    for _ in range(steps):
        loss = F.mse_loss(approximate_shift(inputs, params), shifts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = F.mse_loss(approximate_shift(inputs, params), shifts).item()
    return {k: v.detach() for k, v in params.items()}, before, after


@METHODS.register("paa")
class PAA(KernelRidgeMethod):
    """KRR-ST with parameterised images and targets, predefined views and approximation networks."""

    settings_class = PAASettings

    def __init__(self, settings: PAASettings, context: DistillContext, budget: Budget):
        super().__init__(settings, context, budget, views=settings.views)
        s = settings
        teacher, source, device = context.teacher, context.source, context.device
        self.views = list(s.views)
        c, h, w = self.image_shape
        self.basis_shape = (c, s.basis_size or h, s.basis_size or w)
        if self.basis_shape[1] > h or self.basis_shape[2] > w:
            raise ConfigError(f"basis_size {s.basis_size} is larger than the images ({h}x{w})")
        self.spending = self.plan_budget(budget, len(source))
        m = self.num_images = self.spending["images"]
        chosen = self.initial_selection(m)
        self.initial_indices = chosen
        real = teacher.pixel_space.normalize(self.real.images_at(chosen).float().div(255.0))
        if self.real.mode == "views":
            view_features = self.real.features
        else:
            view_features = teacher_features(teacher, source, views=self.views, device=device)
        chosen_features = torch.stack([read_rows(v, chosen) for v in view_features]).float()  # (views, M, d)
        self.basis_generator = make_generator(context.seed + 3)  # random bases: the image bases, then the targets'
        self.init_images(real)
        if s.target_init == "projected":
            chosen_features = self.teacher_views(self.images_of().detach())
        self.init_targets(chosen_features[0])
        self.approximation_errors: dict[str, tuple[float, float]] = {}
        k = len(self.views) - 1
        if k and s.approximation == "joint":
            identity = self.targets_of().detach()  # the (projected) identity targets the networks will see
            for j, view in enumerate(self.views[1:], start=1):
                fitted, before, after = fit_approximation(
                    identity, chosen_features[j] - identity,
                    init_approximation(self.feature_dim, s.approx_hidden, context.seed * 1000 + j),
                    s.approx_steps, s.approx_lr)
                self.approximation_errors[view] = (before, after)
                self.learn(s.lr_targets, s.relative_lr, **{f"approx.{view}.{p}": fitted[p] for p in APPROX_PARAMS})
        elif k:
            self.learn(s.lr_targets, s.relative_lr, view_targets=chosen_features[1:])
        self._fitted: dict[str, dict[str, torch.Tensor]] | None = None
        self.drift_index = torch.arange(min(s.drift_rows, m), device=device)
        self.start_tracking()

    # ---- the budget ---------------------------------------------------------------------------------------------

    def plan_budget(self, budget: Budget, available: int) -> dict[str, int]:
        """How many images fit and how the bytes are spent (in bytes per part)."""
        s = self.settings
        c, h, w = self.image_shape
        d = self.feature_dim
        k = len(s.views) - 1
        image_values = c * h * w
        total = budget.total_values(image_values + d)
        if s.parameterization == "none":
            fixed, per_image = {}, {"images": image_values, "targets": d}
        else:
            basis_values = self.basis_shape[0] * self.basis_shape[1] * self.basis_shape[2]
            if s.image_bases > basis_values or s.target_bases > d:
                raise ConfigError(f"at most {basis_values} image bases and {d} target bases exist at this size; "
                                  f"got {s.image_bases} and {s.target_bases}")
            fixed = {"image_bases": s.image_bases * basis_values, "target_bases": s.target_bases * d}
            per_image = {"image_coefficients": s.image_bases, "target_coefficients": s.target_bases}
        if k and s.approximation == "stored":
            per_image["view_targets"] = k * d
        elif k:
            fixed["approximation"] = k * (2 * s.approx_hidden * d + s.approx_hidden + d)
        room = total - sum(fixed.values())
        most = room // sum(per_image.values()) if room > 0 else 0
        if most < 1:
            raise ConfigError(f"the budget ({total} values) does not cover the fixed parts ({fixed}) plus one image; "
                              "use fewer bases, a smaller approx_hidden or a larger budget")
        if s.images is not None and s.images > most:
            raise ConfigError(f"images={s.images} does not fit the budget: at most {most} with U={s.image_bases}, "
                              f"V={s.target_bases} and these views")
        if s.images is not None and s.images > available:
            raise ConfigError(f"images={s.images} asks for more images than the source's {available}")
        m = min(s.images or most, available)
        b = budget.bytes_per_value
        spent = {name: v * b for name, v in fixed.items()} | {name: m * v * b for name, v in per_image.items()}
        self.plan = Plan(m, sum(per_image.values()) * b, sum(fixed.values()) * b, total * b)
        unused = total * b - sum(spent.values())
        if m < (s.images or most):
            log.warning("PAA: the budget holds %d images but the source has %d; %s of its %s bytes stay unused",
                        most, available, f"{unused:,}", f"{total * b:,}")
        return {"images": m, "budget_bytes": total * b, **{f"{k}_bytes": v for k, v in spent.items()},
                "unused_bytes": unused}

    # ---- initialisation -----------------------------------------------------------------------------------------

    def pca_sample(self) -> torch.Tensor:
        """The seeded random source images whose images (features) the PCA bases are fitted to."""
        source = self.context.source
        return select_random(min(self.settings.pca_images, len(source)), len(source), self.context.seed + 3)

    def init_images(self, images: torch.Tensor) -> None:
        """Register the learned image tensors, starting from ``images`` (normalised, (M, C, H, W))."""
        s = self.settings
        if s.parameterization == "none":
            self.learn(s.lr_images, s.relative_lr, images=images)
            return
        small = self.downsample(images)
        if s.parameterization == "pca":
            sample = self.pca_sample()
            real = self.context.teacher.pixel_space.normalize(
                self.real.images_at(sample).float().div(255.0))
            image_bases = principal_directions(self.downsample(real).flatten(1), s.image_bases)
        else:
            image_bases = random_directions(small[0].numel(), s.image_bases, self.basis_generator)
        self.learn(s.lr_images, s.relative_lr, image_coefficients=small.flatten(1) @ image_bases.T,
                   image_bases=image_bases.view(s.image_bases, *self.basis_shape))

    def init_targets(self, targets: torch.Tensor) -> None:
        """Register the learned identity-view target tensors, starting from ``targets`` (M, d)."""
        s = self.settings
        if s.parameterization == "none":
            self.learn(s.lr_targets, s.relative_lr, targets=targets)
            return
        if s.parameterization == "pca":
            feats = teacher_features(self.context.teacher, self.context.source, device=self.context.device)
            target_bases = principal_directions(read_rows(feats, self.pca_sample()).float(), s.target_bases)
        else:
            target_bases = random_directions(self.feature_dim, s.target_bases, self.basis_generator)
        self.learn(s.lr_targets, s.relative_lr, target_coefficients=targets @ target_bases.T, target_bases=target_bases)

    @torch.no_grad()
    def teacher_views(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's features (views, M, d) of ``images`` under every view."""
        teacher = self.context.teacher
        return torch.stack([teacher.represent(apply_view(images, view)).to(images.device) for view in self.views])

    def downsample(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) == tuple(self.basis_shape[1:]):
            return images
        return F.interpolate(images, size=self.basis_shape[1:], mode="area")

    # ---- the synthetic set --------------------------------------------------------------------------------------

    def images_of(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Images (all, or ``rows``) from the learned tensors, differentiable."""
        t = self.learned
        if "images" in t:
            return t["images"] if rows is None else t["images"][rows]
        coefficients = t["image_coefficients"] if rows is None else t["image_coefficients"][rows]
        return combine_bases(coefficients, t["image_bases"], self.image_shape)

    def tracked(self) -> dict[str, torch.Tensor]:
        rows = self.drift_index
        tracked = {"images": self.images_of(rows), "targets": self.targets_of(rows)}
        return tracked | {name: self.learned[name] for name in ("image_bases", "target_bases") if name in self.learned}

    def targets_of(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        t = self.learned
        if "targets" in t:
            return t["targets"] if rows is None else t["targets"][rows]
        coefficients = t["target_coefficients"] if rows is None else t["target_coefficients"][rows]
        return coefficients @ t["target_bases"]

    def view_targets_of(self, j: int, identity: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        view = self.views[j]
        if "view_targets" in self.learned:
            stored = self.learned["view_targets"][j - 1]
            return stored if rows is None else stored[rows]
        weights = {p: self.learned[f"approx.{view}.{p}"] for p in APPROX_PARAMS}
        return identity + approximate_shift(identity, weights)

    def inner_set(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        m, v = self.num_images, len(self.views)
        limit = self.settings.inner_samples
        if limit is None or limit >= m * v:
            images, identity = self.images_of(), self.targets_of()
            blocks = [(apply_view(images, view), identity if j == 0 else self.view_targets_of(j, identity, None))
                      for j, view in enumerate(self.views)]
        else:
            pairs = torch.randperm(m * v, generator=generator)[:limit]
            blocks = []
            for j, view in enumerate(self.views):
                rows = pairs[pairs // m == j] % m
                if rows.numel() == 0:
                    continue
                rows = rows.to(self.context.device)
                identity = self.targets_of(rows)
                targets = identity if j == 0 else self.view_targets_of(j, identity, rows)
                blocks.append((apply_view(self.images_of(rows), view), targets))
        return torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])

    def step(self, step: int) -> dict[str, float]:
        self._fitted = None
        return super().step(step)

    def approximation_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per non-identity view, the approximation network's weights (fitted now for ``post``)."""
        s = self.settings
        if s.approximation == "joint":
            return {view: {p: self.learned[f"approx.{view}.{p}"].detach() for p in APPROX_PARAMS}
                    for view in self.views[1:]}
        if self._fitted is None:
            identity = self.targets_of().detach()
            self._fitted = {}
            for j, view in enumerate(self.views[1:], start=1):
                start = init_approximation(self.feature_dim, s.approx_hidden, self.context.seed * 1000 + j)
                fitted, before, after = fit_approximation(identity, self.learned["view_targets"][j - 1] - identity,
                                                          start, s.approx_steps, s.approx_lr)
                self._fitted[view] = fitted
                self.approximation_errors[view] = (before, after)
        return self._fitted

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        t = {k: v for k, v in self.learned.items() if k != "view_targets" and not k.startswith("approx.")}
        if len(self.views) > 1 and self.settings.approximation == "stored":
            t |= {f"view_targets.{view}": self.learned["view_targets"][j] for j, view in enumerate(self.views[1:])}
        elif len(self.views) > 1:
            t |= {f"approx.{view}.{p}": w for view, weights in self.approximation_weights().items()
                  for p, w in weights.items()}
        return t

    def distilled_set(self) -> DistilledSet:
        distilled = self.kernel_set({"views": self.views, "image_shape": list(self.image_shape),
                                     "initial_indices": self.initial_indices.tolist(), "spending": self.spending})
        distilled.metadata["approximation_mse"] = {view: {"before": b, "after": a}
                                                   for view, (b, a) in self.approximation_errors.items()}
        return distilled
