"""How much of a training step goes to data loading and augmentation, on 2 CPU threads.

Times, in one training loop, fetching a batch of 128 from a `Loader` (gather, crop, flip,
cutout 16, normalise) against the forward + backward + SGD step of the template WRN-16-2
members (2 x WRN-16-1, k = 2, T = 2) on that batch. Target: loading < 10% of step time.

    .venv/bin/python bench/data_speed.py [--steps 30] [--warmup 3]

Prints a summary and writes bench/results/data_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mg_lib.data import load_data
from mg_lib.loader import Loader
from mg_lib.recipe import DataConfig
from mg_lib.wrn import Arch, build_model

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared/data/cifar10_5k.npz"
OUT = ROOT / "bench/results/data_speed.json"
BATCH, THREADS, TARGET = 128, 2, 0.10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps (>= 20)")
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)

    # Real CIFAR-10 images when the shared subset is here, else synthetic ones of the same shape.
    if NPZ.is_file():
        cfg = DataConfig(dataset="npz", path=str(NPZ), val_fraction=0.0)
    else:
        cfg = DataConfig(dataset="synthetic", synthetic_images=5000, val_fraction=0.0)
    data = load_data(cfg, seed=0)
    loader = Loader(data.train, BATCH, mean=data.mean, std=data.std, train=True,
                    crop=True, flip=True, cutout=16)

    arch = Arch(kind="template", depth=16, width=1, members=2, templates=2, classes=10)
    model = build_model(arch).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)

    def batches():
        epoch = 0
        while True:  # cross epoch boundaries: each epoch's set-up cost is in the timings
            yield from loader.epoch(seed=epoch)
            epoch += 1

    load_before = os.getloadavg()[0]  # other processes on the cores skew every timing
    it = batches()
    load_s, step_s = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(x)  # (k, N, classes): one set of logits per member
        loss = sum(F.cross_entropy(member, y) for member in logits)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= args.warmup:
            load_s.append(t1 - t0)
            step_s.append(t2 - t1)

    # Separately: one whole epoch of loading alone, which includes the per-epoch set-up
    # (shuffle and all augmentation draws) that the median of single batches hides.
    t0 = time.perf_counter()
    n = sum(1 for _ in loader.epoch(seed=123))
    epoch_ms = (time.perf_counter() - t0) * 1e3

    load_ms = statistics.median(load_s) * 1e3
    step_ms = statistics.median(step_s) * 1e3
    share = load_ms / (load_ms + step_ms)
    result = {
        "dataset": cfg.dataset,
        "batch": BATCH,
        "threads": THREADS,
        "augment": {"crop": True, "flip": True, "cutout": 16},
        "model": arch.describe(),
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "load_ms_median": round(load_ms, 3),
        "load_ms_epoch_mean": round(epoch_ms / n, 3),
        "step_ms_median": round(step_ms, 1),
        "load_share": round(share, 5),
        "target_share": TARGET,
        "ok": share < TARGET,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"data: {cfg.dataset}, batch {BATCH}, crop+flip+cutout16, {THREADS} threads")
    print(f"load+augment  {load_ms:8.2f} ms/batch (median of {args.steps}; "
          f"whole-epoch mean {epoch_ms / n:.2f} ms)")
    print(f"train step    {step_ms:8.1f} ms/batch ({arch.describe()})")
    print(f"loading share {share:8.2%} of step time (target < {TARGET:.0%}): "
          f"{'ok' if share < TARGET else 'TOO SLOW'}")
    print(f"1-min load average {load_before:.2f} -> {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} cores (above {THREADS}: timings are contended)")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
