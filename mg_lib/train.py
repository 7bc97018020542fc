"""The training loop: phases, schedules, exact resume, safe interrupts, metrics.

A run is a list of phases. Before growth: `member0`, `member1`, ... (sequential, each member
trained alone as a small net) or one `members` phase (joint: all members in one block-diagonal
forward, losses summed). After growth: `grow:<target>`. Every phase keeps its completed epochs
in the checkpoint, so `--resume` continues wherever the file stands, and raising the epochs
extends a finished phase.

All randomness of the data stream (order, augmentation) comes from generators seeded by
(seed, phase, epoch, step), so a resumed run sees exactly the batches an uninterrupted one
would: train N epochs straight == stop after N-1, resume, train 1 (bit-identical on CPU).
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint as ck
from . import distributed as dist
from .data import Data, load_data, num_classes
from .errors import Interrupted, MgError, RunError
from .flops import phase_forward_flops, train_flops
from .loader import Loader
from .metrics import evaluate
from .progress import Progress, log
from .recipe import PhaseConfig, Recipe, override, to_toml, validate
from .runtime import StopFlag, catch_signals
from .wrn import WRN, Arch, build_model, extract_member, insert_member

# ------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Phase:
    name: str  # member0 | members | grow:<target>
    epochs: int
    cfg: PhaseConfig
    member: int | None  # sequential: the member trained alone


def plan(recipe: Recipe, arch: Arch, target: str | None) -> list[Phase]:
    """The phases a checkpoint of this arch trains under this recipe."""
    if arch.grown:
        assert target is not None
        g = recipe.grow[target]
        return [Phase(f"grow:{target}", g.epochs, g, None)]
    t = recipe.train
    if t.members == "joint" or arch.members == 1:
        return [Phase("members", t.epochs, t, None)]
    return [Phase(f"member{m}", t.epochs, t, m) for m in range(arch.members)]


def lr_at(cfg: PhaseConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Learning rate before optimiser step `step` (0-based) of `total`."""
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant" or total <= warm:
        return cfg.lr
    cycle = (total - warm) / (cfg.restarts + 1)
    pos = ((step - warm) % cycle) / cycle
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * pos))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Coefficients get no weight decay (they scale templates); templates, BN, weights do."""
    coefs = [p for n, p in model.named_parameters() if n.endswith("coefs")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("coefs")]
    groups = [{"params": rest, "weight_decay": weight_decay}]
    if coefs:
        groups.append({"params": coefs, "weight_decay": 0.0})
    return groups


def make_optimizer(model: nn.Module, cfg: PhaseConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                           momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def member_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """(k,) cross-entropy of each member's (k, N, C) logits, or (1,) for (N, C)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels)[None]
    k, n, c = logits.shape
    per = F.cross_entropy(logits.float().reshape(k * n, c), labels.repeat(k), reduction="none")
    return per.view(k, n).mean(1)


def epoch_seed(seed: int, phase: str, epoch: int) -> int:
    # A stable (not Python-hash-randomised) mix of the run seed, phase and epoch.
    h = seed * 1_000_003 + epoch * 7919
    for ch in phase:
        h = (h * 131 + ord(ch)) % (2**61 - 1)
    return h


# ------------------------------------------------------------------ the trainer


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0]}


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate((state["python_version"], tuple(state["python"]), None))


class Trainer:
    """Trains whatever phases a checkpoint still has to do, writing it after every epoch."""

    def __init__(self, ckpt: dict[str, Any], path: Path, device: torch.device,
                 stop_after: int | None = None):
        self.ckpt, self.path, self.device = ckpt, path, device
        self.recipe = validate(ckpt["recipe"], f"{path}: recipe")
        self.arch = ck.arch_of(ckpt)
        self.model = ck.model_from(ckpt, device)
        self.state = ckpt["train"]
        self.stop_after = stop_after
        self.flag = StopFlag()
        self.data: Data | None = None
        self.cuda = device.type == "cuda"

    # -- files

    def write(self) -> None:
        if not dist.is_main():
            return
        self.ckpt["model"] = {k: v.detach().to("cpu", copy=True)
                              for k, v in self.model.state_dict().items()}
        self.ckpt["train"] = self.state
        self.ckpt["created"] = ck.now()
        ck.save(self.ckpt, self.path)
        write_recipe(self.recipe, self.path.parent)  # always the recipe of the file beside it

    def record(self, line: dict[str, Any]) -> None:
        self.ckpt["history"].append(line)
        if dist.is_main():
            with open(self.path.parent / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

    # -- the run

    def todo(self) -> list[Phase]:
        phases = plan(self.recipe, self.arch, self.ckpt.get("target"))
        return [p for p in phases if self.state["epochs"].get(p.name, 0) < p.epochs]

    def load_data(self) -> None:
        """Read the data now if any phase will train: bad data fails before any write."""
        if self.data is None and self.todo():
            self.data = load_data(self.recipe.data, self.recipe.seed)

    def run(self) -> Path:
        phases = plan(self.recipe, self.arch, self.ckpt.get("target"))
        self.load_data()
        trained = 0
        with catch_signals(self.flag):
            for phase in self.todo():
                trained += self.run_phase(phase, trained)
                if self.stop_after is not None and trained >= self.stop_after:
                    break
        self.state["done"] = all(self.state["epochs"].get(p.name, 0) >= p.epochs
                                 for p in phases)
        self.write()
        # Every rank returns once rank 0's checkpoint is on disk: callers may read it, and no
        # rank tears its connections down while rank 0 still writes.
        dist.barrier()
        return self.path

    def run_phase(self, phase: Phase, trained_before: int) -> int:
        """Train one phase from where the checkpoint stands; returns epochs trained."""
        assert self.data is not None
        cfg, r = phase.cfg, self.recipe
        net = extract_member(self.model, phase.member) if phase.member is not None else self.model
        net.train()
        opt = make_optimizer(net, cfg)
        cur = self.state.get("current") or {}
        start_epoch, start_step = self.state["epochs"].get(phase.name, 0), 0
        if cur.get("phase") == phase.name and cur.get("optimizer") is not None:
            opt.load_state_dict(cur["optimizer"])
            start_step = cur.get("step", 0)
        if "rng" in cur and cur.get("phase") == phase.name:
            set_rng_state(cur["rng"])
        world, rank = dist.world_size(), dist.rank()
        train = Loader(self.data.train, r.data.batch_size, mean=self.data.mean,
                       std=self.data.std, train=True, crop=r.data.crop, flip=r.data.flip,
                       cutout=r.data.cutout, device=self.device, rank=rank, world=world)
        steps = len(train)
        if steps == 0:
            raise MgError(f"data: {len(self.data.train)} training images is fewer than one "
                          f"batch of {r.data.batch_size}; lower data.batch_size")
        fwd = phase_forward_flops(self.arch, phase.name)
        runner = dist.wrap(net, self.device, r.train.sync_bn) if world > 1 else net
        if r.train.compile:  # only the step runs compiled; `net` keeps state_dict keys as is
            runner = torch.compile(runner)
        weights = torch.ones(self.arch.members if phase.member is None and not self.arch.grown
                             else 1, device=self.device)
        if phase.member in (None, 0) and not self.arch.grown:
            weights[0] = r.train.member0_loss_weight
        epochs_done = 0
        for epoch in range(start_epoch, phase.epochs):
            t0, seen = time.perf_counter(), 0
            # Running sums stay on the device (float64): no host sync per step for metrics.
            sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, correct
            seed = epoch_seed(r.seed, phase.name, epoch)
            with Progress(f"{phase.name} {epoch + 1}/{phase.epochs}", steps) as bar:
                bar.advance(start_step)
                for step, (x, y) in enumerate(train.epoch(seed, start_step), start=start_step):
                    lr = lr_at(cfg, epoch * steps + step, phase.epochs * steps, steps)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    if self.cuda and r.train.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                                if self.cuda and r.train.amp else nullcontext())
                    with autocast:
                        logits = runner(x)
                    losses = member_losses(logits, y)
                    loss = (losses * weights).sum()
                    # Agreed by all ranks: one rank leaving alone would hang the others in DDP.
                    finite = bool(torch.isfinite(loss))
                    bad, stop = dist.any_true(not finite, bool(self.flag))
                    if bad:
                        got = loss.item() if not finite else "non-finite on another rank"
                        raise RunError(f"loss became {got} in {phase.name}, epoch "
                                       f"{epoch + 1}, step {step + 1}; the last good checkpoint "
                                       f"is {self.path}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    n = y.numel()
                    seen += n
                    hits = logits.detach().argmax(-1) == y  # (N,) or (k, N): mean over members
                    sums += torch.stack([losses.detach().double().mean() * n,
                                         hits.double().mean() * n])
                    self.add_flops(phase.name, train_flops(fwd, n * world), n * world)
                    bar.advance(1, f"loss {sums[0].item() / seen:.3f} lr {lr:.4g}"
                                if bar.enabled else "")
                    if stop:
                        self.checkpoint_mid_epoch(phase, net, opt, epoch, step + 1)
                        sig = signal.Signals(self.flag.signal or signal.SIGTERM)
                        raise Interrupted(f"interrupted by {sig.name} in {phase.name}, epoch "
                                          f"{epoch + 1}, step {step + 1}; resume with: mg train "
                                          f"--resume {self.path}", 128 + sig.value)
            start_step = 0
            secs = time.perf_counter() - t0
            loss_sum, correct = sums.tolist()
            if world > 1:  # every rank holds rank 0's checkpoint; metrics over all shares
                dist.broadcast_buffers(net)
                seen, loss_sum, correct = dist.sum_tensor(
                    torch.tensor([seen, loss_sum, correct], dtype=torch.float64)).tolist()
            if phase.member is not None:
                insert_member(self.model, phase.member, net)
            self.state["epochs"][phase.name] = epoch + 1
            self.state["current"] = {"phase": phase.name, "step": 0,
                                     "optimizer": opt.state_dict(), "rng": rng_state()}
            val = self.validate(net, phase)
            line = {"phase": phase.name, "epoch": epoch + 1, "lr": lr,
                    "train_loss": loss_sum / max(seen, 1), "train_top1": correct / max(seen, 1),
                    "val_loss": val.get("loss"), "val_top1": val.get("top1"),
                    "images_per_s": seen / max(secs, 1e-9), "seconds": secs,
                    "train_flops": self.ckpt["flops"]["total"], "time": ck.now()}
            if "members" in val:
                line["val_members_top1"] = [m["top1"] for m in val["members"]]
            self.record(line)
            self.write()
            log(f"{phase.name} epoch {epoch + 1}/{phase.epochs}  loss {line['train_loss']:.4f}  "
                f"val top1 {_pct(line['val_top1'])}  {line['images_per_s']:.0f} img/s  "
                f"{secs:.1f}s")
            epochs_done += 1
            if self.stop_after is not None and trained_before + epochs_done >= self.stop_after:
                break
        return epochs_done

    def checkpoint_mid_epoch(self, phase: Phase, net: WRN, opt: torch.optim.Optimizer,
                             epoch: int, step: int) -> None:
        if phase.member is not None:
            insert_member(self.model, phase.member, net)
        self.state["epochs"][phase.name] = epoch
        self.state["current"] = {"phase": phase.name, "step": step,
                                 "optimizer": opt.state_dict(), "rng": rng_state()}
        self.write()

    def add_flops(self, phase: str, n: int, images: int) -> None:
        f = self.ckpt["flops"]
        f["phases"][phase] = f["phases"].get(phase, 0) + n
        f["total"] = f.get("total", 0) + n
        f.setdefault("images", {})[phase] = f["images"].get(phase, 0) + images

    def validate(self, net: WRN, phase: Phase) -> dict[str, Any]:
        assert self.data is not None
        if len(self.data.val) == 0:
            return {}
        loader = Loader(self.data.val, self.recipe.data.eval_batch_size, mean=self.data.mean,
                        std=self.data.std, train=False, device=self.device,
                        rank=dist.rank(), world=dist.world_size())
        return evaluate(net, loader.epoch(0), net.arch.members, net.arch.grown,
                        reduce=dist.sum_tensor if dist.world_size() > 1 else None)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def write_recipe(recipe: Recipe, folder: Path) -> None:
    """The resolved recipe as recipe.toml beside the checkpoint (atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".recipe.toml.tmp"
    tmp.write_text(to_toml(recipe), encoding="utf-8")
    tmp.replace(folder / "recipe.toml")


def write_history(history: list[dict[str, Any]], folder: Path) -> None:
    """Start metrics.jsonl from a checkpoint's history where the folder has none yet."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")


# ------------------------------------------------------------------ entry points


def fresh_state() -> dict[str, Any]:
    return {"epochs": {}, "current": None, "done": False}


def recipe_arch(recipe: Recipe) -> Arch:
    """The members-stage arch a recipe describes (the class count needs no image data)."""
    m = recipe.model
    return Arch(kind=m.kind, depth=m.depth, width=m.width, members=m.members,
                templates=m.templates, stem=m.stem, classes=num_classes(recipe.data),
                grown=False, mid_bn=m.mid_bn)


def new_run(recipe: Recipe) -> dict[str, Any]:
    """The initialised members checkpoint of a recipe (seeded), before any training."""
    torch.manual_seed(recipe.seed)
    arch = recipe_arch(recipe)
    model = build_model(arch)
    lineage = [{"op": "init", "seed": recipe.seed, "arch": arch.to_dict(), "time": ck.now()}]
    return ck.make(recipe.dump(), model, lineage=lineage, train=fresh_state(), history=[],
                   flops={"phases": {}, "images": {}, "total": 0})


def train_recipe(recipe: Recipe, out: Path, device: torch.device,
                 stop_after: int | None = None, force: bool = False) -> Path:
    """`mg train RECIPE`: initialise, write the initial checkpoint, train the members."""
    path = ck.check_out_path(out / "members.pt", force=force)
    trainer = Trainer(new_run(recipe), path, device, stop_after)
    trainer.load_data()
    dist.barrier()  # every rank has checked the path and the data before rank 0 writes
    if dist.is_main():
        (path.parent / "metrics.jsonl").unlink(missing_ok=True)  # a new run starts a new log
    trainer.write()
    return trainer.run()


def resume(path: Path, sets: list[str], device: torch.device, out: Path | None = None,
           stop_after: int | None = None, force: bool = False) -> Path:
    """`mg train --resume CKPT`: continue whatever phase the checkpoint is in."""
    ckpt = ck.load(path)
    recipe = override(ckpt["recipe"], sets, f"{path}: recipe")
    ckpt["recipe"] = recipe.dump()
    if ckpt.get("target") is not None and ckpt["target"] not in recipe.grow:
        raise MgError(f"{path}: grow target '{ckpt['target']}' is not in its recipe")
    dest = path if out is None else ck.check_out_path(out, force)
    return Trainer(ckpt, dest, device, stop_after).run()

