"""The progress bar: drawn on a terminal and erased at the end, absent from logs and pipes."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from conftest import ROOT

SCRIPT = r"""
import sys
from mg_lib.progress import Progress
with Progress("member0 1/2", 30) as bar:
    bar.advance(3)
    for i in range(27):
        bar.advance(1, f"loss {2.5 - i / 100:.3f}")
print("member0 epoch 1/2  summary", file=sys.stderr)
"""


def run(on_terminal: bool) -> bytes:
    """The script's stderr, written to a pseudo-terminal or to a pipe."""
    if not on_terminal:
        return subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                              timeout=60, check=True).stderr
    main, sub = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, stderr=sub,
                         stdout=subprocess.DEVNULL)
    os.close(sub)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert p.wait(timeout=60) == 0
    return out


def test_bar_on_a_terminal_is_drawn_then_erased() -> None:
    out = run(on_terminal=True)
    assert b"member0 1/2" in out and b"30/30" in out and b"loss 2.240" in out
    # Transient: the bar's line is erased (ESC[2K) before the epoch's summary line.
    bar_end = out.rindex(b"30/30")
    assert b"\x1b[2K" in out[bar_end:out.index(b"summary")]


def test_no_bar_when_stderr_is_a_pipe() -> None:
    assert run(on_terminal=False) == b"member0 epoch 1/2  summary\n"
