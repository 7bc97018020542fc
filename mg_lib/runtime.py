"""Where and how a run executes: the device, and the signals that stop it cleanly."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import distributed as dist
from .errors import MgError
from .progress import log

# ------------------------------------------------------------------ devices


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise MgError("--device cuda: no CUDA device is available")
        return torch.device("cuda", dist.local_rank())
    if name == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise MgError("--device mps: MPS is not available")
    if name not in ("cpu", "mps"):
        raise MgError(f"--device {name}: choose auto, cpu, cuda or mps")
    return torch.device(name)


# ------------------------------------------------------------------ signals


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it at step boundaries."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def catch_signals(flag: StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        if flag.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        flag.signal = signum
        log(f"mg: {signal.Signals(signum).name} received; saving a resumable checkpoint "
            "at the next step")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


