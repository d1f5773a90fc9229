"""A method written outside ssdd: the package in tests/example_method (docs/extending.md's walk-through), installed
with pip into a folder of its own, found by its entry point and run through ``ssdd distill``, ``ssdd evaluate`` and
``ssdd bench``; named by ``module:Class`` without installing; and the errors of a name that does not load."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import user_error

from ssdd.cli import main
from ssdd.distilled import load_distilled
from ssdd.methods import list_methods
from ssdd.teachers import load_teacher

EXAMPLE = Path(__file__).resolve().parent / "example_method"
GUIDE = Path(__file__).resolve().parent.parent / "docs" / "extending.md"
CPU = ["--device", "cpu", "--no-progress"]
QUICK = ["--set", "settings.steps=3", "--set", "settings.real_batch=16", "--set", "monitor.every=-1"]
ITEM_BYTES = (3 * 32 * 32 + 1024) * 4  # a float32 image of the tiny teacher's input with its 1024 features


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package installed by pip (no network, no dependencies) into a folder of its own."""
    source = tmp_path_factory.mktemp("example") / "example_method"
    shutil.copytree(EXAMPLE, source)  # pip writes build files beside the sources
    target = tmp_path_factory.mktemp("site-packages")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), str(source)], check=True, capture_output=True)
    return target


def test_the_guide_shows_the_example_as_it_is() -> None:
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", GUIDE.read_text(), re.MULTILINE | re.DOTALL)
    code = {lang: body for lang, body in blocks if lang in ("python", "toml")}
    assert code["python"] == (EXAMPLE / "ssdd_feature_mean" / "__init__.py").read_text()
    assert code["toml"] == (EXAMPLE / "pyproject.toml").read_text()


def test_an_installed_method_runs_through_distill_evaluate_and_bench(
        installed: Path, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(installed))
    assert "feature-mean" in list_methods()
    run = tmp_path / "run"
    assert main(["distill", "--method", "feature-mean", "--teacher", str(tiny_teacher), "--images", "4",
                 *QUICK, "--out", str(run), *CPU]) == 0
    distilled = load_distilled(run)
    assert distilled.method == "feature-mean" and distilled.num_images == 4
    assert distilled.byte_count == 4 * ITEM_BYTES
    teacher = load_teacher(tiny_teacher, device="cpu")
    with torch.no_grad():  # its targets are the teacher's features of its images, as the method says
        torch.testing.assert_close(distilled.tensors["targets"], teacher(distilled.tensors["images"]))
    assert main(["evaluate", str(run), "--preset", "tiny", "--seeds", "0", "--out", str(tmp_path / "eval"), *CPU]) == 0
    cells = json.loads((tmp_path / "eval" / "results.json").read_text())["cells"]
    assert {c["entry"] for c in cells} == {"feature-mean"} and all(0 <= c["mean"] <= 100 for c in cells)
    suite = tmp_path / "mine.yaml"
    suite.write_text("teacher: {preset: tiny}\n"
                     "sets:\n  mine: {config: {method: feature-mean, images: 4, settings: {steps: 3, real_batch: 16},"
                     " monitor: {every: -1}}}\n"
                     "evaluations:\n  linear: {preset: tiny, config: {seeds: [0]}, baselines: [random]}\n")
    assert main(["bench", "--suite", str(suite), "--out", str(tmp_path / "bench"), *CPU]) == 0
    report = json.loads((tmp_path / "bench" / "mine" / "report.json").read_text())
    assert {c["entry"] for c in report["evaluations"]["linear"]} == {"mine", "random"}
    assert load_distilled(tmp_path / "bench" / "mine" / "sets" / "mine").method == "feature-mean"


def test_a_method_named_by_module_and_class_runs_without_installing(
        tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delitem(sys.modules, "ssdd_feature_mean", raising=False)  # not the installed copy another test loaded
    assert main(["distill", "--method", "ssdd_feature_mean:FeatureMean", "--teacher", str(tiny_teacher),
                 "--images", "2", *QUICK, "--out", str(tmp_path / "run"), *CPU]) == 0
    assert load_distilled(tmp_path / "run").method == "ssdd_feature_mean:FeatureMean"


@pytest.mark.parametrize(("name", "message"), [
    ("no_such_package.module:Method",
     "method 'no_such_package.module:Method': cannot load it from module 'no_such_package.module' "
     "(No module named 'no_such_package')"),
    ("ssdd.registry:Registry",
     "method 'ssdd.registry:Registry': module 'ssdd.registry' gives <class 'ssdd.registry.Registry'>, not a "
     "subclass of ssdd.methods.Method"),
    ("ssdd.methods.base:Nothing",
     "method 'ssdd.methods.base:Nothing': cannot load it from module 'ssdd.methods.base' (module "
     "'ssdd.methods.base' has no attribute 'Nothing')"),
])
def test_a_method_name_that_does_not_load_is_one_clear_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                            name: str, message: str) -> None:
    line = user_error(capsys, ["distill", "--method", name, "--dataset", "synthetic", "--images", "2",
                               "--out", str(tmp_path / "run"), *CPU])
    assert line == f"ssdd: error: {message}"
