"""The journal of an evaluation's finished jobs, so that a killed evaluation resumes at its first unfinished job.

A job is one (entry, architecture, seed): one pre-training and its read-outs on every target. Each process appends
the jobs it finishes, one JSON line each, to its own file ``<stem>-<rank>.jsonl`` whose first line holds the
evaluation's settings; a rerun with the same settings skips the jobs the files hold (whatever number of processes
ran them), and files made with other settings are removed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ssdd.distributed import World, broadcast_object
from ssdd.io import append_text, atomic_write_text

# one read-out result: (entry, architecture, target, label fraction, accuracy, seconds)
Result = tuple[str, str, str, float, float, float]


class Journal:
    """Finished jobs of one evaluation whose settings are ``key`` (any JSON-able value)."""

    def __init__(self, stem: str | Path, key: Any):
        self.stem = Path(stem)
        self.key = json.loads(json.dumps(key))  # as read back from a file (tuples become lists)
        self._file: Path | None = None

    def resume(self, current: World) -> dict[int, list[Result]]:
        """The results of the jobs finished before, by job index, the same on every process (the main process
        reads the files, rewrites each without a line a kill cut short, and removes those of other settings)."""
        finished = self._tidy() if current.is_main else {}
        finished = broadcast_object(finished, current)
        self._file = self.stem.with_name(f"{self.stem.name}-{current.rank}.jsonl")
        return finished

    def add(self, job: int, results: list[Result]) -> None:
        """Record a finished job (after :meth:`resume`); the line is on disk when this returns."""
        if self._file is None:
            raise RuntimeError("Journal.add before Journal.resume")
        if not self._file.exists():  # written with the first job, so a refused evaluation leaves no file
            atomic_write_text(self._file, json.dumps({"key": self.key}) + "\n")
        append_text(self._file, json.dumps({"job": job, "results": results}) + "\n", sync=True)

    def _tidy(self) -> dict[int, list[Result]]:
        finished: dict[int, list[Result]] = {}
        for path in journal_files(self.stem):
            lines = path.read_text().splitlines()
            records = []
            for line in lines[1:]:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # the line being written when the process was killed
                    break
            if not lines or _header(lines[0]) != {"key": self.key}:
                path.unlink()
                continue
            atomic_write_text(path, "\n".join([lines[0]] + [json.dumps(r) for r in records]) + "\n")
            for record in records:
                finished[record["job"]] = [tuple(r) for r in record["results"]]
        return finished


def journal_files(stem: str | Path) -> list[Path]:
    """Every process's journal file of ``stem``, in name order."""
    stem = Path(stem)
    return sorted(stem.parent.glob(f"{stem.name}-*.jsonl"))


def clear_journal(stem: str | Path) -> None:
    """Remove every process's journal file of ``stem`` (once the evaluation's results are stored elsewhere)."""
    for path in journal_files(stem):
        path.unlink(missing_ok=True)


def _header(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
