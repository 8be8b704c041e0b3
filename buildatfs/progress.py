"""A progress line for long commands (scrub, estimate) on stderr.

On a terminal the line is rewritten in place a few times a second and erased
at the end; otherwise (a log file, a pipe) a plain line is printed at most
once a minute, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Generic, TypeVar

State = TypeVar("State")

TTY_INTERVAL = 0.25
PLAIN_INTERVAL = 60.0


class ProgressLine(Generic[State]):
    """Call with a state object; *describe* turns it into the line's text."""

    def __init__(self, what: str, describe: Callable[[State], str]) -> None:
        self.what = what
        self.describe = describe
        self.tty = sys.stderr.isatty()
        self._last = time.monotonic()
        self._shown = False

    def __call__(self, state: State) -> None:
        now = time.monotonic()
        if now - self._last < (TTY_INTERVAL if self.tty else PLAIN_INTERVAL):
            return
        self._last = now
        if self.tty:
            sys.stderr.write(f"\r\033[K{self.what}: {self.describe(state)}")
            self._shown = True
        else:
            sys.stderr.write(f"{self.what}: {self.describe(state)}\n")
        sys.stderr.flush()

    def done(self) -> None:
        """Erase the line on a terminal, so the report starts on a clean line."""
        if self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
