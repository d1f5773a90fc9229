"""A suite's report: ``report.md``, ``report.html`` (the same blocks as one self-contained page) and
``report.json``, with the commands, the evaluations' tables and plots and their expected orderings judged, accuracy
against bytes, the sets with their grids, and the time and peak memory of every stage."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from ssdd.distilled import DistilledSet
from ssdd.environment import environment
from ssdd.evaluation.baselines import SETLESS
from ssdd.evaluation.evaluate import Cell
from ssdd.evaluation.expectations import Verdict, judge, summary, verdict_blocks
from ssdd.evaluation.report import plot_against_budget, result_tables
from ssdd.io import atomic_write_text
from ssdd.page import Block, Code, Heading, Image, Paragraph, Table, html, markdown

if TYPE_CHECKING:
    from ssdd.bench.stages import BenchRun

TIMING_HEADING = "## Time and peak memory of each stage"


def budget_points(run: BenchRun, sets: dict[str, DistilledSet],
                  results: dict[str, list[Cell]]) -> list[tuple[str, int, Cell]]:
    """(series, bytes, cell) of every cell that has a budget: a set's under its method at its bytes, a drawn
    baseline's under its name at its evaluation's budget (``none``, ``teacher`` and ``full`` have none)."""
    points = []
    for name, cells in results.items():
        for cell in cells:
            if cell.entry in sets:
                points.append((sets[cell.entry].method, sets[cell.entry].byte_count, cell))
            elif cell.entry not in SETLESS and cell.entry != "full" and run.budgets.get(name) is not None:
                points.append((cell.entry, run.budgets[name], cell))
    return points


def write_suite_report(run: BenchRun, sets: dict[str, DistilledSet], results: dict[str, list[Cell]]) -> Path:
    """Write ``report.md``, ``report.html`` (the same page, its plots and grids embedded) and ``report.json``
    (process 0; the others return the path of ``report.md``): environment, commands, one table and plot per
    evaluation with its expected orderings judged, accuracy against bytes, the sets with their grids, and the
    time and peak memory of every stage."""
    path = run.folder / "report.md"
    if not run.world.is_main:
        return path
    env = environment(run.device)
    verdicts = {name: judge(run.suite.evaluations[name].expect, cells) for name, cells in results.items()
                if run.suite.evaluations[name].expect is not None}
    for name, judged in verdicts.items():
        if judged:
            print(f"[bench] {name}: expected orderings, {summary(judged)}")
    blocks = report_blocks(run, sets, results, verdicts, env)
    atomic_write_text(path, markdown(blocks))
    atomic_write_text(run.folder / "report.html", html(blocks, f"ssdd bench: {run.name}", run.folder))
    atomic_write_text(run.folder / "report.json", json.dumps(
        {"suite": run.name, "environment": env, "stages": run.stages,
         "evaluations": {n: [c.to_dict() for c in cells] for n, cells in results.items()},
         "computed_with": run.computed_with,
         "expectations": {n: [v.to_dict() for v in vs] for n, vs in verdicts.items()}}, indent=2))
    return path


def report_blocks(run: BenchRun, sets: dict[str, DistilledSet], results: dict[str, list[Cell]],
                  verdicts: dict[str, list[Verdict]], env: dict[str, str]) -> list[Block]:
    """The report's content, for both its Markdown and its HTML page."""
    options = [f"--{k} {','.join(map(str, v))}" for k, v in
               (("methods", run.options.methods), ("targets", run.options.targets), ("seeds", run.options.seeds))
               if v is not None]
    blocks: list[Block] = [Heading(1, f"ssdd bench: {run.name}")]
    if run.suite.description:
        blocks.append(Paragraph(run.suite.description.strip()))
    blocks += [Paragraph("This run's environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + " (each "
                         "evaluation names where its entries were computed; each stage's device is in the last "
                         "table)."),
               Heading(2, "Commands"),
               Code([" ".join([f"ssdd bench --suite {run.name} --out {shlex.quote(str(run.folder.parent))}",
                               *options]), "# the same stages one by one:", *run.commands], "bash")]
    for name, cells in results.items():
        if not cells:
            continue
        computed = ", ".join(f"{k} {v}" for k, v in run.computed_with[name].items())
        blocks += [Heading(2, f"Evaluation `{name}`"), Paragraph(f"Computed with: {computed}."),
                   *result_tables(cells), Image(name, f"evaluations/{name}/results.png")]
        if verdicts.get(name):
            blocks += [Heading(3, "Expected orderings"), *verdict_blocks(verdicts[name])]
    points = budget_points(run, sets, results)
    if any(len({size for name, size, _ in points if name == series}) > 1 for series, _, _ in points):
        plot_against_budget(points, run.folder / "budget.png")
        blocks += [Heading(2, "Accuracy against budget"),
                   Paragraph("Each set at its bytes (a line per method), each baseline at the bytes it was drawn "
                             "at; evaluations of one protocol share the axes."),
                   Image("accuracy against budget", "budget.png")]
    if sets:
        blocks += [Heading(2, "Distilled sets"),
                   Table(["set", "method", "images", "views", "bytes"],
                         [[name, d.method, str(d.num_images), str(len(d.views)), f"{d.byte_count:,}"]
                          for name, d in sets.items()]),
                   *(Image(name, f"sets/{name}/grid.png") for name in sets)]
    timing = Table(["stage", "wall time", "distillation time", "peak memory", "device"], [])
    for stage, record in run.stages.items():
        peak = record.get("peak_memory_bytes")
        name = stage.removeprefix("set ")
        distill = sets[name].metadata.get("distill_seconds") if stage.startswith("set ") and name in sets else None
        timing.rows.append([stage, _duration(record["seconds"]), _duration(distill),
                            "-" if peak is None else f"{peak / 2**30:.2f} GiB", record["device"]])
    return blocks + [Heading(2, TIMING_HEADING.removeprefix("## ")),
                     Paragraph("Each stage as it last ran (a resumed stage: its last part); a set's whole "
                               "distillation time is the method's own clock, resumes included."), timing]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"
