"""Does recombining templates beat random growth, at fewer FLOPs than scratch?

Runs every method through the `mg` CLI on the same data, seeds and budget rules:

    mixture        members -> mg grow --method mixture -> grown phase
    random         members -> mg grow --method random  -> grown phase (fresh off-diagonal blocks)
    net2net        members -> mg grow --method net2net -> grown phase (member 0 widened)
    ensemble       the members' averaged logits (no extra training; reference only)
    scratch-small  one member alone, trained as long as a member trains
    scratch-large  a plain net of the grown shape, trained as long as a member trains

The growth methods share one members checkpoint per seed, so they differ only in growth.
Everything is reported on the test split; the coefficient ablation (--ablation coefs) reports
and chooses on the validation split.

    python bench/reproduce.py --data ../shared/data/cifar10_5k.npz --seeds 3 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mg_lib.recipe import load_recipe, parse_value  # noqa: E402

RECIPE = ROOT / "recipes" / "reproduce.toml"
METHODS = ("mixture", "random", "net2net", "ensemble", "scratch-small", "scratch-large")


def mg(*args: str, log: Path | None = None) -> str:
    """Run `python -m mg ...`; stdout is the result, stderr goes to the log."""
    cmd = [sys.executable, "-m", "mg", *args]
    err = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    finally:
        if log:
            err.close()
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}; see {log}")
    return res.stdout.strip()


def sets(d: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in d.items():
        val = json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) \
            else str(v)
        out += ["--set", f"{k}={val}"]
    return out


def test_top1(ckpt: str, log: Path, **kw: Any) -> dict[str, Any]:
    extra = ["--ensemble"] if kw.get("ensemble") else []
    return json.loads(mg("eval", ckpt, "--split", kw.get("split", "test"), "--json", *extra,
                         log=log))


def accounting(ckpt: str) -> tuple[int, float | None]:
    """Training FLOPs spent and the last val top-1, from the checkpoint's own records."""
    import torch

    c = torch.load(ROOT / ckpt if not Path(ckpt).is_absolute() else ckpt, weights_only=True)
    return int(c["flops"]["total"]), c["history"][-1]["val_top1"] if c["history"] else None


def run_seed(seed: int, base: dict[str, Any], out: Path, log: Path,
             grow_sets: dict[str, Any]) -> list[dict[str, Any]]:
    """All methods for one seed; returns one row per method."""
    d = out / f"seed{seed}"
    common = {**base, "seed": seed}
    rows: list[dict[str, Any]] = []

    def row(method: str, ckpt: str, t0: float, **extra: Any) -> None:
        res = test_top1(ckpt, log, ensemble=method == "ensemble")
        flops, val = accounting(ckpt)
        if method == "ensemble":  # the history's last line is one member's (sequential)
            val = test_top1(ckpt, log, split="val", ensemble=True)["top1"]
        r = {"method": method, "seed": seed, "top1": res["top1"], "top5": res["top5"],
             "val_top1": val, "train_flops": flops,
             "seconds": round(time.time() - t0, 1), "checkpoint": ckpt, **extra}
        rows.append(r)
        print(f"  seed {seed} {method:<14} test top1 {100 * r['top1']:.2f}%  "
              f"flops {r['train_flops']:.3e}  {r['seconds']:.0f}s", flush=True)

    t0 = time.time()
    members = mg("train", str(RECIPE), "--out", str(d / "members"), *sets(common), log=log)
    row("ensemble", members, t0)
    for method in ("mixture", "random", "net2net"):
        t1 = time.time()
        g = mg("grow", members, "--to", "wide", "--method", method, "--out",
               str(d / f"{method}.pt"), "--force", *sets(grow_sets), log=log)
        g = mg("train", "--resume", g, log=log)
        row(method, g, t1)
    t2 = time.time()
    r = load_recipe(RECIPE, sets_list(common))
    k, stem = r.model.members, r.model.stem
    small = {**common, "model.members": 1, "model.stem": stem // k}
    ck = mg("train", str(RECIPE), "--out", str(d / "scratch-small"), *sets(small), log=log)
    row("scratch-small", ck, t2)
    t3 = time.time()
    large = {**common, "model.kind": "plain", "model.members": 1,
             "model.width": k * r.model.width, "model.stem": stem}
    ck = mg("train", str(RECIPE), "--out", str(d / "scratch-large"), *sets(large), log=log)
    row("scratch-large", ck, t3)
    return rows


def sets_list(d: dict[str, Any]) -> list[str]:
    return sets(d)[1::2]


def ablation(seed: int, base: dict[str, Any], out: Path, log: Path,
             scales: list[float]) -> list[dict[str, Any]]:
    """Coefficient init x scale, grown from one members checkpoint, judged on val."""
    d = out / f"ablation-seed{seed}"
    members = mg("train", str(RECIPE), "--out", str(d / "members"), *sets({**base, "seed": seed}),
                 log=log)
    rows = []
    grid = [("zero", 0.0)] + [(c, s) for c in ("orthogonal", "copy", "random") for s in scales]
    for coefs, scale in grid:
        t0 = time.time()
        key = "coef_noise" if coefs == "copy" else "coef_scale"
        g = mg("grow", members, "--to", "wide", "--coefs", coefs, "--out",
               str(d / f"{coefs}-{scale}.pt"), "--force", "--set", f"grow.wide.{key}={scale}",
               log=log)
        at_growth = test_top1(g, log, split="val")["top1"]
        g = mg("train", "--resume", g, log=log)
        r = {"coefs": coefs, "scale": scale, "seed": seed, "val_top1_at_growth": at_growth,
             "val_top1": accounting(g)[1],
             "seconds": round(time.time() - t0, 1)}
        rows.append(r)
        print(f"  {coefs:<10} scale {scale:<5} val top1 at growth {100 * at_growth:.2f}% -> "
              f"after {100 * r['val_top1']:.2f}%", flush=True)
    return rows


def ablation_table(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    seeds = sorted({r["seed"] for r in rows})

    def cell(xs: list[float]) -> str:
        sd = f" ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else ""
        return f"{100 * statistics.mean(xs):.1f}{sd}"

    lines = [f"Coefficient ablation: validation top-1 (%) on {config['data']}, "
             f"n = {len(seeds)} seed(s), mean ± std over seeds (500 val images each).", "",
             "| coefs | scale | val top-1 right after growth | val top-1 after the grown phase |",
             "| --- | ---: | ---: | ---: |"]
    keys = sorted({(r["coefs"], r["scale"]) for r in rows}, key=lambda k: (k[0] != "zero", k))
    for c, s in keys:
        xs = [r for r in rows if (r["coefs"], r["scale"]) == (c, s)]
        lines.append(f"| {c} | {s} | {cell([r['val_top1_at_growth'] for r in xs])} "
                     f"| {cell([r['val_top1'] for r in xs])} |")
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for m in METHODS:
        xs = [r for r in rows if r["method"] == m]
        if not xs:
            continue
        top = [r["top1"] for r in xs]
        out[m] = {"n": len(xs), "top1_mean": statistics.mean(top),
                  "top1_std": statistics.stdev(top) if len(top) > 1 else 0.0,
                  "val_top1_mean": statistics.mean(r["val_top1"] for r in xs),
                  "train_flops_mean": statistics.mean(r["train_flops"] for r in xs)}
    return out


def table(summary: dict[str, dict[str, float]], config: dict[str, Any]) -> str:
    large = summary.get("scratch-large", {}).get("train_flops_mean")
    lines = [f"Test top-1 on {config['data']} (n = {config['seeds']} seeds each; mean ± std).",
             "", "| method | test top-1 (%) | val top-1 (%) | training FLOPs | × scratch-large |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for m, s in summary.items():
        ratio = f"{s['train_flops_mean'] / large:.2f}" if large else "-"
        lines.append(f"| {m} | {100 * s['top1_mean']:.2f} ± {100 * s['top1_std']:.2f} | "
                     f"{100 * s['val_top1_mean']:.2f} | {s['train_flops_mean']:.3e} | {ratio} |")
    mix, rnd = summary.get("mixture"), summary.get("random")
    if mix and rnd and large:
        sl = summary["scratch-large"]
        lines += ["", "Targets (mean over seeds, test split):",
                  f"- mixture − random = {100 * (mix['top1_mean'] - rnd['top1_mean']):+.2f} "
                  "points (target ≥ +1.5)",
                  f"- mixture − scratch-large = {100 * (mix['top1_mean'] - sl['top1_mean']):+.2f}"
                  " points (target ≥ −1.0), at "
                  f"{mix['train_flops_mean'] / large:.2f} × its training FLOPs (target ≤ 0.75)"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(summary):
        xs = [r for r in rows if r["method"] == m]
        c = f"C{i}"
        ax.scatter([r["train_flops"] for r in xs], [100 * r["top1"] for r in xs], color=c,
                   alpha=0.5, s=20)
        s = summary[m]
        ax.scatter([s["train_flops_mean"]], [100 * s["top1_mean"]], color=c, marker="D",
                   s=60, edgecolor="black", label=f"{m} (mean of {s['n']})")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (3 × forward × images seen)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("mg reproduce: growth methods and baselines")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="npz file (layout of shared/data/README.md)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--quick", action="store_true", help="a smoke run: few images, 1 epoch")
    p.add_argument("--ablation", choices=["coefs"], help="the coefficient-init ablation")
    p.add_argument("--scales", default="0.03,0.1,0.3,1.0")
    p.add_argument("--set", dest="extra", action="append", default=[],
                   help="extra recipe override for every run, e.g. grow.wide.lr=0.02")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    base: dict[str, Any] = {"data.dataset": "npz", "data.path": str(Path(a.data).resolve())}
    if a.quick:
        base |= {"data.limit": 200, "train.epochs": 1, "grow.wide.epochs": 1,
                 "data.batch_size": 32}
    for item in a.extra:
        k, _, v = item.partition("=")
        base[k] = parse_value(v)
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.out / ("reproduce-runs" if not a.ablation else "ablation-runs")
    log = a.out / ("reproduce.log" if not a.ablation else "ablation.log")
    log.unlink(missing_ok=True)
    t0 = time.time()
    config = {"data": a.data, "seeds": a.seeds, "recipe": str(RECIPE.relative_to(ROOT)),
              "overrides": base, "quick": a.quick, "cpu_threads": os.environ["OMP_NUM_THREADS"]}
    if a.ablation:
        scales = [float(s) for s in a.scales.split(",")]
        rows = []
        for seed in range(a.seeds):
            rows += ablation(seed, base, work, log, scales)
        config["seconds"] = round(time.time() - t0, 1)
        (a.out / "ablation.json").write_text(json.dumps({"runs": rows, "config": config},
                                                        indent=1))
        (a.out / "ablation.md").write_text(ablation_table(rows, config))
        print(ablation_table(rows, config))
        print(f"wrote {a.out / 'ablation.json'} and ablation.md ({config['seconds']:.0f}s)")
        return
    rows = []
    for seed in range(a.seeds):
        rows += run_seed(seed, base, work, log, {})
    summary = summarise(rows)
    config["seconds"] = round(time.time() - t0, 1)
    (a.out / "reproduce.json").write_text(json.dumps(
        {"runs": rows, "summary": summary, "config": config}, indent=1))
    md = table(summary, config)
    (a.out / "reproduce.md").write_text(md)
    plot(rows, summary, a.out / "reproduce.png")
    print(md)
    print(f"wrote {a.out}/reproduce.json, .md, .png in {config['seconds']:.0f}s")


if __name__ == "__main__":
    main()
