"""Runs killed with SIGKILL and resumed with ``--resume``: ``ssdd teacher`` and ``ssdd distill`` with every method's
tiny preset end with exactly the uninterrupted run's files (every tensor equal, the same metadata and metrics but
for timing fields), every file loads after the kill and after the resume, and no temporary file is left.

The harness is ``benchmarks/interruption.py`` (which also interrupts ``ssdd bench`` and runs many random trials);
here each kill moment comes from a fixed seed, the killed run is a subprocess, and the uninterrupted reference and
the resumed run run in this process (the same ``ssdd`` command line through :func:`ssdd.cli.main`).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ssdd.cli import main
from ssdd.config import deep_update, from_dict, preset_dict
from ssdd.io import atomic_write_text
from ssdd.methods import METHODS, Distillation, DistillConfig, list_methods

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import interruption as harness  # noqa: E402


class Killed(BaseException):
    """Stands for the process being killed (pytest reserves KeyboardInterrupt for itself)."""


def _in_process(job: harness.Job, root: Path, resume: bool = False) -> None:
    """Run ``job`` in this process with the data and cache folders of ``root``, as the harness runs it."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in harness.ssdd_dirs(root).items():
            mp.setenv(key, value)
        assert main(job.argv(root, resume=resume)) == 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path):  # noqa: ANN201 - a function
    """``reference(job)``: the root of ``job``'s uninterrupted run (made once per job), its files checked to load."""
    roots: dict[tuple[str, ...], Path] = {}

    def get(job: harness.Job) -> Path:
        if job.args not in roots:
            root = tmp_path_factory.mktemp("reference")
            harness.prepare(job, root, tiny_teacher)
            _in_process(job, root)
            assert harness.problems(root) == []
            roots[job.args] = root
        return roots[job.args]

    return get


def _kill_and_resume(job: harness.Job, reference: Path, root: Path, moment: harness.Moment,
                     teacher: Path) -> harness.Outcome:
    """Kill a fresh run of ``job`` at ``moment``, check what the kill left, resume it in this process and check that
    it ends with the reference's files."""
    harness.prepare(job, root, teacher)
    outcome = harness.run(job.argv(root), root, moment)
    assert outcome.killed, f"{job.name} finished before the kill {moment.describe()}"
    assert harness.problems(root, temporaries_allowed=True) == []  # the kill left no half-written file
    _in_process(job, root, resume=True)
    assert harness.problems(root) == []  # every file loads and no temporary file is left
    assert harness.differences(reference, root) == []
    return outcome


@pytest.mark.parametrize("method", list_methods())
def test_a_distillation_killed_at_a_random_moment_resumes_to_the_uninterrupted_set(
        method: str, reference, tmp_path: Path, tiny_teacher: Path) -> None:  # noqa: ANN001 - the fixture's function
    job = harness.distill_job(method)  # checkpoints at least 0.6 s apart: the resumed run redoes the steps after one
    rng = random.Random(f"interruption/{method}")
    # up to 0.1 s after the first checkpoint began (the last one in a short run): during that checkpoint, a step,
    # a later checkpoint or the writing of the final set
    moment = harness.Moment(write=1, target="checkpoint.pt", delay=rng.uniform(0.0, 0.1))
    _kill_and_resume(job, reference(job), tmp_path, moment, tiny_teacher)


def test_a_distillation_killed_while_writing_a_checkpoint_resumes_without_leftovers(
        reference, tmp_path: Path, tiny_teacher: Path) -> None:  # noqa: ANN001 - the fixture's function
    job = harness.distill_job("krr-st")
    rng = random.Random("interruption/checkpoint-write")
    moment = harness.Moment(write=rng.randint(1, 2), target="checkpoint.pt")  # the first, or the second or final one
    outcome = _kill_and_resume(job, reference(job), tmp_path, moment, tiny_teacher)
    assert outcome.killed_at is not None and "out/checkpoint.pt.tmp-" in outcome.killed_at


def test_a_teacher_killed_at_a_random_moment_resumes_to_the_uninterrupted_weights(
        reference, tmp_path: Path, tiny_teacher: Path) -> None:  # noqa: ANN001 - the fixture's function
    job = harness.teacher_job(epochs=4)  # a checkpoint at the end of an epoch, at least 0.6 s after the last one
    rng = random.Random("interruption/teacher")
    moment = harness.Moment(write=1, target="checkpoint.pt", delay=rng.uniform(0.0, 0.1))
    _kill_and_resume(job, reference(job), tmp_path, moment, tiny_teacher)


@pytest.mark.parametrize("job", [harness.teacher_job(epochs=2), harness.distill_job("krr-st")],
                         ids=["teacher", "distill"])
def test_a_second_run_into_a_folder_in_use_is_refused_and_a_kill_releases_the_lock(
        job: harness.Job, reference, tmp_path: Path, tiny_teacher: Path) -> None:  # noqa: ANN001 - the fixture's function
    root = reference(job)
    result = harness.contended(job, harness.Reference(root, 0.0, 0.0, 0), tmp_path, tiny_teacher)
    assert result.problems == []


def test_a_run_stopped_before_its_first_checkpoint_logs_every_step_once(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    values = preset_dict("distill", "frepo/tiny")
    deep_update(values, {"device": "cpu", "checkpoint_minutes": 60, "log_every": 2, "settings": {"steps": 12}})
    config = from_dict(DistillConfig, values)
    Distillation(config, tmp_path / "reference", progress=False).run()
    method_cls = METHODS.get("frepo")
    original = method_cls.step

    def killed_at_step_7(self, step: int) -> dict[str, float]:  # noqa: ANN001
        if step == 7:
            raise Killed
        return original(self, step)

    with monkeypatch.context() as m:
        m.setattr(method_cls, "step", killed_at_step_7)
        with pytest.raises(Killed):
            Distillation(config, tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3  # steps 2, 4 and 6
    Distillation(config, tmp_path / "run", resume=True, progress=False).run()
    assert harness.differences(tmp_path / "reference", tmp_path / "run") == []


def test_a_write_deletes_the_temporaries_of_killed_writers_only(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "checkpoint.pt"
    stale = tmp_path / f"checkpoint.pt.tmp-{dead.pid}"
    live = tmp_path / f"checkpoint.pt.tmp-{os.getppid()}"  # the process that started pytest: running
    other = tmp_path / f"config.yaml.tmp-{dead.pid}"  # another file's: left to that file's next write
    for leftover in (stale, live, other):
        leftover.write_bytes(b"half a file")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name, other.name])
