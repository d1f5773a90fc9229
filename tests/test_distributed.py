"""Several processes (torch.distributed, gloo on CPU): work dealt round-robin, 2-process evaluations and suites that
give the serial results, and clear refusals for what does not split yet."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import matching_config, one_line

from ssdd.config import resolve_config
from ssdd.distributed import World, gather_objects, init_from_env, leave, shard, world
from ssdd.errors import ConfigError
from ssdd.evaluation import EvaluationConfig, evaluate
from ssdd.evaluation.journal import journal_files
from ssdd.io import load_checkpoint, read_metadata
from ssdd.methods import Distillation, DistillConfig, engine
from ssdd.methods.trajectory import experts as expert_module
from ssdd.methods.trajectory.experts import ExpertSettings, ExpertStore, train_experts
from ssdd.models import create_model
from ssdd.teachers import TeacherConfig, train_teacher
from ssdd.teachers import train as train_module
from ssdd.teachers.losses import SSL_LOSSES, make_projector
from ssdd.teachers.train import SSLModel, distributed_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, size: int, port: int, cache: str | None = None) -> World:
    """In a spawned worker: describe the world as torchrun would, use one thread, and join the process group."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if cache is not None:
        os.environ["SSDD_CACHE_DIR"] = cache
    torch.set_num_threads(1)
    return init_from_env("cpu")


def one_thread(work, *args: object) -> Any:  # noqa: ANN001 - any callable
    """``work(*args)`` with one intra-op thread, as each spawned worker uses, so the float results compare."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return work(*args)
    finally:
        torch.set_num_threads(threads)


def tiny_evaluation(teacher: str, journal: Path | None = None) -> list[dict]:
    """The tiny preset's linear protocol for none and random (2 seeds: 4 jobs), cells without their timings."""
    config = resolve_config(EvaluationConfig, "evaluate", "tiny", overrides={"device": "cpu"})
    cells = evaluate(config=config, baselines=["none", "random"], teacher=teacher, budget_images=20, progress=False,
                     journal=journal)
    return [{k: v for k, v in c.to_dict().items() if k != "seconds"} for c in cells]


def _worker(rank: int, size: int, port: int, teacher: str, cache: str, out: str) -> None:
    current = join(rank, size, port, cache)
    assert current == World(rank, size, rank)
    cells = tiny_evaluation(teacher)
    done = gather_objects(len(shard(list(range(4)), current)), current)
    if current.is_main:
        Path(out).write_text(json.dumps({"cells": cells, "jobs_per_rank": done}))
    leave(finished=True)  # a barrier first: gloo aborts a process whose peer has gone


def test_shard_deals_round_robin_and_covers_every_item_once() -> None:
    items = list("abcdefg")
    parts = [shard(items, World(r, 3)) for r in range(3)]
    assert parts[0] == [(0, "a"), (3, "d"), (6, "g")] and parts[1] == [(1, "b"), (4, "e")]
    assert sorted(i for part in parts for i, _ in part) == list(range(7))
    assert shard(items) == list(enumerate(items)) and world() == World()  # a single process takes everything
    assert gather_objects({"x": 1}) == [{"x": 1}]


def test_two_process_evaluation_gives_the_serial_results(tiny_teacher: Path, tmp_path: Path) -> None:
    serial = one_thread(tiny_evaluation, str(tiny_teacher))
    out = tmp_path / "cells.json"
    mp.spawn(_worker, args=(2, free_port(), str(tiny_teacher), os.environ["SSDD_CACHE_DIR"], str(out)), nprocs=2)
    record = json.loads(out.read_text())
    assert record["jobs_per_rank"] == [2, 2]  # the 4 jobs were split between the processes
    assert record["cells"] == serial


BENCH_SUITE = """
teacher: {preset: tiny}
sets:
  paa: {preset: paa/tiny, config: {monitor: {every: -1}, settings: {steps: 10, amp: false}}}  # float32 on any CPU
  herding: {preset: coreset/tiny}
  dmssl: {preset: dm-ssl/tiny}
evaluations:
  linear: {preset: tiny, config: {seeds: [0]}, baselines: [none]}
"""


def _set_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "distilled.safetensors"))


def _bench_cells(folder: Path) -> dict[tuple[str, float], list[float]]:
    record = json.loads((folder / "report.json").read_text())
    return {(c["entry"], c["fraction"]): c["accuracies"] for c in record["evaluations"]["linear"]}


def test_torchrun_bench_deals_sets_and_gives_the_serial_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes: the PAA set made by both (its real batches shared), the two other sets dealt one to each
    process (bit-identical to the serial run's), every evaluation cell as serial, one report."""
    import subprocess
    import sys

    from ssdd.bench import run_suite

    monkeypatch.setenv("SSDD_PRECISION", "float32")  # both runs: bf16 (where native) would swamp the comparison

    suite = tmp_path / "suite.yaml"
    suite.write_text(BENCH_SUITE)
    one_thread(lambda: run_suite(str(suite), tmp_path / "serial", device="cpu", progress=False))
    serial, two = tmp_path / "serial" / "suite", tmp_path / "two" / "suite"
    two.mkdir(parents=True)
    shutil.copytree(serial / "teacher", two / "teacher")  # the teacher's data-parallel run is tested on its own
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               "--master_port", str(free_port()), "-m", "ssdd", "bench", "--suite", str(suite),
                               "--out", str(tmp_path / "two"), "--device", "cpu", "--no-progress"],
                              env=env, capture_output=True, text=True)

    launched = launch()
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.count("# ssdd bench: suite") == 1  # one report, printed by process 0
    assert launched.stdout.count("set paa: distilling with paa") == 1  # made by both, said by process 0
    # the queue: the two other sets and the setless `none` entry, each done by one process alone
    for line in ("set herding: distilling with coreset on process ", "set dmssl: distilling with dm-ssl on process ",
                 "linear / none: linear protocol, seeds [0] on process "):
        assert launched.stdout.count(line) == 1, line
    again = launch()
    assert again.returncode == 0, again.stderr
    for line in ("set paa: reusing", "set herding: reusing", "set dmssl: reusing", "linear / none: reusing"):
        assert again.stdout.count(line) == 1, line
    assert "on process" not in again.stdout  # nothing to make: no queue
    shutil.rmtree(two / "sets" / "dmssl")
    ended = subprocess.Popen(["true"])
    ended.wait()
    stale = two / f".queue-{socket.gethostname()}-{ended.pid}-0f"  # left by a killed run on this machine
    elsewhere = two / ".queue-another-host-1-0f"  # may belong to a live run on another node sharing the folder
    stale.write_text("1")
    elsewhere.write_text("1")
    remade = launch()
    assert remade.returncode == 0, remade.stderr
    for line in ("set dmssl: distilling with dm-ssl on process ", "linear / none: reusing", "set herding: reusing"):
        assert remade.stdout.count(line) == 1, line  # the queue held only the set: `none` was evaluated already
    assert list(two.glob(".queue-*")) == [elsewhere]  # this run's counter and the killed run's are gone
    for name in ("herding", "dmssl"):
        made, reference = _set_tensors(two / "sets" / name), _set_tensors(serial / "sets" / name)
        assert made.keys() == reference.keys() and all(torch.equal(made[k], reference[k]) for k in made), name
    paa, reference = _set_tensors(two / "sets" / "paa"), _set_tensors(serial / "sets" / "paa")
    for key, tensor in reference.items():  # 10 Adam steps on shares of the real batch summed in another order
        assert float((paa[key] - tensor).abs().max()) <= 5e-3 * float(tensor.abs().max()), key  # 30 steps: <= 1.5e-3
    cells, serial_cells = _bench_cells(two), _bench_cells(serial)
    assert cells.keys() == serial_cells.keys() == {(e, f) for e in ("paa", "herding", "dmssl", "none")
                                                   for f in (0.1, 1.0)}
    assert {k: v for k, v in cells.items() if k[0] != "paa"} == {k: v for k, v in serial_cells.items()
                                                                  if k[0] != "paa"}
    stages = json.loads((two / "stages.json").read_text())
    assert {"set paa", "set herding", "set dmssl"} <= set(stages)  # the dealt sets' times reach process 0
    assert all((two / "sets" / name / "grid.png").is_file() for name in ("paa", "herding", "dmssl"))


def _threads() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))


def _leave_worker(rank: int, size: int, port: int, out: str) -> None:
    join(rank, size, port)
    import torch.distributed.nn  # noqa: F401 - as torch._dynamo does on first use, after the group exists
    joined = _threads()
    gather_objects(torch.full((3,), float(rank)))  # a collective whose work holds Python-owned tensors
    leave(finished=True)
    Path(out, f"{rank}.json").write_text(json.dumps({"joined": joined, "left": _threads()}))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads through /proc")
def test_leaving_releases_the_group_and_its_threads_before_the_interpreter_exits(tmp_path: Path) -> None:
    # a group kept alive past leave() kept its gloo threads, which aborted the process at exit now and then
    # ("terminate called without an active exception"): a thread released a finished work while Python shut down
    mp.spawn(_leave_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        counts = json.loads((tmp_path / f"{rank}.json").read_text())
        assert counts["left"] < counts["joined"], counts


def test_alone_makes_a_process_a_world_of_its_own() -> None:
    from ssdd.distributed import alone

    assert world() == World()
    with alone():
        assert world() == World() and shard(list("ab")) == [(0, "a"), (1, "b")]
    assert world() == World()


def test_a_bad_process_timeout_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssdd.distributed import timeout_minutes

    monkeypatch.setenv("SSDD_PROCESS_TIMEOUT_MINUTES", "90")
    assert timeout_minutes() == 90.0
    for value in ("soon", "0", "-5"):
        monkeypatch.setenv("SSDD_PROCESS_TIMEOUT_MINUTES", value)
        with pytest.raises(ConfigError) as info:
            timeout_minutes()
        assert one_line(info.value) == f"SSDD_PROCESS_TIMEOUT_MINUTES={value!r} is not a positive number of minutes"


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
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.count("# ssdd evaluate") == 1  # one report, printed by rank 0

    def cells(folder: str) -> tuple[list[dict], dict]:
        record = json.loads((tmp_path / folder / "results.json").read_text())
        return [{k: v for k, v in c.items() if k != "seconds"} for c in record["cells"]], record["environment"]

    (serial, serial_env), (two, two_env) = cells("serial"), cells("two")
    assert two == serial and two_env["processes"] == "2" and "processes" not in serial_env


def test_torchrun_evaluate_resumes_a_serial_runs_journal_without_redoing_its_jobs(tiny_teacher: Path,
                                                                                   tmp_path: Path) -> None:
    import subprocess
    import sys

    journal = tmp_path / "two" / ".jobs"  # where `ssdd evaluate --out two` keeps its journal
    serial = one_thread(tiny_evaluation, str(tiny_teacher), journal)
    (file,) = journal_files(journal)
    header, first, *_ = file.read_text().splitlines()
    job = json.loads(first)  # job 0: none, seed 0; its accuracies are replaced by a value no run gives
    assert job["job"] == 0 and job["results"][0][:2] == ["none", "convnet"]
    job["results"] = [[*r[:4], 99.0, r[5]] for r in job["results"]]
    file.write_text(f"{header}\n{json.dumps(job)}\n")  # as if killed after its first job
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               "--master_port", str(free_port()), "-m", "ssdd", "evaluate", "--baselines",
                               "none,random", "--teacher", str(tiny_teacher), "--images", "20", "--preset", "tiny",
                               "--device", "cpu", "--no-progress", "--out", str(tmp_path / "two")],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr
    assert "[evaluate] resuming: 1 of 4 jobs finished before" in launched.stdout
    record = json.loads((tmp_path / "two" / "results.json").read_text())
    two = [{k: v for k, v in c.items() if k != "seconds"} for c in record["cells"]]
    expected = [{**c, "accuracies": [99.0, c["accuracies"][1]]} if c["entry"] == "none" else c for c in serial]
    assert [{k: v for k, v in c.items() if k not in ("mean", "std")} for c in two] == \
        [{k: v for k, v in c.items() if k not in ("mean", "std")} for c in expected]
    assert journal_files(journal) == []  # removed once results.json holds the results


# ---- the teacher: data-parallel training ------------------------------------------------------------------------

def _tiny_ssl_model() -> SSLModel:
    """A BatchNorm-free backbone and a one-layer projector, so the gradient depends only on the global batch."""
    torch.manual_seed(0)
    backbone = create_model("convnet", in_channels=3, image_size=8, widths=[4, 8], norm="none")
    return SSLModel(backbone, make_projector(backbone.feature_dim, [16]))


def _views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g)


def _ddp_gradient_worker(rank: int, size: int, port: int, loss_name: str, out: str) -> None:
    current = join(rank, size, port)
    model = _tiny_ssl_model()
    ddp = distributed_model(model, current, cuda=False)
    v1, v2 = _views()
    share = slice(rank * 4, (rank + 1) * 4)  # each process its contiguous half of the global batch
    z = ddp(torch.cat([v1[share], v2[share]]))
    SSL_LOSSES[loss_name]()(*z.chunk(2)).backward()
    if current.is_main:
        torch.save({n: p.grad.clone() for n, p in model.named_parameters()}, out)
    leave(finished=True)  # a barrier first: gloo aborts a process whose peer has gone


@pytest.mark.parametrize("loss_name", ["barlow-twins", "simclr"])
def test_ddp_teacher_gradient_equals_the_single_process_gradient_of_the_global_batch(loss_name: str,
                                                                                     tmp_path: Path) -> None:
    model = _tiny_ssl_model()
    v1, v2 = _views()
    z = model(torch.cat([v1, v2]))
    SSL_LOSSES[loss_name]()(*z.chunk(2)).backward()
    single = {n: p.grad.clone() for n, p in model.named_parameters()}
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_gradient_worker, args=(2, free_port(), loss_name, str(out)), nprocs=2)
    ddp = torch.load(out)
    assert set(ddp) == set(single)
    for name, grad in single.items():
        assert float(grad.abs().max()) > 0, name
        torch.testing.assert_close(ddp[name], grad, rtol=1e-4, atol=1e-7, msg=name)


class Stop(Exception):
    """Stands for the processes being killed."""


def _teacher_worker(rank: int, size: int, port: int, out: str, cache: str) -> None:
    join(rank, size, port, cache)
    original = train_module._TeacherTraining.train_step

    def stopping(self, batch):  # noqa: ANN001, ANN202
        if self.step == 2 * self.steps_per_epoch + 1:  # after two epochs' checkpoints
            raise Stop
        return original(self, batch)

    train_module._TeacherTraining.train_step = stopping
    try:
        train_teacher(_teacher_config(), out, progress=False)
    except Stop:
        pass
    dist.barrier()
    leave(finished=True)  # a barrier first: gloo aborts a process whose peer has gone


def _teacher_config() -> TeacherConfig:
    return resolve_config(TeacherConfig, "teacher", "tiny", overrides={
        "device": "cpu", "epochs": 3, "probe": False, "monitor_every": 0, "checkpoint_minutes": 0.0})


def test_a_two_process_teacher_checkpoint_resumes_in_one_process(tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    mp.spawn(_teacher_worker, args=(2, free_port(), str(out), os.environ["SSDD_CACHE_DIR"]), nprocs=2)
    state = load_checkpoint(out / "checkpoint.pt")
    steps_per_epoch = 320 // 64  # the tiny preset: 320 synthetic training images, global batches of 64
    assert state["step"] == 2 * steps_per_epoch and not (out / "teacher.safetensors").exists()
    path = train_teacher(_teacher_config(), out, resume=True, progress=False)
    assert read_metadata(path)["epochs_trained"] == 3
    assert f"resumed at step {state['step']}" in (out / "run.log").read_text()


# ---- distillation: the kernel-ridge family shares each step's real batch -----------------------------------------

def _krr_config(teacher: str) -> DistillConfig:
    return resolve_config(DistillConfig, "distill", "krr-st/tiny", overrides={
        "teacher": teacher, "device": "cpu", "monitor": {"every": -1},
        "settings": {"steps": 1, "real_batch": 32, "teacher_copies": 0, "real_augment": "none",
                     "amp": False}})  # float32 everywhere: bf16 (on CPUs that have it) would swamp the comparison


def _krr_step(teacher: str) -> dict[str, dict[str, torch.Tensor]]:
    """One step of the tiny KRR-ST run: the gradient it applied to each learned tensor, and the tensors after it."""
    distillation = Distillation(_krr_config(teacher), None, progress=False)
    distillation.run()
    learned = distillation.method.learned
    return {"grad": {k: v.grad.clone() for k, v in learned.items()}, "after": {k: v.detach().clone()
                                                                              for k, v in learned.items()}}


def _krr_worker(rank: int, size: int, port: int, teacher: str, cache: str, out: str) -> None:
    current = join(rank, size, port, cache)
    every_rank = gather_objects(_krr_step(teacher), current)
    if current.is_main:
        torch.save(every_rank, out)
    leave(finished=True)  # a barrier first: gloo aborts a process whose peer has gone


def test_a_distributed_krr_st_step_is_the_single_process_step(tiny_teacher: Path, tmp_path: Path) -> None:
    """The gradient is compared with the single process's (the tensors after the step only across processes:
    Adam's first step divides each entry by |g| + eps, which turns float-order differences in entries whose
    gradient is near eps into visible ones)."""
    single = one_thread(_krr_step, str(tiny_teacher))
    out = tmp_path / "steps.pt"
    mp.spawn(_krr_worker, args=(2, free_port(), str(tiny_teacher), os.environ["SSDD_CACHE_DIR"], str(out)),
             nprocs=2)
    first, second = torch.load(out)
    for name, grad in single["grad"].items():
        assert float(grad.abs().max()) > 0, name
        # the mean of the two halves' gradients is the whole real batch's gradient, to float32 rounding of
        # sums taken in another order (measured: up to 2e-5 of the gradient's largest entry)
        torch.testing.assert_close(first["grad"][name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()),
                                   msg=name)
        # and both processes applied the same step to the same tensors
        assert torch.equal(first["grad"][name], second["grad"][name]), name
        assert torch.equal(first["after"][name], second["after"][name]), name


# ---- distillation: trajectory matching deals its segments to the processes ---------------------------------------

def _mkdt_iteration(teacher: str, experts: str) -> dict[str, torch.Tensor]:
    """One iteration of the tiny MKDT run with two segments: the gradients it applied and its reported loss."""
    config = matching_config("mkdt", Path(experts), Path(teacher), images=10,
                             settings={"iterations": 1, "segments": 2, "experts": {"num_experts": 2}})
    distillation = Distillation(config, None, progress=False)
    distillation.run()
    method = distillation.method
    return {"images": method.images.grad.clone(), "targets": method.targets.grad.clone(),
            "syn_lr": method.syn_lr.grad.clone(), "after": method.images.detach().clone()}


def _mkdt_worker(rank: int, size: int, port: int, teacher: str, experts: str, cache: str, out: str) -> None:
    current = join(rank, size, port, cache)
    every_rank = gather_objects(_mkdt_iteration(teacher, experts), current)
    if current.is_main:
        torch.save(every_rank, out)
    leave(finished=True)  # a barrier first: gloo aborts a process whose peer has gone


def test_two_processes_matching_one_segment_each_give_the_single_process_iteration(tiny_teacher: Path,
                                                                                   tmp_path: Path) -> None:
    experts = str(tmp_path / "experts")
    single = one_thread(_mkdt_iteration, str(tiny_teacher), experts)  # trains the experts both then read
    out = tmp_path / "iteration.pt"
    mp.spawn(_mkdt_worker, args=(2, free_port(), str(tiny_teacher), experts, os.environ["SSDD_CACHE_DIR"], str(out)),
             nprocs=2)
    first, second = torch.load(out)
    for name in ("images", "targets", "syn_lr"):
        grad = single[name]
        assert float(grad.abs().max()) > 0, name
        # the sum of the two processes' segment gradients is the single process's sum, to float32 rounding
        torch.testing.assert_close(first[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)
        assert torch.equal(first[name], second[name]), name
    assert torch.equal(first["after"], second["after"])


def test_matching_under_torchrun_needs_a_segment_per_process(tiny_teacher: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from ssdd.methods.trajectory import matching
    monkeypatch.setattr(engine, "world", lambda: World(0, 2))
    monkeypatch.setattr(matching, "world", lambda: World(0, 2))
    config = matching_config("mkdt", tmp_path / "experts", tiny_teacher, images=10,
                             settings={"iterations": 1, "experts": {"num_experts": 1}})
    with pytest.raises(ConfigError) as info:
        Distillation(config, None, progress=False)
    assert "set settings.segments to at least the number of processes (2), now 1" in one_line(info.value)


def test_methods_that_do_not_split_refuse_several_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "world", lambda: World(0, 2))
    with pytest.raises(ConfigError) as info:
        Distillation(resolve_config(DistillConfig, "distill", "dm/tiny", overrides={"device": "cpu"}), None)
    message = one_line(info.value)
    assert "method dm does not split over processes yet" in message and "krr-st" in message and "paa" in message


# ---- trajectory-matching experts: dealt to the processes ---------------------------------------------------------

def _expert_data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(7, 3, 8, 8), torch.randn(7, 4)


def _expert_settings() -> ExpertSettings:
    return ExpertSettings(num_experts=3, epochs=2, arch="convnet", arch_args={"widths": [4], "norm": "none"},
                          lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=3, parallel=1)


def _experts_worker(rank: int, size: int, port: int, out: str) -> None:
    join(rank, size, port)
    images, targets = _expert_data()
    trained: list[int] = []
    original = expert_module.make_network

    def counting(settings: ExpertSettings, outputs: int, shape: tuple[int, int, int], seed: int) -> torch.nn.Module:
        trained.append(seed)
        return original(settings, outputs, shape, seed)

    expert_module.make_network = counting
    store = train_experts(out, _expert_settings(), images, targets, "mse", seed=4, progress=False)
    counts = gather_objects(len(trained))
    if rank == 0:
        (Path(out) / "counts.json").write_text(json.dumps({"counts": counts, "experts": len(store)}))
    leave(finished=True)  # a barrier first: gloo aborts a process whose peer has gone


def test_two_processes_share_the_experts_and_train_the_serial_ones(tmp_path: Path) -> None:
    images, targets = _expert_data()
    serial = one_thread(train_experts, tmp_path / "serial", _expert_settings(), images, targets, "mse", 4, "cpu",
                        None, False)
    mp.spawn(_experts_worker, args=(2, free_port(), str(tmp_path / "two")), nprocs=2)
    record = json.loads((tmp_path / "two" / "counts.json").read_text())
    assert record == {"counts": [2, 1], "experts": 3}  # experts 0 and 2 on process 0, expert 1 on process 1
    two = ExpertStore(tmp_path / "two", 3)
    for k in range(3):
        for epoch in range(3):
            mine, theirs = two.params(k, epoch), serial.params(k, epoch)
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)


# ---- decoupled recovery: the classes are dealt to the processes ---------------------------------------------------

def _scdd_config(teacher: str) -> DistillConfig:
    """The tiny SC-DD run: 2 images per class, 4 recovery iterations each (8 steps), a checkpoint after every step."""
    return resolve_config(DistillConfig, "distill", "scdd/tiny", overrides={
        "teacher": teacher, "device": "cpu", "monitor": {"every": -1}, "checkpoint_minutes": 0,
        "settings": {"iterations": 4}})


def _scdd_worker(rank: int, size: int, port: int, teacher: str, cache: str, out: str, stop_at: int) -> None:
    current = join(rank, size, port, cache)
    distillation = Distillation(_scdd_config(teacher), Path(out) / "run", progress=False)
    original = distillation.method.step

    def step(index: int) -> dict[str, float]:
        if index == stop_at:
            raise Stop
        return original(index)

    distillation.method.step = step
    try:
        images = distillation.run().tensors["images"]
    except Stop:
        images = None
    every_rank = gather_objects(images if images is None else images.clone(), current)
    if current.is_main:
        torch.save(every_rank, Path(out) / "images.pt")
    leave(finished=True)  # a barrier first: gloo aborts a process whose peer has gone


def test_two_process_recovery_gives_the_serial_images_and_resumes_in_one_process(tiny_teacher: Path,
                                                                                tmp_path: Path) -> None:
    serial = one_thread(lambda: Distillation(_scdd_config(str(tiny_teacher)), tmp_path / "serial",
                                             progress=False).run().tensors["images"])
    port, cache = free_port(), os.environ["SSDD_CACHE_DIR"]
    mp.spawn(_scdd_worker, args=(2, port, str(tiny_teacher), cache, str(tmp_path / "two"), -1), nprocs=2)
    first, second = torch.load(tmp_path / "two" / "images.pt")
    assert torch.equal(first, second)  # every process applied the same step to the whole batch
    # the whole batch's BatchNorm statistics are sums of the two halves' (float32 sums in another order; measured:
    # 7e-5 of images up to 2.1)
    torch.testing.assert_close(first, serial, rtol=1e-3, atol=1e-3)

    mp.spawn(_scdd_worker, args=(2, free_port(), str(tiny_teacher), cache, str(tmp_path / "killed"), 5), nprocs=2)
    assert load_checkpoint(tmp_path / "killed" / "run" / "checkpoint.pt")["step"] == 5
    resumed = one_thread(lambda: Distillation(_scdd_config(str(tiny_teacher)), tmp_path / "killed" / "run",
                                              resume=True, progress=False).run().tensors["images"])
    torch.testing.assert_close(resumed, serial, rtol=1e-3, atol=1e-3)
