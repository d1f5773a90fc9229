"""Teachers: SSL losses (against loop/numpy references and hand-worked cases), projector, LARS and the LR
schedule, the probes, teacher training (loss goes down, seed-determinism, bitwise resume), the teacher artefact
and the teacher-feature cache.

Every number a test asserts comes from a reference written out here (explicit loops, numpy, or a value worked
on paper), never from the ssdd function under test.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

from ssdd.config import resolve_config
from ssdd.data import make_synthetic
from ssdd.data.dataset import ImageDataset
from ssdd.errors import ArtefactError, ConfigError
from ssdd.io import load_tensors, save_tensors
from ssdd.models import create_model
from ssdd.optim import LARS, warmup_cosine
from ssdd.probes import fit_logistic_regression, knn_accuracy, label_fraction, linear_probe_accuracy
from ssdd.teachers import (
    BarlowTwinsLoss,
    NTXentLoss,
    Teacher,
    TeacherConfig,
    load_teacher,
    make_projector,
    teacher_features,
    train_teacher,
)
from ssdd.teachers import train as train_module
from ssdd.teachers.features import _views_key
from ssdd.teachers.losses import gather_batch

# ---- references written independently of ssdd -------------------------------------------------------------


def barlow_reference(z1: np.ndarray, z2: np.ndarray, lam: float, eps: float) -> float:
    """Barlow Twins with explicit loops: standardise columns (biased variance + eps), C = z1n^T z2n / N."""
    n, d = z1.shape

    def standardise(z: np.ndarray) -> np.ndarray:
        out = np.empty_like(z, dtype=np.float64)
        for j in range(d):
            col = [float(v) for v in z[:, j]]
            mean = sum(col) / n
            var = sum((v - mean) ** 2 for v in col) / n
            for i in range(n):
                out[i, j] = (col[i] - mean) / math.sqrt(var + eps)
        return out

    a, b = standardise(z1), standardise(z2)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k, i] * b[k, j] for k in range(n)) / n
            total += (1.0 - c) ** 2 if i == j else lam * c**2
    return total


def ntxent_reference(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    """NT-Xent with explicit loops over the 2N anchors (the other view of the same image is the positive)."""
    n = z1.shape[0]
    z = np.concatenate([z1, z2]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    m = 2 * n
    losses = []
    for i in range(m):
        pos = (i + n) % m
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(m) if k != i)
        losses.append(-math.log(math.exp(float(z[i] @ z[pos]) / t) / denom))
    return sum(losses) / m


def seeded(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- Barlow Twins -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 5e-3, 0.3])
def test_barlow_twins_matches_loop_reference(lam: float) -> None:
    z1, z2 = seeded(8, 5, seed=1), seeded(8, 5, seed=2)
    z2 = z2 + 0.7 * z1  # correlated views, so the on-diagonal term is not trivial
    expected = barlow_reference(z1.numpy(), z2.numpy(), lam, 1e-5)
    got = BarlowTwinsLoss(lambda_offdiag=lam)(z1, z2).item()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_barlow_twins_hand_worked_case_eps_zero() -> None:
    # Columns standardise to +-1 exactly:
    #   z1n = [[1, 1], [-1, -1]], z2n = [[-1, 1], [1, -1]]
    #   C = z1n^T z2n / 2 = [[-1, 1], [-1, 1]]
    #   on-diagonal: (1 - (-1))^2 + (1 - 1)^2 = 4; off-diagonal: 1^2 + (-1)^2 = 2; lambda 0.5 -> 4 + 1 = 5
    z1 = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    z2 = torch.tensor([[0.0, 5.0], [2.0, 3.0]])
    assert BarlowTwinsLoss(lambda_offdiag=0.5, eps=0.0)(z1, z2).item() == pytest.approx(5.0, abs=1e-6)


def test_barlow_twins_hand_worked_case_with_eps() -> None:
    # Same batch with the default eps: every entry of C is scaled by s = 1 / (1 + eps) (variance 1 + eps).
    eps = 1e-5
    s = 1.0 / (1.0 + eps)
    lam = 0.5
    expected = (1 + s) ** 2 + (1 - s) ** 2 + lam * 2 * s**2
    z1 = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    z2 = torch.tensor([[0.0, 5.0], [2.0, 3.0]])
    assert BarlowTwinsLoss(lambda_offdiag=lam, eps=eps)(z1, z2).item() == pytest.approx(expected, rel=1e-6)


def test_barlow_twins_perfectly_correlated_views_have_zero_loss() -> None:
    # z2 an affine map (positive scale) of z1, columns uncorrelated by construction -> C = I (up to eps) -> ~0.
    z1 = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # columns: mean 0, var 1, uncorrelated
    z2 = 3.0 * z1 + 2.0
    assert BarlowTwinsLoss(lambda_offdiag=1.0, eps=0.0)(z1, z2).item() == pytest.approx(0.0, abs=1e-6)


def test_barlow_twins_invariant_to_permuting_the_batch() -> None:
    z1, z2 = seeded(10, 4, seed=3), seeded(10, 4, seed=4)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    loss = BarlowTwinsLoss(0.1)
    assert loss(z1[perm], z2[perm]).item() == pytest.approx(loss(z1, z2).item(), rel=1e-6)
    # A different permutation for each view breaks the pairing and changes the loss.
    other = torch.roll(perm, 1)
    assert loss(z1[perm], z2[other]).item() != pytest.approx(loss(z1, z2).item(), rel=1e-3)


def test_barlow_twins_lambda_scales_only_the_off_diagonal_term() -> None:
    z1, z2 = seeded(9, 4, seed=6), seeded(9, 4, seed=7)
    on_diag = BarlowTwinsLoss(lambda_offdiag=0.0)(z1, z2).item()
    off_unit = BarlowTwinsLoss(lambda_offdiag=1.0)(z1, z2).item() - on_diag
    # The lambda = 0 loss is the on-diagonal sum of the reference; the slope in lambda is the off-diagonal sum.
    assert on_diag == pytest.approx(barlow_reference(z1.numpy(), z2.numpy(), 0.0, 1e-5), rel=1e-5)
    assert off_unit > 0
    for lam in (0.01, 2.5):
        assert BarlowTwinsLoss(lambda_offdiag=lam)(z1, z2).item() == pytest.approx(on_diag + lam * off_unit, rel=1e-5)


# ---- NT-Xent ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_ntxent_matches_loop_reference(t: float) -> None:
    z1, z2 = seeded(6, 4, seed=10), seeded(6, 4, seed=11)
    expected = ntxent_reference(z1.numpy(), z2.numpy(), t)
    assert NTXentLoss(temperature=t)(z1, z2).item() == pytest.approx(expected, rel=1e-5)


def test_ntxent_hand_worked_cases() -> None:
    eye = torch.eye(2)
    # Aligned: each anchor has its positive at cosine 1 and two negatives at cosine 0 -> log(1 + 2 e^{-1/t}).
    assert NTXentLoss(1.0)(eye, eye).item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)
    assert NTXentLoss(0.5)(eye, eye).item() == pytest.approx(math.log(1 + 2 * math.exp(-2.0)), rel=1e-6)
    # Swapped: the positive is orthogonal (cos 0), one negative identical (cos 1), one orthogonal
    # -> -log(e^0 / (e^0 + e^0 + e^1)) = log(2 + e) for every anchor.
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert NTXentLoss(1.0)(eye, swapped).item() == pytest.approx(math.log(2 + math.e), rel=1e-6)
    # Rows are L2-normalised first: positive rescaling changes nothing.
    assert NTXentLoss(1.0)(5 * eye, 0.1 * swapped).item() == pytest.approx(math.log(2 + math.e), rel=1e-6)


def test_ntxent_invariant_to_permuting_the_batch() -> None:
    z1, z2 = seeded(7, 3, seed=12), seeded(7, 3, seed=13)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(14))
    loss = NTXentLoss(0.3)
    assert loss(z1[perm], z2[perm]).item() == pytest.approx(loss(z1, z2).item(), rel=1e-6)


def test_ntxent_aligned_separated_pairs_beat_random_pairs() -> None:
    n, t = 8, 0.2
    aligned = 3.0 * torch.eye(n)
    aligned_loss = NTXentLoss(t)(aligned, aligned).item()
    random_loss = NTXentLoss(t)(seeded(n, n, seed=15), seeded(n, n, seed=16)).item()
    # positive at cos 1, 2N - 2 negatives at cos 0
    assert aligned_loss == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / t)), rel=1e-5)
    assert aligned_loss < 0.2 < 1.0 < random_loss


# ---- gradients ----------------------------------------------------------------------------------------------


def test_losses_keep_float64_inputs_in_float64() -> None:
    z1, z2 = seeded(4, 3, seed=20, dtype=torch.float64), seeded(4, 3, seed=21, dtype=torch.float64)
    assert BarlowTwinsLoss(0.1)(z1, z2).dtype == torch.float64
    assert NTXentLoss(0.5)(z1, z2).dtype == torch.float64


@pytest.mark.parametrize("loss", [BarlowTwinsLoss(lambda_offdiag=0.3), NTXentLoss(temperature=0.5)],
                         ids=["barlow-twins", "ntxent"])
def test_losses_pass_finite_difference_gradcheck(loss: nn.Module) -> None:
    z1 = seeded(5, 3, seed=22, dtype=torch.float64).requires_grad_()
    z2 = seeded(5, 3, seed=23, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(loss, (z1, z2), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gather_batch_without_process_group_is_identity() -> None:
    z = seeded(3, 2)
    assert gather_batch(z) is z


# ---- projector ----------------------------------------------------------------------------------------------


def test_make_projector_layer_structure_and_output_dim() -> None:
    proj = make_projector(16, [32, 24, 8])
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 24), (24, 8)]
    assert [m.bias is not None for m in linears] == [True, True, False]
    assert [m.num_features for m in proj if isinstance(m, nn.BatchNorm1d)] == [32, 24]
    assert proj(seeded(4, 16)).shape == (4, 8)


def test_make_projector_single_layer_is_one_bias_free_linear() -> None:
    proj = make_projector(10, [6])
    assert len(proj) == 1 and isinstance(proj[0], nn.Linear)
    assert proj[0].bias is None and (proj[0].in_features, proj[0].out_features) == (10, 6)


# ---- LARS and the schedule ----------------------------------------------------------------------------------


def test_lars_on_1d_parameter_is_sgd_with_momentum() -> None:
    # Hand computation, lr 0.1, momentum 0.9 (weight decay must not touch a 1-D parameter):
    #   step 1: buf = g1 = [0.5, -1.0];         p = [1, -2] - 0.1 * buf = [0.95, -1.90]
    #   step 2: buf = 0.9 * g1 + g2 = [0.7, 1.1]; p = [0.95, -1.9] - 0.1 * buf = [0.88, -2.01]
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = LARS([p], lr=0.1, momentum=0.9, weight_decay=0.5)
    for grad, expected in (([0.5, -1.0], [0.95, -1.90]), ([0.25, 2.0], [0.88, -2.01])):
        p.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
        assert p.detach().tolist() == pytest.approx(expected, abs=1e-12)
    # ... and agrees with torch's SGD on a longer sequence.
    q = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    r = nn.Parameter(q.detach().clone())
    lars, sgd = LARS([q], lr=0.05, momentum=0.8), torch.optim.SGD([r], lr=0.05, momentum=0.8)
    for i in range(5):
        g = seeded(2, seed=30 + i, dtype=torch.float64)
        q.grad, r.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    assert torch.allclose(q, r, atol=1e-12)


def test_lars_trust_ratio_on_a_matrix() -> None:
    # ||p|| = 5, ||g|| = 1, no weight decay: trust = 0.001 * 5 / 1 = 0.005; p <- p - lr * trust * g.
    p = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    opt = LARS([p], lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=0.0)
    p.grad = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    opt.step()
    assert p.detach().flatten().tolist() == pytest.approx([3.0 - 0.003, 4.0 - 0.004], abs=1e-12)


def test_warmup_cosine_values() -> None:
    total, warm, final = 100, 10, 0.1
    assert warmup_cosine(0, total, warm, final) == pytest.approx(0.1)  # (0 + 1) / 10
    assert warmup_cosine(4, total, warm, final) == pytest.approx(0.5)
    assert warmup_cosine(9, total, warm, final) == pytest.approx(1.0)  # last warm-up step
    assert warmup_cosine(10, total, warm, final) == pytest.approx(1.0)  # cosine starts at its peak
    assert warmup_cosine(55, total, warm, final) == pytest.approx(0.55)  # halfway: final + (1 - final) / 2
    # a third of the way (step 40): final + (1 - final) * (1 + cos(pi / 3)) / 2 = 0.1 + 0.9 * 0.75
    assert warmup_cosine(40, total, warm, final) == pytest.approx(0.775)
    assert warmup_cosine(100, total, warm, final) == pytest.approx(final)
    assert warmup_cosine(150, total, warm, final) == pytest.approx(final)  # clamped past the end
    assert warmup_cosine(0, 50, 0) == pytest.approx(1.0)  # no warm-up
    assert warmup_cosine(25, 50, 0) == pytest.approx(0.5)
    assert warmup_cosine(50, 50, 0) == pytest.approx(0.0)


# ---- probes -------------------------------------------------------------------------------------------------


def test_knn_separable_toy_set_is_perfect() -> None:
    g = torch.Generator().manual_seed(40)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    train_labels = torch.arange(3).repeat_interleave(5)
    test_labels = torch.arange(3).repeat_interleave(4)
    train = centres[train_labels] + 0.05 * torch.randn(15, 3, generator=g)
    test = centres[test_labels] + 0.05 * torch.randn(12, 3, generator=g)
    assert knn_accuracy(train, train_labels, test, test_labels, k=5) == 100.0


def test_knn_hand_built_neighbours_weighted_vote() -> None:
    # Train (unit vectors): a=[1,0] class 0, c=[.8,.6] class 1, e=[.6,.8] class 1.
    # Test t1=[1,0] (class 0): cosines a=1, c=.8, e=.6.  t2=[0,1] (class 1): a=0, c=.6, e=.8.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    train_labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    test_labels = torch.tensor([0, 1])
    # T = 0.1: t1 votes class 0: e^10 = 22026 vs class 1: e^8 + e^6 = 3384 -> 0 (right); t2 -> 1 (right).
    assert knn_accuracy(train, train_labels, test, test_labels, k=3, temperature=0.1) == 100.0
    # T = 100: weights ~1, so the majority wins: t1 -> class 1 (wrong), t2 -> class 1 (right): 50 %.
    assert knn_accuracy(train, train_labels, test, test_labels, k=3, temperature=100.0) == 50.0
    # k = 1: nearest neighbour only: t1 -> a (0, right), t2 -> e (1, right).
    assert knn_accuracy(train, train_labels, test, test_labels, k=1, temperature=100.0) == 100.0
    # Cosine, not Euclidean: scaling features changes nothing; chunking changes nothing.
    assert knn_accuracy(7 * train, train_labels, 0.1 * test, test_labels, k=3, temperature=100.0, chunk=1) == 50.0


def _blobs(seed: int, per_class: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[6.0, 0, 0, 0, 0], [0, 6.0, 0, 0, 0], [0, 0, 6.0, 0, 0]])
    labels = torch.arange(3).repeat_interleave(per_class)
    return means[labels] + torch.randn(labels.numel(), 5, generator=g), labels


def test_linear_probe_on_separable_blobs() -> None:
    x_train, y_train = _blobs(41)
    x_test, y_test = _blobs(42)
    assert linear_probe_accuracy(x_train, y_train, x_test, y_test) > 95.0


def test_fit_logistic_regression_reaches_the_optimum() -> None:
    # Overlapping blobs (finite optimum): the gradient of mean CE + l2/2 ||W||^2, written out in numpy, vanishes.
    g = torch.Generator().manual_seed(43)
    labels = torch.arange(3).repeat_interleave(30)
    x = torch.randn(90, 4, generator=g) + torch.eye(3, 4)[labels]
    l2 = 1e-2
    w, b = fit_logistic_regression(x, labels, num_classes=3, l2=l2)
    xn, wn, bn = x.double().numpy(), w.numpy(), b.numpy()
    logits = xn @ wn + bn
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.eye(3)[labels.numpy()]
    grad_w = xn.T @ (p - y) / len(xn) + l2 * wn
    grad_b = (p - y).mean(0)
    assert np.abs(grad_w).max() < 1e-5 and np.abs(grad_b).max() < 1e-5


@pytest.mark.parametrize("n,f", [(50, 0.1), (1000, 0.01), (37, 0.5), (10, 1.0)])
def test_label_fraction_count_unique_and_deterministic(n: int, f: float) -> None:
    idx = label_fraction(n, f, seed=3)
    assert idx.numel() == round(n * f)
    assert len(set(idx.tolist())) == idx.numel()
    assert 0 <= idx.min() and idx.max() < n
    assert torch.equal(idx, label_fraction(n, f, seed=3))


def test_label_fraction_seeds_differ_and_minimum_is_one() -> None:
    assert not torch.equal(label_fraction(1000, 0.05, seed=0), label_fraction(1000, 0.05, seed=1))
    assert label_fraction(100, 0.001, seed=0).numel() == 1


# ---- teacher training ---------------------------------------------------------------------------------------


def tiny_config(**overrides: Any) -> TeacherConfig:
    """The tiny preset on CPU, with test-specific overrides."""
    return resolve_config(TeacherConfig, "teacher", "tiny", overrides={"device": "cpu", **overrides})


# 64 training images at batch 64: one step per epoch, so epoch 1's recorded loss is the loss of the untrained
# network and the last epoch's is after 7 updates.
TRAINED = dict(train_images=64, epochs=8, probe=True, monitor_every=1, keep_checkpoint=True)  # the final state kept


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny teacher run shared by the artefact tests (the run folder; never written to by tests)."""
    out = tmp_path_factory.mktemp("teacher-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSDD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("SSDD_DATA_ROOT", str(tmp_path_factory.mktemp("data")))
        path = train_teacher(tiny_config(**TRAINED), out, progress=False)
    assert path == out / "teacher.safetensors"
    return out


def read_metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def epoch_records(run: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run) if "epoch" in r]


def test_tiny_teacher_lowers_its_ssl_loss(trained: Path) -> None:
    epochs = epoch_records(trained)
    assert [r["epoch"] for r in epochs] == list(range(1, 9))
    assert [r["step"] for r in epochs] == list(range(1, 9))
    losses = [r["loss"] for r in epochs]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses
    final = [r for r in read_metrics(trained) if r.get("final")]
    assert len(final) == 1 and isinstance(final[0]["linear_probe"], float)
    assert (trained / "config.yaml").is_file() and (trained / "run.log").is_file()


def test_teacher_metadata_has_documented_keys(trained: Path) -> None:
    teacher = load_teacher(trained / "teacher.safetensors")
    meta = teacher.metadata
    assert meta["kind"] == "teacher"
    arch = meta["architecture"]
    assert arch["name"] == "convnet" and arch["widths"] == [8, 16] and arch["norm"] == "batch"
    assert (arch["in_channels"], arch["image_size"], arch["num_outputs"]) == (3, 32, 0)
    assert meta["feature_dim"] == 16 * (32 // 4) ** 2 == teacher.feature_dim
    assert meta["ssl"]["method"] == "barlow-twins" and meta["ssl"]["projector"] == [64, 64]
    assert meta["ssl"]["lambda_offdiag"] == pytest.approx(5e-3)
    assert meta["epochs_trained"] == 8
    assert isinstance(meta["linear_probe_top1"], float) and 0.0 <= meta["linear_probe_top1"] <= 100.0
    assert re.fullmatch(r"[0-9a-f]{16}", meta["fingerprint"]) and teacher.fingerprint == meta["fingerprint"]

    # Source: the first 64 images of the permutation seeded with config.seed (0), recomputed here.
    idx = torch.randperm(320, generator=torch.Generator().manual_seed(0))[:64]
    subset = make_synthetic("train").subset(idx)
    assert meta["source"]["dataset"] == "synthetic"
    assert meta["source"]["trained_on_fingerprint"] == subset.fingerprint
    assert meta["source"]["fingerprint"] == make_synthetic("train").fingerprint  # the whole split
    assert meta["source"]["images"] == 64 and meta["source"]["image_shape"] == [3, 32, 32]

    # Pixel space: per-channel mean/std of those images, computed with numpy.
    x = subset.images.numpy().astype(np.float64) / 255.0
    space = meta["pixel_space"]
    assert space["mean"] == pytest.approx(x.mean(axis=(0, 2, 3)).tolist(), abs=2e-6)
    assert space["std"] == pytest.approx(x.std(axis=(0, 2, 3)).tolist(), abs=2e-6)


def test_loaded_teacher_is_frozen_and_in_eval_mode(trained: Path) -> None:
    teacher = load_teacher(trained)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.backbone.training
    assert not teacher.training, "a freshly loaded Teacher reports training=True ('a teacher is always in eval mode')"
    teacher.train()
    assert not teacher.training and not teacher.backbone.training  # stays frozen


def test_save_load_round_trip_gives_the_trained_features(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSDD_TEACHER_PRECISION", "float32")  # bit for bit: the contiguous float32 forward pass
    teacher = load_teacher(trained)  # a folder works too
    assert isinstance(teacher, Teacher) and teacher.path == trained / "teacher.safetensors"

    # The trained backbone: the final training state in the checkpoint, rebuilt from the recorded architecture.
    state = torch.load(trained / "checkpoint.pt", map_location="cpu", weights_only=True)
    backbone = create_model(**teacher.metadata["architecture"])
    backbone.load_state_dict(state["backbone"])
    backbone.eval()
    saved, _ = load_tensors(trained / "teacher.safetensors")
    assert set(saved) == set(state["backbone"])
    for k, v in saved.items():
        assert torch.equal(v, state["backbone"][k]), k

    images = make_synthetic("test").images[::20]  # 16 images
    mean = torch.tensor(teacher.metadata["pixel_space"]["mean"]).view(3, 1, 1)
    std = torch.tensor(teacher.metadata["pixel_space"]["std"]).view(3, 1, 1)
    with torch.no_grad():
        expected = backbone.features((images.float() / 255.0 - mean) / std)
    got = teacher.encode(images)
    assert got.shape == (16, teacher.feature_dim)
    assert torch.equal(got, expected)
    monkeypatch.setenv("SSDD_TEACHER_PRECISION", "auto")  # channels_last: the same features where bf16 is not native
    monkeypatch.setattr("ssdd.teachers.artefact.runs_bf16", lambda device, enabled=True: False)  # on any CPU
    torch.testing.assert_close(teacher.encode(images), expected, rtol=1e-5, atol=1e-5)


def test_same_config_twice_gives_identical_teachers(tmp_path: Path) -> None:
    """A run is determined by its config (seed included): the global RNG state must not matter."""
    cfg = tiny_config(train_images=64, epochs=1, probe=False, monitor_every=0)
    torch.manual_seed(1)
    a = train_teacher(cfg, tmp_path / "a", progress=False)
    torch.manual_seed(2)
    b = train_teacher(cfg, tmp_path / "b", progress=False)
    wa, _ = load_tensors(a)
    wb, _ = load_tensors(b)
    differing = sorted(k for k in wa if not torch.equal(wa[k], wb[k]))
    assert not differing, f"same config, different weights in {differing[:3]}"


class _Killed(Exception):
    """Stands for the process being killed mid-run."""


def test_resume_after_interruption_is_bitwise_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 320 images / 64 = 5 steps per epoch; a checkpoint at the end of every epoch (checkpoint_minutes=0).
    cfg = tiny_config(epochs=3, probe=False, monitor_every=1, checkpoint_minutes=0.0)
    a = train_teacher(cfg, tmp_path / "a", progress=False)

    real_step = train_module._TeacherTraining.train_step

    def dying_step(self: Any, batch_idx: torch.Tensor) -> float:
        if self.step == 7:  # killed in the middle of epoch 2
            raise _Killed
        return real_step(self, batch_idx)

    run_b = tmp_path / "b"
    torch.manual_seed(7)  # a different global RNG state: runs depend only on their config's seed
    monkeypatch.setattr(train_module._TeacherTraining, "train_step", dying_step)
    with pytest.raises(_Killed):
        train_teacher(cfg, run_b, progress=False)
    monkeypatch.setattr(train_module._TeacherTraining, "train_step", real_step)

    assert not (run_b / "teacher.safetensors").exists()
    checkpoint = torch.load(run_b / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["step"] == 5  # the end of epoch 1

    torch.manual_seed(123)  # a different global RNG state: the resumed run must not depend on it
    b = train_teacher(cfg, run_b, resume=True, progress=False)
    assert "resumed at step 5" in (run_b / "run.log").read_text()

    wa, meta_a = load_tensors(a)
    wb, meta_b = load_tensors(b)
    assert set(wa) == set(wb)
    differing = sorted(k for k in wa if not torch.equal(wa[k], wb[k]))
    assert not differing, f"resumed weights differ in {differing[:3]}"
    assert meta_a["fingerprint"] == meta_b["fingerprint"]
    assert meta_b["epochs_trained"] == 3

    def losses(run: Path) -> list[tuple[int, int, float]]:
        return [(r["epoch"], r["step"], r["loss"]) for r in epoch_records(run)]

    # The metrics of the resumed run are those of the uninterrupted one (no duplicated or lost epochs).
    assert losses(run_b) == losses(tmp_path / "a")
    assert [r["epoch"] for r in epoch_records(run_b)] == [1, 2, 3]


def test_resume_with_changed_setting_names_the_key(tmp_path: Path) -> None:
    cfg = tiny_config(train_images=64, epochs=1, probe=False, monitor_every=0)
    train_teacher(cfg, tmp_path, progress=False)
    with pytest.raises(ConfigError) as excinfo:
        train_teacher(tiny_config(train_images=64, epochs=1, probe=False, monitor_every=0, temperature=0.35),
                      tmp_path, resume=True, progress=False)
    message = str(excinfo.value)
    assert re.search(r"\btemperature\b", message), message
    assert "batch_size" not in message and "epochs" not in message
    # device, checkpoint_minutes and lr may change between the two runs (a lower lr is the advice after divergence)
    train_teacher(tiny_config(train_images=64, epochs=1, probe=False, monitor_every=0, checkpoint_minutes=1.0,
                              lr=0.1), tmp_path, resume=True, progress=False)


# ---- load_teacher errors ------------------------------------------------------------------------------------


def test_load_teacher_rejects_another_kind_of_artefact(tmp_path: Path) -> None:
    path = tmp_path / "distilled.safetensors"
    save_tensors(path, {"images": torch.zeros(2, 3, 4, 4)}, {"kind": "distilled"})
    with pytest.raises(ArtefactError) as excinfo:
        load_teacher(path)
    assert "distilled" in str(excinfo.value) and "not a teacher" in str(excinfo.value)


def test_load_teacher_rejects_modified_weights(trained: Path, tmp_path: Path) -> None:
    tensors, meta = load_tensors(trained / "teacher.safetensors")
    key = next(k for k, v in sorted(tensors.items()) if v.is_floating_point() and v.numel() > 1)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1.0
    path = tmp_path / "teacher.safetensors"
    save_tensors(path, tensors, meta)
    with pytest.raises(ArtefactError) as excinfo:
        load_teacher(path)
    assert "fingerprint" in str(excinfo.value) and str(path) in str(excinfo.value)


def test_load_teacher_rejects_weights_of_another_architecture(trained: Path, tmp_path: Path) -> None:
    tensors, meta = load_tensors(trained / "teacher.safetensors")
    meta = {**meta, "architecture": {**meta["architecture"], "widths": [8, 32]}}
    path = tmp_path / "teacher.safetensors"
    save_tensors(path, tensors, meta)
    with pytest.raises(ArtefactError) as excinfo:
        load_teacher(path)
    assert "do not match" in str(excinfo.value)


def test_load_teacher_missing_file_or_folder(tmp_path: Path) -> None:
    with pytest.raises(ArtefactError) as excinfo:
        load_teacher(tmp_path / "nothing.safetensors")
    assert "nothing.safetensors" in str(excinfo.value) and "does not exist" in str(excinfo.value)
    with pytest.raises(ArtefactError) as excinfo:
        load_teacher(tmp_path)  # a folder without teacher.safetensors
    assert "teacher.safetensors" in str(excinfo.value)


# ---- the teacher-feature cache ------------------------------------------------------------------------------


@pytest.fixture
def teacher_copy(trained: Path, tmp_path: Path) -> Teacher:
    """The trained teacher, copied so this test has its own feature cache folder."""
    shutil.copy(trained / "teacher.safetensors", tmp_path / "teacher.safetensors")
    return load_teacher(tmp_path / "teacher.safetensors")


def toy_dataset(seed: int = 50, n: int = 12) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageDataset(name="toy", split="train", images=images, labels=torch.arange(n) % 3, classes=["a", "b", "c"])


@pytest.fixture
def forward_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the images the teacher network is run on (every feature path goes through Teacher.forward)."""
    calls: list[int] = []
    real = Teacher.forward

    def counting(self: Teacher, x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(self, x)

    monkeypatch.setattr(Teacher, "forward", counting)
    return calls


def test_teacher_features_second_call_hits_the_cache(teacher_copy: Teacher, forward_calls: list[int],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ds = toy_dataset()
    first = teacher_features(teacher_copy, ds)
    assert first.shape == (12, teacher_copy.feature_dim)
    assert sum(forward_calls) == 12
    assert list((teacher_copy.path.parent / "features").glob("*.safetensors"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("features were recomputed instead of read from the cache")

    monkeypatch.setattr(Teacher, "encode", refuse)
    second = teacher_features(teacher_copy, ds)
    assert torch.equal(first, second)
    assert sum(forward_calls) == 12
    # The cached features are the teacher's features of the images.
    monkeypatch.undo()
    assert torch.equal(first, teacher_copy.encode(ds.images))


def test_teacher_features_recomputed_when_the_dataset_changes(teacher_copy: Teacher, forward_calls: list[int]) -> None:
    ds = toy_dataset()
    before = teacher_features(teacher_copy, ds)
    images = ds.images.clone()
    images[0, 0, 0, 0] ^= 0xFF
    changed = ImageDataset(name="toy", split="train", images=images, labels=ds.labels, classes=ds.classes)
    assert changed.fingerprint != ds.fingerprint
    forward_calls.clear()
    after = teacher_features(teacher_copy, changed)
    assert sum(forward_calls) == 12  # recomputed, not the stale cache
    assert not torch.equal(before[0], after[0])
    assert torch.equal(before[1:], after[1:])  # features are per image


def test_teacher_features_views(teacher_copy: Teacher, forward_calls: list[int]) -> None:
    ds = toy_dataset()
    plain = teacher_features(teacher_copy, ds)
    forward_calls.clear()
    views = teacher_features(teacher_copy, ds, views=("identity", "rot90"))
    assert sum(forward_calls) == 24  # the plain features' cache entry is not reused for views
    assert views.shape == (2, 12, teacher_copy.feature_dim)
    assert torch.equal(views[0], plain)
    assert torch.equal(views[1], teacher_copy.encode(torch.rot90(ds.images, 1, dims=(2, 3))))
    forward_calls.clear()
    again = teacher_features(teacher_copy, ds, views=("identity", "rot90"))
    assert forward_calls == [] and torch.equal(again, views)


def test_teacher_features_augmented_is_seeded(teacher_copy: Teacher, forward_calls: list[int]) -> None:
    ds = toy_dataset()
    d = teacher_copy.feature_dim
    a = teacher_features(teacher_copy, ds, augmented=3, seed=7)
    assert a.shape == (3, 12, d)
    assert not torch.equal(a[0], a[1])  # three different random views
    b = teacher_features(teacher_copy, ds, augmented=3, seed=7, use_cache=False)
    assert torch.equal(a, b)  # same seed, recomputed: the same views
    c = teacher_features(teacher_copy, ds, augmented=3, seed=8)
    assert c.shape == (3, 12, d) and not torch.equal(a, c)
    forward_calls.clear()
    assert torch.equal(teacher_features(teacher_copy, ds, augmented=3, seed=7), a)
    assert forward_calls == []  # cached
    # views + augmented: (V + k, N, d), the views first, then the same seeded random views
    both = teacher_features(teacher_copy, ds, views=("identity",), augmented=3, seed=7)
    assert both.shape == (4, 12, d)
    assert torch.equal(both[0], teacher_features(teacher_copy, ds))
    assert torch.equal(both[1:], a)


def test_teacher_features_record_the_teachers_precision_and_memory_format(
        teacher_copy: Teacher, forward_calls: list[int], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """Each SSDD_TEACHER_PRECISION mode has its own cache entry (its values differ slightly); float32 keeps the key
    it had before the mode was recorded; a bar shows images/s when the teacher's progress is on."""
    ds = toy_dataset()
    monkeypatch.setattr("ssdd.teachers.artefact.runs_bf16", lambda device, enabled=True: False)  # any CPU
    files = lambda: sorted((teacher_copy.path.parent / "features").glob("*.safetensors"))  # noqa: E731
    monkeypatch.setenv("SSDD_TEACHER_PRECISION", "float32")
    assert teacher_copy.encoding("cpu") == (False, False)
    plain = teacher_features(teacher_copy, ds)
    assert [f.name for f in files()] == [f"toy-train-{ds.fingerprint}-{_views_key(None, 0, 0)}.safetensors"]
    monkeypatch.setenv("SSDD_TEACHER_PRECISION", "auto")  # the teacher trained channels_last
    assert teacher_copy.encoding("cpu") == (False, True)
    teacher_copy.progress = True
    monkeypatch.setenv("SSDD_PROGRESS_SECONDS", "1e-9")  # stderr is no terminal here: a status line per update
    auto = teacher_features(teacher_copy, ds)
    assert "img/s" in capsys.readouterr().err
    assert len(files()) == 2 and sum(forward_calls) == 24
    assert sorted(load_tensors(f)[1]["encoding"] for f in files()) == ["float32", "float32+channels_last"]
    torch.testing.assert_close(auto, plain, rtol=1e-5, atol=1e-5)
    assert all(p.is_contiguous() for p in teacher_copy.parameters())  # channels_last inside the pass only
    monkeypatch.setenv("SSDD_TEACHER_PRECISION", "bf16")
    assert teacher_copy.encoding("cpu") == (True, True)
    bf16 = teacher_features(teacher_copy, ds)
    assert bf16.dtype == torch.float32 and len(files()) == 3
    torch.testing.assert_close(bf16, plain, rtol=0.1, atol=0.1)
    monkeypatch.setenv("SSDD_TEACHER_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="SSDD_TEACHER_PRECISION"):
        teacher_features(teacher_copy, ds)


def test_teacher_features_converts_other_image_shapes(teacher_copy: Teacher) -> None:
    g = torch.Generator().manual_seed(51)
    gray = ImageDataset(name="gray", split="test", images=torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8,
                                                                         generator=g),
                        labels=torch.zeros(5, dtype=torch.int64), classes=["x"])
    feats = teacher_features(teacher_copy, gray)
    assert feats.shape == (5, teacher_copy.feature_dim)
    assert torch.equal(feats, teacher_copy.encode(gray.images))


def test_the_compile_flag_runs_every_training_step_through_the_compiled_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile: true`` hands the step's model to torch.compile (recorded here with an identity compiler, so the
    test checks the wiring and not the compiler) and the teacher is unchanged by it."""
    compiled: list[nn.Module] = []
    steps: list[int] = []

    def record(model: nn.Module) -> nn.Module:
        compiled.append(model)
        model.register_forward_hook(lambda *args: steps.append(1))
        return model

    monkeypatch.setattr(torch, "compile", record)
    overrides = {"device": "cpu", "epochs": 1, "probe": False, "monitor_every": 0}
    plain = train_teacher(resolve_config(TeacherConfig, "teacher", "tiny", overrides=overrides), tmp_path / "plain",
                          progress=False)
    assert compiled == []
    path = train_teacher(resolve_config(TeacherConfig, "teacher", "tiny", overrides={**overrides, "compile": True}),
                         tmp_path / "compiled", progress=False)
    assert len(compiled) == 1 and isinstance(compiled[0], train_module.SSLModel)
    assert len(steps) == 320 // 64  # every step of the epoch
    a, b = load_tensors(plain)[0], load_tensors(path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the reference teacher shipped with the package ----------------------------------------------------------------


def test_the_shipped_reference_teacher_is_the_committed_cpu_teacher_with_its_provenance() -> None:
    from ssdd.teachers.reference import reference_path

    committed = Path(__file__).parents[1] / "docs/results/teacher-cifar10-cpu-avx2"
    teacher, trained = load_teacher("reference:cifar10"), load_teacher(committed)
    assert teacher.path == reference_path("reference:cifar10")
    assert teacher.fingerprint == trained.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(teacher.backbone.state_dict().values(),
                                                 trained.backbone.state_dict().values()))
    record = teacher.metadata["reference"]
    assert record["linear_probe_top1"] == round(trained.metadata["linear_probe_top1"], 2)
    assert "ssdd teacher --preset cifar10-cpu" in record["made_by"]
    assert teacher.metadata["source"] == trained.metadata["source"]


def test_an_unknown_reference_teacher_names_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match=r"no shipped teacher 'reference:cifar100'; the reference teachers are "
                                          r"reference:cifar10"):
        load_teacher("reference:cifar100")


def test_what_is_computed_from_a_shipped_teacher_is_cached_outside_the_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ssdd.teachers.features import derived_cache_path
    from ssdd.teachers.reference import shipped_folder

    monkeypatch.setenv("SSDD_CACHE_DIR", str(tmp_path))
    teacher = load_teacher("reference:cifar10")
    data = make_synthetic(num_classes=2, per_class=4)
    path = derived_cache_path(teacher, data, "key")
    assert path is not None and path.is_relative_to(tmp_path) and not path.is_relative_to(shipped_folder())
    assert teacher.fingerprint in path.parts
