"""``ssdd show``: a distilled set's metadata, byte budget and an image grid in the right pixel space."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from ssdd.distilled import DistilledSet
from ssdd.io import atomic_path, atomic_write_text
from ssdd.page import Code, Heading, Image, html
from ssdd.text import plot_text, terminal_safe


def describe(distilled: DistilledSet) -> str:
    """Human-readable summary: method, shapes, target kind, pixel space, byte count, provenance; what came from the
    file is escaped for the terminal (no control sequence or line break of its own reaches it)."""
    meta = distilled.metadata
    c, h, w = distilled.image_shape
    lines = [
        f"method:       {distilled.method}",
        f"images:       {distilled.num_images} x {c}x{h}x{w}",
        f"targets:      {distilled.target_kind}",
        f"pixel space:  mean {list(distilled.pixel_space.mean)} std {list(distilled.pixel_space.std)}",
        f"bytes:        {distilled.byte_count:,} ({distilled.byte_count / 2**20:.2f} MiB)",
    ]
    for name, tensor in distilled.tensors.items():
        lines.append(f"  {name:<10}  {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}")
    if distilled.learned_lr is not None:
        lines.append(f"learned lr:   {distilled.learned_lr:g}")
    for key in ("source", "teacher", "created", "ssdd_version"):
        if key in meta:
            lines.append(f"{key + ':':<13} {meta[key]}")
    return "\n".join(terminal_safe(line) for line in lines)


def save_grid(distilled: DistilledSet, path: str | Path, max_images: int = 100) -> Path:
    """Render up to ``max_images`` images, mapped back to [0, 1] through the set's pixel space, as a PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, _ = distilled.materialize()
    images = distilled.pixel_space.denormalize(images[:max_images]).clamp(0, 1)
    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    c, h, w = images.shape[1:]
    grid = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = images[i]
    array = grid.permute(1, 2, 0).squeeze(-1).numpy()
    fig = plt.figure(figsize=(cols * 0.6 + 0.4, rows * 0.6 + 0.6))
    plt.imshow(array, cmap="gray" if c == 1 else None, interpolation="nearest")
    plt.axis("off")
    plt.title(plot_text(f"{distilled.method}: {n} of {distilled.num_images} images"))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_page(distilled: DistilledSet, path: str | Path, max_images: int = 100) -> Path:
    """Write one self-contained HTML page of the set: its :func:`describe` summary and its image grid (embedded)."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as folder:
        save_grid(distilled, Path(folder) / "grid.png", max_images)
        blocks = [Heading(1, f"ssdd show: {distilled.path}"), Code(describe(distilled).splitlines()),
                  Image(f"{distilled.method} images", "grid.png")]
        atomic_write_text(path, html(blocks, f"ssdd show: {distilled.path.name}", folder))
    return path


def save_curves(records: list[dict], path: str | Path) -> Path | None:
    """Plot a distillation run's ``metrics.jsonl`` records: outer loss, drift from initialisation, kNN monitor and
    protocol monitor against the step (None when there is nothing to plot)."""
    rows = [r for r in records if "step" in r and "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    drifts = sorted({k for r in rows for k in r if k.startswith("drift_")})
    records = [r if "step" in r or not r.get("final") else {**r, "step": steps[-1]} for r in records]  # the end
    knn = [(r["step"], r["knn"]) for r in records if "step" in r and r.get("knn") is not None]
    checks = [r for r in records if "step" in r and r.get("protocol")]
    panels = 1 + bool(drifts) + bool(knn) + bool(checks)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="outer loss", yscale="log", title="loss")
    if drifts:
        ax = axes[0][1]
        for key in drifts:
            ax.plot(steps, [r.get(key) for r in rows], label=key.removeprefix("drift_"))
        ax.set(xlabel="step", ylabel="||x - x0|| / ||x0||", title="distance from initialisation")
        ax.legend(fontsize=7)
    if knn:
        ax = axes[0][1 + bool(drifts)]
        ax.plot(*zip(*knn), marker="o")
        ax.set(xlabel="step", ylabel="top-1 %", title="kNN monitor")
    if checks:
        ax = axes[0][-1]
        for key in sorted({k for r in checks for k in r["protocol"]}):
            points = [(r["step"], r["protocol"][key]) for r in checks if key in r["protocol"]]
            ax.plot(*zip(*points), marker="o", label=key)
        ax.set(xlabel="step", ylabel="top-1 %", title="protocol monitor")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
