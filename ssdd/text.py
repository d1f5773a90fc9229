"""Escaping of text that came from files (a set's metadata, names) before it reaches a terminal or a report
(Markdown, HTML, a plot)."""

from __future__ import annotations

import html
import unicodedata

# control (C0, DEL, C1: ESC, BEL, CSI...), format (bidi overrides, zero-width), surrogate, line/paragraph separators
_UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def terminal_safe(text: str) -> str:
    """``text`` with every character that can move the cursor, change the terminal, reorder the line or break it
    written as a visible escape (``\\x1b``, ``\\n``, ``\\u202e``); printable Unicode is kept as it is."""
    return "".join(_escape(ch) if unicodedata.category(ch) in _UNSAFE else ch for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def markdown_cell(text: str) -> str:
    """``text`` as one cell of a Markdown table: on one line (see :func:`terminal_safe`), with backslashes, ``|``
    and ``<`` escaped so it can neither end its cell nor open an HTML tag."""
    return terminal_safe(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def plot_text(text: str) -> str:
    """``text`` as a matplotlib label or title: on one line, with ``$`` escaped so it never starts mathtext (whose
    parse errors would fail the whole plot)."""
    return terminal_safe(text).replace("$", r"\$")


def html_text(text: str) -> str:
    """``text`` for an HTML page, as element content or a quoted attribute value: on one line (see
    :func:`terminal_safe`), with ``&``, ``<``, ``>``, ``"`` and ``'`` as entities, so it can open no tag."""
    return html.escape(terminal_safe(text), quote=True)
