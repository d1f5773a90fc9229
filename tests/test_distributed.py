"""Several processes (torch.distributed, gloo on CPU): work dealt round-robin, a 2-process evaluation that gives
the serial results, and clear refusals for what does not split yet."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import one_line, user_error
from ssdd.config import resolve_config
from ssdd.distributed import World, gather_objects, init_from_env, shard, world
from ssdd.errors import ConfigError
from ssdd.evaluation import EvaluationConfig, evaluate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_evaluation(teacher: str) -> list[dict]:
    """The tiny preset's linear protocol for none and random (2 seeds: 4 jobs), cells without their timings."""
    config = resolve_config(EvaluationConfig, "evaluate", "tiny", overrides={"device": "cpu"})
    cells = evaluate(config=config, baselines=["none", "random"], teacher=teacher, budget_images=20, progress=False)
    return [{k: v for k, v in c.to_dict().items() if k != "seconds"} for c in cells]


def _worker(rank: int, size: int, port: int, teacher: str, cache: str, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "SSDD_CACHE_DIR": cache})
    torch.set_num_threads(1)
    current = init_from_env("cpu")
    assert current == World(rank, size, rank)
    cells = tiny_evaluation(teacher)
    done = gather_objects(len(shard(list(range(4)), current)), current)
    if current.is_main:
        Path(out).write_text(json.dumps({"cells": cells, "jobs_per_rank": done}))
    dist.destroy_process_group()


def test_shard_deals_round_robin_and_covers_every_item_once() -> None:
    items = list("abcdefg")
    parts = [shard(items, World(r, 3)) for r in range(3)]
    assert parts[0] == [(0, "a"), (3, "d"), (6, "g")] and parts[1] == [(1, "b"), (4, "e")]
    assert sorted(i for part in parts for i, _ in part) == list(range(7))
    assert shard(items) == list(enumerate(items)) and world() == World()  # a single process takes everything
    assert gather_objects({"x": 1}) == [{"x": 1}]


def test_two_process_evaluation_gives_the_serial_results(tiny_teacher: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = tiny_evaluation(str(tiny_teacher))
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "cells.json"
    mp.spawn(_worker, args=(2, free_port(), str(tiny_teacher), os.environ["SSDD_CACHE_DIR"], str(out)), nprocs=2)
    record = json.loads(out.read_text())
    assert record["jobs_per_rank"] == [2, 2]  # the 4 jobs were split between the processes
    assert record["cells"] == serial


def test_commands_that_do_not_split_refuse_several_processes(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in (["distill", "--method", "krr-st", "--preset", "tiny", "--out", str(tmp_path)],
                 ["teacher", "--preset", "tiny", "--out", str(tmp_path)],
                 ["bench", "--suite", "tiny", "--out", str(tmp_path)]):
        line = user_error(capsys, argv)
        assert f"ssdd {argv[0]} does not split its work over processes yet" in line and "torchrun" in line
    assert not any(tmp_path.iterdir())


def test_a_half_described_world_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError) as info:
        init_from_env("cpu")
    assert "RANK, MASTER_ADDR, MASTER_PORT" in one_line(info.value) and "torchrun" in str(info.value)


def test_torchrun_evaluate_writes_the_serial_results_json_once(tiny_teacher: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    base = ["-m", "ssdd", "evaluate", "--baselines", "none,random", "--teacher", str(tiny_teacher), "--images", "20",
            "--preset", "tiny", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *base, "--out", str(tmp_path / "serial")], check=True, env=env,
                   capture_output=True)
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               "--master_port", str(free_port()), *base, "--out", str(tmp_path / "two")],
                              env=env, capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stdout.count("# ssdd evaluate") == 1  # one report, printed by rank 0

    def cells(folder: str) -> tuple[list[dict], dict]:
        record = json.loads((tmp_path / folder / "results.json").read_text())
        return [{k: v for k, v in c.items() if k != "seconds"} for c in record["cells"]], record["environment"]

    (serial, serial_env), (two, two_env) = cells("serial"), cells("two")
    assert two == serial and two_env["processes"] == "2" and "processes" not in serial_env
