"""The decoupled family (ssdd.methods.decoupled: SC-DD, SRe2L), DM and DM-SSL (ssdd.methods.feature_matching.dm), and
the labelled baselines of the supervised protocol (ssdd.evaluation.baselines): the BatchNorm-statistics loss, recovery,
the frozen squeeze model and its soft labels, their temperature in the evaluator, DM's loss and descent, resume, and the
errors.

One tiny BatchNorm teacher (conftest ``tiny_teacher``) and one SC-DD run of the ``scdd/tiny`` preset serve the module;
the other runs are the tiny presets made smaller still, and the unit tests use one-block networks on 5x5 or 8x8
images.  Expected values come from hand computations in float64, the teacher and the source data loaded by the test
itself, ``fit_logistic_regression`` / ``select_herding`` called here, spies that record what the code under test hands
on, or an uninterrupted run -- never from the function under test.
"""

from __future__ import annotations

import copy
import importlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import interrupt_then_resume, one_line
from torch import nn

import ssdd
from ssdd.budget import Budget
from ssdd.config import resolve_config
from ssdd.data import PixelSpace, make_synthetic
from ssdd.data.dataset import ImageDataset
from ssdd.distilled import DISTILLED_FILE, DistilledSet, load_distilled
from ssdd.errors import ArtefactError, ConfigError
from ssdd.evaluation import EvaluationConfig, evaluate
from ssdd.evaluation.baselines import LABELLED_BASELINES, make_labelled_baseline
from ssdd.methods import Distillation, DistillConfig, decoupled
from ssdd.methods.decoupled import SCDD, SQUEEZE_FILE, BatchNormStatistics, SRe2L
from ssdd.methods.feature_matching import dm as dm_module
from ssdd.methods.feature_matching.dm import dm_loss
from ssdd.probes import fit_logistic_regression
from ssdd.selection import select_herding
from ssdd.teachers import Teacher, load_teacher, teacher_features
from ssdd.teachers.artefact import load_network
from ssdd.training import batch_loss, build_student

# ``ssdd.evaluation.evaluate`` is shadowed by the function of that name on the package: import the module.
students = importlib.import_module("ssdd.evaluation.students")  # where protocols train their students

CLASSES = 10
IMAGE_VALUES = 3 * 32 * 32
LABELLED_ITEM_BYTES = IMAGE_VALUES * 4 + 8  # a float32 image and its int64 label
TEMPERATURE = 7.5  # the module's SC-DD run: not the default 30, so that reading it back means something
RECOVER_CLASSES = {"scdd": SCDD, "sre2l": SRe2L}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These networks are far too small to gain from intra-op threads, and on a loaded machine two threads
    spin-wait each other (a run here takes 20x longer): use one, and restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- helpers ----------------------------------------------------------------------------------------------------


def run_config(method: str, teacher: Path | None = None, **overrides: Any) -> DistillConfig:
    """The ``method``/tiny preset on the CPU, logging every step, then ``overrides`` (nested dicts merge)."""
    merged: dict[str, Any] = {"device": "cpu", "log_every": 1, **overrides}
    if teacher is not None:
        merged["teacher"] = str(teacher)
    return resolve_config(DistillConfig, "distill", f"{method}/tiny", overrides=merged)


def config_error(config: DistillConfig, out: Path | None = None, overwrite: bool = False) -> str:
    """Building the run must fail with a one-line ConfigError, whose message is returned."""
    with pytest.raises(ConfigError) as info:
        Distillation(config, out, progress=False, overwrite=overwrite)
    return one_line(info.value)


def metric_rows(out: Path) -> list[dict[str, Any]]:
    """The per-step rows of a run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r and "loss" in r]


def file_state(path: Path) -> tuple[int, int, bytes]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, path.read_bytes()


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def normalise(images: torch.Tensor, space: PixelSpace) -> torch.Tensor:
    """(uint8 / 255 - mean) / std per channel, written out here in float64."""
    mean = torch.tensor(space.mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(space.std, dtype=torch.float64).view(-1, 1, 1)
    return ((images.double() / 255.0 - mean) / std).float()


def softmax_by_hand(logits: torch.Tensor) -> torch.Tensor:
    """exp / sum over the last dimension, in float64 (shifted by the row maximum)."""
    e = (logits.double() - logits.double().max(1, keepdim=True).values).exp()
    return e / e.sum(1, keepdim=True)


def bn_term(x: torch.Tensor, layer: nn.BatchNorm2d) -> torch.Tensor:
    """||mean(x) - running_mean||_2 + ||var(x) - running_var||_2 per channel (biased variance), in float64."""
    x = x.double()
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = x.sum((0, 2, 3)) / count
    var = ((x - mean.view(1, -1, 1, 1)) ** 2).sum((0, 2, 3)) / count
    return (torch.linalg.vector_norm(mean - layer.running_mean.double())
            + torch.linalg.vector_norm(var - layer.running_var.double()))


def state_without_head(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in network.state_dict().items() if not k.startswith("head.")}


# ---- module fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tiny_teacher: Path) -> Teacher:
    return load_teacher(tiny_teacher)


@pytest.fixture(scope="module")
def source() -> ImageDataset:
    return make_synthetic("train")


@pytest.fixture(scope="module")
def features(teacher: Teacher, source: ImageDataset) -> torch.Tensor:
    return teacher_features(teacher, source)


@pytest.fixture(scope="module")
def scdd_run(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Distillation:
    """One finished ``scdd/tiny`` run (2 images per class, 20 iterations each) at temperature ``TEMPERATURE``; its
    method (squeeze model included) stays in memory for inspection."""
    out = tmp_path_factory.mktemp("scdd") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSDD_CACHE_DIR", str(tmp_path_factory.mktemp("scdd-cache")))
        mp.setenv("SSDD_DATA_ROOT", str(tmp_path_factory.mktemp("scdd-data")))
        distillation = Distillation(run_config("scdd", tiny_teacher, settings={"temperature": TEMPERATURE}), out,
                                    progress=False)
        distillation.run()
    return distillation


# ---- 1. the BatchNorm-statistics loss ---------------------------------------------------------------------------


def test_bn_loss_is_zero_at_the_running_statistics_and_grows_with_their_distance() -> None:
    x = randn(4, 3, 5, 5, seed=1)
    layer = nn.BatchNorm2d(3).eval()
    with torch.no_grad():  # the batch's own statistics, computed here in float64
        layer.running_mean.copy_(x.double().mean((0, 2, 3)).float())
        layer.running_var.copy_(((x.double() - x.double().mean((0, 2, 3), keepdim=True)) ** 2).mean((0, 2, 3)).float())
    network = nn.Sequential(layer)
    statistics = BatchNormStatistics(network)
    network(x)
    assert float(statistics.loss()) < 1e-6

    network(x + 0.5)  # the same variance, every mean 0.5 away: ||0.5 * 1_3||
    assert float(statistics.loss()) == pytest.approx(0.5 * 3**0.5, rel=1e-5)
    mean = x.mean((0, 2, 3), keepdim=True)
    network(mean + 2 * (x - mean))  # the same means, four times the variance: ||3 var||
    assert float(statistics.loss()) == pytest.approx(3 * float(layer.running_var.norm()), rel=1e-5)


def test_bn_loss_equals_a_hand_computation_on_two_layers() -> None:
    """sum_l w_l (||mu_l - mu_BN||_2 + ||var_l - var_BN||_2) of each layer's *input*, the first weighted
    ``first_weight``; the gradient reaches the images; ``remove`` stops the recording."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        network = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        for layer in (network[0], network[3]):
            layer.running_mean.copy_(randn(layer.num_features, seed=2))
            layer.running_var.copy_(randn(layer.num_features, seed=3).abs() + 0.5)
    statistics = BatchNormStatistics(network)
    assert statistics.layers == [network[0], network[3]]
    x = randn(3, 3, 6, 6, seed=4).requires_grad_(True)
    network(x)
    first, second = bn_term(x, network[0]), bn_term(network[:3](x), network[3])
    assert float(first.detach()) > 0 and float(second.detach()) > 0
    for weight in (1.0, 10.0):
        expected = weight * first + second
        loss = statistics.loss(first_weight=weight)
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
        (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
        (expected_grad,) = torch.autograd.grad(expected, x, retain_graph=True)
        assert float(grad.abs().max()) > 0
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert float(statistics.loss().detach()) == pytest.approx(float((first + second).detach()), rel=1e-5)  # default 1

    recorded = float(statistics.loss().detach())
    statistics.remove()
    network(x + 3.0)  # no longer seen
    assert float(statistics.loss().detach()) == recorded


def test_bn_loss_needs_batchnorm_layers_and_a_forward_pass() -> None:
    no_bn = build_student("convnet", {"widths": [2], "norm": "instance"}, 0, (3, 8, 8), 0)
    with pytest.raises(ConfigError) as info:
        BatchNormStatistics(no_bn)
    assert "BatchNorm" in one_line(info.value)
    with pytest.raises(ConfigError) as info:
        BatchNormStatistics(nn.Sequential(nn.BatchNorm2d(3))).loss()
    assert "no forward pass" in one_line(info.value)


# ---- 2. recovery lowers its own objective -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["scdd", "sre2l"])
def test_recovery_lowers_its_objective_and_keeps_pixels_valid(tiny_teacher: Path, tmp_path: Path, method: str) -> None:
    iterations, window = 60, 10
    distilled = Distillation(run_config(method, tiny_teacher, settings={"iterations": iterations}), tmp_path,
                             progress=False).run()
    rows = metric_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 2 * iterations + 1))  # 20 images: 2 per class
    for index in range(2):
        losses = [r["loss"] for r in rows if r["index"] == index]
        assert len(losses) == iterations
        first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
        assert last < 0.5 * first, (index, first, last)
    # the logged loss is the recovery objective: ce + r_bn * bn
    r_bn = distilled.metadata["config"]["settings"]["r_bn"]
    assert all(r["loss"] == pytest.approx(r["ce"] + r_bn * r["bn"], rel=1e-5) for r in rows)

    low, high = (b.view(1, -1, 1, 1) for b in distilled.pixel_space.bounds())
    images = distilled.tensors["images"]
    assert images.shape == (20, 3, 32, 32)
    assert bool(((images >= low) & (images <= high)).all())
    # the clipping acts: after one Adam step (each pixel moves by at most about lr = 0.25-0.4) the N(0, 1) start
    # noise beyond +-3 cannot have come back inside bounds of about +-2, so both bounds are hit exactly
    one = Distillation(run_config(method, tiny_teacher, settings={"iterations": 1}), None, progress=False).run()
    first = one.tensors["images"]
    assert float(high.max()) < 2.5 and float(low.min()) > -2.5
    assert bool(((first >= low) & (first <= high)).all())
    assert bool((first == low).any() and (first == high).any())


# ---- 3. the SC-DD squeeze model: the frozen teacher plus a logistic-regression head --------------------------


def test_scdd_squeeze_model_is_the_frozen_teacher_before_and_after_recovery(scdd_run: Distillation,
                                                                            teacher: Teacher) -> None:
    expected = teacher.backbone.state_dict()
    assert {"body.1.running_mean", "body.5.running_var", "body.5.num_batches_tracked"} <= set(expected)
    saved, _, meta, _ = load_network(scdd_run.run_dir.path / SQUEEZE_FILE, "squeeze", SQUEEZE_FILE)
    assert meta["method"] == "scdd" and meta["kind"] == "squeeze"
    after_run = scdd_run.method.model  # the network the whole recovery and relabelling ran through
    for network in (saved, after_run):
        state = state_without_head(network)
        assert set(state) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(state[name].cpu(), tensor), name
        assert set(network.state_dict()) - set(state) == {"head.weight", "head.bias"}


def test_scdd_squeeze_head_reproduces_the_logistic_regression(scdd_run: Distillation, features: torch.Tensor,
                                                              source: ImageDataset) -> None:
    settings = scdd_run.method.settings.squeeze
    mean, std = features.mean(0), features.std(0, unbiased=False).clamp_min(1e-6)
    standardised = (features - mean) / std
    weight, bias = fit_logistic_regression(standardised, source.labels, CLASSES, settings.l2, settings.lbfgs_iterations)
    expected = standardised.double() @ weight + bias
    saved, *_ = load_network(scdd_run.run_dir.path / SQUEEZE_FILE, "squeeze", SQUEEZE_FILE)
    with torch.no_grad():
        logits = saved.head(features)
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)
    assert (expected.argmax(1) == source.labels).float().mean() > 0.5  # a head that learned something


# ---- 4. soft labels -----------------------------------------------------------------------------------------


def test_soft_labels_are_the_squeeze_logits_of_the_stored_images(scdd_run: Distillation) -> None:
    run = scdd_run.run_dir.path
    distilled = load_distilled(run / DISTILLED_FILE)
    squeeze, *_ = load_network(run / SQUEEZE_FILE, "squeeze", SQUEEZE_FILE)
    assert distilled.target_kind == "soft-label" and distilled.method == "scdd"
    images, labels = distilled.tensors["images"], distilled.tensors["labels"]
    assert images.shape == (20, 3, 32, 32) and labels.shape == (20, CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(labels, squeeze.eval()(images), rtol=1e-5, atol=1e-5)
    assert distilled.metadata["temperature"] == TEMPERATURE
    assert distilled.metadata["num_classes"] == CLASSES and distilled.metadata["ipc"] == 2
    # index-major: the recovered image k of index i is meant for class k, which its logits should favour
    assert (labels.argmax(1) == torch.arange(CLASSES).repeat(2)).float().mean() >= 0.8
    torch.testing.assert_close(torch.softmax(labels / TEMPERATURE, 1).double(), softmax_by_hand(labels / TEMPERATURE),
                               rtol=1e-5, atol=1e-7)


def test_kl_batch_loss_equals_the_hand_formula(scdd_run: Distillation) -> None:
    """T^2 * sum_i sum_k p_ik log(p_ik / q_ik) / N with p = softmax(labels / T), q = softmax(out / T)."""
    labels = load_distilled(scdd_run.run_dir.path / DISTILLED_FILE).tensors["labels"]
    out = randn(*labels.shape, seed=6) * 3
    for temperature in (1.0, TEMPERATURE):
        p, q = softmax_by_hand(labels / temperature), softmax_by_hand(out / temperature)
        expected = temperature**2 * float((p * (p / q).log()).sum()) / labels.shape[0]
        assert float(batch_loss(out, labels, "kl", temperature)) == pytest.approx(expected, rel=1e-4)
    assert float(batch_loss(labels, labels, "kl", TEMPERATURE)) == pytest.approx(0.0, abs=1e-5)


# ---- 5. the supervised evaluator and the set's temperature --------------------------------------------------


def capture_training(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the evaluator's training by a spy that records what it is given and trains nothing."""
    seen: list[dict[str, Any]] = []

    def fake(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, settings: Any, loss: str, *args: Any,
             **kwargs: Any) -> nn.Module:
        seen.append({"images": images, "targets": targets, "loss": loss, "temperature": kwargs["temperature"],
                     "settings": settings, "labeller": kwargs.get("labeller")})
        return model.eval()

    monkeypatch.setattr(students, "train_network", fake)
    return seen


def tiny_evaluation(**overrides: Any) -> EvaluationConfig:
    return resolve_config(EvaluationConfig, "evaluate", "tiny",
                          overrides={"device": "cpu", "protocol": "supervised", "seeds": [0], "temperature": 3.0,
                                     **overrides})


def test_supervised_evaluation_trains_at_the_sets_temperature(monkeypatch: pytest.MonkeyPatch,
                                                              scdd_run: Distillation) -> None:
    seen = capture_training(monkeypatch)
    distilled = load_distilled(scdd_run.run_dir.path / DISTILLED_FILE)
    unlabelled_temperature = DistilledSet(dict(distilled.tensors), distilled.pixel_space, "soft-label", "plain")
    evaluate([distilled, unlabelled_temperature], tiny_evaluation(relabel={"mode": "stored"}), progress=False)
    assert [(s["loss"], s["temperature"]) for s in seen] == [("kl", TEMPERATURE), ("kl", 3.0)]
    assert torch.equal(seen[0]["targets"], distilled.tensors["labels"])
    assert [s["labeller"] for s in seen] == [None, None]
    seen.clear()
    evaluate([distilled], tiny_evaluation(use_set_temperature=False, relabel={"mode": "stored"}), progress=False)
    assert [(s["loss"], s["temperature"]) for s in seen] == [("kl", 3.0)]


def test_on_the_fly_relabelling_labels_each_batch_with_the_squeeze_model_in_train_mode(
        monkeypatch: pytest.MonkeyPatch, scdd_run: Distillation) -> None:
    seen = capture_training(monkeypatch)
    distilled = load_distilled(scdd_run.run_dir.path / DISTILLED_FILE)
    assert distilled.metadata["squeeze_model"]["file"] == "squeeze.safetensors"
    in_memory = DistilledSet(dict(distilled.tensors), distilled.pixel_space, "soft-label", "plain")  # names none
    evaluate([distilled, in_memory], tiny_evaluation(), progress=False)  # on-the-fly is the default
    assert [(s["loss"], s["temperature"]) for s in seen] == [("kl", TEMPERATURE), ("kl", 3.0)]
    first, second = seen
    assert second["labeller"] is None and second["settings"].optimizer == "sgd"  # stored labels: nothing else
    released = first["settings"]
    assert (released.optimizer, released.lr, released.weight_decay, released.decay_1d, released.mixup,
            released.augment, released.kl_t_squared) == ("adamw", 1e-3, 0.01, True, 0.8, "crop-flip", False)
    # the labeller is the squeeze model in train mode: BatchNorm normalises with the batch's own statistics
    squeeze = copy.deepcopy(scdd_run.method.model).train()
    x = distilled.tensors["images"][:6].float()
    torch.testing.assert_close(first["labeller"](x), squeeze(x).detach().float())
    assert not torch.allclose(first["labeller"](x), scdd_run.method.model.eval()(x).float())


def test_relabel_settings_and_a_malformed_squeeze_model_entry_are_refused_clearly(scdd_run: Distillation,
                                                                                 tmp_path: Path) -> None:
    from ssdd.evaluation.relabel import RelabelSettings

    with pytest.raises(ConfigError) as info:
        RelabelSettings(mode="sometimes")
    assert one_line(info.value) == "relabel.mode must be one of on-the-fly, stored, got 'sometimes'"
    distilled = load_distilled(scdd_run.run_dir.path / DISTILLED_FILE)
    distilled.metadata["squeeze_model"] = {"file": "../elsewhere/squeeze.safetensors"}
    with pytest.raises(ArtefactError) as info:
        evaluate([distilled], tiny_evaluation(), progress=False)
    assert one_line(info.value) == "set 'scdd': metadata 'squeeze_model' must name a file beside the set"
    in_memory = load_distilled(scdd_run.run_dir.path / DISTILLED_FILE)
    in_memory.path = None
    with pytest.raises(ConfigError, match="but it was given in memory; evaluate it from its file"):
        evaluate([in_memory], tiny_evaluation(), progress=False)


def test_on_the_fly_relabelling_refuses_a_set_whose_squeeze_model_is_missing_or_another(
        scdd_run: Distillation, tmp_path: Path) -> None:
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(scdd_run.run_dir.path / DISTILLED_FILE, alone / DISTILLED_FILE)
    with pytest.raises(ConfigError) as info:
        evaluate([alone / DISTILLED_FILE], tiny_evaluation(), progress=False)
    assert one_line(info.value) == (f"set 'scdd' relabels with its squeeze model {alone / 'squeeze.safetensors'}, "
                                    "which does not exist; copy the run folder whole, or evaluate with "
                                    "relabel.mode: stored")
    other = load_distilled(alone / DISTILLED_FILE)
    other.metadata["squeeze_model"] = {**other.metadata["squeeze_model"], "fingerprint": "0" * 16}
    shutil.copy(scdd_run.run_dir.path / "squeeze.safetensors", alone / "squeeze.safetensors")
    other.path = alone / DISTILLED_FILE
    with pytest.raises(ArtefactError, match="is not the squeeze model set 'scdd' was made with"):
        evaluate([other], tiny_evaluation(), progress=False)


def test_supervised_evaluation_trains_herding_as_a_hard_label_set(monkeypatch: pytest.MonkeyPatch, teacher: Teacher,
                                                                  source: ImageDataset, features: torch.Tensor) -> None:
    seen = capture_training(monkeypatch)
    evaluate([], tiny_evaluation(), baselines=["herding"], teacher=teacher, budget_images=20, progress=False)
    expected = make_labelled_baseline("herding", source, teacher, features, 20 * LABELLED_ITEM_BYTES, 0)
    assert len(seen) == 1 and seen[0]["loss"] == "ce"
    assert torch.equal(seen[0]["targets"], expected.tensors["labels"])
    assert torch.equal(seen[0]["images"], expected.tensors["images"])


# ---- 6. DM ----------------------------------------------------------------------------------------------------


def test_dm_loss_by_hand_and_its_gradient() -> None:
    network = build_student("convnet", {"widths": [2], "norm": "instance"}, 0, (3, 8, 8), 0)
    real = [randn(5, 3, 8, 8, seed=1).requires_grad_(True), randn(4, 3, 8, 8, seed=2).requires_grad_(True)]
    syn = [randn(2, 3, 8, 8, seed=3).requires_grad_(True), randn(3, 3, 8, 8, seed=4).requires_grad_(True)]
    loss = dm_loss(network, real, syn)
    expected = sum(((network.features(r).double().mean(0) - network.features(s).double().mean(0)) ** 2).sum()
                   for r, s in zip(real, syn))
    assert float(expected.detach()) > 0
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    grads = torch.autograd.grad(loss, [*syn, *real], allow_unused=True)
    assert grads[2] is None and grads[3] is None  # the real images are targets only
    expected_grads = torch.autograd.grad(expected, syn)
    for grad, expected_grad in zip(grads[:2], expected_grads):
        assert float(grad.abs().max()) > 0
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_dm_lowers_its_objective_on_a_fixed_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    source: ImageDataset) -> None:
    """Every iteration draws the same network (DSA off), so the run descends one objective, which the test
    evaluates itself with whole classes as the real batches, on the initial (recorded) and the final images."""
    fixed = build_student("convnet3", {"width": 8}, 0, (3, 32, 32), seed=123)
    monkeypatch.setattr(dm_module, "build_student", lambda arch, arch_args, outputs, shape, seed: fixed)
    distilled = ssdd.distill("dm", "synthetic", budget=20, preset="tiny", config={"dsa": False, "iterations": 15},
                             out=tmp_path / "run", device="cpu", progress=False)
    rows = torch.tensor(distilled.metadata["initial_indices"])
    real = normalise(source.images, distilled.pixel_space)
    per_class = [real[source.labels == c] for c in range(CLASSES)]

    def objective(images: torch.Tensor) -> float:
        with torch.no_grad():
            return float(dm_loss(fixed, per_class, list(images.split(2))))

    before, after = objective(real[rows]), objective(distilled.tensors["images"])
    assert after < 0.5 * before, (before, after)
    assert torch.equal(distilled.tensors["labels"], source.labels[rows])  # fixed hard labels


def test_dm_set_is_class_balanced_with_the_true_labels_of_its_initial_images(source: ImageDataset) -> None:
    method = Distillation(run_config("dm", images=25), None, progress=False).method
    distilled = method.distilled_set()
    rows = torch.tensor(distilled.metadata["initial_indices"])
    assert len(set(rows.tolist())) == 20  # 25 images buy 2 per class
    assert torch.equal(source.labels[rows], torch.arange(CLASSES).repeat_interleave(2))
    assert distilled.target_kind == "hard-label" and torch.equal(distilled.tensors["labels"], source.labels[rows])
    torch.testing.assert_close(distilled.tensors["images"], normalise(source.images[rows], distilled.pixel_space),
                               rtol=0, atol=1e-6)


def test_dm_ssl_step_loss_by_hand(monkeypatch: pytest.MonkeyPatch, tiny_teacher: Path, source: ImageDataset) -> None:
    """One iteration's loss is ||mean f(real batch) - mean f(every synthetic image)||^2 (no classes), with the real
    batch drawn from the whole source; the test replays the run's generator (seed + 2: a network seed, then the
    rows) and computes the loss itself in float64."""
    fixed = build_student("convnet3", {"width": 8}, 0, (3, 32, 32), seed=123)
    monkeypatch.setattr(dm_module, "build_student", lambda arch, arch_args, outputs, shape, seed: fixed)
    method = Distillation(run_config("dm-ssl", tiny_teacher, settings={"dsa": False, "real_batch": 24}), None,
                         progress=False).method
    space = method.pixel_space
    real = normalise(source.images, space)
    initial = real[torch.tensor(method.distilled_set().metadata["initial_indices"])]
    generator = torch.Generator().manual_seed(0 + 2)
    torch.randint(0, 2**31 - 1, (1,), generator=generator)  # the network's seed
    rows = torch.randint(0, len(source), (24,), generator=generator)
    with torch.no_grad():
        expected = ((fixed.features(real[rows]).double().mean(0) - fixed.features(initial).double().mean(0)) ** 2).sum()
    assert float(expected) > 0
    assert method.step(0)["loss"] == pytest.approx(float(expected), rel=1e-4)


def test_dm_ssl_lowers_its_objective_and_stores_the_teachers_view_of_its_images(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_teacher: Path, source: ImageDataset) -> None:
    """With one fixed network (DSA off) the run descends ||mean f(source) - mean f(set)||^2, evaluated here on the
    whole source; the stored targets are the teacher's features of the stored images, not of the initial ones."""
    fixed = build_student("convnet3", {"width": 8}, 0, (3, 32, 32), seed=123)
    monkeypatch.setattr(dm_module, "build_student", lambda arch, arch_args, outputs, shape, seed: fixed)
    distilled = ssdd.distill("dm-ssl", "synthetic", teacher=tiny_teacher, budget=20, preset="tiny",
                             config={"dsa": False, "iterations": 30, "real_batch": 160}, out=tmp_path / "run",
                             device="cpu", progress=False)
    real = normalise(source.images, distilled.pixel_space)
    rows = torch.tensor(distilled.metadata["initial_indices"])
    assert len(set(rows.tolist())) == 20 and distilled.target_kind == "representation"

    def objective(images: torch.Tensor) -> float:
        with torch.no_grad():
            return float(dm_loss(fixed, [real], [images]))

    images = distilled.tensors["images"]
    before, after = objective(real[rows]), objective(images)
    assert after < 0.5 * before, (before, after)
    assert not torch.allclose(images, real[rows])
    teacher = load_teacher(tiny_teacher)
    with torch.no_grad():
        torch.testing.assert_close(distilled.tensors["targets"], teacher(images), rtol=1e-4, atol=1e-5)
    assert distilled.byte_count == 20 * (IMAGE_VALUES + teacher.feature_dim) * 4


def test_dm_ssl_needs_a_teacher() -> None:
    message = config_error(run_config("dm-ssl", dataset="synthetic"))
    assert message == "method dm-ssl needs a teacher (--teacher PATH)"


# ---- 7. labelled baselines ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LABELLED_BASELINES)
def test_labelled_baselines_are_class_balanced_real_images_with_hard_labels(
        name: str, teacher: Teacher, source: ImageDataset, features: torch.Tensor) -> None:
    budget = 3 * CLASSES * LABELLED_ITEM_BYTES - 1  # one byte short of 3 per class: 2 per class
    distilled = make_labelled_baseline(name, source, teacher, features, budget, seed=1)
    idx = torch.tensor(distilled.metadata["selected_indices"])
    assert distilled.target_kind == "hard-label" and distilled.metadata["ipc"] == 2
    assert distilled.byte_count == 2 * CLASSES * LABELLED_ITEM_BYTES <= budget
    assert torch.equal(distilled.tensors["labels"], source.labels[idx])
    assert torch.equal(source.labels[idx], torch.arange(CLASSES).repeat_interleave(2))
    assert len(set(idx.tolist())) == idx.numel()
    torch.testing.assert_close(distilled.tensors["images"], normalise(source.images[idx], teacher.pixel_space),
                               rtol=0, atol=1e-6)
    if name == "herding":
        expected = []
        for k in range(CLASSES):
            members = (source.labels == k).nonzero().flatten()
            expected.append(members[select_herding(features[members], 2)])
        assert torch.equal(idx, torch.cat(expected))
    else:  # seeded: the same seed the same images, another seed others
        again = make_labelled_baseline(name, source, teacher, features, budget, seed=1)
        other = make_labelled_baseline(name, source, teacher, features, budget, seed=2)
        assert again.metadata["selected_indices"] == idx.tolist() != other.metadata["selected_indices"]


def test_labelled_baseline_errors(teacher: Teacher, source: ImageDataset, features: torch.Tensor) -> None:
    with pytest.raises(ConfigError) as info:
        make_labelled_baseline("kcenter", source, teacher, features, 10 * LABELLED_ITEM_BYTES, 0)
    message = one_line(info.value)
    assert "'kcenter'" in message and "random, herding" in message
    with pytest.raises(ConfigError) as info:
        make_labelled_baseline("random", source, teacher, features, CLASSES * LABELLED_ITEM_BYTES - 1, 0)
    message = one_line(info.value)
    assert f"{CLASSES * LABELLED_ITEM_BYTES - 1} bytes" in message and "fewer than one image per class" in message
    smallest = make_labelled_baseline("random", source, teacher, features, CLASSES * LABELLED_ITEM_BYTES, 0)
    assert smallest.metadata["ipc"] == 1


def test_supervised_protocol_refuses_none_and_names_its_labelled_baselines(teacher: Teacher) -> None:
    with pytest.raises(ConfigError) as info:
        evaluate([], tiny_evaluation(), baselines=["none"], teacher=teacher, progress=False)
    message = one_line(info.value)
    assert "supervised" in message and "none" in message and "labelled baselines are random, herding" in message


# ---- 8. resume ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sre2l", "scdd"])
def test_interrupted_recovery_resumes_bit_identically_without_a_new_squeeze(
        tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """6 iterations per index, 2 indices: checkpointed after step 8 (index 1, iteration 2), interrupted at step 11."""
    config = run_config(method, tiny_teacher, checkpoint_minutes=0, settings={"iterations": 6})
    full = Distillation(config, tmp_path / "a", progress=False).run()

    saved: list[tuple[int, int, bytes]] = []
    original_save = decoupled.save_network

    def spy(path: Path, *args: Any) -> dict[str, Any]:
        meta = original_save(path, *args)
        saved.append(file_state(path))
        return meta

    monkeypatch.setattr(decoupled, "save_network", spy)
    resumed = interrupt_then_resume(monkeypatch, RECOVER_CLASSES[method], config, tmp_path / "b", checkpoint_until=8,
                                    stop_at=10)
    assert len(saved) == 1  # squeezed once, by the interrupted run
    assert file_state(tmp_path / "b" / SQUEEZE_FILE) == saved[0]  # and the file left as it was
    assert set(resumed.tensors) == set(full.tensors) == {"images", "labels"}
    for name, tensor in full.tensors.items():
        assert torch.equal(resumed.tensors[name], tensor), name
    losses = [(r["step"], r["loss"]) for r in metric_rows(tmp_path / "b")]
    assert [s for s, _ in losses] == list(range(1, 13))
    assert losses == [(r["step"], r["loss"]) for r in metric_rows(tmp_path / "a")]


# ---- 9. errors and budgets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["scdd", "sre2l", "dm"])
def test_a_budget_below_the_number_of_classes_is_refused(tiny_teacher: Path, method: str) -> None:
    message = config_error(run_config(method, None if method == "dm" else tiny_teacher, images=CLASSES - 1))
    assert f"{method} keeps the classes balanced" in message
    assert f"buys {CLASSES - 1} images" in message and f"fewer than the {CLASSES} classes" in message


def test_the_soft_labels_count_in_the_byte_budget(tiny_teacher: Path) -> None:
    """30 images' worth of float32 pixels buys 29 images with their 10 logits: 2 per class, not 3."""
    budget = Budget(bytes=30 * IMAGE_VALUES * 4)
    distilled = ssdd.distill("scdd", "synthetic", teacher=tiny_teacher, budget=budget, preset="tiny",
                             config={"iterations": 1}, device="cpu", progress=False)
    assert distilled.tensors["images"].shape[0] == 20 and distilled.metadata["ipc"] == 2
    assert distilled.byte_count == 20 * (IMAGE_VALUES + CLASSES) * 4 <= budget.bytes


def test_sre2l_without_a_teacher_needs_a_squeeze_arch_with_batchnorm(source: ImageDataset) -> None:
    message = config_error(run_config("sre2l", dataset="synthetic"))
    assert "sre2l" in message and "settings.squeeze.arch" in message and "teacher" in message

    bn_arch = {"arch": "convnet", "arch_args": {"widths": [4], "norm": "batch"}}
    method = Distillation(run_config("sre2l", dataset="synthetic", settings={"squeeze": bn_arch}), None,
                          progress=False).method
    assert method.pixel_space == PixelSpace.of(source.images) and method.ipc == 2

    instance_arch = {"arch": "convnet", "arch_args": {"widths": [4], "norm": "instance"}}
    message = config_error(run_config("sre2l", dataset="synthetic", settings={"squeeze": instance_arch}))
    assert "BatchNorm" in message


def test_scdd_needs_a_teacher() -> None:
    message = config_error(run_config("scdd", dataset="synthetic"))
    assert "scdd needs a teacher" in message and "--teacher" in message


@pytest.mark.parametrize(("maker", "user"), [("sre2l", "scdd"), ("scdd", "sre2l")])
def test_a_squeeze_model_of_the_other_method_is_refused(tiny_teacher: Path, tmp_path: Path, maker: str,
                                                        user: str) -> None:
    Distillation(run_config(maker, tiny_teacher), tmp_path, progress=False)  # writes the squeeze model only
    before = file_state(tmp_path / SQUEEZE_FILE)
    message = config_error(run_config(user, tiny_teacher), tmp_path, overwrite=True)  # a new run, the model kept
    assert SQUEEZE_FILE in message and "made with another method" in message and "new run folder" in message
    assert file_state(tmp_path / SQUEEZE_FILE) == before


def test_a_squeeze_model_made_with_other_squeeze_settings_is_refused(tiny_teacher: Path, tmp_path: Path) -> None:
    Distillation(run_config("scdd", tiny_teacher), tmp_path, progress=False)  # writes the squeeze model only
    before = file_state(tmp_path / SQUEEZE_FILE)
    message = config_error(run_config("scdd", tiny_teacher, settings={"squeeze": {"l2": 0.5}}), tmp_path,
                           overwrite=True)
    assert "made with another squeeze_settings than this run's" in message and "new run folder" in message
    assert file_state(tmp_path / SQUEEZE_FILE) == before
