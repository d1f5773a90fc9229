"""The ``ssdd`` command line, run in-process through ``ssdd.cli.main`` (plus one real ``python -m ssdd``)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import make_splits, write_image_folder_archive
from helpers import user_error

from ssdd import __version__
from ssdd.cli import main
from ssdd.data import DATASETS
from ssdd.errors import ConfigError
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
    (tmp_path / "run" / "config.yaml").write_text("method: cli-set\n")  # a run folder: show writes its grid there
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


def test_show_html_is_one_page_with_the_grid_embedded_and_the_metadata_escaped(capsys: pytest.CaptureFixture[str],
                                                                                tmp_path: Path) -> None:
    import torch

    from ssdd.data import PixelSpace
    from ssdd.distilled import DistilledSet

    hostile = DistilledSet({"images": torch.zeros(4, 3, 8, 8), "targets": torch.zeros(4, 2)},
                           PixelSpace((0.5,) * 3, (0.25,) * 3), "representation", "<script>alert(1)</script>",
                           metadata={"teacher": '"><img src=x onerror=alert(1)>'})
    path = hostile.save(tmp_path / "set")
    page = tmp_path / "pages" / "set.html"
    assert main(["show", str(path), "--grid", str(tmp_path / "g.png"), "--html", str(page)]) == 0
    assert f"html:         {page}" in capsys.readouterr().out
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 1 and "<script" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&quot;&gt;&lt;img src=x" in text


def test_a_long_command_into_a_file_writes_whole_lines(tmp_path: Path) -> None:
    """Progress on a file: no carriage return, a bounded number of lines, and the run folder on the first line."""
    log = tmp_path / "teacher.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSDD_PROGRESS_SECONDS": "0.2"}
    with log.open("w") as out:
        status = subprocess.run([sys.executable, "-m", "ssdd", "teacher", "--preset", "tiny", "--device", "cpu",
                                 "--out", str(tmp_path / "run")], stdout=out, stderr=subprocess.STDOUT, env=env,
                                timeout=300).returncode
    text = log.read_text()
    assert status == 0, text
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert lines[0] == f"[teacher] run folder {tmp_path / 'run'}: teacher.safetensors, run.log, metrics.jsonl there"
    assert 3 <= len(lines) <= 30, text  # 10 steps: at most one status line per 0.2 s, then the totals
    assert lines[-3].startswith("teacher barlow-twins convnet: 10/10 (100 %)"), text


def test_a_progress_bar_on_a_stream_writes_a_line_per_interval_and_its_totals(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssdd.progress import progress_bar

    monkeypatch.setenv("SSDD_PROGRESS_SECONDS", "1000")
    stream = io.StringIO()
    for _ in progress_bar(range(500), desc="stage", unit="step", file=stream):
        pass
    with progress_bar(total=7, desc="inner", leave=False, file=stream) as bar:
        bar.update(7)
    assert stream.getvalue().splitlines() == [stream.getvalue().strip()]  # the inner bar ends silently
    assert stream.getvalue().startswith("stage: 500/500 (100 %) [")
    monkeypatch.setenv("SSDD_PROGRESS_SECONDS", "soon")
    with pytest.raises(ConfigError, match="SSDD_PROGRESS_SECONDS"):
        progress_bar(total=1, file=stream)


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


# ---- numeric flags: one range per kind of value (ssdd/values.py), an argparse error naming the flag ----------


@pytest.mark.parametrize(("argv", "refused"), [
    ([*TINY, "--out", "r", "--seed", "-1"], "-1"),
    ([*TINY, "--out", "r", "--seed", "99999999999999999999"], "99999999999999999999"),
    ([*TINY, "--out", "r", "--seed", "4294967296"], "4294967296"),  # one past numpy's largest seed
    ([*TINY, "--out", "r", "--lr", "-1"], "-1"),
    ([*TINY, "--out", "r", "--lr", "nan"], "nan"),
    ([*TINY, "--out", "r", "--lr", "inf"], "inf"),
    ([*TINY, "--out", "r", "--epochs", "0"], "0"),
    ([*TINY, "--out", "r", "--batch-size", "1"], "1"),
    ([*TINY, "--out", "r", "--train-images", "0"], "0"),  # it used to train on every image
    (["distill", "--out", "r", "--images", "0"], "0"),
    (["distill", "--out", "r", "--bytes", "-5"], "-5"),
    (["distill", "--out", "r", "--seed", "-1"], "-1"),
    (["experts", "--out", "r", "--parallel", "0"], "0"),
    (["experts", "--out", "r", "--seed", "1.5"], "1.5"),
    (["evaluate", "--out", "r", "--seeds", "0,-1"], "-1"),
    (["evaluate", "--out", "r", "--seeds", ","], ","),
    (["evaluate", "--out", "r", "--fractions", "0,1"], "0"),
    (["evaluate", "--out", "r", "--fractions", "1.5"], "1.5"),
    (["evaluate", "--out", "r", "--images", "0"], "0"),
    (["show", "set", "--max-images", "0"], "0"),  # it divided by zero
    (["show", "set", "--max-images", "-1"], "-1"),  # it showed all images but the last
    (["bench", "--suite", "tiny", "--seeds", "99999999999999999999"], "99999999999999999999"),
], ids=lambda value: " ".join(value[-2:]) if isinstance(value, list) else "")
def test_out_of_range_flags_are_argparse_errors(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                refused: str) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert f"error: argument {argv[-2]}: expected " in last and last.endswith(f"got {refused!r}"), err
    assert "Traceback" not in err


def test_flags_at_the_edges_of_their_ranges_are_accepted() -> None:
    from ssdd.cli import build_parser

    parser = build_parser()
    args = parser.parse_args([*TINY, "--out", "r", "--seed", "4294967295", "--lr", "1e-9", "--batch-size", "2",
                              "--train-images", "1"])
    assert (args.seed, args.lr, args.batch_size, args.train_images) == (2**32 - 1, 1e-9, 2, 1)
    args = parser.parse_args(["evaluate", "--out", "r", "--seeds", "0, 4294967295", "--fractions", "1,0.01"])
    assert args.seeds == [0, 2**32 - 1] and args.fractions == [1.0, 0.01]


def test_the_largest_seed_runs_a_teacher_and_a_distillation(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    """Seeds are used by torch and numpy and in derived seeds (seed * 100_003 + i): the top of the range must run."""
    top = str(2**32 - 1)
    assert main([*TINY, "--epochs", "1", "--train-images", "64", "--seed", top, "--out", str(tmp_path / "t")]) == 0
    teacher = tmp_path / "t" / "teacher.safetensors"
    assert read_metadata(teacher)["config"]["seed"] == 2**32 - 1
    assert main(["distill", "--method", "krr-st", "--preset", "tiny", "--teacher", str(teacher), "--seed", top,
                 "--set", "settings.steps=2", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "d")]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(("value", "shown"),
                         [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), ("1e400", "'1e400'")])
def test_a_non_finite_setting_is_refused_naming_that_setting(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                             tiny_teacher: Path, value: str, shown: str) -> None:
    line = user_error(capsys, ["distill", "--method", "krr-st", "--preset", "tiny", "--teacher", str(tiny_teacher),
                               "--set", f"settings.lr_images={value}", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert "settings.lr_images" in line and "finite" in line and line.endswith(f"got {shown}")
    assert "pool" not in line  # it blamed settings.pool.lr, after a step on NaN images
    assert not (tmp_path / "r" / "distilled.safetensors").exists()


def test_settings_from_a_config_file_are_held_to_the_same_ranges(capsys: pytest.CaptureFixture[str],
                                                                 tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("seed: -1\n")
    line = user_error(capsys, [*TINY, "--config", str(config), "--out", str(tmp_path / "r")])
    assert "seed" in line and "4294967295" in line and "-1" in line
    config.write_text("lr: .nan\n")
    line = user_error(capsys, [*TINY, "--config", str(config), "--out", str(tmp_path / "r")])
    assert "lr" in line and "finite" in line


def test_a_set_value_of_too_many_digits_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = user_error(capsys, ["distill", "--method", "krr-st", "--preset", "tiny", "--set",
                               f"settings.steps={'9' * 5000}", "--out", str(tmp_path / "r")])
    assert "--set settings.steps" in line and len(line) < 200


# ---- messages a newcomer meets ------------------------------------------------------------------------------


def test_an_unknown_method_is_named_with_the_close_ones(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from ssdd.methods import list_methods

    line = user_error(capsys, ["distill", "--method", "krr", "--preset", "tiny", "--out", str(tmp_path / "r")])
    assert "unknown method 'krr'" in line and "Did you mean krr-st?" in line and "preset" not in line
    assert all(name in line for name in list_methods())


def test_a_preset_the_method_lacks_lists_the_methods_own(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from ssdd.config import list_presets

    line = user_error(capsys, ["distill", "--method", "mtt", "--preset", "cifar100-gpu", "--out", str(tmp_path / "r")])
    own = sorted(p.removeprefix("mtt/") for p in list_presets("distill") if p.startswith("mtt/"))
    assert line.endswith(f"method mtt has no preset 'cifar100-gpu'; its presets: {', '.join(own)}")
    assert "krr-st" not in line


def test_method_help_lists_the_methods(capsys: pytest.CaptureFixture[str]) -> None:
    from ssdd.methods import list_methods

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert f"distillation method: {', '.join(list_methods())}" in help_text


def test_an_error_message_is_one_line_whatever_it_quotes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "a\x1b[2Jb\nc.yaml"  # a missing file's name is quoted in the message as it is
    line = user_error(capsys, [*TINY, "--config", str(config), "--out", str(tmp_path / "r")])
    assert "\x1b" not in line and "a\\x1b[2Jb\\nc.yaml" in line and "does not exist" in line


def test_output_cut_off_by_the_reader_stops_quietly(tmp_path: Path) -> None:
    path, _ = saved_set(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ssdd", "show", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # as `ssdd show SET | head -0` would
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err  # 128 + SIGPIPE, what a shell reports for cat in the same place
    assert err == ""


# ---- escaping: what came from a set's file never drives the terminal or breaks a line -----------------------


HOSTILE = "evil\x1b]0;pwned\x07\x1b[2J\x9b31m|x\ny\r\u202eabc$\\frac$"


def test_show_escapes_what_the_set_says(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import torch

    from ssdd.data import PixelSpace
    from ssdd.distilled import DistilledSet

    images = torch.zeros(4, 3, 8, 8)
    clean = DistilledSet({"images": images, "targets": torch.zeros(4, 2)}, PixelSpace((0.5,) * 3, (0.25,) * 3),
                         "representation", "plain", metadata={"teacher": "t", "source": {"dataset": "d"}})
    hostile = DistilledSet({"images": images, "targets": torch.zeros(4, 2)}, PixelSpace((0.5,) * 3, (0.25,) * 3),
                           "representation", HOSTILE, metadata={"teacher": HOSTILE, "source": {"dataset": HOSTILE}})
    outputs = []
    for name, distilled in (("clean", clean), ("hostile", hostile)):
        path = distilled.save(tmp_path / name)
        assert main(["show", str(path), "--grid", str(tmp_path / f"{name}.png")]) == 0  # mathtext `$` is text too
        outputs.append(capsys.readouterr().out)
    clean_out, hostile_out = outputs
    assert len(hostile_out.splitlines()) == len(clean_out.splitlines())  # no line of the set's own
    assert all(ch == "\n" or ch.isprintable() for ch in hostile_out), repr(hostile_out)
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m|x\\ny\\r\\u202eabc$\\frac$" in hostile_out
    assert (tmp_path / "hostile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the data root the installer found, and --download -------------------------------------------------------


def test_the_installer_records_the_data_root_that_ssdd_then_reads(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/install.sh run in a throwaway copy: a fake .venv whose pip and apt-get do nothing."""
    project, data = tmp_path / "proj", tmp_path / "shared" / "data"
    (project / "scripts").mkdir(parents=True)
    data.mkdir(parents=True)
    shutil.copy(Path(__file__).parents[1] / "scripts" / "install.sh", project / "scripts" / "install.sh")
    venv_bin, fake_bin = project / ".venv" / "bin", tmp_path / "bin"
    venv_bin.mkdir(parents=True)
    fake_bin.mkdir()
    (venv_bin / "python").symlink_to(sys.executable)
    for tool in (venv_bin / "pip", fake_bin / "apt-get"):
        tool.write_text("#!/bin/sh\nexit 0\n")
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "SSDD_DATA_ROOT"}
    env["PATH"] = f"{fake_bin}:{env['PATH']}"
    result = subprocess.run(["bash", "scripts/install.sh"], cwd=project, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    recorded = project / ".venv" / "ssdd-data-root"
    assert recorded.read_text() == f"{data.resolve()}\n"
    assert f"export SSDD_DATA_ROOT={data.resolve()}" in result.stdout
    # ssdd run from that environment (activated or not: sys.prefix is the .venv) uses it when the variable is unset
    monkeypatch.delenv("SSDD_DATA_ROOT")
    monkeypatch.setattr(sys, "prefix", str(project / ".venv"))
    from ssdd.data import data_root

    assert data_root() == data.resolve()
    monkeypatch.setenv("SSDD_DATA_ROOT", str(tmp_path / "mine"))  # the variable still wins
    assert data_root() == tmp_path / "mine"


def test_an_unreadable_recorded_data_root_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSDD_DATA_ROOT")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    (tmp_path / "ssdd-data-root").write_bytes(b"\xff\xfe")
    line = user_error(capsys, ["datasets"])
    assert str(tmp_path / "ssdd-data-root") in line and "delete it" in line


class FakeResponse(io.BytesIO):
    """What urlopen returns, serving ``payload``."""

    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def serve(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> list[str]:
    """Make urlopen serve ``files`` (url -> bytes) and return the list of the urls it was asked for."""
    import urllib.request

    asked: list[str] = []

    def urlopen(url: str, timeout: float) -> FakeResponse:
        asked.append(url)
        return FakeResponse(files[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


def test_download_fetches_the_official_file_and_checks_its_md5(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                               data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from fixtures import make_cifar_data, write_cifar10_archive

    from ssdd.data import load_dataset

    data = make_cifar_data()
    payload = write_cifar10_archive(tmp_path / "upstream", data).read_bytes()
    url, name, published = DATASETS.get("cifar10").downloads[0]
    assert (name, len(published)) == ("cifar-10-python.tar.gz", 32)
    asked = serve(monkeypatch, {url: payload})
    # a file that is not the published one is refused, and nothing is left behind
    assert main(["datasets", "--download", "cifar10"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert line.startswith("ssdd: error: download of ") and url in line
    assert published in line and hashlib.md5(payload).hexdigest() in line
    assert list(data_dir.iterdir()) == []
    # the published one (here: the MD5 of our archive) is kept, and then found
    monkeypatch.setattr(DATASETS.get("cifar10"), "downloads", [(url, name, hashlib.md5(payload).hexdigest())])
    assert main(["datasets", "--download", "cifar10"]) == 0
    assert dataset_rows(capsys.readouterr().out)["cifar10"][0] == "available"
    assert (data_dir / name).read_bytes() == payload and asked == [url, url]
    assert load_dataset("cifar10", "train").images.shape[0] == len(data.train_labels)
    assert main(["datasets", "--download", "cifar10"]) == 0 and asked == [url, url]  # present: not fetched again


def test_download_names_are_checked_before_anything_is_fetched(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    asked = serve(monkeypatch, {})
    line = user_error(capsys, ["datasets", "--download", "mnist,cifar11"])
    assert "cifar11" in line and "Did you mean" in line and asked == []
    line = user_error(capsys, ["datasets", "--download", "digits"])
    public = [name for name in DATASETS.names() if DATASETS.get(name).downloads]
    assert f"'digits' has no public download (these have: {', '.join(public)})" in line and asked == []


def test_a_missing_dataset_says_how_to_download_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = user_error(capsys, [*TINY, "--dataset", "cifar10", "--out", str(tmp_path / "r")])
    assert "`ssdd datasets --download cifar10`" in line
    assert main(["datasets"]) == 0
    assert "(fetch it with: ssdd datasets --download cifar10)" in dataset_rows(capsys.readouterr().out)["cifar10"][1]
