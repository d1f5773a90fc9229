"""The stages of a suite run (:class:`BenchRun`): the teacher, each set, each evaluation's entries, each reused when
its artefact exists with the same settings; :func:`run_suite`, what ``ssdd bench`` calls."""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ssdd.bench.queue import claimed
from ssdd.bench.report import write_suite_report
from ssdd.bench.suite import EvaluationStage, Stage, load_suite, suite_name
from ssdd.config import deep_update, from_dict, preset_dict, to_dict
from ssdd.device import resolve_device
from ssdd.distilled import DistilledSet, load_distilled
from ssdd.distributed import alone, barrier, broadcast_object, gather_objects, world
from ssdd.environment import PeakMemory, combined_environment, environment
from ssdd.errors import ConfigError
from ssdd.evaluation import EvaluationConfig, clear_journal, evaluate, write_report
from ssdd.evaluation.baselines import SETLESS
from ssdd.evaluation.evaluate import Cell, image_budget_bytes
from ssdd.io import atomic_write_text, locked, make_folder
from ssdd.methods import METHODS, Distillation, DistillConfig, distill_preset
from ssdd.methods.engine import default_config, method_settings, resolved_config
from ssdd.runs import RunDir, exclusive
from ssdd.teachers import Teacher, TeacherConfig, load_teacher, train_teacher
from ssdd.teachers.reference import PREFIX as REFERENCE_PREFIX
from ssdd.teachers.reference import is_reference

TEACHER_FILE = "teacher.safetensors"
SET_FILE = "distilled.safetensors"


@dataclass
class BenchOptions:
    """How to run a suite: where, on what, and which part of it (``methods`` keeps only those sets and baselines;
    ``targets`` / ``seeds`` replace every evaluation's; ``train_teacher`` trains the suite's teacher even where it
    names a shipped one)."""

    data_root: str | None = None
    device: str = "auto"
    progress: bool = True
    methods: list[str] | None = None
    targets: list[str] | None = None
    seeds: list[int] | None = None
    train_teacher: bool = False


class BenchRun:
    """One suite run into ``out/<suite>``: every stage reused when its artefact exists with the same settings."""

    def __init__(self, suite: str, out: str | Path, options: BenchOptions | None = None):
        self.name = suite_name(suite)
        self.suite = load_suite(suite)
        self.options = options or BenchOptions()
        self.folder = Path(out) / self.name
        self.world = world()
        self.device = resolve_device(self.options.device)
        known = set(self.suite.sets) | {b for e in self.suite.evaluations.values() for b in e.baselines}
        unknown = sorted(set(self.options.methods or []) - known)
        if unknown:
            raise ConfigError(f"--methods names {', '.join(unknown)}, which suite {self.name} does not run; "
                              f"it runs {', '.join(sorted(known))}")
        self.stages_path = self.folder / "stages.json"
        self.stages: dict[str, dict] = json.loads(self.stages_path.read_text()) if self.stages_path.exists() else {}
        self.ran: set[str] = set()  # the stages this run timed (its processes together)
        self.commands: list[str] = []
        self.computed_with: dict[str, dict[str, str]] = {}  # per evaluation: where its entries' cells were computed
        self.budgets: dict[str, int | None] = {}  # per evaluation: the bytes its drawn baselines were given

    def _keep(self, name: str) -> bool:
        return self.options.methods is None or name in self.options.methods

    def _say(self, line: str) -> None:
        """Print ``line`` from process 0, or from the process doing a queued job alone (which it names)."""
        if world().is_main:
            print(line + (f" on process {self.world.rank}" if self.world.size > 1 and world().size == 1 else ""))

    def _record(self, stage: str, seconds: float, peak: int | None) -> None:
        self.stages[stage] = {"seconds": round(seconds, 1), "peak_memory_bytes": peak,
                              "device": environment(self.device)["device"]}
        self.ran.add(stage)
        self._write_stages()

    def _write_stages(self) -> None:
        """Write the stages this run timed into ``stages.json``, keeping what another run into the same folder (other
        ``--methods`` at the same time) wrote there meanwhile."""
        if self.world.is_main:
            make_folder(self.folder)
            with locked(self.folder / ".stages.lock"):
                on_disk = json.loads(self.stages_path.read_text()) if self.stages_path.exists() else {}
                self.stages = {**on_disk, **{k: self.stages[k] for k in self.ran}}
                atomic_write_text(self.stages_path, json.dumps(self.stages, indent=2))

    def _timed(self, stage: str, work):  # noqa: ANN001, ANN202 - any callable, its result
        started = time.monotonic()
        with PeakMemory(self.device) as peak:
            result = work()
        self._record(stage, time.monotonic() - started, peak.bytes)
        return result

    def run(self) -> Path:
        """Run (or continue) every stage, then write the report; returns the path of ``report.md``."""
        stages = 1 + sum(map(self._keep, self.suite.sets)) + len(self.suite.evaluations)  # --methods narrows the sets
        if self.world.is_main:
            make_folder(self.folder)
        processes = f", {self.world.size} processes" if self.world.size > 1 else ""
        self._say(f"[bench] suite {self.name} into {self.folder} ({stages} stage groups{processes}); report: "
                  f"{self.folder / 'report.md'} and {self.folder / 'report.html'}")
        teacher = self.teacher()
        sets = self.sets(teacher)
        results = {name: self.evaluation(name, stage, teacher, sets) for name, stage in self.suite.evaluations.items()}
        return write_suite_report(self, sets, results)

    def _merged(self, group: str, stage: Stage, run: dict[str, Any], preset: str | None = None) -> dict[str, Any]:
        """The stage's preset of ``group`` (``preset`` when given: its resolved name) < its overrides < this run's
        settings."""
        preset = preset or stage.preset
        merged = dict(preset_dict(group, preset)) if preset else {}
        deep_update(merged, stage.config)
        deep_update(merged, {**run, "data_root": self.options.data_root, "device": self.options.device})
        return merged

    def teacher_config(self) -> TeacherConfig:
        return from_dict(TeacherConfig, self._merged("teacher", self.suite.teacher, {}),
                         where=f"suite {self.name} teacher")

    def set_config(self, name: str) -> DistillConfig:
        """The distillation of set ``name``, its method's settings checked."""
        stage = self.suite.sets[name]
        preset = distill_preset(stage.preset, stage.config.get("method"))
        merged = self._merged("distill", stage, {"teacher": self.teacher_source()}, preset)
        config = from_dict(DistillConfig, merged, where=f"suite {self.name} set {name}")
        method_settings(config.method, config.settings)
        return config

    def evaluation_config(self, name: str) -> EvaluationConfig:
        options = (("targets", self.options.targets), ("seeds", self.options.seeds))
        replaced = {k: v for k, v in options if v is not None}
        merged = self._merged("evaluate", self.suite.evaluations[name], replaced)
        return from_dict(EvaluationConfig, merged, where=f"suite {self.name} evaluation {name}")

    def teacher_source(self) -> str:
        """The teacher every stage uses: the shipped one the suite names (unless ``--train-teacher``), else the
        suite's own ``teacher/`` folder."""
        reference = self.suite.teacher.reference
        if reference is not None and not self.options.train_teacher:
            return f"{REFERENCE_PREFIX}{reference}"
        return str(self.folder / "teacher")

    def teacher(self) -> Teacher:
        source = self.teacher_source()
        if is_reference(source):
            teacher = load_teacher(source, device=self.device)
            self._say(f"[bench] teacher: {source}, shipped with ssdd ({teacher.metadata['reference']['made_by']}; "
                      f"linear probe {teacher.metadata['reference']['linear_probe_top1']} %); --train-teacher "
                      "trains the suite's own instead")
            self.commands.append(f"# teacher: {source}, shipped with ssdd")
            return teacher
        folder = self.folder / "teacher"
        config = self.teacher_config()
        if (folder / TEACHER_FILE).exists():
            _check_same(folder, config, "teacher", defaults=TeacherConfig())
            self._say(f"[bench] teacher: reusing {folder / TEACHER_FILE}")
        else:
            self._say(f"[bench] teacher: training {config.ssl} {config.arch}, {config.epochs} epochs on "
                      f"{config.train_images or 'all'} {config.dataset} images")
            self._timed("teacher", lambda: train_teacher(config, folder, resume=True, progress=self.options.progress))
            barrier(self.world)  # process 0 writes the teacher that every process loads
        self.commands.append(f"ssdd teacher --config {shlex.quote(str(folder / 'config.yaml'))} --out "
                             f"{shlex.quote(str(folder))}")
        return load_teacher(folder, device=self.device)

    def sets(self, teacher: Teacher) -> dict[str, DistilledSet]:
        """Make (or reuse) the suite's sets. Several processes make a set whose method splits its steps together;
        the other sets still to make are queued with the baselines' entries that need no set, and each process
        takes the next job from the queue and does it alone until none is left, so that no process idles while
        another makes a long set. Every process then reads every set from disk."""
        names = [name for name in self.suite.sets if self._keep(name)]
        configs = {name: self.set_config(name) for name in names}
        together = [n for n in names if self.world.size == 1 or METHODS.get(configs[n].method).splits_over_processes]
        queued: list[str] = []
        if self.world.size > 1:  # process 0 decides, as another process may look after process 0 has made one
            queued = broadcast_object([n for n in names if n not in together
                                       and not (self._set_folder(n) / SET_FILE).exists()], self.world)
        jobs = [("set", name) for name in queued] + (self._setless_entries(teacher) if queued else [])
        for job in claimed(jobs, self.folder, self.world):
            with alone():
                if job[0] == "set":
                    self.distilled(job[1], configs[job[1]], teacher, self.options.progress and self.world.is_main)
                else:
                    self._entry(*job[1:], distilled=None, teacher=teacher)
        for part in gather_objects({k: self.stages[k] for k in self.ran}, self.world):
            self.stages.update(part)  # the queued jobs' times, measured by the process that did each
            self.ran.update(part)
        self._write_stages()
        made = {name: self.distilled(name, configs[name], teacher, self.options.progress)
                for name in names if name not in queued}
        barrier(self.world)  # every set is on disk
        sets = {name: made[name] if name in made and self.world.size == 1 else load_distilled(self._set_folder(name))
                for name in names}
        for name in names:
            self.commands.append(f"ssdd distill --config {shlex.quote(str(self._set_folder(name) / 'config.yaml'))} "
                                 f"--out {shlex.quote(str(self._set_folder(name)))}")
        return sets

    def _setless_entries(self, teacher: Teacher) -> list[tuple]:
        """The baselines' entries still to evaluate that need no set: ``_entry``'s leading arguments."""
        jobs = []
        for name, stage in self.suite.evaluations.items():
            config = self.evaluation_config(name)
            covered = stage.sets if stage.sets is not None else list(self.suite.sets)
            budget = self._budget(stage, covered, {}, teacher, config)
            folder = self.folder / "evaluations" / name
            for entry in (b for b in stage.baselines if self._keep(b)):
                drawn = None if entry in SETLESS else budget
                if (entry in SETLESS or budget is not None) and _reusable(
                        folder / f"{entry}.json", _entry_key(config, drawn, None)) is None:
                    jobs.append(("entry", folder, name, entry, config, drawn))
        return jobs

    def _set_folder(self, name: str) -> Path:
        return self.folder / "sets" / name

    def distilled(self, name: str, config: DistillConfig, teacher: Teacher, progress: bool) -> DistilledSet:
        """Set ``name`` made with ``config`` (reused when its folder holds it with the same settings), with its
        ``grid.png``."""
        folder = self._set_folder(name)
        current = world()
        if (folder / SET_FILE).exists():
            # the teacher by its fingerprint, not its path: a suite folder may be moved
            _check_same(folder, resolved_config(config), f"set {name}", ignore=("teacher",),
                        defaults=default_config(config.method))
            distilled = load_distilled(folder)
            made_with = (distilled.metadata.get("teacher") or {}).get("fingerprint")
            if made_with is not None and made_with != teacher.fingerprint:
                raise ConfigError(f"the set {name} in {folder} was made with another teacher than the suite's "
                                  f"({made_with} vs {teacher.fingerprint}); delete the folder or use another --out")
            self._say(f"[bench] set {name}: reusing {folder / SET_FILE}")
        else:
            self._say(f"[bench] set {name}: distilling with {config.method}")
            distilled = self._timed(f"set {name}", lambda: Distillation(
                config, folder, resume=True, progress=progress, teacher=teacher).run())
        if current.is_main and not (folder / "grid.png").exists():
            from ssdd.show import save_grid

            save_grid(distilled, folder / "grid.png", max_images=64)
        return distilled

    def evaluation(self, name: str, stage: EvaluationStage, teacher: Teacher,
                   sets: dict[str, DistilledSet]) -> list[Cell]:
        folder = self.folder / "evaluations" / name
        config = self.evaluation_config(name)
        covered = stage.sets if stage.sets is not None else list(self.suite.sets)
        names = [n for n in covered if n in sets]
        baselines = [b for b in stage.baselines if self._keep(b)]
        budget = self._budget(stage, covered, sets, teacher, config)
        if budget is None and set(baselines) - set(SETLESS):
            raise ConfigError(f"evaluation {name}: the baselines take the bytes of set {covered[0]}, which is not made "
                              "yet; run the suite with it first (or without --methods)")
        cells: list[Cell] = []
        environments: dict[str, dict[str, str]] = {}
        for entry in names + baselines:  # a set's entry does not depend on the baselines' budget
            drawn = entry in baselines and entry not in SETLESS
            entry_cells, environments[entry] = self._entry(folder, name, entry, config, budget if drawn else None,
                                                           sets.get(entry), teacher)
            cells += entry_cells
        self.computed_with[name] = combined_environment(environments)
        self.budgets[name] = budget
        command = _evaluate_command(folder, names, baselines, budget, self.folder)
        self.commands.append(command)
        if self.world.is_main:
            make_folder(folder)
            atomic_write_text(folder / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
            if cells:
                write_report(folder, cells, config, self.computed_with[name], command=command)
        return cells

    def _budget(self, stage: EvaluationStage, covered: list[str], sets: dict[str, DistilledSet], teacher: Teacher,
                config: EvaluationConfig) -> int | None:
        """The baselines' byte budget: ``bytes``, ``images`` (with teacher targets or hard labels), or the bytes of
        the first set the evaluation covers (read from disk when ``--methods`` left it out); None if none is known."""
        if stage.bytes is not None:
            return stage.bytes
        if stage.images is not None:
            return image_budget_bytes(stage.images, teacher, config.protocol)
        if not covered:
            return None
        if covered[0] in sets:
            return sets[covered[0]].byte_count
        path = self.folder / "sets" / covered[0] / SET_FILE
        return load_distilled(path).byte_count if path.exists() else None

    def _entry(self, folder: Path, evaluation: str, entry: str, config: EvaluationConfig, budget: int | None,
               distilled: DistilledSet | None, teacher: Teacher) -> tuple[list[Cell], dict[str, str]]:
        """The entry's cells (reused from its record when the settings match) and the environment that computed
        them."""
        path = folder / f"{entry}.json"
        key = _entry_key(config, budget, distilled)
        record = _reusable(path, key)
        if record is not None:
            self._say(f"[bench] {evaluation} / {entry}: reusing {path}")
            # records written before entries kept their environment: the device the stage's timing names
            ran = self.stages.get(f"evaluation {evaluation} / {entry}", {}).get("device", "not recorded")
            return ([Cell.from_dict(c) for c in record["cells"]],
                    record.get("environment") or {"device": ran, "commit": "not recorded"})
        self._say(f"[bench] {evaluation} / {entry}: {config.protocol} protocol, seeds {config.seeds}")
        sets, names, baselines = ([distilled], [entry], []) if distilled is not None else ([], [], [entry])
        journal = folder / f".{entry}.jobs"  # a killed entry resumes at its first unfinished job
        with exclusive(folder / f".{entry}.lock", f"the entry {entry} of {folder}"):  # one run evaluates it at a time
            cells = self._timed(f"evaluation {evaluation} / {entry}", lambda: evaluate(
                sets, config, baselines=baselines, teacher=teacher, budget_bytes=budget,
                progress=self.options.progress, names=names, journal=journal))
            env = environment(self.device)
            if world().is_main:
                atomic_write_text(path, json.dumps({**key, "environment": env, "cells": [c.to_dict() for c in cells]},
                                                   indent=2))
                clear_journal(journal)
        return cells, env

def _entry_key(config: EvaluationConfig, budget: int | None, distilled: DistilledSet | None) -> dict[str, Any]:
    """What an entry's cells depend on: the evaluation's settings, the baseline's budget, the set (its creation)."""
    return {"config": to_dict(config), "budget_bytes": budget,
            "set": None if distilled is None else distilled.metadata.get("created")}


def _reusable(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The entry record at ``path`` if it was made with ``key``'s settings (a set's cells do not depend on the
    baselines' budget, which older records of a set's entry hold), else None."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    compared = [k for k in key if not (k == "budget_bytes" and key["set"] is not None)]
    return record if all(record.get(k) == key[k] for k in compared) else None


def _check_same(folder: Path, config: Any, what: str, ignore: tuple[str, ...] = (), defaults: Any = None) -> None:
    """Refuse to reuse an artefact made with other settings than the suite's (where and how fast it ran do not
    count, nor settings added since it was made that keep their ``defaults``)."""
    changed = RunDir(folder).differences(config, ignore=ignore, defaults=defaults)
    if changed:
        raise ConfigError(f"the {what} in {folder} was made with other settings than this suite's "
                          f"({', '.join(changed)}); delete the folder or use another --out")


def _evaluate_command(folder: Path, names: list[str], baselines: list[str], budget: int | None, root: Path) -> str:
    parts = ["ssdd evaluate", *(shlex.quote(f"{n}={root / 'sets' / n}") for n in names)]
    if baselines:
        parts.append(f"--baselines {','.join(baselines)}")
    if budget is not None and set(baselines) - set(SETLESS):
        parts.append(f"--bytes {budget}")
    parts += [f"--teacher {shlex.quote(str(root / 'teacher'))}", f"--config {shlex.quote(str(folder / 'config.yaml'))}",
              f"--out {shlex.quote(str(folder))}"]
    return " ".join(parts)


def run_suite(suite: str, out: str | Path, data_root: str | None = None, device: str = "auto", progress: bool = True,
              methods: list[str] | None = None, targets: list[str] | None = None,
              seeds: list[int] | None = None, train_teacher: bool = False) -> Path:
    """Run (or continue) benchmark ``suite`` (a shipped suite's name or a suite file) into ``out/<suite>``; returns
    the path of its ``report.md``."""
    options = BenchOptions(data_root, device, progress, methods, targets, seeds, train_teacher)
    run = BenchRun(suite, out, options)
    report = run.run()
    if run.world.is_main:
        print(report.read_text())
    return report
