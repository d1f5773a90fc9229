"""``ssdd bench``: the suite runner on the tiny suite (every report file, resume after a kill, reuse checks) and
the shipped suites' configurations."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import one_line, user_error

import ssdd.bench as bench
import ssdd.bench.stages as stage_module
from ssdd.bench import TIMING_HEADING, BenchOptions, BenchRun, load_suite, run_suite, suites
from ssdd.bench.report import budget_points
from ssdd.config import merge
from ssdd.distilled import load_distilled
from ssdd.errors import ConfigError
from ssdd.evaluation import Cell
from ssdd.methods.engine import method_settings
from ssdd.teachers import load_teacher


class Killed(BaseException):
    """Stands for the process being killed (pytest reserves KeyboardInterrupt for itself)."""


def _run(out: Path, **options: object) -> Path:
    return run_suite("tiny", out, device="cpu", progress=False, **options)


def _comparable(report: Path) -> str:
    """The report without its timing section and with its own folder's path replaced."""
    text = report.read_text().split(TIMING_HEADING)[0]
    return text.replace(str(report.parent.parent), "OUT")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny suite run once from start to end; returns its report folder (tests must not change it)."""
    out = tmp_path_factory.mktemp("bench-whole")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSDD_CACHE_DIR", str(tmp_path_factory.mktemp("bench-cache")))
        return _run(out).parent


def test_tiny_suite_writes_every_report_file(uninterrupted: Path) -> None:
    for name in ("report.md", "report.html", "report.json", "stages.json", "teacher/teacher.safetensors",
                 "sets/paa/distilled.safetensors", "sets/paa/grid.png", "evaluations/linear/results.json",
                 "evaluations/linear/results.md", "evaluations/linear/results.png", "evaluations/linear/config.yaml",
                 "evaluations/linear/paa.json", "evaluations/linear/none.json", "evaluations/linear/random.json"):
        path = uninterrupted / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert not (uninterrupted / "budget.png").exists()  # one budget: nothing to plot against it
    record = json.loads((uninterrupted / "report.json").read_text())
    cells = record["evaluations"]["linear"]
    # the tiny suite: sets paa, baselines none and random; label fractions 0.1 and 1.0; one seed
    assert sorted((c["entry"], c["fraction"]) for c in cells) == sorted(
        (e, f) for e in ("paa", "none", "random") for f in (0.1, 1.0))
    assert all(len(c["accuracies"]) == 1 and 0 <= c["accuracies"][0] <= 100 for c in cells)
    assert set(record["stages"]) == {"teacher", "set paa", "evaluation linear / paa", "evaluation linear / none",
                                     "evaluation linear / random"}
    assert all(s["seconds"] > 0 and s["peak_memory_bytes"] > 0 for s in record["stages"].values())
    report = (uninterrupted / "report.md").read_text()
    for row in ("| paa |", "| none |", "| random |", "![paa](sets/paa/grid.png)", "ssdd distill --config",
                "ssdd evaluate paa=", "--baselines none,random", TIMING_HEADING):
        assert row in report, row
    # one run computed every entry: its environment, as each entry recorded it
    entry_env = json.loads((uninterrupted / "evaluations/linear/none.json").read_text())["environment"]
    assert record["computed_with"]["linear"] == entry_env and set(entry_env) >= {"device", "torch", "commit"}
    # the tiny suite expects paa >= none and random >= none: judged from the table's own means, per label fraction
    means = {(c["entry"], c["fraction"]): c["mean"] for c in cells}
    verdicts = record["expectations"]["linear"]
    assert sorted((v["ordering"], v["fraction"]) for v in verdicts) == sorted(
        (o, f) for o in ("paa >= none", "random >= none") for f in (0.1, 1.0))
    for v in verdicts:
        left, right = v["ordering"].split(" >= ")
        assert (v["left"], v["right"]) == (means[left, v["fraction"]], means[right, v["fraction"]])
        assert v["outcome"] == ("fails" if v["left"] < v["right"] else "holds")  # one seed: no noise
    assert "### Expected orderings" in report and "| paa >= none | convnet | synthetic |" in report
    # the random baseline was drawn at the paa set's bytes, and the command says so
    paa_bytes = json.loads((uninterrupted / "evaluations/linear/random.json").read_text())["budget_bytes"]
    assert f"--bytes {paa_bytes}" in report and f"{paa_bytes:,}" in report


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium; CI installs "
                                             "it), so report.html is not rendered")
def test_the_html_report_renders_in_chromium_with_the_tables_numbers(uninterrupted: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    page = uninterrupted / "report.html"
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 2 and "src=\"http" not in text  # results.png, the grid
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run([*browser, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (1600, 1200) and (pixels < 128).mean() > 0.01 and pixels.std() > 20  # not a blank page
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    record = json.loads((uninterrupted / "report.json").read_text())
    for cell in map(Cell.from_dict, record["evaluations"]["linear"]):
        assert f"<td>{cell.entry}</td>" in dom and f"{cell.mean:.1f} +- {cell.std:.1f}</" in dom, cell
    for verdict in record["expectations"]["linear"]:
        assert f"<td>{verdict['ordering'].replace('>', '&gt;')}</td>" in dom and verdict["outcome"] in dom
    assert "Time and peak memory of each stage" in dom and "Distilled sets" in dom


def test_killed_and_resumed_suite_gives_the_same_report(tmp_path: Path, uninterrupted: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    kill = [True]
    real_evaluate = stage_module.evaluate

    def killed_on_second_entry(*args: object, **kwargs: object) -> object:
        calls.append(list(kwargs["names"]) + list(kwargs["baselines"]))
        if kill[0] and len(calls) == 2:
            raise Killed
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(stage_module, "evaluate", killed_on_second_entry)
    with pytest.raises(Killed):
        _run(tmp_path)
    folder = tmp_path / "tiny"
    assert (folder / "evaluations/linear/paa.json").exists() and not (folder / "report.md").exists()
    first_stages = json.loads((folder / "stages.json").read_text())

    calls.clear()
    kill[0] = False
    report = _run(tmp_path)
    assert calls == [["none"], ["random"]]  # the teacher, the set and paa's evaluation were reused
    assert _comparable(report) == _comparable(uninterrupted / "report.md")
    stages = json.loads((folder / "stages.json").read_text())
    assert stages["teacher"] == first_stages["teacher"] and stages["set paa"] == first_stages["set paa"]


def test_methods_filter_reports_only_the_chosen_rows_and_reuses_the_rest(tmp_path: Path, uninterrupted: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(uninterrupted, tmp_path / "tiny")
    monkeypatch.setattr(stage_module, "evaluate", lambda *a, **k: pytest.fail("nothing should be evaluated again"))
    report = _run(tmp_path, methods=["none"])
    assert "(2 stage groups)" in capsys.readouterr().out  # the teacher and the evaluation: no set is kept
    record = json.loads((tmp_path / "tiny/report.json").read_text())
    assert {c["entry"] for c in record["evaluations"]["linear"]} == {"none"}
    assert "| none |" in report.read_text() and "| paa |" not in report.read_text()
    assert "--methods none" in report.read_text()


def test_a_sets_entry_is_reused_whatever_the_baselines_budget(tmp_path: Path, uninterrupted: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(uninterrupted, tmp_path / "tiny")
    path = tmp_path / "tiny/evaluations/linear/paa.json"
    record = json.loads(path.read_text())
    assert record["budget_bytes"] is None  # a set's cells are keyed without the baselines' budget
    path.write_text(json.dumps({**record, "budget_bytes": 12345}))  # as older records held it
    suite = load_suite("tiny")
    suite.evaluations["linear"].bytes = 2 * json.loads(
        (tmp_path / "tiny/evaluations/linear/random.json").read_text())["budget_bytes"]
    monkeypatch.setattr(stage_module, "load_suite", lambda name: suite)
    evaluated: list[list[str]] = []
    monkeypatch.setattr(stage_module, "evaluate",
                        lambda sets, config, **k: evaluated.append(k["names"] + k["baselines"]) or [])
    _run(tmp_path)
    assert evaluated == [["random"]]  # the baseline is drawn again at the new budget; paa and none are reused


def test_the_report_names_where_each_reused_entry_was_computed(tmp_path: Path, uninterrupted: Path) -> None:
    shutil.copytree(uninterrupted, tmp_path / "tiny")
    evaluations = tmp_path / "tiny/evaluations/linear"
    here = json.loads((evaluations / "paa.json").read_text())["environment"]
    none = json.loads((evaluations / "none.json").read_text())
    (evaluations / "none.json").write_text(json.dumps({**none, "environment": {**here, "commit": "abc1234"}}))
    random = json.loads((evaluations / "random.json").read_text())
    del random["environment"]  # a record from before entries kept theirs: the stage's device stands in
    (evaluations / "random.json").write_text(json.dumps(random))
    stages = json.loads((tmp_path / "tiny/stages.json").read_text())
    stages["evaluation linear / random"]["device"] = "elsewhere"
    (tmp_path / "tiny/stages.json").write_text(json.dumps(stages))

    report = _run(tmp_path).read_text()
    computed = (f"device {here['device']} (paa, none); elsewhere (random), "
                f"torch {here['torch']} (paa, none); not recorded (random), "
                f"python {here['python']} (paa, none); not recorded (random), "
                f"commit {here['commit']} (paa); abc1234 (none); not recorded (random).")
    assert f"Computed with: {computed}" in report
    assert f"Environment: {computed}" in (evaluations / "results.md").read_text()
    recorded = json.loads((evaluations / "results.json").read_text())["environment"]
    assert recorded["commit"] == f"{here['commit']} (paa); abc1234 (none); not recorded (random)"


BUDGET_SUITE = """
teacher: {preset: tiny}
sets:
  small: {preset: krr-st/tiny, config: {images: 10}}
  large: {preset: krr-st/tiny, config: {images: 20}}
evaluations:
  at-small: {preset: tiny, config: {seeds: [0]}, sets: [small], baselines: [none, random]}
  at-large: {preset: tiny, config: {seeds: [0]}, sets: [large], baselines: [random]}
"""


def test_a_suite_that_varies_the_budget_plots_accuracy_against_bytes(tmp_path: Path) -> None:
    suite = tmp_path / "budget.yaml"
    suite.write_text(BUDGET_SUITE)
    run = BenchRun(str(suite), tmp_path, BenchOptions(device="cpu", progress=False))
    report = run.run().read_text()
    assert "## Accuracy against budget" in report and "![accuracy against budget](budget.png)" in report
    assert (tmp_path / "budget/budget.png").stat().st_size > 0
    sets = {n: load_distilled(tmp_path / "budget/sets" / n) for n in ("small", "large")}
    assert sets["large"].byte_count == 2 * sets["small"].byte_count  # 20 images and targets instead of 10
    record = json.loads((tmp_path / "budget/report.json").read_text())
    results = {name: [Cell.from_dict(c) for c in cells] for name, cells in record["evaluations"].items()}
    points = {(series, size, cell.entry, cell.fraction) for series, size, cell in budget_points(run, sets, results)}
    assert points == {(series, sets[at].byte_count, entry, f) for at in ("small", "large") for f in (0.1, 1.0)
                      for series, entry in (("krr-st", at), ("random", "random"))}  # `none` has no bytes


def test_baseline_without_its_set_is_a_clear_error(tmp_path: Path, uninterrupted: Path) -> None:
    shutil.copytree(uninterrupted, tmp_path / "tiny")
    shutil.rmtree(tmp_path / "tiny/sets")
    with pytest.raises(ConfigError) as info:
        _run(tmp_path, methods=["random"])
    assert "bytes of set paa" in one_line(info.value) and "not made yet" in str(info.value)


def test_changed_seeds_evaluate_again(tmp_path: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(uninterrupted, tmp_path / "tiny")
    seen: list[list[int]] = []
    monkeypatch.setattr(stage_module, "evaluate", lambda sets, config, **k: seen.append(config.seeds) or [])
    _run(tmp_path, methods=["none"], seeds=[3])
    assert seen == [[3]]


def test_two_runs_into_one_folder_keep_each_others_stage_times(tmp_path: Path, uninterrupted: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs with other --methods at the same time (e.g. one per core): the second's writes must not put back the
    stage records it read before the first one finished."""
    shutil.copytree(uninterrupted, tmp_path / "tiny")
    monkeypatch.setattr(stage_module, "evaluate", lambda sets, config, **k: [])
    first, second = (BenchRun("tiny", tmp_path, BenchOptions(device="cpu", progress=False, methods=[m], seeds=[3]))
                     for m in ("none", "random"))  # both started: each read stages.json as the whole run left it
    first.run()
    second.run()
    stages = json.loads((tmp_path / "tiny/stages.json").read_text())
    old = json.loads((uninterrupted / "stages.json").read_text())
    for entry, run in (("none", first), ("random", second)):
        stage = f"evaluation linear / {entry}"
        assert stages[stage] == run.stages[stage] != old[stage], stage  # each run's new time, not the old one
    assert stages["set paa"] == old["set paa"]
    assert "| evaluation linear / none |" in (tmp_path / "tiny/report.md").read_text()  # the first run's row


def test_a_set_made_with_other_settings_is_refused(tmp_path: Path, uninterrupted: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(uninterrupted, tmp_path / "tiny")
    suite = load_suite("tiny")
    suite.sets["paa"].config = {"settings": {"steps": 7}}
    monkeypatch.setattr(stage_module, "load_suite", lambda name: suite)
    with pytest.raises(ConfigError) as info:
        _run(tmp_path)
    message = one_line(info.value)
    assert "set paa" in message and "settings.steps" in message and "delete the folder or use another --out" in message


def test_a_teacher_recorded_without_an_execution_setting_is_reused(tmp_path: Path, uninterrupted: Path) -> None:
    import yaml

    shutil.copytree(uninterrupted, tmp_path / "tiny")
    path = tmp_path / "tiny" / "teacher" / "config.yaml"
    recorded = yaml.safe_load(path.read_text())
    del recorded["compile"]  # a teacher trained before the setting existed
    recorded["device"], recorded["checkpoint_minutes"] = "cuda", 99.0
    path.write_text(yaml.safe_dump(recorded))
    before = (tmp_path / "tiny" / "teacher" / "teacher.safetensors").read_bytes()
    report = _run(tmp_path)  # the moved folder: every stage reused
    assert (tmp_path / "tiny" / "teacher" / "teacher.safetensors").read_bytes() == before
    assert _comparable(report) == _comparable(uninterrupted / "report.md")


def test_a_set_made_with_another_teacher_is_refused(tmp_path: Path, uninterrupted: Path) -> None:
    from ssdd.distilled import load_distilled

    shutil.copytree(uninterrupted, tmp_path / "tiny")
    path = tmp_path / "tiny" / "sets" / "paa" / "distilled.safetensors"
    distilled = load_distilled(path)
    distilled.metadata["teacher"]["fingerprint"] = "0" * 16
    distilled.save(path)
    with pytest.raises(ConfigError) as info:
        _run(tmp_path)
    message = one_line(info.value)
    assert "set paa" in message and "another teacher" in message and "0" * 16 in message


def test_unknown_suite_and_methods_are_clear_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = user_error(capsys, ["bench", "--suite", "nosuch", "--out", str(tmp_path)])
    assert "nosuch" in line and "quickstart" in line and "cifar10-cpu" in line and "YAML file" in line
    line = user_error(capsys, ["bench", "--suite", str(tmp_path / "mine.yaml"), "--out", str(tmp_path)])
    assert line == f"ssdd: error: suite file {tmp_path / 'mine.yaml'} does not exist"
    (tmp_path / "bad.yaml").write_text("sets: {a: {preset: paa/tiny}}\nevaluations: {e: {sets: [b]}}\n")
    line = user_error(capsys, ["bench", "--suite", str(tmp_path / "bad.yaml"), "--out", str(tmp_path)])
    assert line == f"ssdd: error: suite {tmp_path / 'bad.yaml'}: evaluation e names sets the suite does not make: b"
    line = user_error(capsys, ["bench", "--suite", "tiny", "--methods", "paa,mkdt", "--out", str(tmp_path)])
    assert "mkdt" in line and "none, paa, random" in line
    assert not (tmp_path / "tiny").exists()


def test_suite_naming_a_set_it_does_not_make_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        bench.Suite(sets={"paa": {"preset": "paa/tiny"}}, evaluations={"linear": {"sets": ["pa"]}})
    assert "pa" in one_line(info.value) and "does not make" in str(info.value)


def test_an_expected_ordering_of_an_entry_not_evaluated_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        bench.Suite(sets={"paa": {"preset": "paa/tiny"}}, evaluations={"linear": {
            "baselines": ["random"], "expect": {"orderings": ["paa > random", "mkdt > random"]}}})
    assert one_line(info.value) == ("evaluation linear: its expected orderings name mkdt, which it does not evaluate; "
                                    "its entries are paa, random")
    with pytest.raises(ConfigError) as info:
        bench.Suite(sets={"paa": {"preset": "paa/tiny"}}, evaluations={"linear": {"expect": {"orderings": ["paa"]}}})
    assert "evaluations.linear.expect.orderings[0]: 'paa' is not an ordering" in one_line(info.value)


@pytest.mark.parametrize("name", suites())
def test_every_shipped_suite_resolves_every_stage(name: str, tmp_path: Path) -> None:
    run = BenchRun(name, tmp_path, BenchOptions(device="cpu"))
    run.teacher_config()
    for set_name in run.suite.sets:
        config = run.set_config(set_name)
        assert config.images or config.bytes, f"{name}: set {set_name} has no budget"
        method_settings(config.method, config.settings)
    for evaluation in run.suite.evaluations:
        config = run.evaluation_config(evaluation)
        assert merge(config, {}) == config
    assert {"quickstart", "tiny", "cifar10-cpu", "cifar10-ipc-cpu", "cifar10-gpu"} <= set(suites())
    assert not (tmp_path / name).exists()  # resolving writes nothing


def test_a_suite_that_names_a_shipped_teacher_uses_it_unless_asked_to_train_its_own(tmp_path: Path) -> None:
    suite = tmp_path / "shipped.yaml"
    suite.write_text(yaml.safe_dump({"teacher": {"reference": "cifar10", "preset": "tiny"},
                                     "sets": {"krr": {"preset": "krr-st/tiny"}}}))
    shipped = BenchRun(str(suite), tmp_path, BenchOptions(device="cpu", progress=False))
    assert shipped.teacher_source() == "reference:cifar10"
    assert shipped.set_config("krr").teacher == "reference:cifar10"
    assert shipped.teacher().fingerprint == load_teacher("reference:cifar10").fingerprint
    own = BenchRun(str(suite), tmp_path, BenchOptions(device="cpu", progress=False, train_teacher=True))
    assert own.teacher_source() == own.set_config("krr").teacher == str(tmp_path / "shipped" / "teacher")
    suite.write_text(yaml.safe_dump({"teacher": {"referense": "cifar10"}}))
    with pytest.raises(ConfigError, match="referense"):
        BenchRun(str(suite), tmp_path)


def test_a_set_stage_names_its_methods_preset_as_the_command_line_does(tmp_path: Path) -> None:
    short, full = tmp_path / "short.yaml", tmp_path / "full.yaml"
    short.write_text("teacher: {preset: tiny}\nsets:\n  paa: {preset: tiny, config: {method: paa}}\n")
    full.write_text("teacher: {preset: tiny}\nsets:\n  paa: {preset: paa/tiny}\n")
    configs = [BenchRun(str(suite), tmp_path, BenchOptions(device="cpu", progress=False)).set_config("paa")
               for suite in (short, full)]
    assert dataclasses.replace(configs[0], teacher=None) == dataclasses.replace(configs[1], teacher=None)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("teacher: {preset: tiny}\nsets:\n  paa: {preset: nosuch, config: {method: paa}}\n")
    with pytest.raises(ConfigError) as info:
        BenchRun(str(wrong), tmp_path, BenchOptions(device="cpu", progress=False)).set_config("paa")
    assert one_line(info.value) == "method paa has no preset 'nosuch'; its presets: cifar10-cpu, cifar100-gpu, tiny"
