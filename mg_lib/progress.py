"""Logs and progress on stderr: stdout carries only results, so pipelines stay clean."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any


def log(msg: str) -> None:
    """One log line on stderr (rank 0 only under torchrun)."""
    from . import distributed as dist

    if dist.is_main():
        print(msg, file=sys.stderr, flush=True)


class Progress:
    """A per-epoch progress bar on stderr (rich, which typer brings), used as a context.

    It is drawn only when stderr is a terminal and only on rank 0: logs and CI output get the
    per-epoch summary line instead of a wall of redraws. The bar is transient, so the summary
    line takes its place when the epoch ends, is interrupted or fails.
    """

    def __init__(self, label: str, total: int):
        from . import distributed as dist

        self._bar: Any = None
        if sys.stderr.isatty() and dist.is_main():
            import rich.progress as rp
            from rich.console import Console

            self._bar = rp.Progress(
                rp.TextColumn(label), rp.BarColumn(), rp.MofNCompleteColumn(),
                rp.TextColumn("{task.fields[note]}"), rp.TimeRemainingColumn(),
                console=Console(stderr=True), transient=True, refresh_per_second=10)
            self._task = self._bar.add_task(label, total=total, note="")

    @property
    def enabled(self) -> bool:
        """Whether a bar is drawn (callers skip building notes nobody sees)."""
        return self._bar is not None

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: int = 1, note: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=n, **({"note": note} if note else {}))
