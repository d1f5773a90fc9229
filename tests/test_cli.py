"""The ``ssdd`` command line, run in-process through ``ssdd.cli.main`` (plus one real ``python -m ssdd``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import make_splits, write_image_folder_archive
from helpers import user_error
from ssdd import __version__
from ssdd.cli import main
from ssdd.data import DATASETS
from ssdd.io import read_metadata
from ssdd.models import MODELS

TINY = ["teacher", "--preset", "tiny", "--device", "cpu", "--no-progress"]


def dataset_rows(out: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (available|missing, the indented lines under it) of ``ssdd datasets`` output."""
    rows: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith(" ") and current is not None:
            rows[current][1].append(line.strip())
            continue
        parts = line.split()
        if len(parts) >= 2 and parts[0] in DATASETS:
            current = parts[0]
            rows[current] = (parts[1], [])
        else:
            current = None
    return rows


# ---- listings -----------------------------------------------------------------------------------------------


def test_datasets_lists_every_dataset_with_status_and_places(capsys: pytest.CaptureFixture[str],
                                                            data_dir: Path) -> None:
    write_image_folder_archive(data_dir / "cifar10.tar.gz", "cifar10", make_splits())
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert f"data root: {data_dir}" in out
    rows = dataset_rows(out)
    assert set(rows) == set(DATASETS.names())
    for name, (mark, _) in rows.items():
        assert mark in ("available", "missing"), (name, mark)
    # the archive makes cifar10 available, and the output says where it came from
    mark, details = rows["cifar10"]
    assert mark == "available"
    assert any(str(data_dir / "cifar10.tar.gz") in d for d in details), details
    assert rows["synthetic"][0] == "available"
    # a missing dataset says every place it looked, under the data root
    mark, details = rows["cifar100"]
    assert mark == "missing"
    looked = [d for d in details if d.startswith("looked for")]
    assert any(str(data_dir / "cifar100.tar.gz") in d for d in looked), details
    assert any(str(data_dir / "cifar-100-python.tar.gz") in d for d in looked), details


def test_datasets_data_root_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "elsewhere"
    assert main(["datasets", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"data root: {root}" in out
    rows = dataset_rows(out)
    assert rows["cifar10"][0] == "missing"
    assert any(str(root / "cifar10.tar.gz") in d for d in rows["cifar10"][1])


def test_models_lists_every_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert listed == MODELS.names()
    convnet_line = next(line for line in out.splitlines() if line.split()[0] == "convnet")
    assert "width=128" in convnet_line and "norm='instance'" in convnet_line


# ---- teacher ------------------------------------------------------------------------------------------------


def test_teacher_tiny_preset_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    assert main([*TINY, "--out", str(out_dir)]) == 0
    captured = capsys.readouterr()
    artefact = out_dir / "teacher.safetensors"
    assert str(artefact) in captured.out
    for name in ("teacher.safetensors", "config.yaml", "metrics.jsonl"):
        assert (out_dir / name).is_file(), name
    meta = read_metadata(artefact)
    assert meta["kind"] == "teacher" and meta["epochs_trained"] == 2  # the tiny preset's epochs
    assert meta["architecture"]["name"] == "convnet"
    assert f"{meta['epochs_trained']} epochs" in captured.out
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r] == [1, 2]
    assert "Traceback" not in captured.err


# ---- user errors: status 2, one line, no traceback ---------------------------------------------------------


def test_unknown_dataset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = user_error(capsys, [*TINY, "--dataset", "nosuch", "--out", str(tmp_path / "r")])
    assert "nosuch" in line and "dataset" in line


def test_unknown_preset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = user_error(capsys, ["teacher", "--preset", "nosuch", "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert "nosuch" in line and "tiny" in line  # names the known presets


def test_unknown_arch(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = user_error(capsys, [*TINY, "--arch", "nosuch", "--out", str(tmp_path / "r")])
    assert "nosuch" in line and "model" in line


def test_config_file_with_unknown_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: 1\nbogus_key: 3\n")
    line = user_error(capsys, [*TINY, "--config", str(config), "--out", str(tmp_path / "r")])
    assert "bogus_key" in line


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    line = user_error(capsys, [*TINY, "--config", str(missing), "--out", str(tmp_path / "r")])
    assert str(missing) in line and "does not exist" in line


def test_dataset_not_present_says_where_it_looked(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  data_dir: Path) -> None:
    line = user_error(capsys, [*TINY, "--dataset", "cifar10", "--out", str(tmp_path / "r")])
    assert "cifar10" in line and "not found" in line
    assert str(data_dir / "cifar10.tar.gz") in line and str(data_dir / "cifar-10-batches-py") in line


def test_resume_with_other_settings_is_a_user_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "r"
    assert main([*TINY, "--epochs", "1", "--train-images", "64", "--out", str(out_dir)]) == 0
    capsys.readouterr()
    line = user_error(capsys, [*TINY, "--epochs", "1", "--train-images", "64", "--batch-size", "16", "--out",
                               str(out_dir), "--resume"])
    assert "batch_size" in line and "resume" in line


# ---- argparse errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["nosuch"], [], ["teacher", "--preset", "tiny"], ["teacher", "--out", "x", "--device", "tpu"]],
    ids=["unknown-subcommand", "no-subcommand", "missing-out", "bad-choice"],
)
def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_version_in_a_subprocess() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "ssdd", "--version"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ssdd {__version__}"


# ---- evaluate and show --------------------------------------------------------------------------------------


def test_evaluate_baselines_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_teacher: Path) -> None:
    out_dir = tmp_path / "eval"
    status = main(["evaluate", "--baselines", "none,random", "--teacher", str(tiny_teacher), "--images", "20",
                   "--preset", "tiny", "--out", str(out_dir), "--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    for name in ("results.json", "results.md", "results.png"):
        assert (out_dir / name).is_file(), name
    assert (out_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out_dir / "results.json").read_text())
    cells = record["cells"]
    # the tiny preset: linear protocol, label fractions 0.1 and 1.0, seeds 0 and 1, target synthetic
    assert {(c["entry"], c["fraction"]) for c in cells} == {(e, f) for e in ("none", "random") for f in (0.1, 1.0)}
    for cell in cells:
        assert cell["protocol"] == "linear" and cell["target"] == "synthetic" and cell["seeds"] == [0, 1]
        assert len(cell["accuracies"]) == 2 and all(0 <= a <= 100 for a in cell["accuracies"])
    md = (out_dir / "results.md").read_text()
    assert md.strip() in captured.out  # the report is printed
    assert "| none |" in md and "| random |" in md
    assert "Traceback" not in captured.err


def test_evaluate_names_sets_with_name_equals_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path, _ = saved_set(tmp_path / "run")
    odd = tmp_path / "a=b"  # a path that exists is never split at its '='
    saved_set(odd)
    out_dir = tmp_path / "eval"
    status = main(["evaluate", f"mine={path}", str(odd), "--preset", "tiny", "--protocol", "knn", "--seeds", "0",
                   "--targets", "synthetic", "--out", str(out_dir), "--no-progress", "--device", "cpu"])
    assert status == 0, capsys.readouterr().err
    entries = [c["entry"] for c in json.loads((out_dir / "results.json").read_text())["cells"]]
    assert entries == ["mine", "cli-set"]


def saved_set(folder: Path) -> tuple[Path, int]:
    import torch

    from ssdd.data import PixelSpace
    from ssdd.distilled import DistilledSet

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 8, 8, generator=gen)
    targets = torch.randn(6, 5, generator=gen)
    distilled = DistilledSet({"images": images, "targets": targets, "learned_lr": torch.tensor(0.02)},
                             PixelSpace((0.5,) * 3, (0.25,) * 3), "representation", "cli-set")
    # 6 * 3 * 8 * 8 + 6 * 5 + 1 (the learned lr) = 1183 float32 values = 4732 bytes
    return distilled.save(folder), 4732


def test_show_prints_byte_count_and_writes_grid(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path, byte_count = saved_set(tmp_path / "run")
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{byte_count:,}" in out or str(byte_count) in out
    assert "cli-set" in out and "representation" in out and "0.02" in out
    grid = tmp_path / "run" / "grid.png"
    assert grid.is_file() and grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(grid) in out
    # a run folder works too, and --grid puts the picture elsewhere
    other = tmp_path / "pictures" / "g.png"
    assert main(["show", str(tmp_path / "run"), "--grid", str(other), "--max-images", "4"]) == 0
    assert other.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_with_nothing_to_evaluate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = user_error(capsys, ["evaluate", "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert "nothing to evaluate" in line
    assert not (tmp_path / "r" / "results.json").exists()


def test_show_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    line = user_error(capsys, ["show", str(missing)])
    assert str(missing) in line and "does not exist" in line


def test_evaluate_unknown_baseline_and_protocol(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = user_error(capsys, ["evaluate", "--baselines", "randm", "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert "randm" in line and "random" in line
    line = user_error(capsys, ["evaluate", "--baselines", "none", "--protocol", "lineer", "--out", str(tmp_path / "r"),
                               "--device", "cpu"])
    assert "lineer" in line and "linear" in line


def test_show_on_a_teacher_is_a_user_error(capsys: pytest.CaptureFixture[str], tiny_teacher: Path) -> None:
    line = user_error(capsys, ["show", str(tiny_teacher)])
    assert str(tiny_teacher) in line and "teacher" in line and "distilled" in line
