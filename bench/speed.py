"""Speed of template layers against plain convolutions, side by side, in one run.

Each comparison alternates its two sides (A B, then B A, ...) and reports the median time of
each side and the median of the per-repeat ratios A/B, so drift in a shared machine's load
hits both sides alike. On CPU everything runs on 2 threads (as CI). Measured:

    train step   template / plain (same shapes, same function: the plain net is the
                 template net's export), members stage and grown stage
    eval step    folded template / plain; unfolded (synthesis on every call) / plain for scale
    members      joint (one block-diagonal step) / sequential (each member's own net in turn)
    growth       mg_lib.growth.grow on a loaded 2 x WRN-28-5 (100 classes) model; loading and
                 saving the checkpoints are timed apart, and the whole `mg grow` command too
    mg train     the whole command, model.kind template / plain, a short synthetic run

A step is forward + loss + backward + SGD (Nesterov, weight decay) as the trainer does it,
with bf16 autocast and channels_last on CUDA. On CUDA a timing covers `--steps` steps.

    .venv/bin/python bench/speed.py [--json] [--device cpu|cuda] [--quick] [--repeats 5]

Writes bench/results/speed.json (speed_cuda.json on CUDA; or --out) and prints a markdown
table (or, with --json, the JSON object) on stdout. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mg_lib import checkpoint as ck
from mg_lib.export import to_plain
from mg_lib.growth import grow
from mg_lib.recipe import GrowConfig, PhaseConfig, Recipe
from mg_lib.templates import Synthesised
from mg_lib.train import make_optimizer, member_losses
from mg_lib.wrn import WRN, Arch, build_model, extract_member

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"train_members": 1.05, "train_grown": 1.05, "eval_grown": 1.02,
           "eval_members": 1.02, "grow_s": 1.0, "mg_train": 1.05}


@dataclass(frozen=True)
class Setup:
    depth: int
    width: int
    batch: int
    repeats: int
    steps: int  # steps per timing (CUDA: enough to hide launch latency)
    cli_images: int  # `mg train`: synthetic training images
    cli_depth: int
    cli_width: int
    cli_batch: int


def setup(device: str, quick: bool, repeats: int | None) -> Setup:
    if device == "cuda":  # real widths: 2 x WRN-28-5 members, the grown net is a WRN-28-10
        s = Setup(28, 5, 128, 5, 20, 5120, 28, 5, 128)
        if quick:
            s = replace(s, repeats=3, cli_images=2560)
    else:
        s = Setup(16, 2, 128, 5, 1, 1152, 16, 1, 128)
        if quick:
            s = Setup(10, 1, 32, 3, 1, 256, 10, 1, 64)
    return replace(s, repeats=repeats) if repeats else s


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ timing


Timing = tuple[float, float]  # (wall-clock seconds, CPU seconds of this process's threads)


class Clock:
    """Seconds per call of a callable, synchronising the GPU around the calls.

    CPU time (all threads) is reported beside wall time: on a shared machine a descheduled
    thread stretches wall time but not CPU time, so CPU-time ratios are the steadier
    estimate of the work each side does (meaningless on GPU, where the CPU mostly waits).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any], n: int = 1) -> Timing:
        if self.cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def alternate(sides: dict[str, Callable[[], Timing]], repeats: int,
              warmup: int = 1) -> dict[str, Any]:
    """Run each side `repeats` times, alternating order; medians and per-repeat ratios."""
    names = list(sides)
    for _ in range(warmup):
        for n in names:
            sides[n]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            w, c = sides[n]()
            wall[n].append(w)
            cpu[n].append(c)
    a, b = names[0], names[-1]
    # Medians are the headline; minima (noise only ever adds time) are kept beside them.
    return {"seconds": {n: statistics.median(v) for n, v in wall.items()},
            "cpu_seconds": {n: statistics.median(v) for n, v in cpu.items()},
            "min_seconds": {n: min(v) for n, v in wall.items()},
            "min_cpu_seconds": {n: min(v) for n, v in cpu.items()},
            "ratio_min": min(wall[a]) / min(wall[b]),
            "all_seconds": wall, "all_cpu_seconds": cpu, "ratio_of": f"{a}/{b}",
            "ratio": pair_ratio(wall, a, b), "ratio_cpu": pair_ratio(cpu, a, b)}


def pair_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repeats of time(a) / time(b), each pair measured back to back."""
    return statistics.median([x / y for x, y in zip(times[a], times[b], strict=True)])


# ------------------------------------------------------------------ model steps


class Stepper:
    """One training step of `net`, as the trainer takes it (optimiser, autocast, layout)."""

    def __init__(self, net: WRN, x: torch.Tensor, y: torch.Tensor, compile_: bool = False):
        self.net = net.train()
        self.opt = make_optimizer(net, PhaseConfig(lr=1e-3))  # small lr: stay finite
        self.cuda = x.is_cuda
        self.x = x.contiguous(memory_format=torch.channels_last) if self.cuda else x
        self.y = y
        self.run = torch.compile(net) if compile_ else net

    def __call__(self) -> None:
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda
               else contextlib.nullcontext())
        with ctx:
            logits = self.run(self.x)
        loss = member_losses(logits, self.y).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def models(arch: Arch, device: torch.device) -> tuple[WRN, WRN]:
    """A template net and its plain export: same shapes and the same function."""
    torch.manual_seed(0)
    template = build_model(arch).to(device)
    return template, to_plain(template).to(device)


def batch(n: int, classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x.to(device), y.to(device)


def bench_train(s: Setup, device: torch.device, compile_: bool) -> dict[str, Any]:
    clock, out = Clock(device), {}
    x, y = batch(s.batch, 10, device)
    for stage in ("members", "grown"):
        arch = Arch(depth=s.depth, width=s.width, members=2, templates=2, grown=stage == "grown")
        t, p = models(arch, device)
        st, sp = Stepper(t, x, y, compile_), Stepper(p, x, y, compile_)
        log(f"train step, {stage}: {arch.describe()}")
        res = alternate({"template": lambda st=st: clock(st, s.steps),
                         "plain": lambda sp=sp: clock(sp, s.steps)}, s.repeats,
                        warmup=3 if compile_ else 1)
        res["arch"] = arch.describe()
        out[stage] = res
    return out


def bench_parts(s: Setup, device: torch.device) -> dict[str, Any]:
    """What a template step does beyond a plain one, timed alone (many cheap repeats).

    Synthesis forward + backward of every template layer (gradients of the weights given),
    and the SGD step over the template parameters against the plain ones. The sum over the
    plain step time is the template tax, estimated without the noise of timing whole steps.
    """
    clock, out = Clock(device), {}
    for stage in ("members", "grown"):
        arch = Arch(depth=s.depth, width=s.width, members=2, templates=2, grown=stage == "grown")
        t, p = models(arch, device)
        layers = [m for m in t.modules() if isinstance(m, Synthesised)]
        grads = [torch.randn_like(m.weight()) for m in layers]

        def synthesis(layers: list[Synthesised] = layers, grads: list[Any] = grads) -> None:
            torch.autograd.backward([m.weight() for m in layers], grads)

        opts = {}
        for name, net in (("template", t), ("plain", p)):
            opts[name] = make_optimizer(net, PhaseConfig(lr=1e-6))
            for q in net.parameters():
                q.grad = torch.randn_like(q)
        log(f"template overhead, {stage}: synthesis and optimiser alone")
        res = alternate({"synthesis": lambda: clock(synthesis, s.steps),
                         "sgd_template": lambda o=opts["template"]: clock(o.step, s.steps),
                         "sgd_plain": lambda o=opts["plain"]: clock(o.step, s.steps)},
                        6 * s.repeats)
        res["params"] = {n: sum(q.numel() for q in net.parameters())
                         for n, net in (("template", t), ("plain", p))}
        for key in ("ratio", "ratio_cpu", "ratio_min", "ratio_of"):
            del res[key]
        out[stage] = res
    return out


def bench_eval(s: Setup, device: torch.device) -> dict[str, Any]:
    clock, out = Clock(device), {}
    x, _ = batch(s.batch, 10, device)
    for stage in ("members", "grown"):
        arch = Arch(depth=s.depth, width=s.width, members=2, templates=2, grown=stage == "grown")
        t, p = models(arch, device)
        t.eval(), p.eval()

        def folded(t: WRN = t) -> Timing:
            with torch.no_grad():
                return clock(lambda: t(x), s.steps)

        def unfolded(t: WRN = t) -> Timing:
            with torch.no_grad():
                return clock(lambda: (t.eval(), t(x)), s.steps)  # eval() drops the fold

        def plain(p: WRN = p) -> Timing:
            with torch.no_grad():
                return clock(lambda: p(x), s.steps)

        log(f"eval step, {stage}: {arch.describe()}")
        res = alternate({"folded": folded, "unfolded": unfolded, "plain": plain}, 3 * s.repeats)
        wall, cpu = res["all_seconds"], res["all_cpu_seconds"]
        res["ratio_unfolded"] = pair_ratio(wall, "unfolded", "plain")
        res["ratio_unfolded_cpu"] = pair_ratio(cpu, "unfolded", "plain")
        res["ratio"], res["ratio_cpu"] = pair_ratio(wall, "folded", "plain"), pair_ratio(
            cpu, "folded", "plain")
        res["ratio_of"] = "folded/plain"
        res["arch"] = arch.describe()
        out[stage] = res
    return out


def bench_joint(s: Setup, device: torch.device) -> dict[str, Any]:
    clock = Clock(device)
    x, y = batch(s.batch, 10, device)
    arch = Arch(depth=s.depth, width=s.width, members=2, templates=2)
    torch.manual_seed(0)
    joint = build_model(arch).to(device)
    solo = [Stepper(extract_member(joint, m), x, y) for m in range(arch.members)]
    sj = Stepper(joint, x, y)
    log(f"members joint vs sequential: {arch.describe()}")

    def sequential() -> Timing:
        times = [clock(st, s.steps) for st in solo]
        return sum(t[0] for t in times), sum(t[1] for t in times)

    res = alternate({"joint": lambda: clock(sj, s.steps), "sequential": sequential}, s.repeats)
    res["arch"] = arch.describe()
    return res


def bench_grow(s: Setup, repeats: int) -> dict[str, Any]:
    """Growth of 2 x WRN-28-5 (100 classes) into a WRN-28-10, on CPU, load and save apart."""
    arch = Arch(depth=28, width=5, members=2, templates=2, classes=100)
    recipe = Recipe().dump()
    cfg = GrowConfig()
    with tempfile.TemporaryDirectory(prefix="mg-speed-") as tmp:
        src, dst = Path(tmp) / "members.pt", Path(tmp) / "grown.pt"
        torch.manual_seed(0)
        model = build_model(arch)
        ck.save(ck.make(recipe, model, lineage=[], train={"epochs": {}, "current": None,
                        "done": False}, history=[], flops={"phases": {}, "total": 0}), src)
        del model
        log(f"growth: {arch.describe()}, {src.stat().st_size / 2**20:.0f} MiB checkpoint")
        state: dict[str, Any] = {}

        def load() -> float:
            t0 = time.perf_counter()
            state["model"] = ck.model_from(ck.load(src))
            return time.perf_counter() - t0

        def grow_() -> float:
            t0 = time.perf_counter()
            state["grown"] = grow(state["model"], cfg)
            return time.perf_counter() - t0

        def save() -> float:
            t0 = time.perf_counter()
            ck.save(ck.make(recipe, state["grown"], lineage=[], train={}, history=[],
                            flops={}, target="wide"), dst)
            return time.perf_counter() - t0

        def command() -> float:
            cmd = [sys.executable, "-m", "mg", "grow", str(src), "--to", "wide", "--out",
                   str(Path(tmp) / "grown-cli.pt"), "--force"]
            return run_child(cmd, child_env(1))[0]

        load(), grow_(), save()  # warm-up (page cache, allocator)
        times: dict[str, list[float]] = {"load": [], "grow": [], "save": [], "mg grow": []}
        for _ in range(repeats):
            for name, fn in (("load", load), ("grow", grow_), ("save", save),
                             ("mg grow", command)):
                times[name].append(fn())
        size = dst.stat().st_size
    return {"arch": arch.describe(), "grown": arch.as_grown().describe(),
            "checkpoint_mib": size / 2**20, "all_seconds": times,
            "seconds": {n: statistics.median(v) for n, v in times.items()}}


# ------------------------------------------------------------------ mg train, whole command


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_child(cmd: list[str], env: dict[str, str]) -> Timing:
    """Run a command; its wall-clock and CPU seconds (user + system, all threads)."""
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        sys.exit(f"speed.py: {' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return wall, (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)


def bench_cli(s: Setup, device: str, threads: int | None) -> dict[str, Any]:
    recipe = f"""seed = 0
[data]
dataset = "synthetic"
synthetic_images = {s.cli_images}
batch_size = {s.cli_batch}
eval_batch_size = 500
val_fraction = 0.1
[model]
depth = {s.cli_depth}
width = {s.cli_width}
members = 2
templates = 2
[train]
epochs = 1
members = "joint"
"""
    with tempfile.TemporaryDirectory(prefix="mg-speed-cli-") as tmp:
        path = Path(tmp) / "speed.toml"
        path.write_text(recipe, encoding="utf-8")
        runs = iter(range(10**6))

        def run(kind: str) -> Timing:
            out = Path(tmp) / f"{kind}-{next(runs)}"
            cmd = [sys.executable, "-m", "mg", "train", str(path), "--out", str(out),
                   "--device", device, "--set", f'model.kind="{kind}"']
            return run_child(cmd, child_env(threads))

        log(f"mg train, whole command: 2 x WRN-{s.cli_depth}-{s.cli_width} joint, "
            f"{s.cli_images} synthetic images, 1 epoch")
        res = alternate({"template": lambda: run("template"), "plain": lambda: run("plain")},
                        s.repeats, warmup=0)
    res["recipe"] = recipe
    return res


# ------------------------------------------------------------------ report


def _ms(v: float) -> str:
    return f"{v * 1e3:,.1f} ms" if v < 0.1 else f"{v * 1e3:,.0f} ms" if v < 10 else f"{v:,.1f} s"


def _ips(res: dict[str, Any], side: str, s: Setup) -> str:
    sec = res["seconds"][side]
    return f"{_ms(sec)} ({s.batch / sec:,.0f} img/s)"


def _ratio(res: dict[str, Any], cpu: bool, key: str = "ratio") -> str:
    return f"{res[key]:.3f}" + (f" ({res[key + '_cpu']:.3f})" if cpu else "")


def _ok(v: float, target: float, unit: str = "") -> str:
    return f"≤ {target:g}{unit} " + ("yes" if v <= target else "**no**")


def table(r: dict[str, Any], s: Setup, device: str) -> str:
    """The README table: A and B are medians; A / B is the median of back-to-back pairs."""
    cpu = device == "cpu"
    per = f" ({s.steps}-step mean)" if s.steps > 1 else ""
    head = "A / B wall (CPU time)" if cpu else "A / B"
    rows = [f"| measurement | A | B | {head} | target |", "| --- | --- | --- | --- | --- |"]
    for stage in ("members", "grown"):
        if stage in r.get("train", {}):
            t, key = r["train"][stage], f"train_{stage}"
            rows.append(f"| train step{per}, {t['arch']}, batch {s.batch} | template "
                        f"{_ips(t, 'template', s)} | plain {_ips(t, 'plain', s)} | "
                        f"{_ratio(t, cpu)} | {_ok(t['ratio'], TARGETS[key])} |")
    for stage in ("members", "grown"):
        if stage in r.get("parts", {}):
            q = r["parts"][stage]
            sec = q["min_cpu_seconds" if cpu else "min_seconds"]
            share = f"{q['tax']:.1%} of a plain step" if q.get("tax") is not None else ""
            rows.append(f"| template extras, {stage} (min{', CPU time' if cpu else ''}): synthesis "
                        f"fwd + bwd, SGD template − plain | {_ms(sec['synthesis'])} | "
                        f"{_ms(sec['sgd_template'] - sec['sgd_plain'])} | {share} | |")
    for stage in ("members", "grown"):
        if stage in r.get("eval", {}):
            e, key = r["eval"][stage], f"eval_{stage}"
            rows.append(f"| eval step{per}, {e['arch']}, batch {s.batch} | folded "
                        f"{_ms(e['seconds']['folded'])} | plain {_ms(e['seconds']['plain'])} | "
                        f"{_ratio(e, cpu)} | {_ok(e['ratio'], TARGETS[key])} |")
            rows.append(f"| eval step, {stage}, unfolded (synthesis every call) | unfolded "
                        f"{_ms(e['seconds']['unfolded'])} | plain {_ms(e['seconds']['plain'])} | "
                        f"{_ratio(e, cpu, 'ratio_unfolded')} | (reference) |")
    if "joint" in r:
        j = r["joint"]
        rows.append(f"| members training step{per}, {j['arch']}, batch {s.batch} | joint "
                    f"{_ips(j, 'joint', s)} | sequential {_ips(j, 'sequential', s)} | "
                    f"{_ratio(j, cpu)} | (lower is better) |")
    if "grow" in r:
        g, sec = r["grow"], r["grow"]["seconds"]
        rows.append(f"| growth {g['arch']} → {g['grown'].split(' grown')[0]}: `grow()` | "
                    f"grow {_ms(sec['grow'])} | load {_ms(sec['load'])}, save {_ms(sec['save'])} "
                    f"| | {_ok(sec['grow'], TARGETS['grow_s'], ' s')} |")
        rows.append(f"| `mg grow` whole command ({g['checkpoint_mib']:.0f} MiB checkpoint) | "
                    f"{_ms(sec['mg grow'])} | | | |")
    if "cli" in r:
        c = r["cli"]
        rows.append(f"| `mg train` whole command ({device}, short synthetic run) | template "
                    f"{_ms(c['seconds']['template'])} | plain {_ms(c['seconds']['plain'])} | "
                    f"{_ratio(c, cpu)} | {_ok(c['ratio'], TARGETS['mg_train'])} |")
    return "\n".join(rows)


SECTIONS = ("train", "parts", "eval", "joint", "grow", "cli")


@contextlib.contextmanager
def _loadavg(into: dict[str, Any], key: str) -> Iterator[None]:
    into[f"{key}_before"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    yield
    into[f"{key}_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the JSON object, not the table")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="smaller nets, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per side (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--compile", action="store_true", help="torch.compile the train steps")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default "
                    "bench/results/speed.json, speed_cuda.json on CUDA)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        ap.error(f"--only: unknown sections {sorted(only - set(SECTIONS))}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    threads = args.threads if args.device == "cpu" else None
    if threads:
        torch.set_num_threads(threads)
    s = setup(args.device, args.quick, args.repeats)
    machine: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
        or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    with _loadavg(machine, "loadavg"):
        if "train" in only:
            results["train"] = bench_train(s, device, args.compile)
        if "parts" in only:
            results["parts"] = bench_parts(s, device)
        if "eval" in only:
            results["eval"] = bench_eval(s, device)
        if "joint" in only:
            results["joint"] = bench_joint(s, device)
        if "grow" in only:
            results["grow"] = bench_grow(s, s.repeats)
        if "cli" in only:
            results["cli"] = bench_cli(s, args.device, threads)
    for stage, q in results.get("parts", {}).items():  # the tax: extras / plain step
        clock = "min_cpu_seconds" if args.device == "cpu" else "min_seconds"
        sec, step = q[clock], results.get("train", {}).get(stage, {}).get(clock)
        extra = sec["synthesis"] + sec["sgd_template"] - sec["sgd_plain"]
        q["tax"] = extra / step["plain"] if step else None
    md = table(results, s, args.device)
    report = {"bench": "speed", "machine": machine, "setup": s.__dict__, "quick": args.quick,
              "compile": args.compile, "seconds": time.perf_counter() - t0,
              "targets": TARGETS, "results": results, "table": md}
    out = args.out or ROOT / "bench" / "results" / (
        "speed_cuda.json" if args.device == "cuda" else "speed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {out} ({report['seconds']:.0f} s)")
    print(json.dumps(report) if args.json else md)


if __name__ == "__main__":
    main()
