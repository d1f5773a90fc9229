"""``ssdd bench``: benchmark suites run end to end, stage by stage, into one report folder.

A suite (preset group ``bench``) names a teacher, the distilled sets to make and the evaluations to run. Its stages
are the teacher, each set and each (evaluation, entry) pair; every stage writes into the report folder and is
reused when the suite runs again with the same settings, so a suite killed halfway continues where it stopped:

    <out>/<suite>/teacher/                       the teacher's run folder
    <out>/<suite>/sets/<name>/                   each set's run folder (+ grid.png)
    <out>/<suite>/evaluations/<eval>/<entry>.json one entry's cells under one evaluation
    <out>/<suite>/evaluations/<eval>/results.*   the evaluation's combined results (json, md, png)
    <out>/<suite>/stages.json                    wall time and peak memory of every stage that ran
    <out>/<suite>/report.md                      environment, commands, tables, plots, grids, time and memory
    <out>/<suite>/report.html                    the same page, self-contained (plots and grids embedded)

Under ``torchrun`` every process takes part: the teacher trains data-parallel; the other sets still to make and the
baselines' entries that need no set form a queue from which each process takes the next job and does it alone
(so a process that finished does not wait while another makes a long set); then the sets whose method splits its
steps (the kernel-ridge family, SC-DD, SRe2L) are made by all processes together, and the remaining entries' cells
are dealt over the processes. Process 0 writes the report; the output folder must be visible to every process (one
machine, or a filesystem the nodes share).

Separate runs with different ``--methods`` may share one folder at the same time: ``stages.json`` is changed under a
lock, and each run's ``report.md`` covers its own part.

The package: :mod:`.suite` (what a suite is), :mod:`.stages` (running it stage by stage), :mod:`.queue` (the jobs
dealt over processes), :mod:`.report` (the report).
"""

from ssdd.bench.report import TIMING_HEADING
from ssdd.bench.stages import BenchOptions, BenchRun, run_suite
from ssdd.bench.suite import EvaluationStage, Stage, Suite, load_suite, suite_name, suites

__all__ = ["TIMING_HEADING", "BenchOptions", "BenchRun", "EvaluationStage", "Stage", "Suite", "load_suite",
           "run_suite", "suite_name", "suites"]
