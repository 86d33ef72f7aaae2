"""What `mirror warm` and `export` show while they work: on a terminal, a bar per transfer
redrawn in place; piped, one plain line per finished transfer and per image."""

from __future__ import annotations

import io
import logging
import sys
import time
from dataclasses import dataclass
from typing import Protocol

from ..maintenance import human

REDRAW_SECONDS = 0.1
BAR = 24


@dataclass
class _Transfer:
    label: str
    total: int | None
    done: int = 0


class Stream(Protocol):
    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...
    def isatty(self) -> bool: ...


class LogLines(io.TextIOBase):
    """A stream whose lines go to a logger: the server's background warming reports what a
    terminal would show, one log line each."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self._log.info("%s", line)
        return len(text)

    def isatty(self) -> bool:
        return False


class Display:
    def __init__(self, stream: Stream | None = None) -> None:
        self.stream: Stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._transfers: dict[str, _Transfer] = {}
        self._drawn_lines = 0
        self._drawn_at = 0.0

    def start(self, key: str, label: str, total: int | None) -> None:
        self._transfers[key] = _Transfer(label, total)
        self._draw()

    def advance(self, key: str, amount: int) -> None:
        transfer = self._transfers.get(key)
        if transfer is not None:
            transfer.done += amount
            self._draw()

    def finish(self, key: str, line: str) -> None:
        self._transfers.pop(key, None)
        self.say(line)

    def say(self, line: str) -> None:
        """A line that stays (above the bars on a terminal)."""
        self._clear()
        self.stream.write(line + "\n")
        self.stream.flush()
        self._draw(force=True)

    def close(self) -> None:
        self._clear()

    def _clear(self) -> None:
        if self.live and self._drawn_lines:
            self.stream.write(f"\x1b[{self._drawn_lines}F\x1b[J")
            self._drawn_lines = 0

    def _draw(self, force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < REDRAW_SECONDS:
            return
        self._drawn_at = now
        self._clear()
        lines = []
        for transfer in self._transfers.values():
            if transfer.total:
                share = min(transfer.done / transfer.total, 1.0)
                bar = "#" * int(share * BAR)
                amount = f"{human(transfer.done)} / {human(transfer.total)}"
                lines.append(f"{transfer.label} [{bar:<{BAR}}] {amount}")
            else:
                lines.append(f"{transfer.label} {human(transfer.done)}")
        for line in lines:
            self.stream.write(line[:200] + "\n")
        self._drawn_lines = len(lines)
        self.stream.flush()
