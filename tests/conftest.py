"""Shared fixtures: tiny recipes and the real CIFAR-10 subset (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared" / "data" / "cifar10_5k.npz"

# Tests run on tiny nets, where a second thread buys little and, on busy cores, costs a lot.
torch.set_num_threads(1)


@pytest.fixture
def npz_path() -> Path:
    if not NPZ.exists():
        pytest.skip(f"real CIFAR-10 subset not found at {NPZ} (see shared/data/README.md)")
    return NPZ


def tiny_sets(**extra: object) -> list[str]:
    """--set overrides for a tiny synthetic run: WRN-10-1 members, a few dozen images."""
    base = {
        "data.dataset": "synthetic", "data.synthetic_images": 48, "data.batch_size": 16,
        "data.eval_batch_size": 64, "data.val_fraction": 0.25, "model.depth": 10,
        "model.width": 1, "train.epochs": 1, "grow.wide.epochs": 1,
    }
    base.update(extra)
    out = []
    for k, v in base.items():
        val = f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v
        out += ["--set", f"{k}={val}"]
    return out


def sets_list(args: list[str]) -> list[str]:
    """['--set', 'a=1', '--set', 'b=2'] -> ['a=1', 'b=2'] (for library calls)."""
    return args[1::2]
