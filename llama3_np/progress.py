"""A progress line on standard error for a prefill that takes a while: terminals only.

Shown once the work has run for more than `SHOW_AFTER_SECONDS`, redrawn in place (`\\r`), and
wiped when the work ends, so that what follows starts on a clean line. Nothing is written when
standard error is not a terminal (a log file or a pipe gets no control characters).
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

SHOW_AFTER_SECONDS = 1.0


class ProgressLine:
    def __init__(self, label: str, stream: Optional[TextIO] = None):
        self.label, self.stream = label, stream or sys.stderr
        self.on = self.stream.isatty()
        self.start = time.perf_counter()
        self.width = 0

    def update(self, done: int, total: int) -> None:
        """`done` of `total` units finished."""
        if not self.on or time.perf_counter() - self.start <= SHOW_AFTER_SECONDS:
            return
        line = f"{self.label} {done}/{total} tokens ({100 * done / total:.0f}%)"
        self.width = max(self.width, len(line))
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()

    def clear(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
