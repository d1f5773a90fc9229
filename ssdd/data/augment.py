"""Batched, differentiable image augmentations driven by explicit ``torch.Generator`` objects.

Three families, all on float tensors (N, C, H, W) in [0, 1] (or any pixel space for the geometric ops), on any
device:

* :class:`SSLViews` -- the self-supervised two-view pipeline (random resized crop, flip, colour jitter,
  grayscale), parameters drawn per image.
* DSA -- differentiable siamese augmentation: :func:`sample_dsa_params` draws the parameters once and
  :func:`apply_dsa` applies them identically to any number of batches (a real and a synthetic one); gradients
  flow to the images.
* Predefined views -- exact, deterministic transforms (rotations by 90/180/270, flips) for PAA.

Randomness comes only from the generator passed in, so a run is reproducible from its seed and the global RNG
is never reseeded.  Geometric warps use ``torch.nn.functional.grid_sample``; colour operations use kornia.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F

from ssdd.errors import ConfigError

PREDEFINED_VIEWS = ("identity", "rot90", "rot180", "rot270", "hflip", "vflip")


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device).to(device) * (high - low) + low


def _bernoulli(n: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device).to(device) < p


def warp_affine(x: torch.Tensor, theta: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Apply per-image 2x3 affine maps in normalised coordinates (output pixel -> input pixel)."""
    theta = theta.to(dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def crop_flip_params(n: int, generator: torch.Generator, padding: int = 4, flip: bool = True,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image integer shifts (n, 2) in [-padding, padding] and horizontal-flip flags (n,) for
    :func:`apply_crop_flip`."""
    shifts = torch.randint(-padding, padding + 1, (n, 2), generator=generator, device=generator.device).to(device)
    if flip:
        flips = _bernoulli(n, 0.5, generator, torch.device(device))
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=device)
    return shifts, flips


def apply_crop_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """A crop after zero padding (i.e. an integer shift of each image), then a horizontal flip where flagged."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, 0, 2] = 2 * shifts[:, 0].to(x.device, x.dtype) / w
    theta[:, 1, 2] = 2 * shifts[:, 1].to(x.device, x.dtype) / h
    out = warp_affine(x, theta)
    return _where(flips.to(x.device), out.flip(-1), out)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding by ``padding`` pixels (i.e. an integer shift), then horizontal flip."""
    return apply_crop_flip(x, *crop_flip_params(x.shape[0], generator, padding, flip, x.device))


@dataclass
class SSLViews:
    """The SSL augmentation of SimCLR / Barlow Twins on [0, 1] images: two independent views per image.

    Colour jitter is applied in a fixed order (brightness, contrast, saturation, hue) with probability
    ``jitter_p``; brightness, contrast and saturation blend with black, the mean grey level and the grayscale
    image as torchvision does; hue rotates in HSV space (kornia).  Grayscale and colour steps are skipped for
    one-channel images.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2

    def resized_crop(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        area = _uniform(n, *self.crop_scale, generator, x.device)
        log_ratio = _uniform(n, math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), generator, x.device)
        ratio = log_ratio.exp()
        width = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the image side
        height = (area / ratio).sqrt().clamp(max=1.0)
        cx = _uniform(n, 0, 1, generator, x.device) * (1 - width) + width / 2
        cy = _uniform(n, 0, 1, generator, x.device) * (1 - height) + height / 2
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = width
        theta[:, 1, 1] = height
        theta[:, 0, 2] = 2 * cx - 1
        theta[:, 1, 2] = 2 * cy - 1
        return warp_affine(x, theta, padding_mode="border")

    def color(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        shape = (n, 1, 1, 1)
        b = _uniform(n, 1 - self.brightness, 1 + self.brightness, generator, x.device).view(shape)
        c = _uniform(n, 1 - self.contrast, 1 + self.contrast, generator, x.device).view(shape)
        s = _uniform(n, 1 - self.saturation, 1 + self.saturation, generator, x.device).view(shape)
        h = _uniform(n, -self.hue, self.hue, generator, x.device)
        jitter = _bernoulli(n, self.jitter_p, generator, x.device)
        gray = _bernoulli(n, self.grayscale_p, generator, x.device)
        y = (x * b).clamp(0, 1)
        mean = _luma(y).mean(dim=(1, 2, 3), keepdim=True)
        y = ((y - mean) * c + mean).clamp(0, 1)
        if x.shape[1] == 3:
            g = _luma(y)
            y = ((y - g) * s + g).clamp(0, 1)
            if self.hue > 0:
                y = kornia.enhance.adjust_hue(y, h * 2 * math.pi)
        y = _where(jitter, y, x)
        if x.shape[1] == 3:
            y = _where(gray, _luma(y).expand_as(y), y)
        return y

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One random view of every image in ``x``."""
        y = self.resized_crop(x, generator)
        y = _where(_bernoulli(x.shape[0], self.flip_p, generator, x.device), y.flip(-1), y)
        return self.color(y, generator)

    def two_views(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self(x, generator), self(x, generator)


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return kornia.color.rgb_to_grayscale(x)


DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass
class DSAConfig:
    """Differentiable siamese augmentation (Zhao & Bilen, 2021) settings.

    ``mode="single"`` applies one randomly chosen family of ``strategy`` per call (DSA's default);
    ``mode="all"`` applies every family in order.
    """

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    mode: str = "single"
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop_ratio: float = 0.125
    cutout_ratio: float = 0.5
    scale_ratio: float = 1.2
    rotate_degrees: float = 15.0
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        unknown = [op for op in self.strategy.split("_") if op not in DSA_OPS]
        if unknown:
            raise ConfigError(f"unknown DSA operation(s) {', '.join(unknown)}; choose from {', '.join(DSA_OPS)}")
        if self.mode not in ("single", "all"):
            raise ConfigError(f"DSA mode must be 'single' or 'all', got {self.mode!r}")


@dataclass
class DSAParams:
    """Sampled DSA parameters; ``n`` rows, or one row broadcast over any batch (the siamese case)."""

    ops: tuple[str, ...]
    values: dict[str, torch.Tensor]
    n: int


def sample_dsa_params(n: int, config: DSAConfig, generator: torch.Generator,
                      device: torch.device | str = "cpu") -> DSAParams:
    """Draw DSA parameters for ``n`` images (``n=1``: one transform shared by every image of any batch)."""
    device = torch.device(device)
    families = config.strategy.split("_")
    if config.mode == "single":
        pick = int(torch.randint(len(families), (1,), generator=generator, device=generator.device))
        ops = (families[pick],)
    else:
        ops = tuple(families)
    u = lambda low, high: _uniform(n, low, high, generator, device)  # noqa: E731
    v: dict[str, torch.Tensor] = {}
    for op in ops:
        if op == "color":
            v["brightness"] = u(-0.5, 0.5) * config.brightness
            v["saturation"] = u(0, 1) * config.saturation
            v["contrast"] = u(0, 1) + config.contrast
        elif op == "crop":
            v["shift"] = torch.stack([u(-config.crop_ratio, config.crop_ratio),
                                      u(-config.crop_ratio, config.crop_ratio)], 1)
        elif op == "cutout":
            v["cutout_center"] = torch.stack([u(0, 1), u(0, 1)], 1)
        elif op == "flip":
            v["flip"] = _bernoulli(n, config.flip_p, generator, device)
        elif op == "scale":
            v["scale"] = torch.stack([u(1 / config.scale_ratio, config.scale_ratio),
                                      u(1 / config.scale_ratio, config.scale_ratio)], 1)
        elif op == "rotate":
            v["angle"] = u(-config.rotate_degrees, config.rotate_degrees) * math.pi / 180
    v["cutout_ratio"] = torch.tensor(config.cutout_ratio)
    return DSAParams(ops, v, n)


def apply_dsa(x: torch.Tensor, params: DSAParams) -> torch.Tensor:
    """Apply sampled DSA parameters to a batch (differentiable in ``x``)."""
    n = x.shape[0]
    if params.n not in (1, n):
        raise ConfigError(f"DSA parameters were sampled for {params.n} images, cannot apply them to {n}")

    def rows(t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.device)
        return t.expand(n, *t.shape[1:]) if params.n == 1 else t

    v = params.values
    for op in params.ops:
        if op == "color":
            shape = (n, 1, 1, 1)
            x = x + rows(v["brightness"]).to(x.dtype).view(shape)
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * rows(v["saturation"]).to(x.dtype).view(shape) + mean
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * rows(v["contrast"]).to(x.dtype).view(shape) + mean
        elif op == "crop":
            h, w = x.shape[-2:]
            pixels = torch.stack([(rows(v["shift"])[:, 0] * w).round() / w,
                                  (rows(v["shift"])[:, 1] * h).round() / h], 1)
            theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
            theta[:, 0, 0] = theta[:, 1, 1] = 1
            theta[:, :, 2] = 2 * pixels.to(x.dtype)
            x = warp_affine(x, theta)
        elif op == "cutout":
            x = x * _cutout_mask(x, rows(v["cutout_center"]), float(v["cutout_ratio"]))
        elif op == "flip":
            x = _where(rows(v["flip"]), x.flip(-1), x)
        elif op == "scale":
            s = rows(v["scale"]).to(x.dtype)
            theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
            theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
            x = warp_affine(x, theta)
        elif op == "rotate":
            a = rows(v["angle"]).to(x.dtype)
            theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
            theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
            theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
            x = warp_affine(x, theta)
    return x


def siamese_dsa(real: torch.Tensor, synthetic: torch.Tensor, generator: torch.Generator,
                config: DSAConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampled DSA transform applied to a real and a synthetic batch alike (siamese augmentation)."""
    params = sample_dsa_params(1, config or DSAConfig(), generator, synthetic.device)
    return apply_dsa(real, params), apply_dsa(synthetic, params)


def _cutout_mask(x: torch.Tensor, centers: torch.Tensor, ratio: float) -> torch.Tensor:
    n, _, h, w = x.shape
    side_h, side_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = (centers[:, 1] * h).long().clamp(0, h - 1).view(n, 1, 1) - side_h // 2
    left = (centers[:, 0] * w).long().clamp(0, w - 1).view(n, 1, 1) - side_w // 2
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (ys >= top) & (ys < top + side_h) & (xs >= left) & (xs < left + side_w)
    return (~inside).to(x.dtype).unsqueeze(1)


def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """Apply one predefined, exact view to a batch (N, C, H, W)."""
    if view == "identity":
        return x
    if view in ("rot90", "rot180", "rot270"):
        return torch.rot90(x, k=int(view[3:]) // 90, dims=(-2, -1))
    if view == "hflip":
        return x.flip(-1)
    if view == "vflip":
        return x.flip(-2)
    raise ConfigError(f"unknown view {view!r}; choose from {', '.join(PREDEFINED_VIEWS)}")


def apply_views(x: torch.Tensor, views: tuple[str, ...] | list[str]) -> torch.Tensor:
    """All views of a batch, stacked view-major: (len(views) * N, C, H, W)."""
    return torch.cat([apply_view(x, v) for v in views])
