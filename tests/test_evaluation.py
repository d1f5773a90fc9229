"""Evaluation: probes, protocols end to end, baselines at the same byte budget, pixel spaces, reports and the
errors a user can run into.

One tiny teacher (conftest ``tiny_teacher``) is trained for the whole module.  Expected values come from hand
computations, from the inputs the test built itself, or from spies that record what the code under test
hands to the next stage -- never from the function under test.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fixtures import make_splits, write_image_folder

from ssdd.config import resolve_config
from ssdd.data import PixelSpace, make_synthetic
from ssdd.distilled import DistilledSet
from ssdd.errors import ConfigError, SsddError
from ssdd.evaluation import Cell, EvaluationConfig, evaluate, read_results, write_report
from ssdd.evaluation.baselines import make_baseline
from ssdd.evaluation.journal import clear_journal, journal_files
from ssdd.evaluation.report import markdown_tables
from ssdd.probes import fit_logistic_regression, linear_probe_accuracy
from ssdd.selection import HighLossSettings
from ssdd.teachers import Teacher, load_teacher, teacher_features
from ssdd.training import TrainSettings, build_student, top1, train_network

# ``ssdd.evaluation.evaluate`` is shadowed by the function of that name on the package: import the modules.
evaluate_module = importlib.import_module("ssdd.evaluation.evaluate")
protocols = importlib.import_module("ssdd.evaluation.protocols")
students = importlib.import_module("ssdd.evaluation.students")

CPU = torch.device("cpu")
N_SOURCE = 320  # the synthetic dataset: 10 classes x 32 images per split
TINY_ARCH = {"widths": [8, 16], "norm": "batch"}
IMAGE_VALUES = 3 * 32 * 32


def tiny(**overrides: object) -> EvaluationConfig:
    """The tiny evaluation preset on the CPU, with test-specific overrides."""
    return resolve_config(EvaluationConfig, "evaluate", "tiny", overrides={"device": "cpu", **overrides})


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(uint8 / 255 - mean) / std per channel, written out here in float64."""
    m = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    return ((images.double() / 255.0 - m) / s).float()


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def is_top1_of(accuracy: float, n: int) -> bool:
    """Whether ``accuracy`` (%) is k / n * 100 for an integer k (top-1 over n test images)."""
    k = accuracy * n / 100
    return 0 <= accuracy <= 100 and abs(k - round(k)) < 1e-3


# ---- module fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tiny_teacher: Path) -> Teacher:
    return load_teacher(tiny_teacher)


@pytest.fixture(scope="module")
def source():  # noqa: ANN201
    return make_synthetic("train")


@pytest.fixture(scope="module")
def features(teacher: Teacher, source) -> torch.Tensor:  # noqa: ANN001
    return teacher_features(teacher, source)


@pytest.fixture(scope="module")
def real20(teacher: Teacher, source, features: torch.Tensor) -> DistilledSet:  # noqa: ANN001
    """20 real synthetic images (2 per class) in the teacher's pixel space with teacher-feature targets."""
    idx = torch.arange(0, N_SOURCE, 16)
    images = normalise(source.images[idx], teacher.pixel_space.mean, teacher.pixel_space.std)
    return DistilledSet({"images": images, "targets": features[idx].clone()}, teacher.pixel_space,
                        "representation", "real20")


SPACE_B = PixelSpace((0.5, 0.45, 0.4), (0.25, 0.2, 0.3))


def labelled_set(kind: str, space: PixelSpace = SPACE_B, split: str = "train", per_class: int = 3) -> DistilledSet:
    """A hard- or soft-label set of real synthetic images (``per_class`` of each of the 10 classes)."""
    data = make_synthetic(split)
    idx = torch.cat([torch.arange(c * 32, c * 32 + per_class) for c in range(10)])
    images = normalise(data.images[idx], space.mean, space.std)
    labels = data.labels[idx]
    if kind == "hard-label":
        return DistilledSet({"images": images, "labels": labels.clone()}, space, kind, "hard")
    logits = 4.0 * F.one_hot(labels, 10).float() + 0.1 * randn(idx.numel(), 10, seed=5)
    return DistilledSet({"images": images, "labels": logits}, space, kind, "soft")


# ---- probes -------------------------------------------------------------------------------------------------


def blobs() -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian blobs in 2-D, 20 points each."""
    centers = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    labels = torch.arange(3).repeat_interleave(20)
    return centers[labels] + 0.5 * randn(60, 2, seed=1), labels


def test_logistic_regression_separates_a_separable_problem() -> None:
    x, y = blobs()
    weight, bias = fit_logistic_regression(x, y, 3, l2=1e-4, max_iter=200)
    assert weight.shape == (2, 3) and bias.shape == (3,)
    predictions = (x.double() @ weight + bias).argmax(1)
    assert (predictions == y).all()
    # the fitted model is confident: mean cross-entropy far below chance (log 3 = 1.10)
    assert F.cross_entropy(x.double() @ weight + bias, y).item() < 0.1


def test_linear_probe_accuracy_hand_checked() -> None:
    x, y = blobs()
    assert linear_probe_accuracy(x, y, x, y, l2=1e-4) == 100.0
    # flip the labels of 6 of the 60 test points: exactly 90% stay right
    wrong = y.clone()
    wrong[:6] = 2
    assert linear_probe_accuracy(x, y, x, wrong, l2=1e-4) == pytest.approx(90.0)


class Passthrough(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_top1_hand_checked() -> None:
    # logits = the images themselves: argmax of rows [0,1,0], [2,0,0], [0,0,5], [1,3,2] = 1, 0, 2, 1
    images = torch.tensor([[0.0, 1, 0], [2, 0, 0], [0, 0, 5], [1, 3, 2]]).view(4, 3, 1, 1)
    assert top1(Passthrough(), images, torch.tensor([1, 0, 2, 1])) == 100.0
    assert top1(Passthrough(), images, torch.tensor([1, 0, 0, 0]), batch_size=3) == 50.0


# ---- the linear readout's label fractions -----------------------------------------------------------------


def test_linear_readout_uses_round_n_f_seeded_labels(monkeypatch: pytest.MonkeyPatch, real20: DistilledSet) -> None:
    calls: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def record(train_features, train_labels, test_features, test_labels, **kwargs):  # noqa: ANN001, ANN003
        calls.append((train_features.clone(), train_labels.clone(), test_features.shape[0]))
        return 42.0

    monkeypatch.setattr(protocols, "linear_probe_accuracy", record)
    fractions = [0.1, 0.25, 1.0]  # round(320 * f) = 32, 80, 320
    config = tiny(seeds=[0, 1], readout={"fractions": fractions})
    cells = evaluate([real20], config, progress=False)
    assert [c[0].shape[0] for c in calls] == [32, 80, 320, 32, 80, 320]
    assert all(c[2] == N_SOURCE for c in calls)  # always the full test split
    assert sorted(c.fraction for c in cells) == fractions
    assert all(c.accuracies == [42.0, 42.0] and c.seeds == [0, 1] for c in cells)
    for seed_calls in (calls[:3], calls[3:]):
        full_features, full_labels = seed_calls[2][0], seed_calls[2][1]
        # fraction 1: every training image once (in a seeded order)
        assert torch.equal(full_labels.sort().values, make_synthetic("train").labels)
        for feats, labels, _ in seed_calls[:2]:
            # every labelled row is a distinct row of the full training features, with its own label
            rows = [int((full_features == row).all(1).nonzero()[0]) for row in feats]
            assert len(set(rows)) == len(rows)
            assert torch.equal(full_labels[rows], labels)
            # a random subset, not the first images of a class-sorted split
            assert len(set(labels.tolist())) > 3
    # seeded: another seed labels other images ...
    assert not torch.equal(calls[0][1], calls[3][1])
    # ... and the same seed the same images, run after run
    first = [c[1] for c in calls]
    calls.clear()
    evaluate([real20], config, progress=False)
    assert all(torch.equal(a, b[1]) for a, b in zip(first, calls))


def test_linear_readout_encodes_only_the_labelled_images(monkeypatch: pytest.MonkeyPatch,
                                                         real20: DistilledSet) -> None:
    probes: dict[tuple[float, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    encoded: list[int] = []
    extract = protocols.dataset_features

    def counting_extract(encoder, dataset, space, indices=None, **kwargs):  # noqa: ANN001, ANN003
        encoded.append(len(dataset) if indices is None else indices.shape[0])
        return extract(encoder, dataset, space, indices, **kwargs)

    monkeypatch.setattr(protocols, "dataset_features", counting_extract)
    monkeypatch.setattr(students, "train_network", lambda model, *a, **k: model.eval())
    for fractions in ((0.1, 0.25), (0.1, 0.25, 1.0)):
        calls = probes.setdefault(fractions, [])
        monkeypatch.setattr(protocols, "linear_probe_accuracy",
                            lambda tf, tl, *a, calls=calls, **k: calls.append((tf, tl)) or 50.0)
        encoded.clear()
        evaluate([real20], tiny(seeds=[3], readout={"fractions": list(fractions)}), progress=False)
        union = torch.unique(torch.cat([protocols.label_fraction(N_SOURCE, f, 3) for f in fractions])).numel()
        assert encoded == [union, N_SOURCE]  # the labelled training images, then the whole test split
    assert encoded[0] == N_SOURCE
    # the same features and labels reach the probe as when every training image is encoded
    for (subset_feats, subset_labels), (full_feats, full_labels) in zip(probes[(0.1, 0.25)], probes[(0.1, 0.25, 1.0)]):
        assert torch.equal(subset_labels, full_labels)
        torch.testing.assert_close(subset_feats, full_feats, rtol=1e-5, atol=1e-5)


# ---- every protocol end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["linear", "knn", "finetune", "supervised-hard", "supervised-soft"])
def test_protocol_end_to_end(protocol: str, real20: DistilledSet) -> None:
    if protocol.startswith("supervised"):
        distilled = labelled_set(f"{protocol.split('-')[1]}-label")
        config = tiny(protocol="supervised")
    else:
        distilled = real20
        config = tiny(protocol=protocol)
    cells = evaluate([distilled], config, progress=False)
    fractions = [0.1, 1.0] if protocol == "linear" else [1.0]
    assert sorted(c.fraction for c in cells) == fractions
    for cell in cells:
        assert isinstance(cell, Cell)
        assert cell.entry == distilled.method and cell.arch == "convnet" and cell.target == "synthetic"
        assert cell.protocol == config.protocol
        assert cell.seeds == [0, 1] and len(cell.accuracies) == 2
        assert all(is_top1_of(a, N_SOURCE) for a in cell.accuracies), cell.accuracies
        assert cell.seconds >= 0


def test_sets_with_the_same_method_get_distinct_rows(monkeypatch: pytest.MonkeyPatch, real20: DistilledSet) -> None:
    monkeypatch.setattr(students, "train_network", lambda model, *a, **k: model.eval())
    twin = DistilledSet(dict(real20.tensors), real20.pixel_space, "representation", "real20")
    cells = evaluate([real20, twin], tiny(protocol="knn"), progress=False)
    assert len(cells) == 2 and len({c.entry for c in cells}) == 2
    assert all(len(c.accuracies) == 2 for c in cells)  # one per seed, never merged across sets


def test_named_sets_get_their_names_as_rows(monkeypatch: pytest.MonkeyPatch, real20: DistilledSet) -> None:
    monkeypatch.setattr(students, "train_network", lambda model, *a, **k: model.eval())
    twin = DistilledSet(dict(real20.tensors), real20.pixel_space, "representation", "real20")
    cells = evaluate([real20, twin, twin], tiny(protocol="knn", seeds=[0]), names=["ablated", None], progress=False)
    assert [c.entry for c in cells] == ["ablated", "real20", "real20'"]
    for names, baselines in ((["a", "a"], ()), (["none"], ("none",))):
        with pytest.raises(ConfigError, match="row names must be distinct and differ from the baselines; repeated"):
            evaluate([real20, twin], tiny(), names=names, baselines=baselines, progress=False)
    with pytest.raises(ConfigError, match="3 names for 2 sets"):
        evaluate([real20, twin], tiny(), names=["a", "b", "c"], progress=False)


# ---- baselines at the same byte budget ----------------------------------------------------------------------

FAST_HIGH_LOSS = HighLossSettings(num_experts=1, epochs=1, arch="convnet", arch_args=TINY_ARCH, batch_size=64)


@pytest.mark.parametrize("name", ["random", "herding", "kcenter", "high-loss"])
def test_selection_baselines_spend_the_sets_budget_on_real_images(name: str, teacher: Teacher, source,  # noqa: ANN001
                                                                 features: torch.Tensor, real20: DistilledSet) -> None:
    baseline = make_baseline(name, source, teacher, features, real20.byte_count, 0, CPU, FAST_HIGH_LOSS)
    assert baseline.byte_count == real20.byte_count == 20 * (IMAGE_VALUES + teacher.feature_dim) * 4
    assert baseline.num_images == 20 and baseline.target_kind == "representation"
    assert baseline.pixel_space == teacher.pixel_space
    idx = baseline.metadata["selected_indices"]
    assert len(set(idx)) == 20 and all(0 <= i < N_SOURCE for i in idx)
    expected = normalise(source.images[idx], teacher.pixel_space.mean, teacher.pixel_space.std)
    assert torch.allclose(baseline.images, expected, atol=1e-5)
    assert torch.equal(baseline.tensors["targets"], features[idx])


def test_high_loss_scores_are_computed_once_per_teacher_source_settings_and_seed(
        tiny_teacher: Path, source, features: torch.Tensor, tmp_path: Path,  # noqa: ANN001
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from ssdd import selection

    shutil.copy(tiny_teacher, tmp_path / tiny_teacher.name)
    teacher = load_teacher(tmp_path / tiny_teacher.name)  # its own cache folder
    trained = []
    compute = selection._train_and_score
    monkeypatch.setattr(selection, "_train_and_score", lambda *args: trained.append(args[4]) or compute(*args))
    first = selection.high_loss_scores(source, features, teacher, FAST_HIGH_LOSS, 0, CPU)
    again = selection.high_loss_scores(source, features, teacher, FAST_HIGH_LOSS, 0, CPU)
    assert trained == [0] and torch.equal(first, again) and first.shape == (N_SOURCE,)
    other_seed = selection.high_loss_scores(source, features, teacher, FAST_HIGH_LOSS, 1, CPU)
    wider = HighLossSettings(**{**FAST_HIGH_LOSS.__dict__, "num_experts": 2})
    selection.high_loss_scores(source, features, teacher, wider, 0, CPU)
    assert trained == [0, 1, 0] and not torch.equal(first, other_seed)
    assert len(list((tmp_path / "features").glob("high-loss-*.safetensors"))) == 3


def test_random_baseline_budget_floors_to_whole_pairs(teacher: Teacher, source, features: torch.Tensor,  # noqa: ANN001
                                                      real20: DistilledSet) -> None:
    pair = (IMAGE_VALUES + teacher.feature_dim) * 4
    half = DistilledSet({k: v.half() for k, v in real20.tensors.items()}, real20.pixel_space, "representation", "half")
    for budget in (half.byte_count, real20.byte_count + pair - 1, real20.byte_count + 1, 3 * pair + 17):
        baseline = make_baseline("random", source, teacher, features, budget, 1, CPU)
        assert 0 <= budget - baseline.byte_count < pair, (budget, baseline.byte_count)
    assert make_baseline("random", source, teacher, features, half.byte_count, 1, CPU).num_images == 10
    # the same seed picks the same images; another seed others
    a = make_baseline("random", source, teacher, features, real20.byte_count, 3, CPU)
    b = make_baseline("random", source, teacher, features, real20.byte_count, 3, CPU)
    c = make_baseline("random", source, teacher, features, real20.byte_count, 4, CPU)
    assert a.metadata["selected_indices"] == b.metadata["selected_indices"] != c.metadata["selected_indices"]


def test_full_baseline_holds_every_source_image(teacher: Teacher, source, features: torch.Tensor) -> None:  # noqa: ANN001
    full = make_baseline("full", source, teacher, features, None, 0, CPU)
    assert full.num_images == N_SOURCE
    assert full.byte_count == N_SOURCE * (IMAGE_VALUES + teacher.feature_dim) * 4
    assert torch.allclose(full.images, normalise(source.images, teacher.pixel_space.mean, teacher.pixel_space.std),
                          atol=1e-5)
    assert torch.equal(full.tensors["targets"], features)


def test_evaluate_builds_baselines_at_the_sets_budget(monkeypatch: pytest.MonkeyPatch, teacher: Teacher,
                                                      real20: DistilledSet) -> None:
    built: list[DistilledSet] = []
    real_make = evaluate_module.make_baseline

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        built.append(real_make(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(evaluate_module, "make_baseline", spy)
    monkeypatch.setattr(students, "train_network", lambda model, *a, **k: model.eval())  # no pre-training
    config = tiny(protocol="knn")
    cells = evaluate([real20], config, baselines=["random"], teacher=teacher, progress=False)
    assert {c.entry for c in cells} == {"real20", "random"}
    assert [b.byte_count for b in built] == [real20.byte_count] * 2  # one per seed
    assert built[0].metadata["selected_indices"] != built[1].metadata["selected_indices"]
    built.clear()
    evaluate([], config, baselines=["random"], teacher=teacher, budget_images=7, progress=False)
    assert [b.num_images for b in built] == [7, 7]
    assert built[0].byte_count == 7 * (IMAGE_VALUES + teacher.feature_dim) * 4
    built.clear()
    evaluate([], config, baselines=["herding"], teacher=teacher, budget_bytes=5 * built_pair(teacher) + 3,
             progress=False)
    assert [b.num_images for b in built] == [5, 5]


def built_pair(teacher: Teacher) -> int:
    return (IMAGE_VALUES + teacher.feature_dim) * 4


# ---- a killed evaluation resumes from its journal -----------------------------------------------------------


class Killed(BaseException):
    """Stands for the process being killed (pytest reserves KeyboardInterrupt for itself)."""


def without_seconds(cells: list[Cell]) -> list[dict]:
    return [{k: v for k, v in c.to_dict().items() if k != "seconds"} for c in cells]


def test_a_killed_evaluation_resumes_at_its_first_unfinished_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture, teacher: Teacher,
                                                                real20: DistilledSet) -> None:
    config = tiny(seeds=[0, 1, 2], readout={"lbfgs_iterations": 10})
    journal = tmp_path / ".jobs"

    def run(cfg: EvaluationConfig = config) -> list[Cell]:
        return evaluate([real20], cfg, baselines=["none"], teacher=teacher, progress=False, journal=journal)

    uninterrupted = without_seconds(evaluate([real20], config, baselines=["none"], teacher=teacher, progress=False))
    built: list[tuple[str, int]] = []
    kill_at = [3]  # jobs: real20 seeds 0-2, then none seeds 0-2; the kill comes as job 3 starts
    real_student = evaluate_module.Evaluator.student

    def student(self, entry, distilled, arch, seed, *args):  # noqa: ANN001, ANN202 - a spy
        if len(built) == kill_at[0]:
            raise Killed
        built.append((entry.name, seed))
        return real_student(self, entry, distilled, arch, seed, *args)

    monkeypatch.setattr(evaluate_module.Evaluator, "student", student)
    with pytest.raises(Killed):
        run()
    (file,) = journal_files(journal)
    assert file.name == ".jobs-0.jsonl" and len(file.read_text().splitlines()) == 1 + 3  # settings + 3 jobs
    with open(file, "a") as f:
        f.write('{"job": 3, "resu')  # a line the kill cut short is dropped, not read
    built.clear()
    kill_at[0] = -1
    capsys.readouterr()
    assert without_seconds(run()) == uninterrupted
    assert built == [("none", 0), ("none", 1), ("none", 2)]  # only the jobs left were run
    assert "[evaluate] resuming: 3 of 6 jobs finished before" in capsys.readouterr().out

    built.clear()  # other settings: the old journal is not used (and is replaced)
    run(tiny(seeds=[0, 1], readout={"lbfgs_iterations": 10}))
    assert built == [("real20", 0), ("real20", 1), ("none", 0), ("none", 1)]
    assert json.loads(file.read_text().splitlines()[0])["key"]["config"]["seeds"] == [0, 1]
    clear_journal(journal)
    assert journal_files(journal) == []


# ---- reports ------------------------------------------------------------------------------------------------


def table_rows(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    """(column names, row name -> cell texts) of the single table in ``markdown``."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return header[1:], rows


def test_markdown_bold_marks_the_best_mean_of_each_column() -> None:
    def cell(entry: str, fraction: float, accs: list[float]) -> Cell:
        return Cell(entry, "linear", "convnet", "synthetic", fraction, [0, 1], accs, 1.0)

    cells = [cell("A", 0.1, [30, 30]), cell("B", 0.1, [48, 52]), cell("C", 0.1, [40, 41]),
             cell("A", 1.0, [70, 70]), cell("B", 1.0, [60, 61]), cell("C", 1.0, [65, 66])]
    md = markdown_tables(cells)
    assert sum(line.startswith("| set |") for line in md.splitlines()) == 1
    columns, rows = table_rows(md)
    assert columns == ["synthetic 10%", "synthetic 100%"]
    assert rows["B"][0] == "**50.0 +- 2.8**"  # mean 50, sample std sqrt(8) = 2.83
    assert rows["A"][0] == "30.0 +- 0.0" and rows["C"][0] == "40.5 +- 0.7"
    assert rows["A"][1] == "**70.0 +- 0.0**"
    assert not rows["B"][1].startswith("**") and not rows["C"][1].startswith("**")


def test_report_files_round_trip(tmp_path: Path, teacher: Teacher, real20: DistilledSet) -> None:
    config = tiny(readout={"lbfgs_iterations": 10})  # the numbers do not matter here, only the files
    cells = evaluate([real20], config, baselines=["none", "random"], teacher=teacher, progress=False)
    assert {(c.entry, c.fraction) for c in cells} == {(e, f) for e in ("real20", "none", "random") for f in (0.1, 1.0)}
    md_path = write_report(tmp_path, cells, config, {"torch": torch.__version__}, command="ssdd evaluate x")
    assert md_path == tmp_path / "results.md"
    back, record = read_results(tmp_path / "results.json")
    assert back == cells
    assert record["command"] == "ssdd evaluate x"
    assert record["config"]["protocol"] == "linear" and record["config"]["seeds"] == [0, 1]
    assert json.loads((tmp_path / "results.json").read_text())["cells"][0]["mean"] == pytest.approx(cells[0].mean)
    md = md_path.read_text()
    assert sum(line.startswith("| set |") for line in md.splitlines()) == 1
    columns, rows = table_rows(md)
    assert set(rows) == {"real20", "none", "random"}
    for j, column in enumerate(columns):
        fraction = 0.1 if column.endswith(" 10%") else 1.0
        means = {c.entry: c.mean for c in cells if c.fraction == fraction}
        best = max(means.values())
        bold = {entry for entry, texts in rows.items() if texts[j].startswith("**")}
        assert bold == {entry for entry, m in means.items() if m == best}, (column, means, rows)
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "results.png" in md


def test_read_results_of_a_non_results_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "results.json"
    bad.write_text('{"cells": [{"nope": 1}]}')
    with pytest.raises(SsddError) as excinfo:
        read_results(bad)
    assert str(bad) in str(excinfo.value)


# ---- user errors --------------------------------------------------------------------------------------------


def test_none_under_supervised_is_a_config_error(teacher: Teacher) -> None:
    with pytest.raises(ConfigError) as excinfo:
        evaluate([], tiny(protocol="supervised"), baselines=["none"], teacher=teacher, progress=False)
    assert "supervised" in str(excinfo.value) and "none" in str(excinfo.value)


def test_none_under_supervised_without_teacher_names_the_real_problem() -> None:
    # Adding --teacher would not help: the message must say that 'none' cannot be used with supervised.
    with pytest.raises(ConfigError) as excinfo:
        evaluate([], tiny(protocol="supervised"), baselines=["none"], progress=False)
    assert "supervised" in str(excinfo.value), str(excinfo.value)


def test_none_under_supervised_fails_before_any_training(monkeypatch: pytest.MonkeyPatch, teacher: Teacher) -> None:
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a student was trained before the impossible 'none' + supervised entry was refused")

    monkeypatch.setattr(students, "train_network", no_training)
    with pytest.raises(ConfigError):
        evaluate([labelled_set("hard-label")], tiny(protocol="supervised"), baselines=["none"], teacher=teacher,
                 progress=False)


def test_representation_set_under_supervised_is_a_config_error(real20: DistilledSet) -> None:
    with pytest.raises(ConfigError) as excinfo:
        evaluate([real20], tiny(protocol="supervised"), progress=False)
    assert "real20" in str(excinfo.value) and "supervised" in str(excinfo.value)


@pytest.mark.parametrize("protocol", ["linear", "knn", "finetune"])
def test_labelled_set_under_a_representation_protocol_is_a_config_error(protocol: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        evaluate([labelled_set("hard-label")], tiny(protocol=protocol), progress=False)
    assert "hard" in str(excinfo.value) and "supervised" in str(excinfo.value)


def test_each_protocol_says_what_it_takes_and_names_the_protocols_that_take_the_rest() -> None:
    supervised, linear = protocols.PROTOCOLS.get("supervised"), protocols.PROTOCOLS.get("linear")
    with pytest.raises(ConfigError) as excinfo:
        supervised.refuse_mismatches([("mine", "representation")], [])
    assert str(excinfo.value) == ("set 'mine' holds representations; the supervised protocol evaluates labelled sets; "
                                  "use --protocol linear or knn or finetune")
    with pytest.raises(ConfigError) as excinfo:
        linear.refuse_mismatches([("mine", "soft-label")], ["random", "kcenter"])
    assert str(excinfo.value) == ("set 'mine' holds soft-labels; the linear protocol evaluates representation sets; "
                                  "use --protocol supervised")
    with pytest.raises(ConfigError) as excinfo:
        supervised.refuse_mismatches([("mine", "hard-label")], ["random", "none", "kcenter"])
    assert str(excinfo.value) == ("the supervised protocol evaluates labelled sets; baselines none, kcenter are not "
                                  "among them; evaluate them with linear, knn, finetune (its labelled baselines are "
                                  "random, herding)")


def test_unknown_protocol_is_a_clear_error() -> None:
    with pytest.raises(ConfigError) as excinfo:
        EvaluationConfig(protocol="lineer")
    message = str(excinfo.value)
    assert "lineer" in message and "linear" in message and "knn" in message
    with pytest.raises(ConfigError) as excinfo:
        tiny(protocol="nosuch")
    assert "nosuch" in str(excinfo.value)


def test_teacher_baseline_reads_out_the_teachers_own_features(monkeypatch: pytest.MonkeyPatch, teacher: Teacher,
                                                               source) -> None:  # noqa: ANN001
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    monkeypatch.setattr(protocols, "linear_probe_accuracy", lambda tf, tl, *a, **k: calls.append((tf, tl)) or 50.0)
    trained: list[object] = []
    monkeypatch.setattr(students, "train_network", lambda model, *a, **k: trained.append(model) or model.eval())
    config = tiny(seeds=[0, 1], archs=["convnet", "convnet3"], readout={"fractions": [1.0]})
    cells = evaluate([], config, baselines=["teacher"], teacher=teacher, progress=False)
    assert not trained  # nothing is pre-trained ...
    assert [(c.entry, c.arch, c.seeds) for c in cells] == [("teacher", "convnet", [0, 1])]  # ... once per seed
    expected = teacher_features(teacher, source)  # the target is the teacher's own source here
    for seed, (feats, labels) in zip([0, 1], calls):
        idx = protocols.label_fraction(N_SOURCE, 1.0, seed)  # the seeded order in which the probe sees them
        assert torch.equal(labels, source.labels[idx])
        torch.testing.assert_close(feats, expected[idx], rtol=1e-4, atol=1e-4)


def test_teacher_baseline_without_a_teacher_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="'teacher' reads out the teacher's own network: give it with --teacher"):
        evaluate([], tiny(), baselines=["teacher"], progress=False)


def test_unknown_baseline_is_a_clear_error(teacher: Teacher, source, features: torch.Tensor) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError) as excinfo:
        evaluate([], tiny(), baselines=["randm"], teacher=teacher, progress=False)
    assert "randm" in str(excinfo.value) and "random" in str(excinfo.value)
    for name in ("randm", "none"):
        with pytest.raises(ConfigError) as excinfo:
            make_baseline(name, source, teacher, features, 10**6, 0, CPU)
        assert repr(name) in str(excinfo.value)


def test_missing_inputs_are_clear_errors(teacher: Teacher, source, features: torch.Tensor) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate([], tiny(), progress=False)
    with pytest.raises(ConfigError, match="teacher"):
        evaluate([], tiny(), baselines=["random"], budget_bytes=10**6, progress=False)
    with pytest.raises(ConfigError, match="teacher"):
        evaluate([], tiny(), baselines=["random"], budget_images=5, progress=False)
    with pytest.raises(ConfigError, match="budget"):
        make_baseline("random", source, teacher, features, None, 0, CPU)
    with pytest.raises(ConfigError, match="100 bytes"):
        make_baseline("random", source, teacher, features, 100, 0, CPU)
    with pytest.raises(ConfigError, match="fraction"):
        tiny(readout={"fractions": [0.0, 1.0]})
    with pytest.raises(ConfigError):
        tiny(seeds=[])


# ---- pre-training -------------------------------------------------------------------------------------------


def mse(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(((model(images) - targets) ** 2).mean())


def test_mse_pretraining_lowers_the_training_mse() -> None:
    data = make_synthetic("train")
    idx = torch.arange(0, N_SOURCE, 10)  # 32 images
    images = normalise(data.images[idx], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    targets = randn(32, 8, seed=3) + 0.5
    model = build_student("convnet", {"widths": [8, 16], "norm": "instance"}, 8, (3, 32, 32), seed=0)
    before = mse(model, images, targets)
    settings = TrainSettings(epochs=25, lr=0.05, batch_size=16)
    trained = train_network(model, images, targets, settings, "mse", seed=0)
    after = mse(trained, images, targets)
    assert after < 0.5 * before, (before, after)


def test_zero_epochs_leave_the_network_untouched() -> None:
    model = build_student("convnet", TINY_ARCH, 4, (3, 32, 32), seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train_network(model, randn(8, 3, 32, 32), randn(8, 4), TrainSettings(epochs=0), "mse", seed=0)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_build_student_is_a_function_of_the_seed() -> None:
    a = build_student("convnet", TINY_ARCH, 4, (3, 32, 32), seed=7)
    torch.rand(100)  # global RNG state must not matter
    b = build_student("convnet", TINY_ARCH, 4, (3, 32, 32), seed=7)
    c = build_student("convnet", TINY_ARCH, 4, (3, 32, 32), seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head.weight, c.head.weight)


def capture_pretraining(monkeypatch: pytest.MonkeyPatch) -> list[tuple[TrainSettings, str]]:
    seen: list[tuple[TrainSettings, str]] = []

    def fake(model, images, targets, settings, loss, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append((settings, loss))
        return model.eval()

    monkeypatch.setattr(students, "train_network", fake)
    return seen


def test_a_set_with_a_learned_lr_is_pretrained_at_that_lr(monkeypatch: pytest.MonkeyPatch,
                                                          real20: DistilledSet) -> None:
    seen = capture_pretraining(monkeypatch)
    learned = DistilledSet({**real20.tensors, "learned_lr": torch.tensor(0.015625)}, real20.pixel_space,
                           "representation", "learned")
    evaluate([learned, real20], tiny(protocol="knn", seeds=[0]), progress=False)
    assert [(s.lr, loss) for s, loss in seen] == [(0.015625, "mse"), (0.05, "mse")]  # 0.05: the tiny preset's lr
    assert all(s.epochs == 2 and s.batch_size == 64 for s, _ in seen)  # nothing else changes
    seen.clear()
    evaluate([learned], tiny(protocol="knn", seeds=[0], use_learned_lr=False), progress=False)
    assert [s.lr for s, _ in seen] == [0.05]


# ---- pixel spaces: target data is normalised once, with the set's own pixel space --------------------------


@pytest.mark.parametrize("space", [PixelSpace((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), SPACE_B], ids=["unit", "mean-std"])
def test_knn_readout_normalises_target_data_once_with_the_sets_pixel_space(monkeypatch: pytest.MonkeyPatch,
                                                                          space: PixelSpace) -> None:
    # The set is made of the target's own training images: what the student sees of the target must then be
    # exactly the set's images (normalising twice, or with another pixel space, would change them).
    train, test = make_synthetic("train"), make_synthetic("test")
    idx = torch.arange(0, N_SOURCE, 8)
    images = normalise(train.images[idx], space.mean, space.std)
    distilled = DistilledSet({"images": images, "targets": randn(idx.numel(), 8, seed=2)}, space,
                             "representation", "px")
    seen = []
    real_extract = protocols.dataset_features

    def spy(encoder, dataset, pixel_space, indices=None, batch_size=512, device="cpu"):  # noqa: ANN001, ANN202
        inputs = []

        def recording(x: torch.Tensor) -> torch.Tensor:
            inputs.append(x.detach().cpu().clone())
            return encoder(x)

        feats = real_extract(recording, dataset, pixel_space, indices, batch_size=batch_size, device=device)
        seen.append((torch.cat(inputs), feats, encoder))
        return feats

    monkeypatch.setattr(protocols, "dataset_features", spy)
    evaluate([distilled], tiny(protocol="knn", seeds=[0]), progress=False)
    assert len(seen) == 2  # train and test features
    (train_x, train_feats, encoder), (test_x, _, _) = seen
    assert torch.allclose(train_x[idx], images, atol=1e-5)
    assert torch.allclose(train_x, normalise(train.images, space.mean, space.std), atol=1e-5)
    assert torch.allclose(test_x, normalise(test.images, space.mean, space.std), atol=1e-5)
    # ... so the student's features of the target images are its features of the set's images
    with torch.no_grad():
        assert torch.allclose(train_feats[idx], encoder(images), atol=1e-4)


def test_supervised_readout_normalises_target_data_once(monkeypatch: pytest.MonkeyPatch) -> None:
    test = make_synthetic("test")
    distilled = labelled_set("hard-label", SPACE_B, split="test")  # images 0..2 of every class of the test split
    idx = torch.cat([torch.arange(c * 32, c * 32 + 3) for c in range(10)])
    seen = []
    real_top1 = protocols.top1

    def spy(model, images, labels, device="cpu", batch_size=1024):  # noqa: ANN001, ANN202
        seen.append((images[torch.arange(len(images))].clone(), labels.clone()))  # NormalizedImages, read whole
        return real_top1(model, images, labels, device, batch_size)

    monkeypatch.setattr(protocols, "top1", spy)
    cells = evaluate([distilled], tiny(protocol="supervised", seeds=[0]), progress=False)
    assert len(seen) == 1 and len(cells) == 1
    images, labels = seen[0]
    assert torch.allclose(images[idx], distilled.images, atol=1e-5)
    assert torch.allclose(images, normalise(test.images, SPACE_B.mean, SPACE_B.std), atol=1e-5)
    assert torch.equal(labels, test.labels)


def test_finetune_readout_normalises_target_data_once(monkeypatch: pytest.MonkeyPatch,
                                                      real20: DistilledSet) -> None:
    train, test = make_synthetic("train"), make_synthetic("test")
    distilled = DistilledSet(dict(real20.tensors), real20.pixel_space, "representation", "ft")
    space = distilled.pixel_space
    seen = {}

    def fake_train(model, images, labels, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen["train"] = (images[torch.arange(len(images))].clone(), labels.clone(), model.head.out_features)
        return model.eval()

    def fake_top1(model, images, labels, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen["test"] = (images[torch.arange(len(images))].clone(), labels.clone())
        return 12.5

    monkeypatch.setattr(protocols, "train_network", fake_train)
    monkeypatch.setattr(protocols, "top1", fake_top1)
    cells = evaluate([distilled], tiny(protocol="finetune", seeds=[0]), progress=False)
    assert [c.accuracies for c in cells] == [[12.5]]
    images, labels, classes = seen["train"]
    assert classes == 10  # a new head for the target's classes
    assert torch.allclose(images, normalise(train.images, space.mean, space.std), atol=1e-5)
    assert torch.equal(labels, train.labels)
    assert torch.allclose(seen["test"][0], normalise(test.images, space.mean, space.std), atol=1e-5)


# ---- fine-tuning starts from the pre-trained student, for every target and seed ------------------------------


def body_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


def test_finetune_starts_every_target_from_the_pretrained_student(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  real20: DistilledSet) -> None:
    folder = write_image_folder(tmp_path / "folder", make_splits())
    starts = []
    real_train = protocols.train_network

    def spy(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        starts.append(body_state(model))
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(protocols, "train_network", spy)
    cells = evaluate([real20], tiny(protocol="finetune", seeds=[0], targets=["synthetic", f"imagefolder:{folder}"]),
                     progress=False)
    assert len(cells) == 2 and len(starts) == 2
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0]), \
        "the second target was fine-tuned from the student already fine-tuned on the first"


def test_finetune_head_is_a_function_of_the_seed(monkeypatch: pytest.MonkeyPatch, real20: DistilledSet) -> None:
    heads: list[torch.Tensor] = []

    def fake_train(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        heads.append(model.head.weight.detach().clone())
        return model.eval()

    monkeypatch.setattr(protocols, "train_network", fake_train)
    monkeypatch.setattr(students, "train_network", lambda model, *a, **k: model.eval())
    with torch.random.fork_rng(devices=[]):
        evaluate([real20], tiny(protocol="finetune", seeds=[0, 1]), progress=False)
        seed1_after_seed0 = heads[1]
        heads.clear()
        evaluate([real20], tiny(protocol="finetune", seeds=[1]), progress=False)
    # Seed 1's result must not depend on whether seed 0 (or anything else using torch's global RNG) ran first.
    assert torch.equal(heads[0], seed1_after_seed0), "the fine-tuning head is drawn from torch's global RNG"


def test_steps_fix_the_number_of_optimiser_steps_with_the_epochs_batch_order() -> None:
    images, targets = randn(10, 3, 8, 8, seed=2), randn(10, 2, seed=3)
    runs = {}
    for name, settings in {"steps": TrainSettings(epochs=50, steps=6, batch_size=4, cosine=False),
                           "epochs": TrainSettings(epochs=2, batch_size=4, cosine=False)}.items():
        model = build_student("convnet", {"widths": [4], "norm": "batch"}, 2, (3, 8, 8), 0)
        sizes: list[int] = []
        model.register_forward_pre_hook(lambda module, args, sizes=sizes: sizes.append(args[0].shape[0]))
        train_network(model, images, targets, settings, "mse", 0)
        runs[name] = (sizes, model.state_dict())
    assert runs["steps"][0] == runs["epochs"][0] == [4, 4, 2, 4, 4, 2]  # 6 steps, not 50 epochs
    for key, value in runs["epochs"][1].items():
        assert torch.equal(runs["steps"][1][key], value), key
    sizes = []
    model = build_student("convnet", {"widths": [4], "norm": "batch"}, 2, (3, 8, 8), 0)
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    train_network(model, images, targets, TrainSettings(steps=4, batch_size=4), "mse", 0)
    assert sizes == [4, 4, 2, 4]  # a step count that ends inside an epoch


def test_negative_steps_are_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="epochs and steps must be >= 0"):
        TrainSettings(steps=-1)


@pytest.mark.parametrize(("n", "batch", "expected"), [(10, 4, [4, 4, 2]), (9, 4, [4, 4]), (3, 8, [3])])
def test_train_network_batches_cover_the_set_without_single_image_batches(
        n: int, batch: int, expected: list[int]) -> None:
    from ssdd.training import TrainSettings, build_student, train_network

    model = build_student("convnet", {"widths": [4], "norm": "batch"}, 2, (3, 8, 8), 0)
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    train_network(model, torch.randn(n, 3, 8, 8), torch.randn(n, 2), TrainSettings(epochs=1, batch_size=batch),
                  "mse", 0)
    assert sizes == expected


def test_a_compiled_student_trains_like_the_eager_one() -> None:
    """``compile: true`` changes how the steps run, not what they compute."""
    torch.manual_seed(0)
    images, targets = torch.randn(8, 3, 8, 8), torch.randn(8, 4)
    trained = []
    for compiled in (False, True):
        student = build_student("convnet", {"widths": [4], "norm": "batch"}, 4, (3, 8, 8), seed=0)
        settings = TrainSettings(epochs=2, batch_size=4, lr=0.1, amp=False, compile=compiled)
        trained.append(train_network(student, images, targets, settings, "mse", seed=0))
    eager, compiled = (dict(m.named_parameters()) for m in trained)
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(eager.values(),  # training moved the weights
               build_student("convnet", {"widths": [4], "norm": "batch"}, 4, (3, 8, 8), seed=0).parameters()))


# ---- mixing a batch: mixup and CutMix ---------------------------------------------------------------------------


def test_cutmix_pastes_one_box_from_the_permuted_batch_and_returns_the_kept_share() -> None:
    import numpy as np

    from ssdd.training import mix_batch

    x = torch.arange(4 * 1 * 8 * 8, dtype=torch.float32).view(4, 1, 8, 8)
    settings = TrainSettings(cutmix=1.0)
    for seed in range(20):
        mixed, (lam, perm) = mix_batch(x, settings, torch.Generator().manual_seed(seed), np.random.default_rng(seed))
        if torch.equal(perm, torch.arange(4)):  # every image pasted onto itself: nothing changes
            assert torch.equal(mixed, x)
            continue
        pasted = mixed != x  # the values are distinct, so a pixel differs exactly where it came from another image
        box = pasted.any(0)[0]
        assert torch.equal(pasted, box.expand_as(pasted) & (perm != torch.arange(4)).view(4, 1, 1, 1))
        assert torch.equal(mixed[:, :, box], x[perm][:, :, box])
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if rows.numel():  # one rectangle, and lam is the share of the image outside it
            assert int(box.sum()) == rows.numel() * cols.numel() == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert lam == pytest.approx(1 - int(box.sum()) / 64)
    assert not x.equal(torch.zeros_like(x))  # the input is not changed in place
    plain, mixing = mix_batch(x, TrainSettings(), torch.Generator(), np.random.default_rng(0))
    assert plain is x and mixing is None


def test_mixup_and_cutmix_together_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        TrainSettings(mixup=0.8, cutmix=1.0)
    assert str(info.value) == "mixup and cutmix are Beta(alpha, alpha) parameters >= 0; use at most one of them"


# ---- a set whose values are out of range is blamed, not the protocol's learning rate --------------------------


def pixels(value: float, space: PixelSpace = SPACE_B, n: int = 4) -> torch.Tensor:
    """``n`` images whose every pixel is ``value`` on the [0, 1] scale, written into ``space`` by hand."""
    mean = torch.tensor(space.mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(space.std, dtype=torch.float64).view(-1, 1, 1)
    return ((torch.full((n, 3, 8, 8), value, dtype=torch.float64) - mean) / std).float()


def representation_set(images: torch.Tensor, targets: torch.Tensor) -> DistilledSet:
    return DistilledSet({"images": images, "targets": targets}, SPACE_B, "representation", "odd")


@pytest.mark.parametrize("value", [1 + 9.9, -9.9, 0.5])
def test_images_within_ten_pixel_ranges_of_the_valid_range_are_accepted(value: float) -> None:
    evaluate_module.check_values(representation_set(pixels(value), randn(4, 5)), "odd")


@pytest.mark.parametrize("value", [1 + 10.1, -10.1, 1e30])
def test_images_farther_out_are_refused_naming_their_largest_value(value: float) -> None:
    images = pixels(value)
    with pytest.raises(SsddError) as excinfo:
        evaluate_module.check_values(representation_set(images, randn(4, 5)), "odd")
    message = str(excinfo.value)
    assert "set 'odd'" in message and "images" in message and f"{images.abs().max().item():.3g}" in message
    assert "learning rate" not in message and "\n" not in message


def test_targets_whose_squares_overflow_float32_are_refused_before_any_training(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import user_error

    trained = []
    monkeypatch.setattr(students, "train_network", lambda *a, **k: trained.append(1))
    targets = randn(4, 5)
    targets[1, 2] = 3e38  # float32 holds it; its square (and the loss) does not
    path = representation_set(pixels(0.5), targets).save(tmp_path / "set")
    line = user_error(capsys, ["evaluate", str(path), "--preset", "tiny", "--device", "cpu", "--no-progress",
                               "--out", str(tmp_path / "eval")])
    assert "targets" in line and "3e+38" in line and "out of range" in line and "learning rate" not in line
    assert trained == [] and not (tmp_path / "eval" / "results.json").exists()
    # 1.8e19 squared is still finite in float32: that set gets as far as training
    targets[1, 2] = 1.8e19
    evaluate_module.check_values(representation_set(pixels(0.5), targets), "odd")


def test_images_that_overflow_when_materialised_are_refused() -> None:
    huge = torch.full((2, 3, 8, 8), 1e30)  # each stored value is finite; coefficients @ bases are not
    distilled = DistilledSet({"image_coefficients": torch.full((4, 2), 1e30), "image_bases": huge,
                              "targets": randn(4, 5)}, SPACE_B, "representation", "bases")
    with pytest.raises(SsddError, match="set 'b': its images hold NaN or infinite values"):
        evaluate_module.check_values(distilled, "b")


# ---- reports: names are escaped, whatever they hold ------------------------------------------------------------


def gfm_cells(line: str) -> list[str]:
    """The cells of a GitHub-flavoured Markdown table row: split at unescaped pipes, backslash escapes undone."""
    cells, current, chars = [], "", iter(line.strip().strip("|") + "|")
    for ch in chars:
        if ch == "\\":
            current += next(chars)
        elif ch == "|":
            cells.append(current.strip())
            current = ""
        else:
            current += ch
    return cells


def test_hostile_names_stay_in_their_cell_of_the_report(tmp_path: Path) -> None:
    import html

    name, target = "a|b\nc\x1b[2J<img src=x>\\|$\\frac$", "imagefolder:/x|y"
    cells = [Cell(entry, "knn", "convnet", target, 1.0, [0], [acc], 1.0)
             for entry, acc in ((name, 50.0), ("plain", 40.0))]
    md = write_report(tmp_path, cells, tiny(protocol="knn"), {"torch": torch.__version__}).read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 4  # header, rule, two rows: no line of the name's own
    assert [len(gfm_cells(line)) for line in table] == [2, 2, 2, 2]
    assert gfm_cells(table[0]) == ["set", target]
    shown = [html.unescape(c) for c in gfm_cells(table[2])]
    assert shown == ["a|b\\nc\\x1b[2J<img src=x>\\|$\\frac$", "**50.0 +- 0.0**"]
    assert "\x1b" not in md and "<img" not in md
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # `$\frac$` is no mathtext
