"""Run directories: resolved configuration, log, metrics and checkpoints of one long command."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from ssdd.config import to_dict
from ssdd.errors import ConfigError
from ssdd.io import atomic_write_text, load_checkpoint, save_checkpoint

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "run.log"
CHECKPOINT_FILE = "checkpoint.pt"
# settings that change where and how fast a run goes, never what it makes: they may differ at any depth when a run
# resumes or a finished artefact is reused
EXECUTION_SETTINGS = ("device", "data_root", "checkpoint_minutes", "log_every", "compile")


class RunDir:
    """A folder that holds everything one run writes.

    ``start(config, resume)`` writes the resolved configuration; on ``resume`` it checks that the configuration
    matches the one the run started with (a resumed run with other settings would silently mix two runs).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.logger = logging.getLogger(f"ssdd.run.{self.path}")

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def start(self, config: Any, resume: bool = False, ignore: tuple[str, ...] = (), defaults: Any = None) -> None:
        """Create the folder and record ``config``; ``ignore`` lists keys allowed to differ on resume (dotted
        for nested keys, e.g. ``settings.lr_images``; a key also covers everything below it); ``defaults`` (a config
        of the same shape at its default values) lets a run recorded before a setting existed resume while that
        setting keeps its default."""
        config_path = self.path / CONFIG_FILE
        self.created_folder = not self.path.exists()
        self.created_config = not config_path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
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
        atomic_write_text(config_path, yaml.safe_dump(resolved, sort_keys=False))
        handler = logging.FileHandler(self.path / LOG_FILE)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self.logger.handlers = [handler]
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        for message in allowed_changes:
            self.log(message)

    def abandon(self) -> None:
        """Undo what :meth:`start` created, for a run that failed before its first step: the recorded config and
        log of a new run, and its folder when nothing else was written into it."""
        for handler in self.logger.handlers:
            handler.close()
        self.logger.handlers = []
        if self.created_config:
            (self.path / CONFIG_FILE).unlink(missing_ok=True)
            (self.path / LOG_FILE).unlink(missing_ok=True)
        if self.created_folder and not any(self.path.iterdir()):
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
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

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
