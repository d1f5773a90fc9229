"""Paired rounds: two shell commands A and B timed side by side, each run in its own process.

Round i runs A then B (odd rounds B then A, so neither always runs first), records each command's wall seconds,
user and system CPU seconds and peak resident memory (from ``wait4``, which covers the shell and everything it
waited for), the load average before and after the round, and the ratio A/B of the round's wall times. On a
shared machine the seconds drift with the other jobs; the ratio of two commands run back to back drifts much
less, so the claim to quote is the median of the per-round ratios, with its spread (minimum to maximum).

    python benchmarks/paired.py --rounds 5 -a 'python bench.py --old' -b 'python bench.py --new' --json out.json

The report also records the machine: CPU model, logical CPUs, torch version, whether oneDNN has native bf16
(``torch.ops.mkldnn._is_mkldnn_bf16_supported()``), the thread settings and the git commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any


def run_once(command: str, output: IO | int = subprocess.DEVNULL) -> dict[str, float]:
    """Run ``command`` in a shell; its wall, user and system seconds, peak RSS (MiB) and exit status."""
    start = time.perf_counter()
    child = subprocess.Popen(command, shell=True, stdout=output, stderr=output)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return {"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024, "exit": child.returncode}


def summarise(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Median, minimum and maximum of the per-round ratios A/B, and the median seconds of A and of B."""
    ratios = [r["a"]["wall_s"] / r["b"]["wall_s"] for r in rounds]
    return {"rounds": len(rounds), "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "a_median_s": statistics.median(r["a"]["wall_s"] for r in rounds),
            "b_median_s": statistics.median(r["b"]["wall_s"] for r in rounds)}


def machine() -> dict[str, Any]:
    """What the numbers depend on: CPU model, CPUs, load, thread settings, torch and its bf16 support, commit."""
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
                            "threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                                            if k in os.environ}}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        try:
            info["cpu_bf16_native"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            info["cpu_bf16_native"] = False
    except ImportError:
        info["torch"] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        info["commit"] = commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def run_rounds(a: str, b: str, rounds: int, warmup: int = 0, output: IO | int = subprocess.DEVNULL,
               echo: IO | None = None) -> list[dict[str, Any]]:
    """``warmup`` uncounted rounds, then ``rounds`` counted ones; each round runs A and B in alternating order.
    Stops with RuntimeError when a command fails (its timings would mean nothing)."""
    done = []
    for index in range(-warmup, rounds):
        order = "ab" if index % 2 == 0 else "ba"
        load_before = os.getloadavg()[0]
        result = {}
        for which in order:
            result[which] = run_once(a if which == "a" else b, output)
            if result[which]["exit"] != 0:
                raise RuntimeError(f"command {which.upper()} exited with {result[which]['exit']} in round {index}")
        record = {"round": index, "order": order, "load_before": load_before, "load_after": os.getloadavg()[0],
                  **result}
        if echo is not None:
            kind = "warm-up" if index < 0 else "round"
            print(f"{kind} {index}: A {result['a']['wall_s']:.2f} s, B {result['b']['wall_s']:.2f} s, "
                  f"A/B {result['a']['wall_s'] / result['b']['wall_s']:.3f}", file=echo, flush=True)
        if index >= 0:
            done.append(record)
    return done


def markdown(rounds: list[dict[str, Any]], summary: dict[str, float], names: tuple[str, str] = ("A", "B")) -> str:
    """The rounds as a markdown table, then the median ratio and its spread."""
    a, b = names
    lines = [f"| round | order | {a} s | {b} s | {a}/{b} | {a} peak MiB | {b} peak MiB | {a} sys s | {b} sys s "
             "| load before / after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rounds:
        ra, rb = r["a"], r["b"]
        lines.append(f"| {r['round']} | {r['order'].upper()} | {ra['wall_s']:.2f} | {rb['wall_s']:.2f} "
                     f"| {ra['wall_s'] / rb['wall_s']:.3f} | {ra['peak_rss_mib']:,.0f} | {rb['peak_rss_mib']:,.0f} "
                     f"| {ra['sys_s']:.2f} | {rb['sys_s']:.2f} | {r['load_before']:.2f} / {r['load_after']:.2f} |")
    lines.append("")
    lines.append(f"{a}/{b}: median **{summary['ratio_median']:.3f}** (min {summary['ratio_min']:.3f}, max "
                 f"{summary['ratio_max']:.3f}) over {summary['rounds']} rounds; median {a} "
                 f"{summary['a_median_s']:.2f} s, {b} {summary['b_median_s']:.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-a", required=True, help="command A (a shell command line)")
    parser.add_argument("-b", required=True, help="command B (a shell command line)")
    parser.add_argument("--rounds", type=int, default=5, help="counted rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=0, help="uncounted rounds first (default 0)")
    parser.add_argument("--names", default="A,B", help="the two commands' names in the table (default A,B)")
    parser.add_argument("--json", type=Path, help="also write the rounds, summary and machine here")
    parser.add_argument("--log", type=Path, help="append the commands' output here (default: discarded)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be at least 1 and --warmup at least 0")
    names = tuple(args.names.split(","))
    if len(names) != 2:
        parser.error("--names takes two names separated by a comma")
    info = machine()
    print(f"machine: {json.dumps(info)}", file=sys.stderr)
    with open(args.log, "a") if args.log else open(os.devnull, "w") as output:
        try:
            rounds = run_rounds(args.a, args.b, args.rounds, args.warmup, output, echo=sys.stderr)
        except RuntimeError as exc:
            print(f"paired: {exc}", file=sys.stderr)
            return 1
    summary = summarise(rounds)
    print(markdown(rounds, summary, names))
    if args.json:
        args.json.write_text(json.dumps({"a": args.a, "b": args.b, "names": names, "machine": info,
                                         "summary": summary, "rounds": rounds}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
