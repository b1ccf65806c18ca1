"""A small progress display for long CLI commands, with no dependency.

On a terminal it is one line redrawn in place (a carriage return), at most ten times a second:
`[#####.....]  5,000/10,000 cards  2,345/s`. Anywhere else (a pipe, CI, a test) a redrawn line
would be noise in a log, so it writes a plain count line every `plain_every` items instead.
Messages written through `message()` never end up glued to the bar.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 10
REDRAW_INTERVAL = 0.1
PLAIN_EVERY = 10_000
_CLEAR_LINE = "\r\x1b[K"


class Progress:
    """Counts items done and shows the count on a stream (stderr in the CLI)."""

    def __init__(  # noqa: PLR0913  every knob is keyword-only and defaulted
        self,
        stream: TextIO,
        *,
        total: int | None = None,
        unit: str = "cards",
        interactive: bool | None = None,
        plain_every: int = PLAIN_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Interactive defaults to whether the stream is a terminal."""
        self._stream = stream
        self._total = total
        self._unit = unit
        self._interactive = stream.isatty() if interactive is None else interactive
        self._plain_every = plain_every
        self._clock = clock
        self._started = clock()
        self._drawn_at: float | None = None
        self._bar_shown = False
        self.done = 0

    def advance(self, count: int) -> None:
        """Record count more items done and redraw if it is time."""
        before, self.done = self.done, self.done + count
        if self._interactive:
            now = self._clock()
            if not self._bar_shown or now - (self._drawn_at or 0.0) >= REDRAW_INTERVAL:
                self._draw(now)
        elif self._plain_every and before // self._plain_every < self.done // self._plain_every:
            self._write(f"{self.done:,} {self._unit} so far ({self.rate():,.0f}/s)\n")

    def message(self, text: str) -> None:
        """Write a line; a bar is cleared first and is back on the next advance, not per line."""
        if self._bar_shown:
            self._stream.write(_CLEAR_LINE)
            self._bar_shown = False
        self._write(text + "\n")

    def close(self) -> None:
        """Draw the final state and end the bar's line, leaving the terminal clean."""
        if self._interactive and self._drawn_at is not None:
            self._draw(self._clock())
            self._write("\n")
            self._bar_shown = False

    def elapsed(self) -> float:
        """Seconds since the display was created."""
        return self._clock() - self._started

    def rate(self) -> float:
        """Items per second so far."""
        return self.done / max(self.elapsed(), 1e-9)

    def render(self) -> str:
        """The bar line as it is drawn now, without the carriage return."""
        count = f"{self.done:,}"
        bar = ""
        if self._total:
            filled = min(BAR_WIDTH, BAR_WIDTH * self.done // self._total)
            bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}]  "
            count = f"{self.done:,}/{max(self._total, self.done):,}"
        return f"{bar}{count} {self._unit}  {self.rate():,.0f}/s"

    def _draw(self, now: float) -> None:
        self._drawn_at = now
        self._stream.write(_CLEAR_LINE + self.render())
        self._stream.flush()
        self._bar_shown = True

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()
