"""A benchmark suite: a teacher stage, named set stages and evaluation stages, each a preset of its command with
overrides; a shipped suite (preset group ``bench``) or a suite's YAML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssdd.config import from_dict, list_presets, preset_dict, read_yaml
from ssdd.errors import ConfigError
from ssdd.evaluation.baselines import BASELINES
from ssdd.evaluation.expectations import Expectation


@dataclass
class Stage:
    """A preset of a command's group and overrides of its keys (e.g. ``{preset: paa/cifar10-cpu, config: {...}}``)."""

    preset: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherStage(Stage):
    """The suite's teacher: ``reference`` names a teacher ssdd ships (``cifar10`` for ``reference:cifar10``), used
    unless the run asks to train its own from the preset and overrides (``--train-teacher``)."""

    reference: str | None = None


@dataclass
class EvaluationStage(Stage):
    """One evaluation: an ``evaluate`` preset and overrides, the suite's sets it covers (all when unset) and its
    baselines, at the first set's bytes or at ``images`` / ``bytes`` when given; ``expect``: the orderings of its
    entries that the report checks."""

    sets: list[str] | None = None
    baselines: list[str] = field(default_factory=list)
    images: int | None = None
    bytes: int | None = None
    expect: Expectation | None = None


@dataclass
class Suite:
    """A benchmark suite (preset group ``bench``)."""

    description: str = ""
    teacher: TeacherStage = field(default_factory=TeacherStage)
    sets: dict[str, Stage] = field(default_factory=dict)
    evaluations: dict[str, EvaluationStage] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.teacher = stage_of(TeacherStage, self.teacher, "teacher")
        self.sets = {name: stage_of(Stage, value, f"sets.{name}") for name, value in self.sets.items()}
        self.evaluations = {name: stage_of(EvaluationStage, value, f"evaluations.{name}")
                            for name, value in self.evaluations.items()}
        for name, stage in self.evaluations.items():
            unknown = sorted(set(stage.sets or []) - set(self.sets))
            if unknown:
                raise ConfigError(f"evaluation {name} names sets the suite does not make: {', '.join(unknown)}")
            bad = sorted(set(stage.baselines) - set(BASELINES))
            if bad:
                raise ConfigError(f"evaluation {name}: unknown baseline(s) {', '.join(bad)}; "
                                  f"use {', '.join(BASELINES)}")
            if stage.expect is not None:
                entries = [*(stage.sets if stage.sets is not None else self.sets), *stage.baselines]
                named = {e for o in stage.expect.parsed(f"evaluations.{name}.expect") for e in (o.above, o.below)}
                strangers = sorted(named - set(entries))
                if strangers:
                    raise ConfigError(f"evaluation {name}: its expected orderings name {', '.join(strangers)}, which "
                                      f"it does not evaluate; its entries are {', '.join(entries)}")


def stage_of(cls: type[Stage], value: Any, where: str) -> Stage:
    return value if isinstance(value, cls) else from_dict(cls, dict(value or {}), where=where)


def suites() -> list[str]:
    """Names of the shipped suites."""
    return list_presets("bench")


def suite_name(suite: str) -> str:
    """The report folder's name for ``suite``: a shipped suite's name, or a suite file's name without ``.yaml``."""
    return Path(suite).stem if suite.endswith((".yaml", ".yml")) else suite


def load_suite(suite: str) -> Suite:
    """The shipped suite named ``suite``, or the suite written in the YAML file ``suite`` (same keys)."""
    if suite.endswith((".yaml", ".yml")):
        if not Path(suite).is_file():
            raise ConfigError(f"suite file {suite} does not exist")
        return from_dict(Suite, read_yaml(suite), where=f"suite {suite}")
    if suite not in suites():
        raise ConfigError(f"unknown suite {suite!r}; known suites: {', '.join(suites())}, or a suite's YAML file")
    return from_dict(Suite, preset_dict("bench", suite), where=f"suite {suite}")
