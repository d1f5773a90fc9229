"""Evaluation reports: ``results.json`` (every cell, every setting), ``results.md`` (tables) and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ssdd.config import to_dict
from ssdd.errors import ArtefactError
from ssdd.evaluation.evaluate import Cell, EvaluationConfig
from ssdd.io import atomic_path, atomic_paths
from ssdd.page import Block, Heading, Table, markdown
from ssdd.text import plot_text

RESULTS_FORMAT = 1


def _column(cell: Cell) -> str:
    return cell.target if cell.protocol != "linear" else f"{cell.target} {cell.fraction * 100:g}%"


def results_dict(cells: list[Cell], config: EvaluationConfig, environment: dict[str, Any], command: str | None) -> dict:
    return {"format": RESULTS_FORMAT, "command": command, "environment": environment, "config": to_dict(config),
            "cells": [c.to_dict() for c in cells]}


def read_results(path: str | Path) -> tuple[list[Cell], dict]:
    """Cells and the full record of a ``results.json``."""
    try:
        record = json.loads(Path(path).read_text())
        cells = [Cell.from_dict(c) for c in record["cells"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtefactError(f"{path} is not an ssdd results file ({exc})") from None
    return cells, record


def result_tables(cells: list[Cell]) -> list[Block]:
    """One table per (protocol, architecture), under its heading: entries as rows, targets (x label fractions) as
    columns, the best mean of each column in bold."""
    blocks: list[Block] = []
    groups = dict.fromkeys((c.protocol, c.arch) for c in cells)
    for protocol, arch in groups:
        group = [c for c in cells if c.protocol == protocol and c.arch == arch]
        columns = list(dict.fromkeys(_column(c) for c in group))
        rows = list(dict.fromkeys(c.entry for c in group))
        best = {col: max(c.mean for c in group if _column(c) == col) for col in columns}
        seeds = len(group[0].seeds)
        table = Table(["set", *columns], [])
        for r, row in enumerate(rows):
            texts = [row]
            for i, col in enumerate(columns, start=1):
                match = [c for c in group if c.entry == row and _column(c) == col]
                texts.append(f"{match[0].mean:.1f} +- {match[0].std:.1f}" if match else "-")
                if match and match[0].mean == best[col]:
                    table.strong.add((r, i))
            table.rows.append(texts)
        blocks += [Heading(3, f"protocol `{protocol}`, architecture `{arch}` (top-1 %, mean +- std over {seeds} "
                              "seeds)"), table]
    return blocks


def markdown_tables(cells: list[Cell]) -> str:
    """:func:`result_tables` as Markdown."""
    return markdown(result_tables(cells))


def plot(cells: list[Cell], path: Path) -> None:
    """Grouped bars: accuracy per target column and entry, with std error bars (one panel per architecture), written
    to ``path`` as it is (:func:`write_report` gives a temporary path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(c.arch for c in cells))
    width = max(6, 1.6 * len({_column(c) for c in cells}) + 3)
    fig, axes = plt.subplots(len(archs), 1, figsize=(width, 3.6 * len(archs)), squeeze=False)
    for ax, arch in zip(axes[:, 0], archs):
        group = [c for c in cells if c.arch == arch]
        columns = list(dict.fromkeys(_column(c) for c in group))
        entries = list(dict.fromkeys(c.entry for c in group))
        width = 0.8 / len(entries)
        for i, entry in enumerate(entries):
            xs, means, stds = [], [], []
            for j, col in enumerate(columns):
                match = [c for c in group if c.entry == entry and _column(c) == col]
                if match:
                    xs.append(j + (i - (len(entries) - 1) / 2) * width)
                    means.append(match[0].mean)
                    stds.append(match[0].std)
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=plot_text(entry))
        ax.set_xticks(range(len(columns)), [plot_text(column) for column in columns])
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{group[0].protocol} protocol, {arch}")
        ax.legend(fontsize="small", ncols=min(len(entries), 4))
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=110)
    finally:
        plt.close(fig)


def plot_against_budget(points: list[tuple[str, int, Cell]], path: Path) -> None:
    """Accuracy against bytes: one panel per (protocol, architecture) and target column, a line with std error bars
    per series (a method, or a baseline drawn at several budgets), bytes on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys((c.protocol, c.arch) for _, _, c in points))
    columns = list(dict.fromkeys(_column(c) for _, _, c in points))
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(3.4 * len(columns), 3.0 * len(rows)), squeeze=False)
    for (protocol, arch), row in zip(rows, axes):
        for column, ax in zip(columns, row):
            here = [(series, size, c) for series, size, c in points
                    if (c.protocol, c.arch) == (protocol, arch) and _column(c) == column]
            for series in dict.fromkeys(series for series, _, _ in here):
                line = sorted((size, c.mean, c.std) for name, size, c in here if name == series)
                sizes, means, stds = zip(*line)
                ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=2, label=plot_text(series))
            ax.set_xscale("log")
            ax.set_title(plot_text(f"{protocol}, {arch}: {column}"), fontsize="small")
            ax.set_xlabel("bytes")
            ax.set_ylabel("top-1 (%)")
    axes[0, 0].legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(folder: str | Path, cells: list[Cell], config: EvaluationConfig, environment: dict[str, Any],
                 command: str | None = None) -> Path:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``folder``, all three or (a write that fails)
    none; returns the markdown path."""
    folder = Path(folder)
    header = ["# ssdd evaluate", ""]
    if command:
        header += ["```", command, "```", ""]
    env = ", ".join(f"{k} {v}" for k, v in environment.items())
    header += [f"Environment: {env}.", ""]
    if config.protocol == "supervised":  # which labels trained the soft-label sets that name their squeeze model
        how = ("relabelled on the fly by their squeeze model, as released" if config.relabel.mode == "on-the-fly"
               else "trained on their stored logits")
        header += [f"Relabel `{config.relabel.mode}`: sets that name their squeeze model are {how}.", ""]
    md = folder / "results.md"
    with atomic_paths(folder / "results.json", md, folder / "results.png") as (results, tables, figure):
        results.write_text(json.dumps(results_dict(cells, config, environment, command), indent=2))
        tables.write_text("\n".join(header) + "\n" + markdown_tables(cells) + "\n![results](results.png)\n")
        plot(cells, figure)
    return md
