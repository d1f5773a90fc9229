"""Report pages written from one list of blocks twice: as Markdown (``report.md``) and as one self-contained HTML
file (``report.html``: its PNG plots and image grids embedded, every text escaped)."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path

from ssdd.text import html_text, markdown_cell


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    """Text; spans between backticks are code."""

    text: str


@dataclass
class Code:
    lines: list[str]
    language: str = ""


@dataclass
class Table:
    """A header and rows of cell texts; ``strong`` holds the (row, column) of the cells shown in bold."""

    header: list[str]
    rows: list[list[str]]
    strong: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class Image:
    """A PNG file, ``path`` relative to the page's folder."""

    alt: str
    path: str


Block = Heading | Paragraph | Code | Table | Image
_NUMBER = re.compile(r"[-+]?\d")


def markdown(blocks: list[Block]) -> str:
    """The blocks as Markdown (table cells escaped by :func:`ssdd.text.markdown_cell`)."""
    return "\n\n".join(_markdown(block) for block in blocks) + "\n"


def _markdown(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Code):
        return "\n".join([f"```{block.language}", *block.lines, "```"])
    if isinstance(block, Table):
        def row(cells: list[str], r: int) -> str:
            texts = [f"**{markdown_cell(c)}**" if (r, i) in block.strong else markdown_cell(c)
                     for i, c in enumerate(cells)]
            return "| " + " | ".join(texts) + " |"

        return "\n".join([row(block.header, -1), "| " + " | ".join("---" for _ in block.header) + " |",
                          *(row(cells, r) for r, cells in enumerate(block.rows))])
    return f"![{block.alt}]({block.path})"


STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1b1b1b; background: #fff; margin: 0; }
main { max-width: 72rem; margin: 0 auto; padding: 1.5rem 2rem 4rem; }
h1 { font-size: 1.7rem; } h2 { font-size: 1.35rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.1rem; }
table { border-collapse: collapse; margin: 0.8rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; white-space: nowrap; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f2f2f2; }
tbody tr:nth-child(even) { background: #fafafa; }
pre { background: #f6f6f6; padding: 0.7rem; overflow-x: auto; font-size: 13px; }
code { font-size: 0.92em; }
img { max-width: 100%; display: block; margin: 0.8rem 0; }
"""


def html(blocks: list[Block], title: str, folder: str | Path) -> str:
    """The blocks as one HTML page with its images (read from ``folder``) embedded as base64 PNG; a missing image
    is named in its place."""
    body = "\n".join(_html(block, Path(folder)) for block in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html_text(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


def _html(block: Block, folder: Path) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{_inline(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Code):
        return "<pre><code>" + "\n".join(html_text(line) for line in block.lines) + "</code></pre>"
    if isinstance(block, Table):
        head = "".join(f"<th>{html_text(c)}</th>" for c in block.header)
        rows = "\n".join("<tr>" + "".join(_cell(c, (r, i) in block.strong) for i, c in enumerate(cells)) + "</tr>"
                         for r, cells in enumerate(block.rows))
        return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>"
    path = folder / block.path
    if not path.is_file():
        return f"<p>(image {html_text(block.path)} is missing)</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html_text(block.alt)}" src="data:image/png;base64,{data}">'


def _cell(text: str, strong: bool) -> str:
    """A table cell; one that starts with a number is aligned right."""
    content = f"<strong>{html_text(text)}</strong>" if strong else html_text(text)
    return f'<td class="number">{content}</td>' if _NUMBER.match(text) else f"<td>{content}</td>"


def _inline(text: str) -> str:
    """Escaped text with its backtick spans as ``<code>``."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick is text
        parts = [*parts[:-2], parts[-2] + "`" + parts[-1]]
    return "".join(f"<code>{html_text(p)}</code>" if i % 2 else html_text(p) for i, p in enumerate(parts))
