"""Run folders, files and disk: one process at a time writes a run folder, a finished run is neither redone nor
silently replaced, checkpoints go once a run is done, a full or read-only disk and a file in the way are one line,
results land all together, ``show`` writes its grid only where it may, a read-only teacher's caches go to the cache
folder, and ``run.log`` tells what a run did and how long it took."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import one_line, user_error

from ssdd.cli import main
from ssdd.config import resolve_config
from ssdd.data import PixelSpace, load_dataset
from ssdd.distilled import DistilledSet
from ssdd.errors import RunFolderError, StorageError
from ssdd.evaluation import Cell, EvaluationConfig, write_report
from ssdd.io import LOCK_FILE, load_checkpoint, read_metadata, storage_error
from ssdd.methods import METHODS, Distillation, DistillConfig
from ssdd.methods.trajectory.experts import ExpertSettings, expert_file, train_experts
from ssdd.runs import RunDir
from ssdd.teachers import load_teacher, teacher_features
from ssdd.teachers.train import _TeacherTraining

TEACHER = ["teacher", "--preset", "tiny", "--device", "cpu", "--no-progress", "--epochs", "1", "--train-images", "64"]
TORCH_DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 335680 vs 335572"


def distill_argv(teacher: Path, out: Path, *extra: str) -> list[str]:
    """A two-step krr-st/tiny run."""
    return ["distill", "--method", "krr-st", "--preset", "tiny", "--teacher", str(teacher), "--set",
            "settings.steps=2", "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def snapshot(folder: Path, without: tuple[str, ...] = ()) -> dict[str, str]:
    """The content (a hash) of every file under ``folder`` but ``without``."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in without}


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@contextmanager
def held_by_another_process(folder: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``folder``'s lock, as a run writing it does, until it is killed with SIGKILL at the
    end of the block."""
    code = ("import sys, time; from pathlib import Path; from ssdd.io import LOCK_FILE, hold_lock, make_folder; "
            "make_folder(sys.argv[1]); hold_lock(Path(sys.argv[1]) / LOCK_FILE, sys.argv[1]); print('held', "
            "flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        process.kill()  # SIGKILL: the system releases the lock
        process.wait()
        process.stdout.close()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    """A finished two-step ``ssdd distill`` run folder (tests copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(distill_argv(tiny_teacher, out)) == 0
    return out


def read_only(folder: Path):  # noqa: ANN201 - os.access's stand-in
    """``os.access`` for a process that may not write ``folder`` or anything in it (tests run as root, whom
    permissions do not stop)."""
    access = os.access

    def check(path: object, mode: int, **kwargs: object) -> bool:
        inside = folder == Path(path) or folder in Path(path).parents
        return not (inside and mode & os.W_OK) and access(path, mode, **kwargs)

    return check


def small_set(folder: Path) -> Path:
    """A six-image distilled set saved into ``folder``; returns its path."""
    gen = torch.Generator().manual_seed(0)
    distilled = DistilledSet({"images": torch.randn(6, 3, 8, 8, generator=gen),
                              "targets": torch.randn(6, 5, generator=gen)},
                             PixelSpace((0.5,) * 3, (0.25,) * 3), "representation", "small-set")
    return distilled.save(folder)


# ---- 1. one process at a time writes a folder ----------------------------------------------------------------


@pytest.mark.parametrize("command", ["distill", "teacher", "evaluate"])
def test_a_folder_another_process_writes_is_refused_naming_it(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                              command: str) -> None:
    out = tmp_path / "out"
    argv = {"distill": distill_argv(tmp_path / "no-teacher-needed-yet", out),
            "teacher": [*TEACHER, "--out", str(out)],
            "evaluate": ["evaluate", str(tmp_path / "set"), "--preset", "tiny", "--device", "cpu", "--out", str(out)],
            }[command]
    with held_by_another_process(out) as holder:
        before = snapshot(out)
        line = user_error(capsys, argv)
        assert f"{out} is in use by another ssdd process (pid {holder.pid})" in line and "--out" in line
        assert snapshot(out) == before  # nothing written


def test_a_kill_releases_the_lock_and_a_finished_run_leaves_none(capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    with held_by_another_process(out):
        user_error(capsys, [*TEACHER, "--out", str(out)])
    assert main([*TEACHER, "--out", str(out)]) == 0  # the killed holder's lock is gone with it
    assert (out / "teacher.safetensors").is_file() and not (out / LOCK_FILE).exists()


def test_experts_train_into_a_folder_one_process_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "experts"
    settings = ExpertSettings(num_experts=1, epochs=1, arch_args={"width": 4}, batch_size=8)
    images, targets = torch.randn(16, 3, 16, 16), torch.randn(16, 4)
    with held_by_another_process(folder) as holder:
        with pytest.raises(RunFolderError) as info:
            train_experts(folder, settings, images, targets, "mse", seed=0, progress=False)
        assert f"pid {holder.pid}" in one_line(info.value)
        assert not expert_file(folder, 0).exists()
    store = train_experts(folder, settings, images, targets, "mse", seed=0, progress=False)
    assert len(store) == 1 and sorted(p.name for p in folder.iterdir()) == ["expert_000.safetensors"]

    def no_lock(*args: object) -> None:
        raise AssertionError("a complete experts folder is only read (it may be read-only)")

    monkeypatch.setattr("ssdd.runs.hold_lock", no_lock)
    assert len(train_experts(folder, settings, images, targets, "mse", seed=0, progress=False)) == 1


# ---- 2. a folder that holds a run needs --resume or --overwrite --------------------------------------------------


def test_a_finished_run_is_refused_kept_by_resume_and_replaced_by_overwrite(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, finished: Path, tiny_teacher: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    line = user_error(capsys, distill_argv(tiny_teacher, out, "--seed", "1"))
    assert f"{out} already holds a finished run" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(out) == before

    assert main(distill_argv(tiny_teacher, out, "--resume")) == 0  # the set as it is, no step done again
    assert "the run was finished already" in capsys.readouterr().out
    assert snapshot(out, without=("run.log",)) == snapshot(finished, without=("run.log",))
    assert "resumed a finished run" in (out / "run.log").read_text()

    (out / "notes.txt").write_text("the user's own")
    (out / "sets").mkdir()
    (out / "sets" / "step-000001.safetensors").write_bytes(b"a set the old run kept")
    assert main(distill_argv(tiny_teacher, out, "--seed", "1", "--overwrite")) == 0
    assert read_metadata(out / "distilled.safetensors")["seed"] == 1
    assert [r.get("final") for r in records(out)].count(True) == 1  # the new run's record only
    assert (out / "run.log").read_text().count("started: ") == 1
    assert (out / "notes.txt").read_text() == "the user's own" and not (out / "sets").exists()

    line = user_error(capsys, distill_argv(tiny_teacher, out, "--resume", "--overwrite"))
    assert "give one of them" in line


class Killed(BaseException):
    """Stands for the process being killed."""


def test_an_unfinished_run_is_refused_without_resume(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = resolve_config(DistillConfig, "distill", "krr-st/tiny", overrides={
        "teacher": str(tiny_teacher), "device": "cpu", "checkpoint_minutes": 0, "settings": {"steps": 2}})
    method = METHODS.get("krr-st")
    original = method.step

    def killed_at_step_2(self, step: int) -> dict[str, float]:  # noqa: ANN001
        if step == 1:
            raise Killed
        return original(self, step)

    with monkeypatch.context() as m:
        m.setattr(method, "step", killed_at_step_2)
        with pytest.raises(Killed):
            Distillation(config, tmp_path / "run", progress=False).run()
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 1
    line = user_error(capsys, distill_argv(tiny_teacher, tmp_path / "run"))
    assert "already holds an unfinished run" in line and "--resume" in line


def test_a_finished_teacher_is_kept_by_resume_without_training(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "teacher"
    assert main([*TEACHER, "--out", str(out)]) == 0
    before = snapshot(out, without=("run.log",))
    line = user_error(capsys, [*TEACHER, "--out", str(out)])
    assert "already holds a finished run" in line

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished teacher was trained again")

    monkeypatch.setattr(_TeacherTraining, "__init__", never)
    assert main([*TEACHER, "--out", str(out), "--resume"]) == 0
    assert "finished already" in capsys.readouterr().out
    assert snapshot(out, without=("run.log",)) == before


# ---- 3. checkpoints go once a run is finished, unless kept ----------------------------------------------------


def test_checkpoints_go_on_success_unless_kept(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                               finished: Path, tiny_teacher: Path) -> None:
    assert not (finished / "checkpoint.pt").exists()
    kept = tmp_path / "kept"
    assert main(distill_argv(tiny_teacher, kept, "--set", "keep_checkpoint=true")) == 0
    assert load_checkpoint(kept / "checkpoint.pt")["step"] == 2
    # a finished run whose checkpoint is still there (kept, or a kill before its removal) loses it on --resume
    assert main(distill_argv(tiny_teacher, kept, "--resume")) == 0
    assert not (kept / "checkpoint.pt").exists() and (kept / "distilled.safetensors").is_file()

    (tmp_path / "keep.yaml").write_text("keep_checkpoint: true\n")
    assert main([*TEACHER, "--out", str(tmp_path / "t1")]) == 0
    assert main([*TEACHER, "--config", str(tmp_path / "keep.yaml"), "--out", str(tmp_path / "t2")]) == 0
    assert not (tmp_path / "t1" / "checkpoint.pt").exists()
    assert load_checkpoint(tmp_path / "t2" / "checkpoint.pt")["step"] == 1  # 64 images, batches of 64, 1 epoch


# ---- 4. disk: a file in the way, a read-only folder, a full disk ----------------------------------------------


@pytest.mark.parametrize("command", ["distill", "teacher", "evaluate", "bench"])
def test_an_out_that_is_a_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str) -> None:
    file = tmp_path / "results.txt"
    file.write_text("not a folder")
    argv = {"distill": distill_argv(tmp_path / "teacher", file),
            "teacher": [*TEACHER, "--out", str(file)],
            "evaluate": ["evaluate", str(tmp_path / "set"), "--preset", "tiny", "--device", "cpu", "--out", str(file)],
            "bench": ["bench", "--suite", "tiny", "--device", "cpu", "--no-progress", "--out", str(file)],
            }[command]
    line = user_error(capsys, argv)
    assert f"{file} is a file, not a folder" in line
    assert file.read_text() == "not a folder"


@pytest.mark.parametrize(("code", "said"), [(errno.EROFS, "is on a read-only filesystem"),
                                            (errno.EACCES, "is read-only to this user")])
def test_an_out_on_a_read_only_disk_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, code: int, said: str) -> None:
    """Tests run as root, whom permissions do not stop: the system's refusal is simulated at ``mkdir``."""
    read_only = tmp_path / "mounted"
    read_only.mkdir()
    mkdir = pathlib.Path.mkdir

    def refused(self: Path, *args: object, **kwargs: object) -> None:
        if read_only in self.parents:
            raise OSError(code, "refused", str(self))
        mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", refused)
    for argv in ([*TEACHER, "--out", str(read_only / "t")], distill_argv(tmp_path / "teacher", read_only / "d")):
        line = user_error(capsys, argv)
        assert said in line and "another --out" in line


def fail_torch_save(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """torch.save fails as it does on a full disk, half a file written; the disk has ``free`` bytes left."""

    def save(obj: object, path: object, *args: object, **kwargs: object) -> None:
        Path(path).write_bytes(b"half a checkpoint")
        raise RuntimeError(TORCH_DISK_FULL)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr("ssdd.io.shutil.disk_usage", lambda folder: shutil._ntuple_diskusage(10**9, 10**9, free))


@pytest.mark.parametrize("command", ["distill", "teacher"])
def test_torch_failing_on_a_full_disk_says_disk_full(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, tiny_teacher: Path,
                                                     command: str) -> None:
    out = tmp_path / "out"
    argv = distill_argv(tiny_teacher, out) if command == "distill" else [*TEACHER, "--out", str(out)]
    fail_torch_save(monkeypatch, free=4096)
    line = user_error(capsys, argv)
    assert line.startswith(f"ssdd: error: disk full: cannot write {out / 'checkpoint.pt'}") and "free some" in line
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # the half-written checkpoint is gone
    fail_torch_save(monkeypatch, free=10**9)  # the same failure with space left is not called a full disk
    line = user_error(capsys, [*argv, "--resume"])
    assert "disk full" not in line and "torch's writer failed (" in line and "unexpected pos" in line


def test_a_full_disk_while_writing_the_set_says_disk_full(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, tiny_teacher: Path) -> None:
    write_bytes = pathlib.Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        if self.name.startswith("distilled.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    line = user_error(capsys, distill_argv(tiny_teacher, tmp_path / "out"))
    assert f"disk full: cannot write {tmp_path / 'out' / 'distilled.safetensors'}" in line
    assert not (tmp_path / "out" / "distilled.safetensors").exists()
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pt")["step"] == 2  # --resume finishes it once there is space


def disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def cells() -> list[Cell]:
    return [Cell("a-set", "linear", "convnet", "synthetic", 1.0, [0, 1], [50.0, 52.0], 1.0)]


def test_results_land_all_three_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = EvaluationConfig(protocol="linear")
    write_report(tmp_path, cells(), config, {"torch": torch.__version__})
    before = snapshot(tmp_path)
    assert sorted(before) == ["results.json", "results.md", "results.png"]

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", disk_full)  # the last of the three files fails
    with pytest.raises(StorageError) as info:
        write_report(tmp_path, [*cells(), Cell("b", "linear", "convnet", "synthetic", 1.0, [0], [1.0], 1.0)], config,
                     {"torch": torch.__version__})
    assert one_line(info.value).startswith(f"disk full: cannot write {tmp_path}")
    assert snapshot(tmp_path) == before  # the earlier results, whole; no temporary left
    with pytest.raises(StorageError):
        write_report(tmp_path / "new", cells(), config, {"torch": torch.__version__})
    assert list((tmp_path / "new").iterdir()) == []


def test_evaluate_on_a_full_disk_is_one_line_and_says_where_results_go(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = small_set(tmp_path / "set")
    argv = ["evaluate", str(path), "--preset", "tiny", "--seeds", "0", "--fractions", "1", "--device", "cpu",
            "--no-progress", "--out", str(tmp_path / "results")]
    with monkeypatch.context() as m:
        m.setattr("matplotlib.figure.Figure.savefig", disk_full)
        line = user_error(capsys, argv)
    assert "disk full" in line
    assert not list((tmp_path / "results").glob("results.*"))
    assert main(argv) == 0  # the journal kept what was done; the results land with their paths said
    out = capsys.readouterr().out
    folder = tmp_path / "results"
    assert (f"results written to {folder / 'results.json'}, {folder / 'results.md'} and {folder / 'results.png'}"
            in out)
    assert all((folder / f"results.{ext}").is_file() for ext in ("json", "md", "png"))


@pytest.mark.parametrize(("exc", "said"), [
    (OSError(errno.ENOSPC, "No space left on device"), "disk full: cannot write {path}"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk full: cannot write {path}"),
    (OSError(errno.EROFS, "Read-only file system"), "{folder} is on a read-only filesystem"),
    (OSError(errno.EACCES, "Permission denied"), "it is read-only to this user (permission denied in {folder})"),
    (OSError(errno.EPERM, "Operation not permitted"), "read-only to this user"),
    (RuntimeError(TORCH_DISK_FULL), "torch's writer failed"),  # the tests' disk has space left
])
def test_each_failed_write_is_named_as_what_it_is(tmp_path: Path, exc: BaseException, said: str) -> None:
    path = tmp_path / "a" / "file.bin"
    message = one_line(storage_error(exc, path))
    assert said.format(path=path, folder=tmp_path) in message


def test_a_file_in_the_way_is_named_and_other_failures_are_not_storage_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    message = storage_error(NotADirectoryError(errno.ENOTDIR, "Not a directory"), tmp_path / "file" / "sub" / "x")
    assert f"{tmp_path / 'file'} is a file, not a folder" in one_line(message)
    assert storage_error(FileExistsError(errno.EEXIST, "File exists"), tmp_path / "free") is None  # nothing in the way
    assert storage_error(FileNotFoundError(errno.ENOENT, "gone"), tmp_path / "x") is None
    assert storage_error(RuntimeError("CUDA error"), tmp_path / "x") is None


def test_a_full_disk_under_the_log_is_one_line(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.start({"a": 1})

    class Full:
        def write(self, text: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            pass

    handler = run.logger.handlers[0]
    stream, handler.stream = handler.stream, Full()
    try:
        with pytest.raises(StorageError) as info:
            run.log("a line")
        assert one_line(info.value).startswith(f"disk full: cannot write {tmp_path / 'run' / 'run.log'}")
    finally:
        handler.stream = stream
        run.close()


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ssdd.data.cache import store

    (tmp_path / "file").write_text("x")
    source = load_dataset("synthetic", "train")
    store(tmp_path / "file" / "decoded.safetensors", source)  # a file in the way: nothing stored, no error
    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_full)
    store(tmp_path / "decoded.safetensors", source)  # a full disk: the same
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "x"


# ---- 5. show writes its grid where --grid or a writable run folder says ------------------------------------------


def test_show_writes_a_grid_only_into_a_writable_run_folder_or_where_asked(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, finished: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    someone = small_set(tmp_path / "downloads")  # a set outside any run folder: someone else's
    assert main(["show", str(someone)]) == 0
    out = capsys.readouterr().out
    assert "grid:         not written" in out and "--grid PATH" in out
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == [someone.name]

    asked = tmp_path / "pictures" / "g.png"
    assert main(["show", str(someone), "--grid", str(asked)]) == 0
    assert asked.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    with monkeypatch.context() as m:
        m.setattr("os.access", read_only(run))
        assert main(["show", str(run)]) == 0
    assert "not written" in capsys.readouterr().out and not (run / "grid.png").exists()
    assert main(["show", str(run)]) == 0
    assert f"grid:         {run / 'grid.png'}" in capsys.readouterr().out and (run / "grid.png").is_file()


# ---- 6. a read-only teacher's caches go to the cache folder --------------------------------------------------------


def test_a_read_only_teacher_caches_its_features_in_the_cache_folder(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_teacher: Path, cache_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "shared-teacher"
    folder.mkdir()
    shutil.copy2(tiny_teacher, folder / "teacher.safetensors")
    monkeypatch.setattr("os.access", read_only(folder))
    teacher = load_teacher(folder, device="cpu")
    source = load_dataset("synthetic", "train")
    features = teacher_features(teacher, source)
    cached = list((cache_dir / "features" / teacher.fingerprint).glob("*.safetensors"))
    assert len(cached) == 1 and not (folder / "features").exists()
    with monkeypatch.context() as m:
        m.setattr(type(teacher), "encode", lambda *a, **k: pytest.fail("the cache was not read"))
        assert torch.equal(teacher_features(teacher, source), features)
    # and a run with it works (it cached inside the teacher's folder before, and failed there)
    assert main(distill_argv(folder, tmp_path / "run")) == 0
    assert not (folder / "features").exists()


# ---- 7. what a run did, and how long it took ----------------------------------------------------------------


def test_run_log_tells_each_phase_and_the_wall_time(capsys: pytest.CaptureFixture[str], finished: Path) -> None:
    log = (finished / "run.log").read_text()
    for said in ("started: ", "setup: loading the teacher and the source data", "krr-st: a budget of 20 images",
                 "precision", "setup: preparing krr-st", "setup done in", "checkpoint at step 2",
                 "final monitor check", "monitor at step 2: knn", "finished: 2 steps", "s wall time of this command",
                 f"wrote {finished / 'distilled.safetensors'}", "removed"):
        assert said in log, said
    final = records(finished)[-1]
    assert final["final"] and final["wall_seconds"] > final["seconds"] >= 0


def test_the_setup_is_said_on_stderr_with_progress_and_the_wall_time_printed(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        tiny_teacher: Path) -> None:
    argv = [a for a in distill_argv(tiny_teacher, tmp_path / "run") if a != "--no-progress"]
    assert main(argv) == 0  # stderr is not a terminal: the setup goes to run.log only
    assert "setup:" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: said there too
    assert main([*argv, "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert "setup: loading the teacher and the source data" in captured.err and "setup done in" in captured.err
    assert "s in the outer loop, " in captured.out and "s wall time (setup and checks included)" in captured.out
    assert main([*TEACHER, "--out", str(tmp_path / "teacher")]) == 0
    assert "s wall time; log: " in capsys.readouterr().out
    log = (tmp_path / "teacher" / "run.log").read_text()
    assert "setup: loading synthetic" in log and "epoch 1/1: loss" in log and "s wall time" in log
