"""Interruption harness: ``ssdd teacher``, ``ssdd distill`` (every method, tiny preset) and ``ssdd bench --suite
tiny`` killed with SIGKILL at random moments, resumed, and compared with an uninterrupted run; and two runs of
``ssdd teacher`` / ``ssdd distill`` into one folder at once (:func:`contended`).

A job runs in its own root folder (run folder ``out/``, its own data and cache folders, a copy of the source
teacher in ``teacher/`` where the command needs one). A trial kills a fresh run ``--kills`` times, each time
either after a random delay (drawn between the reference run's first file write and its end) or as soon as a
random one of its atomic writes (a ``NAME.tmp-<pid>`` file) appears, resumes it to the end, and then checks:

* every file under the root loads (safetensors, checkpoints, JSON, JSON lines, YAML, PNG) after every kill;
* after the resumed run no ``*.tmp-*`` file is left;
* every safetensors file holds exactly the reference's tensors (``torch.equal``) and, like every JSON file and
  ``metrics.jsonl``, the same metadata once timing, host and commit fields are dropped and the root folders'
  paths are replaced by ``<root>``.

A contended trial stops a first run (SIGSTOP) as soon as it holds its run folder's lock and starts the same command
into the same folder: the second run must be refused at once (exit 2, one line naming the first's pid) and leave
every file as it was. The first is then killed with SIGKILL, a resumed run must take the lock the kill released and
end with the reference's files, and the finished folder must then be refused to a run without ``--resume`` and left
as it is by one with ``--resume``.

    python benchmarks/interruption.py --trials 3 --out docs/results/reliability-interruption.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from safetensors import safe_open

COMMANDS = ("teacher", "distill", "bench")
TEMPORARY = ".tmp-"  # ssdd.io writes NAME.tmp-<pid>, then renames it over NAME
POLL_SECONDS = 0.0002
# a checkpoint at most every 0.6 s: several in a tiny run, with steps between them that a resumed run does again
CHECKPOINT_MINUTES = 0.01
# fields that differ between two correct runs: wall time, peak memory and time stamps ("set": a bench evaluation
# record names its set by the set's creation time stamp), and the host, versions and commit ("environment")
IGNORED_KEYS = frozenset({"time", "seconds", "distill_seconds", "wall_seconds", "stages", "peak_memory_bytes",
                          "created", "set", "environment"})
COMPARED_SUFFIXES = (".safetensors", ".json", ".jsonl", ".yaml")
NOT_COMPARED = frozenset({"stages.json"})  # wall time and peak memory only


@dataclass(frozen=True)
class Job:
    """One command to interrupt: ``args`` (after ``ssdd``; ``{root}`` is the job's root folder), the arguments that
    resume it, whether it needs a copy of the source teacher, and files it reads from its root."""

    name: str
    args: tuple[str, ...]
    resume: tuple[str, ...] = ("--resume",)
    teacher: bool = False
    files: dict[str, str] = field(default_factory=dict)

    def argv(self, root: Path, resume: bool = False) -> list[str]:
        return [a.format(root=root) for a in self.args] + (list(self.resume) if resume else [])


def teacher_job(epochs: int = 4, checkpoint_minutes: float = CHECKPOINT_MINUTES) -> Job:
    """The tiny teacher for ``epochs`` epochs (it checkpoints at the end of an epoch)."""
    return Job("teacher", ("teacher", "--preset", "tiny", "--epochs", str(epochs), "--config", "{root}/teacher.yaml",
                           "--device", "cpu", "--no-progress", "--out", "{root}/out"),
               files={"teacher.yaml": f"checkpoint_minutes: {checkpoint_minutes}\n"})


def distill_job(method: str, checkpoint_minutes: float = CHECKPOINT_MINUTES) -> Job:
    """``method``'s tiny preset, with the tiny teacher unless the preset names its own source dataset."""
    from ssdd.config import preset_dict

    needs_teacher = "dataset" not in preset_dict("distill", f"{method}/tiny")
    teacher = ("--teacher", "{root}/teacher") if needs_teacher else ()
    return Job(f"distill/{method}", ("distill", "--method", method, "--preset", "tiny", "--device", "cpu",
                                     "--no-progress", "--set", f"checkpoint_minutes={checkpoint_minutes}",
                                     "--out", "{root}/out", *teacher), teacher=needs_teacher)


def bench_job() -> Job:
    """The tiny suite; ``ssdd bench`` always continues what is in its folder, so it resumes with the same command."""
    return Job("bench", ("bench", "--suite", "tiny", "--device", "cpu", "--no-progress", "--out", "{root}/out"),
               resume=())


def jobs(commands: list[str], methods: list[str] | None = None) -> list[Job]:
    from ssdd.methods import list_methods

    chosen: list[Job] = []
    for command in commands:
        if command == "teacher":
            chosen.append(teacher_job())
        elif command == "distill":
            chosen += [distill_job(m) for m in (methods or list_methods())]
        elif command == "bench":
            chosen.append(bench_job())
        else:
            raise SystemExit(f"unknown command {command!r}; use {', '.join(COMMANDS)}")
    return chosen


def prepare(job: Job, root: Path, source_teacher: Path | None) -> None:
    """Make ``root`` a fresh folder holding the job's files and, if it needs one, a copy of the source teacher."""
    if root.exists():
        shutil.rmtree(root)
    (root / "logs").mkdir(parents=True)
    for name, text in job.files.items():
        (root / name).write_text(text)
    if job.teacher:
        if source_teacher is None:
            raise ValueError(f"{job.name} needs a source teacher")
        (root / "teacher").mkdir()
        shutil.copy2(source_teacher, root / "teacher" / "teacher.safetensors")


def ssdd_dirs(root: Path) -> dict[str, str]:
    """The environment variables that give a run in ``root`` its own data root and decoded-data cache."""
    return {"SSDD_DATA_ROOT": str(root / "data"), "SSDD_CACHE_DIR": str(root / "cache")}


@dataclass(frozen=True)
class Moment:
    """When to kill a run: ``delay`` seconds after the ``write``-th temporary file it writes (of a name starting
    with ``target``) appeared, i.e. during that write when ``delay`` is 0 (a write too fast for the watcher to see
    its temporary counts when its finished file lands); ``write`` 0: ``delay`` seconds after it started."""

    delay: float = 0.0
    write: int = 0
    target: str = ""

    def describe(self) -> str:
        after = f"at write {self.write}" + (f" of {self.target}" if self.target else "") if self.write else "at start"
        return after + (f" + {self.delay:.2f} s" if self.delay else "")


@dataclass
class Outcome:
    """One run: whether it was killed (and at which temporary file), its exit status and what was watched."""

    killed: bool
    returncode: int
    seconds: float
    writes: int  # temporary files seen appearing
    first_write: float | None  # seconds from the start to the first file written under the root
    killed_at: str | None = None


def _scan(root: Path, pid: int, target: str = "") -> tuple[set[str], dict[str, int]]:
    """The temporary files process ``pid`` is writing under ``root`` (of names starting with ``target``), and the
    modification times of the finished files named ``target``."""
    suffix = f"{TEMPORARY}{pid}"
    temporaries, finished = set(), {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(suffix) and name.startswith(target):
                temporaries.add(path)
            elif target and name == target:
                try:
                    finished[path] = os.stat(path).st_mtime_ns
                except FileNotFoundError:  # replaced between the listing and the stat
                    continue
    return temporaries, finished


def _file_count(root: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(root))


def _spawn(argv: list[str], root: Path, output: Any) -> subprocess.Popen:
    """``ssdd argv`` in a new process group with the environment of ``root``, its output to ``output``."""
    return subprocess.Popen([sys.executable, "-m", "ssdd", *argv], env={**os.environ, **ssdd_dirs(root)},
                            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def run(argv: list[str], root: Path, moment: Moment | None = None, log: str = "run") -> Outcome:
    """Run ``ssdd argv`` in a new process group with the environment of ``root``, watching the temporary files
    under ``root``; kill the group with SIGKILL at ``moment`` (None: let it finish)."""
    with open(root / "logs" / f"{log}.out", "wb") as output:
        files_before = _file_count(root)
        target = moment.target if moment is not None else ""
        landed = _scan(root, 0, target)[1]  # the finished target files before the run
        started = time.monotonic()
        process = _spawn(argv, root, output)
        seen: set[str] = set()
        writes, pending, first_write, killed, killed_at = 0, 0, None, False, None
        mark = 0.0 if moment is not None and moment.write == 0 else None  # when the moment's write appeared
        try:
            while process.poll() is None:
                now = time.monotonic() - started
                current, finished = _scan(root, process.pid, target)
                appeared = current - seen
                writes += len(appeared)
                pending += len(appeared)  # temporaries seen whose finished file has not landed yet
                for path, mtime in finished.items():
                    if landed.get(path) != mtime:  # a write of the target finished
                        if pending:
                            pending -= 1
                        else:  # too fast for the watcher to see its temporary file: still a write
                            writes += 1
                landed = finished
                if first_write is None and (appeared or _file_count(root) > files_before):
                    first_write = now
                seen = current
                if moment is not None and mark is None and writes >= moment.write:
                    mark = now
                if mark is not None and now >= mark + moment.delay:
                    os.killpg(process.pid, signal.SIGKILL)
                    killed, killed_at = True, ", ".join(os.path.relpath(p, root) for p in sorted(current)) or None
                    break
                time.sleep(POLL_SECONDS)
        finally:
            if process.poll() is None and not killed:  # the watcher failed: leave no process behind
                os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
    return Outcome(killed, returncode, time.monotonic() - started, writes, first_write, killed_at)


# ---- checks -------------------------------------------------------------------------------------------------------


def _load(path: Path) -> Any:
    """The content of ``path`` read by an independent reader of its format (not ssdd's loaders)."""
    suffix = path.suffix
    if suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            metadata = json.loads((fh.metadata() or {}).get("ssdd", "{}"))
        return tensors, metadata
    if suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    if suffix == ".json":
        return json.loads(path.read_text())
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if suffix == ".yaml":
        return yaml.safe_load(path.read_text())
    if suffix == ".png":
        with Image.open(path) as image:
            image.load()
        return None
    return path.read_text()


def problems(root: Path, temporaries_allowed: bool = False) -> list[str]:
    """Files under ``root`` that do not load, and (unless allowed) temporary files left behind."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.parent != root / "logs"):
        name = path.relative_to(root)
        if TEMPORARY in path.name:
            if not temporaries_allowed:
                found.append(f"{name}: temporary file left behind")
            continue
        try:
            _load(path)
        except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
            reason = str(exc).splitlines()[0] if str(exc) else ""
            found.append(f"{name}: does not load ({type(exc).__name__}: {reason})")
    return found


def _normalised(value: Any, root: Path) -> Any:
    """``value`` without :data:`IGNORED_KEYS` (at any depth) and with ``root`` written as ``<root>``."""
    if isinstance(value, dict):
        return {k: _normalised(v, root) for k, v in value.items() if k not in IGNORED_KEYS}
    if isinstance(value, list):
        return [_normalised(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(str(root), "<root>")
    return value


def _compared_files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.suffix in COMPARED_SUFFIXES
            and TEMPORARY not in p.name and p.name not in NOT_COMPARED and p.parent != root / "logs"}


def differences(reference: Path, trial: Path) -> list[str]:
    """How the files under ``trial`` differ from those under ``reference``: missing or extra files, tensors that
    are not equal (dtype, shape and every bit), metadata or records that differ once normalised."""
    ours, theirs = _compared_files(reference), _compared_files(trial)
    found = [f"{p}: missing" for p in sorted(ours - theirs)]
    found += [f"{p}: not in the reference" for p in sorted(theirs - ours)]
    for name in sorted(ours & theirs):
        a, b = _load(reference / name), _load(trial / name)
        if name.suffix == ".safetensors":
            (tensors_a, a), (tensors_b, b) = a, b
            if tensors_a.keys() != tensors_b.keys():
                found.append(f"{name}: tensors {sorted(tensors_a.keys() ^ tensors_b.keys())} in one file only")
            unequal = sorted(k for k in tensors_a.keys() & tensors_b.keys()
                             if tensors_a[k].dtype != tensors_b[k].dtype or not torch.equal(tensors_a[k], tensors_b[k]))
            if unequal:
                found.append(f"{name}: tensors differ: {', '.join(unequal[:8])}{' ...' if len(unequal) > 8 else ''}")
        a, b = _normalised(a, reference), _normalised(b, trial)
        if a != b:
            found.append(f"{name}: metadata differs: {_first_difference(a, b)}")
    return found


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys(), key=str):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where or 'value'}: {str(a)[:200]} != {str(b)[:200]}"


# ---- trials -------------------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """The uninterrupted run of a job: its root, how long it took and how many temporary files it wrote."""

    root: Path
    seconds: float
    first_write: float
    writes: int


def reference_run(job: Job, root: Path, source_teacher: Path | None = None) -> Reference:
    prepare(job, root, source_teacher)
    outcome = run(job.argv(root), root, log="reference")
    if outcome.returncode != 0:
        raise RuntimeError(f"the reference run of {job.name} failed; see {root / 'logs' / 'reference.out'}")
    found = problems(root)
    if found:
        raise RuntimeError(f"the reference run of {job.name} left unreadable files: {found}")
    return Reference(root, outcome.seconds, outcome.first_write or 0.0, outcome.writes)


def draw_moment(rng: random.Random, reference: Reference, during_write: bool, done_seconds: float = 0.0,
                done_writes: int = 0) -> Moment:
    """A random kill moment within what is left of the reference run once earlier runs did ``done_seconds`` of its
    work and ``done_writes`` of its writes: one of the remaining temporary files it writes, or a delay between its
    first write and its expected end."""
    if during_write:
        return Moment(write=rng.randint(1, max(1, reference.writes - done_writes)))
    end = max(reference.first_write, reference.seconds - done_seconds)
    return Moment(delay=rng.uniform(reference.first_write, end))


@dataclass
class TrialResult:
    """What one trial did and found: each planned kill (and whether the run finished first), how many runs were
    killed, and the problems; ``matched``: none, i.e. the resumed run's files load, equal the reference's, and no
    temporary file is left."""

    moments: list[str]
    kills: int
    problems: list[str]

    @property
    def matched(self) -> bool:
        return not self.problems


def trial(job: Job, reference: Reference, root: Path, rng: random.Random, kinds: list[bool],
          source_teacher: Path | None = None) -> TrialResult:
    """Kill a fresh run of ``job`` in ``root`` once per entry of ``kinds`` (True: during a random write, False:
    after a random delay; each kill but the first hits a resumed run), resume it to the end, check every file and
    compare it with ``reference``."""
    prepare(job, root, source_teacher)
    moments: list[str] = []
    found: list[str] = []
    kills, done_seconds, done_writes = 0, 0.0, 0
    for i, during_write in enumerate(kinds):
        moment = draw_moment(rng, reference, during_write, done_seconds, done_writes)
        outcome = run(job.argv(root, resume=i > 0), root, moment, log=f"killed-{i}")
        done_seconds += max(0.0, outcome.seconds - reference.first_write)
        done_writes += outcome.writes
        if not outcome.killed:
            moments.append(f"{moment.describe()}: finished first (status {outcome.returncode})")
            if outcome.returncode != 0:
                found.append(f"run {i} failed with status {outcome.returncode}; see {root}/logs/killed-{i}.out")
            continue
        kills += 1
        moments.append(f"{moment.describe()} (killed at {outcome.seconds:.2f} s"
                       + (f", writing {outcome.killed_at})" if outcome.killed_at else ")"))
        found += [f"after kill {i + 1}: {p}" for p in problems(root, temporaries_allowed=True)]
    final = run(job.argv(root, resume=True), root, log="resumed")
    if final.returncode != 0:
        found.append(f"the resumed run failed with status {final.returncode}; see {root / 'logs' / 'resumed.out'}")
    else:
        found += problems(root) + differences(reference.root, root)
    return TrialResult(moments, kills, found)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file under ``folder`` but its log (which a refused run may not touch
    either, but a resumed finished run appends to)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "run.log"}


def _refused(root: Path, argv: list[str], log: str, expected: str) -> list[str]:
    """Run ``ssdd argv``; the problems if it was not refused with exit 2 and one error line holding ``expected``."""
    outcome = run(argv, root, log=log)
    lines = (root / "logs" / f"{log}.out").read_text().strip().splitlines()
    errors = [line for line in lines if line.startswith("ssdd: error: ")]
    if outcome.returncode != 2 or len(errors) != 1 or expected not in errors[0] or "Traceback" in "".join(lines):
        return [f"{log}: not refused with one line holding {expected!r} (status {outcome.returncode}; see "
                f"{root / 'logs' / f'{log}.out'})"]
    return []


def _holds_lock(folder: Path, pid: int) -> bool:
    """Whether process ``pid`` holds ``folder``'s lock (its lock file names the holder once it is held)."""
    try:
        return (folder / ".lock").read_text().strip() == str(pid)
    except FileNotFoundError:
        return False


def contended(job: Job, reference: Reference, root: Path, source_teacher: Path | None = None) -> TrialResult:
    """Two runs of ``job`` into one folder (see the module's docstring); returns what was done and the problems."""
    prepare(job, root, source_teacher)
    out, found = root / "out", []
    with open(root / "logs" / "first.out", "wb") as output:
        first = _spawn(job.argv(root), root, output)
        try:
            while not _holds_lock(out, first.pid) and first.poll() is None:
                time.sleep(POLL_SECONDS)
            os.killpg(first.pid, signal.SIGSTOP)  # it holds the lock and writes nothing more while stopped
            if first.poll() is not None:
                return TrialResult(["the first run ended before it was stopped"], 0, ["the first run was not stopped"])
            before = _snapshot(out)
            found += _refused(root, job.argv(root), "second", f"in use by another ssdd process (pid {first.pid})")
            if _snapshot(out) != before:
                found.append("the refused second run changed the folder")
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # kill -9: the system releases its lock
            first.wait()
    found += problems(root, temporaries_allowed=True)
    resumed = run(job.argv(root, resume=True), root, log="resumed")
    if resumed.returncode != 0:
        return TrialResult(["second refused, first killed"], 1, found + [f"the resumed run failed (status "
                                                                          f"{resumed.returncode})"])
    found += problems(root) + differences(reference.root, root)
    finished = _snapshot(out)
    found += _refused(root, job.argv(root), "rerun", "already holds a finished run")
    again = run(job.argv(root, resume=True), root, log="resumed-finished")
    if again.returncode != 0 or _snapshot(out) != finished:
        found.append(f"--resume of the finished run changed it or failed (status {again.returncode})")
    if (out / ".lock").exists() or (out / "checkpoint.pt").exists():
        found.append("a lock or checkpoint is left in the finished folder")
    return TrialResult(["second refused, first killed, resumed, finished run refused and kept"], 1, found)


def train_source_teacher(folder: Path) -> Path:
    """The tiny teacher the distillation jobs copy (trained once, uninterrupted)."""
    job = Job("source-teacher", ("teacher", "--preset", "tiny", "--device", "cpu", "--no-progress", "--out",
                                 "{root}/out"))
    reference_run(job, folder)
    return folder / "out" / "teacher.safetensors"


def benchmark(chosen: list[Job], trials: int, kills: int, seed: int, work: Path) -> dict[str, Any]:
    """``trials`` trials of ``kills`` kills for every job (kills alternate between a random delay and a random write,
    starting with the other kind in every other trial); returns the per-job counts and findings."""
    rng = random.Random(seed)
    source_teacher = train_source_teacher(work / "source-teacher") if any(j.teacher for j in chosen) else None
    results: dict[str, Any] = {}
    for job in chosen:
        folder = work / job.name.replace("/", "-")
        reference = reference_run(job, folder / "reference", source_teacher)
        record: dict[str, Any] = {"trials": 0, "matched": 0, "kills": 0, "details": [],
                                  "reference_seconds": round(reference.seconds, 1),
                                  "reference_writes": reference.writes}
        for t in range(trials):
            kinds = [(t + k) % 2 == 1 for k in range(kills)]
            result = trial(job, reference, folder / f"trial-{t}", rng, kinds, source_teacher)
            record["trials"] += 1
            record["matched"] += result.matched
            record["kills"] += result.kills
            record["details"].append({**asdict(result), "matched": result.matched})
            print(f"[interruption] {job.name} trial {t}: {'matched' if result.matched else 'DIFFERS'}; kills: "
                  f"{'; '.join(result.moments)}" + "".join(f"\n    {p}" for p in result.problems), flush=True)
        if job.resume:  # bench shares its folder by design and always continues it
            result = contended(job, reference, folder / "contended", source_teacher)
            record["contended"] = {**asdict(result), "matched": result.matched}
            print(f"[interruption] {job.name} contended: {'as expected' if result.matched else 'DIFFERS'}"
                  + "".join(f"\n    {p}" for p in result.problems), flush=True)
        results[job.name] = record
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="trials per command and method")
    parser.add_argument("--kills", type=int, default=2, help="kills per trial before the run is resumed to the end")
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma list of teacher, distill, bench")
    parser.add_argument("--methods", help="comma list of distillation methods (default: every registered one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--work", help="folder for the runs (default: a temporary folder, removed at the end)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    chosen = jobs([c.strip() for c in args.commands.split(",") if c.strip()],
                  [m.strip() for m in args.methods.split(",")] if args.methods else None)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ssdd-interruption-"))
    started = time.monotonic()
    try:
        results = benchmark(chosen, args.trials, args.kills, args.seed, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    from ssdd.environment import environment

    command = ["python", "benchmarks/interruption.py", *(argv if argv is not None else sys.argv[1:])]
    report = {"command": " ".join(command), "environment": environment(torch.device("cpu")),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "minutes": round((time.monotonic() - started) / 60, 1), "jobs": results}
    print("| job | trials | kills | matched | contended run refused, kill released the lock |\n"
          "| --- | --- | --- | --- | --- |")
    for name, record in results.items():
        contention = record.get("contended")
        print(f"| {name} | {record['trials']} | {record['kills']} | {record['matched']} | "
              f"{'-' if contention is None else 'yes' if contention['matched'] else 'NO'} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["matched"] == r["trials"] and r.get("contended", {}).get("matched", True)
                    for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
