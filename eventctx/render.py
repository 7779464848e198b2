"""How the command line shows things to people and scripts: aligned tables with control
characters escaped and long values shortened, times absolute and relative, colour only on a
terminal (never with ``NO_COLOR``), and JSON for every result type."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import orjson

from eventctx.findings import ABSENT, DELETED

__all__ = ["Progress", "Style", "json_bytes", "plain", "printable", "shorten", "table", "when"]

_ESCAPES: Final = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0))}
"""C0 controls, DEL and C1 controls, each as its Python escape (``\\x1b``, ``\\n``)."""

WIDTH: Final = 60
"""How many characters of a value a table shows."""


def printable(text: str) -> str:
    """``text`` with control characters escaped: a stored string can neither drive the terminal
    (escape sequences) nor break a line of a table. Other characters are left alone."""
    return text.translate(_ESCAPES)


def plain(value: Any) -> Any:
    """``value`` as plain JSON data: result records as dicts, times as ISO strings, bytes (the
    chain hashes) as hex, the ``ABSENT``/``DELETED`` markers as null/"<deleted>", exceptions as
    their type and message."""
    if value is ABSENT:
        return None
    if value is DELETED:
        return "<deleted>"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    if isinstance(value, bytes):  # chain hashes
        return value.hex()
    if isinstance(value, (set, frozenset)):
        return sorted(plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def json_bytes(document: Any, *, indent: bool = True) -> bytes:
    """One JSON document (indented for people reading ``--json``; compact for JSON Lines)."""
    option = orjson.OPT_INDENT_2 if indent else 0
    return orjson.dumps(plain(document), option=option | orjson.OPT_NON_STR_KEYS)


def shorten(value: Any, width: int = WIDTH) -> str:
    """``value`` as one line of JSON, cut to ``width`` characters with an ellipsis."""
    text = printable(orjson.dumps(plain(value), option=orjson.OPT_NON_STR_KEYS).decode())
    return text if len(text) <= width else text[: width - 1] + "…"


def when(at: datetime | None, now: datetime | None = None) -> str:
    """An absolute UTC time with how long ago it was: ``2026-11-27 01:02:03 (5m ago)``."""
    if at is None:
        return "-"
    now = now or datetime.now(UTC)
    seconds = (now - at).total_seconds()
    ago = "in the future" if seconds < 0 else f"{_span(seconds)} ago"
    return f"{at:%Y-%m-%d %H:%M:%S} ({ago})"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], style: Style | None = None
) -> list[str]:
    """Aligned lines: a header, then a row per item (cells escaped; a status cell coloured)."""
    cells = [[printable(str(c)) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        out = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        if style is not None:
            out = [style.status(cell) for cell in out]
        return "  ".join(out).rstrip()

    return [line(list(headers)), *(line(r) for r in cells)]


class Style:
    """Colour for a terminal: on only when the stream is a terminal and ``NO_COLOR`` is unset."""

    _COLOURS: Final = {
        "completed": "32",
        "ok": "32",
        "failed": "31",
        "interrupted": "33",
        "running": "36",
        "FAILED": "31",
    }

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.on = stream.isatty() and "NO_COLOR" not in os.environ

    def status(self, cell: str) -> str:
        """``cell`` coloured when it is a status word (padding kept)."""
        code = self._COLOURS.get(cell.strip())
        return f"\x1b[{code}m{cell}\x1b[0m" if self.on and code else cell


class Progress:
    """A long command's progress on a terminal: after ``delay`` seconds, one line on stderr,
    rewritten twice a second, with the rows read so far and the time taken; erased at the end.
    Nothing at all when stderr is not a terminal, or for a command that ends sooner."""

    def __init__(
        self, label: str, rows: Callable[[], int], stream: TextIO = sys.stderr, delay: float = 1.0
    ) -> None:
        self._label, self._rows, self._stream, self._delay = label, rows, stream, delay
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False

    def __enter__(self) -> Progress:
        if self._stream.isatty():
            self._thread = threading.Thread(
                target=self._show, name="eventctx-progress", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()

    def _show(self) -> None:
        started = time.monotonic()
        if self._done.wait(self._delay):
            return
        while not self._done.is_set():
            seconds = time.monotonic() - started
            self._stream.write(
                f"\r\x1b[K{self._label}: {self._rows():,} rows read, {seconds:.0f} s"
            )
            self._stream.flush()
            self._shown = True
            self._done.wait(0.5)
