"""The documentation works as written: every ``ssdd`` command in the ```` ```bash ```` blocks of
docs/getting-started.md runs (the guide uses the ``tiny`` presets, so they take seconds), in order, in one folder;
the README's Python example runs; and every relative link of README.md and docs/*.md points to a file that exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ssdd.cli import main

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "getting-started.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def fenced(path: Path, language: str) -> list[str]:
    """The text of every fenced block of ``language`` in ``path``."""
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def ssdd_commands(block: str) -> list[list[str]]:
    """The ``ssdd ...`` command lines of a shell block (continuation lines joined, comments dropped) as argv."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip().startswith("ssdd ")]


def test_every_command_of_the_getting_started_guide_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    commands = [argv for block in fenced(GUIDE, "bash") for argv in ssdd_commands(block)]
    assert len(commands) >= 6 and {argv[1] for argv in commands} >= {"teacher", "distill", "evaluate", "show",
                                                                       "bench"}
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        assert argv[1] in ("datasets", "models", "show") or "tiny" in argv, f"not a tiny-preset command: {argv}"
        status = main(argv[1:])
        out = capsys.readouterr()
        assert status == 0, f"{shlex.join(argv)} failed ({status}):\n{out.out}\n{out.err}"


def test_the_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    (example,) = fenced(ROOT / "README.md", "python")
    assert len(example.splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})  # noqa: S102 - the project's own README
    out = capsys.readouterr().out
    assert "bytes" in out and "none" in out and "random" in out and "paa" in out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file(page: Path) -> None:
    targets = [t.split("#")[0] for t in LINK.findall(page.read_text())
               if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"
