"""The paired-rounds runner (``benchmarks/paired.py``): ratios, their median and spread, the table, real rounds."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import paired  # noqa: E402


def fake_round(index: int, a: float, b: float) -> dict:
    timing = lambda wall: {"wall_s": wall, "user_s": 0.0, "sys_s": 0.0, "peak_rss_mib": 10.0, "exit": 0}  # noqa: E731
    return {"round": index, "order": "ab", "load_before": 0.5, "load_after": 0.7, "a": timing(a), "b": timing(b)}


def test_summary_is_the_median_of_the_per_round_ratios() -> None:
    rounds = [fake_round(0, 2.0, 1.0), fake_round(1, 3.0, 1.0), fake_round(2, 10.0, 1.0)]
    summary = paired.summarise(rounds)
    assert summary["ratio_median"] == 3.0
    assert (summary["ratio_min"], summary["ratio_max"]) == (2.0, 10.0)
    assert (summary["a_median_s"], summary["b_median_s"]) == (3.0, 1.0)
    # the median of ratios, not the ratio of medians: the rounds pair the commands
    drift = [fake_round(0, 2.0, 1.0), fake_round(1, 4.0, 2.0), fake_round(2, 8.0, 4.0)]
    assert paired.summarise(drift)["ratio_median"] == 2.0


def test_markdown_table_has_a_row_per_round_and_the_summary() -> None:
    rounds = [fake_round(0, 2.0, 1.0), fake_round(1, 1.0, 2.0)]
    text = paired.markdown(rounds, paired.summarise(rounds), ("old", "new"))
    lines = text.splitlines()
    assert lines[0].startswith("| round | order | old s | new s | old/new |")
    assert "| 0 | AB | 2.00 | 1.00 | 2.000 |" in lines[2]
    assert "| 1 | AB | 1.00 | 2.00 | 0.500 |" in lines[3]
    assert "old/new: median **1.250** (min 0.500, max 2.000) over 2 rounds" in text


def test_rounds_alternate_the_order_and_stop_on_a_failure(tmp_path: Path) -> None:
    python = shlex.quote(sys.executable)
    rounds = paired.run_rounds(f"{python} -c pass", f"{python} -c pass", rounds=2, warmup=1)
    assert [r["round"] for r in rounds] == [0, 1] and [r["order"] for r in rounds] == ["ab", "ba"]
    assert all(r[w]["wall_s"] > 0 and r[w]["peak_rss_mib"] > 0 for r in rounds for w in "ab")
    with pytest.raises(RuntimeError, match="command B exited with 3"):
        paired.run_rounds(f"{python} -c pass", f"{python} -c 'raise SystemExit(3)'", rounds=1)


def test_main_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    python = shlex.quote(sys.executable)
    out = tmp_path / "paired.json"
    assert paired.main(["-a", f"{python} -c pass", "-b", f"{python} -c pass", "--rounds", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["summary"]["rounds"] == 1 and len(report["rounds"]) == 1
    assert {"cpu", "torch", "cpu_bf16_native", "commit"} <= set(report["machine"])
    assert "A/B: median" in capsys.readouterr().out
