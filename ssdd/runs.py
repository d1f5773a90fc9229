"""Run directories: resolved configuration, log, metrics and checkpoints of one long command, and its lock."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from tqdm.auto import tqdm

from ssdd.config import to_dict
from ssdd.distributed import World, broadcast_object, world
from ssdd.errors import ConfigError, RunFolderError, SsddError
from ssdd.io import (
    LOCK_FILE,
    append_text,
    atomic_write_text,
    hold_lock,
    load_checkpoint,
    make_folder,
    release_lock,
    save_checkpoint,
    storage_error,
    writing,
)

T = TypeVar("T")
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "run.log"
CHECKPOINT_FILE = "checkpoint.pt"
RUN_FILES = (CONFIG_FILE, LOG_FILE, METRICS_FILE, CHECKPOINT_FILE)
# settings that change where and how fast a run goes, never what it makes: they may differ at any depth when a run
# resumes or a finished artefact is reused
EXECUTION_SETTINGS = ("device", "data_root", "checkpoint_minutes", "log_every", "compile", "keep_checkpoint")


class RunDir:
    """A folder that holds everything one run writes, locked while a process writes it.

    ``start(config, resume, overwrite=...)`` takes the folder's lock (a folder another process writes is refused),
    refuses a folder that holds a run unless it is resumed or overwritten, and writes the resolved configuration; on
    ``resume`` it checks that the configuration matches the one the run started with (a resumed run with other
    settings would silently mix two runs). A run is finished once its ``artefact`` exists (written last); ``owned``
    names the other files and folders it writes (removed with its record by ``overwrite``); ``echo`` also shows the
    log on stderr.
    """

    def __init__(self, path: str | Path, artefact: str | None = None, owned: tuple[str, ...] = (), echo: bool = False):
        self.path = Path(path)
        self.artefact = artefact
        self.owned = owned
        self.echo = echo
        self.logger = logging.getLogger(f"ssdd.run.{self.path}")
        self.locked = False
        self.created_folder = self.created_config = False

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def finished(self) -> bool:
        return self.artefact is not None and (self.path / self.artefact).exists()

    def start(self, config: Any, resume: bool = False, ignore: tuple[str, ...] = (), defaults: Any = None,
              overwrite: bool = False) -> bool:
        """Create and lock the folder and record ``config``; returns whether the run is finished (resumed, it is then
        left as it is). ``ignore`` lists keys allowed to differ on resume (dotted for nested keys, e.g.
        ``settings.lr_images``; a key also covers everything below it); ``defaults`` (a config of the same shape at
        its default values) lets a run recorded before a setting existed resume while that setting keeps its default;
        ``overwrite`` removes the run the folder holds first."""
        if resume and overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it; give one of them")
        self.created_folder = not self.path.exists()
        make_folder(self.path)
        try:
            hold_lock(self.path / LOCK_FILE, str(self.path))
            self.locked = True
            return self._start(config, resume, ignore, defaults, overwrite)
        except BaseException:
            self.abandon()
            raise

    def _start(self, config: Any, resume: bool, ignore: tuple[str, ...], defaults: Any, overwrite: bool) -> bool:
        config_path = self.path / CONFIG_FILE
        self.created_config = False
        if (config_path.exists() or self.finished) and not (resume or overwrite):
            state = "a finished run" if self.finished else "an unfinished run"
            raise RunFolderError(f"{self.path} already holds {state}; continue it with --resume (a finished run is "
                                 "kept as it is), replace it with --overwrite, or use another --out")
        if overwrite:
            self.clear()
        self.created_config = not config_path.exists()
        resolved = to_dict(config)
        allowed_changes: list[str] = []
        if resume and config_path.exists():
            previous = _flatten(yaml.safe_load(config_path.read_text()) or {})
            current = _flatten(resolved)
            changed = self.differences(resolved, ignore, defaults)
            if changed:
                raise ConfigError(
                    f"cannot resume {self.path}: settings differ from the original run ({', '.join(changed)}); "
                    "use the same settings or a new --out"
                )
            allowed_changes = [f"resumed with {k} = {current.get(k)!r} (was {previous.get(k)!r})"
                               for k in self.differences(resolved, defaults=defaults)]
        finished = resume and self.finished
        if not finished:
            atomic_write_text(config_path, yaml.safe_dump(resolved, sort_keys=False))
        self._open_log()
        for message in allowed_changes:
            self.log(message)
        return finished

    def _open_log(self) -> None:
        """Send the run's log to ``run.log`` (and, with ``echo`` and a terminal on stderr, there too: redirected
        output, such as a log file or a pipe, gets the errors alone; run.log has the rest)."""
        self.close_log()
        with writing(self.path / LOG_FILE):
            handler: logging.Handler = _LogFile(self.path / LOG_FILE)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self.logger.handlers = [handler]
        if self.echo and sys.stderr.isatty():
            echo = _Echo()
            echo.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            self.logger.handlers.append(echo)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False

    def clear(self) -> None:
        """Remove the run the folder holds: its record, checkpoint, artefact and ``owned`` files (nothing else)."""
        for name in (*RUN_FILES, *([self.artefact] if self.artefact else []), *self.owned):
            target = self.path / name
            with writing(target):
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)

    def complete(self, keep_checkpoint: bool) -> None:
        """End a finished run: its checkpoint is removed unless ``keep_checkpoint``."""
        if self.checkpoint_path.exists() and not keep_checkpoint:
            with writing(self.checkpoint_path):
                self.checkpoint_path.unlink()
            self.log(f"removed {self.checkpoint_path} (the run is finished; keep_checkpoint: true keeps it)")

    def close_log(self) -> None:
        for handler in self.logger.handlers:
            handler.close()
        self.logger.handlers = []

    def close(self) -> None:
        """Close the log and release the folder's lock (the run is over, or failed)."""
        self.close_log()
        if self.locked:
            release_lock(self.path / LOCK_FILE)
            self.locked = False

    def abandon(self) -> None:
        """Undo what :meth:`start` created, for a run that failed before its first step: the recorded config and
        log of a new run, and its folder when nothing else was written into it; the lock is released."""
        held = self.locked
        if self.created_config:
            (self.path / CONFIG_FILE).unlink(missing_ok=True)
            (self.path / LOG_FILE).unlink(missing_ok=True)
        self.close()
        if held and self.created_folder:
            with contextlib.suppress(OSError):  # not empty: something else was written, or another process locks it
                self.path.rmdir()

    def differences(self, config: Any, ignore: tuple[str, ...] = (), defaults: Any = None) -> list[str]:
        """The (dotted) keys in which ``config`` differs from the recorded one, except ``ignore`` and what lies
        below it, the :data:`EXECUTION_SETTINGS` at any depth, and keys the record lacks (settings added since)
        whose value is the one in ``defaults``; every key when nothing is recorded."""
        config_path = self.path / CONFIG_FILE
        previous = _flatten(yaml.safe_load(config_path.read_text()) or {}) if config_path.exists() else {}
        current = _flatten(to_dict(config))
        default = _flatten(to_dict(defaults)) if defaults is not None and previous else {}
        added_at_default = {k for k, v in current.items() if k not in previous and k in default and default[k] == v}
        return sorted(k for k in set(previous) | set(current)
                      if not any(k == i or k.startswith(i + ".") for i in ignore) and k not in added_at_default
                      and k.rsplit(".", 1)[-1] not in EXECUTION_SETTINGS and previous.get(k) != current.get(k))

    def log(self, message: str) -> None:
        self.logger.info(message)

    def metrics(self, **values: Any) -> None:
        """Append one JSON line of metrics (with a wall-clock time stamp)."""
        record = {"time": round(time.time(), 3), **values}
        append_text(self.metrics_path, json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by an interrupted write
        return records

    def truncate_metrics(self, keep: int) -> None:
        """Drop metric lines recorded after a checkpoint (a resumed run re-does that work)."""
        records = self.read_metrics()[:keep]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        state = {**state, "metrics_lines": len(self.read_metrics())}
        save_checkpoint(self.checkpoint_path, state)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint (metrics written after it are dropped), or None when there is none (the run starts
        again, so every metric written before is dropped)."""
        if not self.checkpoint_path.exists():
            if self.metrics_path.exists():
                self.truncate_metrics(0)
            return None
        state = load_checkpoint(self.checkpoint_path)
        self.truncate_metrics(int(state.get("metrics_lines", 0)))
        return state


class _LogFile(logging.FileHandler):
    """``run.log``: a write that fails for want of space or permission is the run's one-line error, not a traceback
    that logging prints and goes on."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        error = storage_error(sys.exc_info()[1], self.baseFilename) if sys.exc_info()[1] is not None else None
        if error is None:
            super().handleError(record)
            return
        raise error from None


class _Echo(logging.Handler):
    """A run's log lines on stderr, above the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def on_main(work: Callable[[], T], current: World | None = None) -> T:
    """``work()`` done by process 0 alone, its result given to every process; an :class:`SsddError` it raises is
    raised by every process, so that none waits at a collective for one that failed."""
    current = current or world()
    if current.size == 1:
        return work()
    result, error = None, None
    if current.is_main:
        try:
            result = work()
        except SsddError as exc:
            error = exc
    result, error = broadcast_object((result, error), current)
    if error is not None:
        raise error
    return result


@contextlib.contextmanager
def exclusive(lock_file: str | Path, what: str, current: World | None = None) -> Iterator[None]:
    """Hold ``lock_file``'s lock (its folder created if missing) for the block, so that one process writes ``what``
    at a time; process 0 takes it, and the other processes of a run share its refusal. A folder it created that holds
    nothing else at the end is removed."""
    current = current or world()
    lock_file = Path(lock_file)
    created = not lock_file.parent.exists()

    def take() -> None:
        make_folder(lock_file.parent)
        hold_lock(lock_file, what)

    on_main(take, current)
    try:
        yield
    finally:
        if current.is_main:
            release_lock(lock_file)
            if created:
                with contextlib.suppress(OSError):  # not empty: something was written, or another process locks it
                    lock_file.parent.rmdir()


def is_run_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a run (its recorded configuration)."""
    return (Path(folder) / CONFIG_FILE).is_file()


def folder_lock(folder: str | Path, current: World | None = None) -> contextlib.AbstractContextManager[None]:
    """:func:`exclusive` over a whole folder (created if missing)."""
    return exclusive(Path(folder) / LOCK_FILE, str(folder), current)


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
