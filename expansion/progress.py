"""Progress lines for logs that nobody watches live: a job's output sent to a file (a sweep, SLURM, ``nohup``)
shows no progress bar, so every long loop (generation, fits, training) logs what is done, its pace and the
time left, at most one line per :attr:`ProgressLog.every` seconds plus the first and the last."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

#: the default seconds between two progress lines of one loop (a job sets it from ``progress_every_s``)
EVERY_SECONDS = 30.0


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(round(seconds) // 60, 60)
    return f"{hours} h {rest:02d} min"


class ProgressLog:
    """``update(done)`` logs ``<what>: <done>/<total> <unit> (<pct>), <rate> <unit>/s, <elapsed>, ETA <left>``
    on the first call, the last (``done == total``) and at most every ``every`` seconds between; the
    pace is measured from when the log was made (make it just before the loop)."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str,
        logger: logging.Logger,
        *,
        every: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.what, self.total, self.unit, self.logger, self.clock = what, int(total), unit, logger, clock
        self.every = EVERY_SECONDS if every is None else float(every)
        self.started = clock()
        self.last_line: float | None = None
        self.lines = 0

    def update(self, done: int, detail: str = "") -> bool:
        """Logs a line when one is due; returns whether it did."""
        now = self.clock()
        final = done >= self.total
        if not final and self.last_line is not None and now - self.last_line < self.every:
            return False
        self.last_line = now
        self.lines += 1
        self.logger.info("%s", self.line(done, now - self.started, detail))
        return True

    def line(self, done: int, elapsed: float, detail: str = "") -> str:
        total = max(self.total, 1)
        text = f"{self.what}: {done:,}/{self.total:,} {self.unit} ({100 * done / total:.0f}%)"
        if detail:
            text += f", {detail}"
        if done > 0 and elapsed > 0:
            text += f", {done / elapsed:,.1f} {self.unit}/s, {duration(elapsed)}"
            text += " (done)" if done >= self.total else f", ETA {duration(elapsed * (self.total - done) / done)}"
        return text
