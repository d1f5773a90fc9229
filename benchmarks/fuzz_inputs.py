"""The malformed-input fuzz campaign at scale: every category of ``tests/test_malformed_input.py`` with many examples.

Each category's hypothesis strategy generates cases (generation only: no shrinking, and the tests' explicit
regression examples are not repeated here); each case runs through the CLI in-process and is judged by the same
checks as the tests (exit status 2, one ``ssdd: error:`` line naming the culprit, no traceback or warning, no output
files, no pickle payload run, no large allocation; or, where damage cannot be seen, a success that read the intact
content).  Prints, and with ``--out`` writes, a JSON table: per category the cases tried, handled correctly (refused,
or accepted as intact) and the first few problems.

    OMP_NUM_THREADS=1 python benchmarks/fuzz_inputs.py --examples 100 --out docs/results/reliability-fuzz.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"


def run_category(name: str, examples: int, seed: int) -> dict:
    """Generate ``examples`` cases of category ``name`` and judge each."""
    import test_malformed_input as fuzz
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    strategy, build = fuzz.CATEGORIES[name]
    record = {"tried": 0, "handled": 0, "refused": 0, "accepted": 0, "problems": []}

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(spec=strategy)
    def trial(spec: object) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            status, problems = fuzz.run_case(build(spec, Path(tmp)))
        record["tried"] += 1
        record["handled"] += not problems
        record["refused"] += not problems and status != 0
        record["accepted"] += not problems and status == 0  # damage no check can see, read as the intact original
        if problems and len(record["problems"]) < 5:
            record["problems"].append({"case": repr(spec)[:400], "problems": problems})

    started = time.monotonic()
    trial()
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100, help="cases per category (default 100)")
    parser.add_argument("--categories", help="comma-separated categories (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON table here (e.g. docs/results/reliability-fuzz.json)")
    args = parser.parse_args()
    from ssdd.environment import environment

    where = environment(torch.device("cpu"))  # before the run: the commit whose code is tested
    with tempfile.TemporaryDirectory() as scratch:  # the tests' isolation: no cache or data root of the user's
        os.environ["SSDD_CACHE_DIR"] = str(Path(scratch) / "cache")
        os.environ["SSDD_DATA_ROOT"] = str(Path(scratch) / "data")
        sys.path.insert(0, str(TESTS))
        logging.basicConfig(handlers=[logging.NullHandler()])  # the CLI's own basicConfig then adds nothing
        import test_malformed_input as fuzz

        names = args.categories.split(",") if args.categories else list(fuzz.CATEGORIES)
        table = {}
        for name in names:
            table[name] = run_category(name, args.examples, args.seed)
            row = table[name]
            print(f"{name:<28} {row['handled']:>5} / {row['tried']:<5} handled ({row['refused']} refused, "
                  f"{row['accepted']} accepted intact)  {row['seconds']} s", flush=True)
    total = {"tried": sum(r["tried"] for r in table.values()), "handled": sum(r["handled"] for r in table.values())}
    command = "OMP_NUM_THREADS=1 python " + " ".join(["benchmarks/fuzz_inputs.py", *sys.argv[1:]])
    report = {"command": command, "environment": where, "examples_per_category": args.examples,
              "seed": args.seed, "total": total, "categories": table}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
