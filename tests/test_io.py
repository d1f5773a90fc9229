"""Artefact I/O: safetensors with metadata, corrupt and forged files, atomic writes, checkpoints and run
directories."""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fixtures import ShellPayload, marker_command

from ssdd.errors import ArtefactError, ConfigError, RunFolderError, SsddError
from ssdd.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    load_tensors,
    locked,
    read_metadata,
    save_checkpoint,
    save_tensors,
)
from ssdd.runs import RunDir


def artefact_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    assert isinstance(excinfo.value, SsddError)
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g),
        "labels": torch.tensor([3, 1, 4, 1], dtype=torch.int64),
        "weights": torch.randn(5, 7, generator=g),
        "half": torch.randn(3, generator=g).to(torch.float16),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }


META = {"kind": "distilled", "classes": ["a", "b"], "ipc": 10, "space": {"mean": [0.5], "std": [0.25]}, "ok": True,
        "note": "ünïcode ✓", "none": None}


def test_save_load_tensors_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    tensors = sample_tensors()
    save_tensors(path, tensors, META)
    loaded, meta = load_tensors(path)
    assert meta == META
    assert read_metadata(path) == META
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype, name
        assert loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name


def test_save_tensors_non_contiguous_and_grad(tmp_path: Path) -> None:
    base = torch.arange(24.0).view(4, 6)
    w = torch.randn(3, 3, requires_grad=True)
    save_tensors(tmp_path / "y.safetensors", {"t": base.t(), "w": w}, {})
    loaded, meta = load_tensors(tmp_path / "y.safetensors")
    assert meta == {}
    assert torch.equal(loaded["t"], base.t())
    assert torch.equal(loaded["w"], w.detach())


def test_save_tensors_overwrites_and_leaves_no_tmp(tmp_path: Path) -> None:
    path = tmp_path / "z.safetensors"
    save_tensors(path, {"a": torch.zeros(2)}, {"v": 1})
    save_tensors(path, {"a": torch.ones(3)}, {"v": 2})
    loaded, meta = load_tensors(path)
    assert meta == {"v": 2} and torch.equal(loaded["a"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.safetensors"]


def test_read_metadata_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtefactError) as excinfo:
        read_metadata(tmp_path / "missing.safetensors")
    artefact_error(excinfo, "missing.safetensors", "does not exist")
    with pytest.raises(ArtefactError):
        load_tensors(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("keep", [0, 3, 8, 20, "half-header"])
def test_read_metadata_truncated_file(tmp_path: Path, keep: int | str) -> None:
    good = tmp_path / "good.safetensors"
    save_tensors(good, sample_tensors(), META)
    blob = good.read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    cut = 8 + header_len // 2 if keep == "half-header" else keep
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(blob[:cut])
    with pytest.raises(ArtefactError) as excinfo:
        read_metadata(bad)
    artefact_error(excinfo, str(bad))
    with pytest.raises(ArtefactError):
        load_tensors(bad)


def test_load_tensors_truncated_data(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_tensors(good, sample_tensors(), META)
    blob = good.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(blob[:-10])  # header intact, tensor bytes missing
    assert read_metadata(bad) == META  # the header alone is still readable
    with pytest.raises(ArtefactError) as excinfo:
        load_tensors(bad)
    artefact_error(excinfo, str(bad), "corrupt")


@pytest.mark.parametrize("length", [2**63, 2**40, 100 * 1024 * 1024 + 1, 10_000])
def test_read_metadata_forged_header_length(tmp_path: Path, length: int) -> None:
    bad = tmp_path / "forged.safetensors"
    bad.write_bytes(struct.pack("<Q", length) + b'{"__metadata__": {}}' + b"\0" * 64)
    with pytest.raises(ArtefactError) as excinfo:
        read_metadata(bad)
    artefact_error(excinfo, str(bad), str(length))


@pytest.mark.parametrize("seed", range(5))
def test_read_metadata_random_bytes(tmp_path: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    bad = tmp_path / "random.safetensors"
    bad.write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g).tolist()))
    with pytest.raises(ArtefactError) as excinfo:
        read_metadata(bad)
    artefact_error(excinfo, str(bad))
    with pytest.raises(ArtefactError):
        load_tensors(bad)


@pytest.mark.parametrize("header", [b"\xff\xfe not utf8 \x80", b"{not json", b"[1, 2, 3]", b'{"a": 1}',
                                    b'{"__metadata__": {"other": "x"}}', b'{"__metadata__": {"ssdd": "{oops"}}',
                                    b'{"__metadata__": {"ssdd": "[1]"}}', b'{"__metadata__": "str"}'])
def test_read_metadata_bad_header_content(tmp_path: Path, header: bytes) -> None:
    bad = tmp_path / "h.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ArtefactError) as excinfo:
        read_metadata(bad)
    artefact_error(excinfo, str(bad))


def test_read_metadata_forged_non_string_metadata(tmp_path: Path) -> None:
    # safetensors metadata values are strings; a forged file may put a number there.
    header = b'{"__metadata__": {"ssdd": 5}}'
    bad = tmp_path / "n.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ArtefactError) as excinfo:
        read_metadata(bad)
    artefact_error(excinfo, str(bad))


def test_safetensors_without_ssdd_metadata(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(ArtefactError) as excinfo:
        load_tensors(path)
    artefact_error(excinfo, str(path), "ssdd")


@pytest.mark.parametrize("kind", ["pickle", "torch-zip"])
def test_pickle_renamed_to_safetensors(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.safetensors"
    marker = tmp_path / "pwned"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"w": ShellPayload(marker_command(marker))}, protocol=2))
    else:
        torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(ArtefactError) as excinfo:
        read_metadata(path)
    artefact_error(excinfo, str(path), "safetensors")
    with pytest.raises(ArtefactError):
        load_tensors(path)
    assert not marker.exists()


# ---- limits on the JSON of a header and of the metadata -----------------------------------------------------


def with_header(tmp_path: Path, edit) -> Path:  # noqa: ANN001 - edits the header text of an intact file
    """An intact ssdd file whose JSON header text (a str) is replaced by ``edit(text)`` (str or bytes)."""
    good = tmp_path / "good.safetensors"
    save_tensors(good, {"w": torch.arange(4.0)}, {"kind": "distilled", "note": "x"})
    blob = good.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = edit(blob[8 : 8 + length].decode())
    header = header if isinstance(header, bytes) else header.encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + blob[8 + length :])
    return bad


def in_metadata(text: str, old: str, new: str) -> str:
    """``text`` (a header) with ``old`` replaced by ``new`` inside the ssdd metadata string."""
    header = json.loads(text)
    header["__metadata__"]["ssdd"] = header["__metadata__"]["ssdd"].replace(old, new)
    return json.dumps(header)


DEEP = "[" * 100_000 + "]" * 100_000
HOSTILE_JSON = {  # what the header becomes -> what the one-line error says
    "deep-header": (lambda t: t.rstrip()[:-1] + f', "x": {DEEP}}}', "header nests deeper than 64 levels"),
    "deep-metadata": (lambda t: in_metadata(t, '"x"', DEEP), "metadata (it nests deeper than 64 levels)"),
    "65-deep-metadata": (lambda t: in_metadata(t, '"x"', "[" * 65 + "]" * 65), "nests deeper than 64 levels"),
    "5000-digit-header": (lambda t: t.rstrip()[:-1] + ', "x": ' + "9" * 5000 + "}",
                          "integer of 5000 digits, more than 40"),
    "5000-digit-metadata": (lambda t: in_metadata(t, '"x"', "-" + "1" * 5000), "integer of 5000 digits"),
    "surrogate-value": (lambda t: in_metadata(t, '"x"', '"\\ud800"'), "not valid Unicode: a lone surrogate"),
    "surrogate-key": (lambda t: in_metadata(t, '"note"', '"\\udce9"'), "not valid Unicode: a lone surrogate"),
    "surrogate-tensor-name": (lambda t: t.replace('"w"', '"\\udfff"'), "not valid Unicode: a lone surrogate"),
    "latin-1-byte": (lambda t: t.encode().replace(b'\\"x\\"', b'\\"\xe9\\"'), "header is not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
def test_hostile_json_is_one_clear_error(tmp_path: Path, case: str) -> None:
    edit, words = HOSTILE_JSON[case]
    bad = with_header(tmp_path, edit)
    with pytest.raises(ArtefactError) as excinfo:
        read_metadata(bad)
    assert "\n" not in artefact_error(excinfo, str(bad), words)
    with pytest.raises(ArtefactError):
        load_tensors(bad)


def test_json_within_the_limits_is_read(tmp_path: Path) -> None:
    """64 levels, 40-digit integers and any valid Unicode (non-ASCII, astral) are legitimate metadata."""
    deep: list = []
    for _ in range(62):  # 63 lists inside the metadata mapping: 64 levels in all
        deep = [deep]
    meta = {"deep": deep, "big": -(10**39), "text": "ünïcode ✓ 𝄞"}
    save_tensors(tmp_path / "ok.safetensors", {"w": torch.zeros(1)}, meta)
    assert read_metadata(tmp_path / "ok.safetensors") == meta


def test_hostile_json_through_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ssdd.cli import main

    bad = with_header(tmp_path, lambda t: in_metadata(t, '"x"', DEEP))
    assert main(["show", str(bad), "--grid", str(tmp_path / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"ssdd: error: {bad} has corrupt ssdd metadata (it nests deeper than 64 levels)"]
    assert not (tmp_path / "grid.png").exists()


# ---- atomic writes ------------------------------------------------------------------------------------------


def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "one")
    assert target.read_text() == "one"
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]


def test_atomic_write_failure_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            assert tmp != target and tmp.parent == target.parent
            with open(tmp, "wb") as fh:
                fh.write(b"half of the new")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_write_failure_without_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_save_tensors_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.safetensors"
    save_tensors(path, {"x": torch.ones(2)}, {"v": 1})
    before = path.read_bytes()

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_tensors(path, {"x": torch.zeros(5)}, {"v": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


# ---- checkpoints --------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_with_rng_states(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(42)
    torch.rand(3, generator=gen)
    state = {
        "step": 17,
        "loss": 0.125,
        "name": "run-a",
        "model": {"w": torch.randn(4, 4), "b": torch.zeros(4)},
        "history": [1.0, 0.5, 0.25],
        "torch_rng": torch.get_rng_state(),
        "generator": gen.get_state(),
        "flags": (True, None),
    }
    path = tmp_path / "ckpt" / "checkpoint.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded.keys() == state.keys()
    assert loaded["step"] == 17 and loaded["loss"] == 0.125 and loaded["name"] == "run-a"
    assert loaded["history"] == [1.0, 0.5, 0.25] and loaded["flags"] == (True, None)
    for k in ("w", "b"):
        assert torch.equal(loaded["model"][k], state["model"][k])
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])
    assert loaded["generator"].dtype == torch.uint8
    # Restoring the generator state continues the same random stream.
    expected_next = torch.rand(5, generator=gen)
    restored = torch.Generator()
    restored.set_state(loaded["generator"])
    assert torch.equal(torch.rand(5, generator=restored), expected_next)
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]


def test_load_checkpoint_missing(tmp_path: Path) -> None:
    with pytest.raises(ArtefactError) as excinfo:
        load_checkpoint(tmp_path / "nope.pt")
    artefact_error(excinfo, "nope.pt", "does not exist")


@pytest.mark.parametrize("kind", ["torch-save", "raw-pickle"])
def test_load_checkpoint_malicious_pickle_does_not_execute(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"step": 1, "evil": ShellPayload(marker_command(marker))}
    path = tmp_path / "checkpoint.pt"
    if kind == "torch-save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    with pytest.raises(ArtefactError) as excinfo:
        load_checkpoint(path)
    artefact_error(excinfo, str(path))
    assert not marker.exists(), "the malicious checkpoint ran code"


@pytest.mark.parametrize("content", [b"", b"garbage" * 50], ids=["empty", "garbage"])
def test_load_checkpoint_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(ArtefactError) as excinfo:
        load_checkpoint(path)
    artefact_error(excinfo, str(path), "corrupt")


def test_load_checkpoint_truncated(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"w": torch.randn(64, 64)})
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ArtefactError) as excinfo:
        load_checkpoint(path)
    artefact_error(excinfo, str(path))


# ---- run directories ----------------------------------------------------------------------------------------


@dataclass
class Sub:
    lr: float = 0.1
    compile: bool = False


@dataclass
class RunCfg:
    steps: int = 10
    seed: int = 0
    device: str = "cpu"
    sizes: tuple[int, int] = (1, 2)
    sub: Sub = field(default_factory=Sub)


@pytest.fixture
def close_run_logs():
    """Close the log file handlers RunDir opens, so no file stays open after a test."""
    runs: list[RunDir] = []
    yield runs
    for run in runs:
        for handler in list(run.logger.handlers):
            handler.close()
            run.logger.removeHandler(handler)


def new_run(path: Path, runs: list[RunDir]) -> RunDir:
    run = RunDir(path)
    runs.append(run)
    return run


def test_run_start_writes_config(tmp_path: Path, close_run_logs: list) -> None:
    run = new_run(tmp_path / "run", close_run_logs)
    cfg = RunCfg(steps=5, sub=Sub(lr=0.01))
    run.start(cfg)
    import yaml

    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written == {"steps": 5, "seed": 0, "device": "cpu", "sizes": [1, 2], "sub": {"lr": 0.01, "compile": False}}
    run.log("hello world")
    for handler in run.logger.handlers:
        handler.flush()
    assert "hello world" in (tmp_path / "run" / "run.log").read_text()


def test_run_metrics_are_json_lines(tmp_path: Path, close_run_logs: list) -> None:
    run = new_run(tmp_path / "run", close_run_logs)
    run.start(RunCfg())
    assert run.read_metrics() == []
    run.metrics(step=1, loss=0.5)
    run.metrics(step=2, loss=0.25, note="x")
    lines = run.metrics_path.read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 0.5), (2, 0.25)]
    assert records[1]["note"] == "x" and all(isinstance(r["time"], float) for r in records)
    assert run.read_metrics() == records


def test_resume_with_same_config(tmp_path: Path, close_run_logs: list) -> None:
    new_run(tmp_path / "run", close_run_logs).start(RunCfg(steps=7))
    new_run(tmp_path / "run", close_run_logs).start(RunCfg(steps=7), resume=True)


def test_resume_with_changed_config_names_the_key(tmp_path: Path, close_run_logs: list) -> None:
    new_run(tmp_path / "run", close_run_logs).start(RunCfg(steps=7))
    original = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ConfigError) as excinfo:
        new_run(tmp_path / "run", close_run_logs).start(RunCfg(steps=8, sub=Sub(lr=0.5)), resume=True)
    message = artefact_error(excinfo, "steps", "sub", str(tmp_path / "run"))
    assert "seed" not in message and "device" not in message
    assert (tmp_path / "run" / "config.yaml").read_text() == original  # the original record is kept


def test_resume_ignore_allows_listed_keys(tmp_path: Path, close_run_logs: list) -> None:
    new_run(tmp_path / "run", close_run_logs).start(RunCfg(steps=10))
    new_run(tmp_path / "run", close_run_logs).start(RunCfg(steps=20), resume=True, ignore=("steps",))
    with pytest.raises(ConfigError) as excinfo:
        new_run(tmp_path / "run", close_run_logs).start(RunCfg(steps=30, seed=1), resume=True, ignore=("steps",))
    artefact_error(excinfo, "seed")


def test_execution_settings_never_count_at_any_depth(tmp_path: Path, close_run_logs: list) -> None:
    import yaml

    new_run(tmp_path / "run", close_run_logs).start(RunCfg(device="cpu"))
    path = tmp_path / "run" / "config.yaml"
    recorded = yaml.safe_load(path.read_text())
    del recorded["sub"]["compile"]  # recorded before the setting existed
    path.write_text(yaml.safe_dump(recorded))
    run = new_run(tmp_path / "run", close_run_logs)
    assert run.differences(RunCfg(device="cuda", sub=Sub(compile=True))) == []
    assert run.differences(RunCfg(device="cuda", sub=Sub(lr=0.5, compile=True))) == ["sub.lr"]


def test_a_setting_added_since_the_record_counts_only_away_from_its_default(tmp_path: Path,
                                                                          close_run_logs: list) -> None:
    import yaml

    new_run(tmp_path / "run", close_run_logs).start(RunCfg())
    path = tmp_path / "run" / "config.yaml"
    recorded = yaml.safe_load(path.read_text())
    del recorded["seed"]  # recorded before the setting existed
    path.write_text(yaml.safe_dump(recorded))
    run = new_run(tmp_path / "run", close_run_logs)
    assert run.differences(RunCfg(), defaults=RunCfg()) == []
    assert run.differences(RunCfg(seed=3), defaults=RunCfg()) == ["seed"]
    assert run.differences(RunCfg()) == ["seed"]  # without defaults nothing is known about the missing key
    run.start(RunCfg(), resume=True, defaults=RunCfg())
    with pytest.raises(ConfigError) as excinfo:
        new_run(tmp_path / "run2", close_run_logs).start(RunCfg())
        (tmp_path / "run2" / "config.yaml").write_text(yaml.safe_dump(recorded))
        new_run(tmp_path / "run2", close_run_logs).start(RunCfg(seed=3), resume=True, defaults=RunCfg())
    artefact_error(excinfo, "seed")


def test_start_without_resume_refuses_a_run_and_overwrite_replaces_it(tmp_path: Path, close_run_logs: list) -> None:
    import yaml

    new_run(tmp_path / "run", close_run_logs).start(RunCfg(steps=1))
    with pytest.raises(RunFolderError) as excinfo:
        new_run(tmp_path / "run", close_run_logs).start(RunCfg(steps=2))
    assert "--resume" in str(excinfo.value) and "--overwrite" in str(excinfo.value)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["steps"] == 1
    new_run(tmp_path / "run", close_run_logs).start(RunCfg(steps=2), overwrite=True)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["steps"] == 2


def test_load_checkpoint_truncates_later_metrics(tmp_path: Path, close_run_logs: list) -> None:
    run = new_run(tmp_path / "run", close_run_logs)
    run.start(RunCfg())
    assert run.load_checkpoint() is None
    run.metrics(step=1, loss=1.0)
    run.metrics(step=2, loss=0.9)
    run.save_checkpoint({"step": 2, "w": torch.arange(3)})
    kept = run.read_metrics()
    run.metrics(step=3, loss=0.8)
    run.metrics(step=4, loss=0.7)
    assert len(run.read_metrics()) == 4
    resumed = new_run(tmp_path / "run", close_run_logs)
    resumed.start(RunCfg(), resume=True)
    state = resumed.load_checkpoint()
    assert state["step"] == 2 and torch.equal(state["w"], torch.arange(3))
    assert resumed.read_metrics() == kept
    assert [r["step"] for r in resumed.read_metrics()] == [1, 2]
    resumed.metrics(step=3, loss=0.85)
    assert [r["step"] for r in resumed.read_metrics()] == [1, 2, 3]


def test_resume_after_crash_mid_metrics_line(tmp_path: Path, close_run_logs: list) -> None:
    # A run killed while appending a metrics line leaves half a line after the checkpoint; resuming drops it.
    run = new_run(tmp_path / "run", close_run_logs)
    run.start(RunCfg())
    run.metrics(step=1, loss=1.0)
    run.save_checkpoint({"step": 1})
    kept = run.read_metrics()
    with open(run.metrics_path, "a") as fh:
        fh.write('{"time": 1.0, "step": 2, "lo')
    resumed = new_run(tmp_path / "run", close_run_logs)
    resumed.start(RunCfg(), resume=True)
    assert resumed.load_checkpoint()["step"] == 1
    assert resumed.read_metrics() == kept


def test_run_load_checkpoint_malicious(tmp_path: Path, close_run_logs: list) -> None:
    run = new_run(tmp_path / "run", close_run_logs)
    run.start(RunCfg())
    marker = tmp_path / "pwned"
    torch.save({"metrics_lines": 0, "x": ShellPayload(marker_command(marker))}, run.checkpoint_path)
    with pytest.raises(ArtefactError):
        run.load_checkpoint()
    assert not marker.exists()


def test_run_logger_does_not_propagate(tmp_path: Path, close_run_logs: list, caplog: pytest.LogCaptureFixture) -> None:
    run = new_run(tmp_path / "run", close_run_logs)
    run.start(RunCfg())
    with caplog.at_level(logging.INFO):
        run.log("private")
    assert "private" not in caplog.text


def test_locked_excludes_another_process_until_released(tmp_path: Path) -> None:
    lock = tmp_path / "sub" / ".lock"
    probe = ("import fcntl, sys\n"
             "with open(sys.argv[1], 'a') as fh:\n"
             "    try:\n        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "    except BlockingIOError:\n        sys.exit(3)\n")

    def other_process_gets_it() -> bool:
        code = subprocess.run([sys.executable, "-c", probe, str(lock)], check=False).returncode
        assert code in (0, 3)
        return code == 0

    with locked(lock):
        assert not other_process_gets_it()
    assert other_process_gets_it()
