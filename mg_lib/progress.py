"""Logs and progress on stderr: stdout carries only results, so pipelines stay clean."""

from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    """One log line on stderr (rank 0 only under torchrun)."""
    from . import distributed as dist

    if dist.is_main():
        print(msg, file=sys.stderr, flush=True)


class Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second.

    It is drawn only when stderr is a terminal: logs and CI output get the per-epoch summary
    line instead of a wall of carriage returns.
    """

    def __init__(self, label: str, total: int):
        from . import distributed as dist

        self.label, self.total, self.done = label, total, 0
        self.enabled = sys.stderr.isatty() and dist.is_main()
        self.t0 = self.last = time.perf_counter()
        self.note = ""

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self.note = note or self.note
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.1 or self.done >= self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        width = 24
        frac = self.done / max(self.total, 1)
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {self.note} "
                         f"eta {eta:.0f}s\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
