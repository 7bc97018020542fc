"""What each `mg` command does, as library calls the CLI wraps: grow, eval, flops, info."""

from __future__ import annotations

import difflib
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import torch

from . import checkpoint as ck
from . import flops as fl
from .data import load_data
from .errors import MgError
from .growth import grow
from .loader import Loader
from .metrics import evaluate
from .recipe import GrowConfig, Recipe, load_recipe, override
from .train import fresh_state, recipe_arch, write_history, write_recipe

# ------------------------------------------------------------------ grow


def grow_checkpoint(path: Path, target: str, coefs: str | None, method: str | None,
                    out: Path | None, sets: list[str], force: bool = False) -> Path:
    """`mg grow`: members checkpoint -> grown checkpoint, offline (no data is read)."""
    _check_choice("--coefs", coefs, "coefs")
    _check_choice("--method", method, "method")
    ckpt = ck.load(path)
    if ckpt["stage"] != "members":
        raise MgError(f"{path}: is already grown (stage '{ckpt['stage']}'); grow a members "
                      "checkpoint")
    # A target missing from the recipe may be defined on the spot with --set grow.NAME.KEY=V;
    # --coefs/--method alone must not conjure a target out of a typo.
    known = list(ckpt["recipe"].get("grow", {}))
    if target not in known and not any(s.startswith(f"grow.{target}.") for s in sets):
        close = difflib.get_close_matches(target, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise MgError(f"{path}: unknown grow target '{target}' ({hint}the recipe defines: "
                      f"{', '.join(known) or 'none'})")
    extra = list(sets)
    if coefs is not None:
        extra.append(f"grow.{target}.coefs={coefs}")
    if method is not None:
        extra.append(f"grow.{target}.method={method}")
    recipe = override(ckpt["recipe"], extra, f"{path}: recipe")
    cfg = recipe.grow[target]
    dest = ck.check_out_path(out if out is not None else path.parent / f"grown-{target}.pt",
                             force)
    grown = grow(ck.model_from(ckpt), cfg, seed=recipe.seed)
    lineage = ckpt["lineage"] + [{
        "op": "grow", "target": target, "method": cfg.method, "coefs": cfg.coefs,
        "coef_scale": cfg.coef_scale, "from": str(path), "time": ck.now()}]
    new = ck.make(recipe.dump(), grown, lineage=lineage,
                  train={**fresh_state(), "members": ckpt["train"]},
                  history=list(ckpt["history"]),
                  flops=ckpt["flops"], target=target)
    ck.save(new, dest)
    # Like every checkpoint, the grown one gets its recipe and metrics beside it.
    write_recipe(recipe, dest.parent)
    write_history(new["history"], dest.parent)
    return dest


def _check_choice(option: str, value: str | None, field: str) -> None:
    """An unknown --coefs/--method value, named as the option the user typed."""
    allowed = get_args(GrowConfig.model_fields[field].annotation)
    if value is not None and value not in allowed:
        raise MgError(f"{option} {value}: unknown; choose {', '.join(allowed)}")


# ------------------------------------------------------------------ eval


def eval_checkpoint(path: Path, split: str, member: int | None, ensemble: bool,
                    sets: list[str], device: str | torch.device = "auto") -> dict[str, Any]:
    """`mg eval`: accuracy of a grown net, one member, or the members' ensemble.

    Inside a process group each rank walks its own shard and the counts are summed, so
    every rank returns the numbers of the whole split.
    """
    from . import distributed as dist
    from .runtime import resolve_device

    if split not in ("val", "test"):
        raise MgError(f"--split {split}: choose val or test")
    ckpt = ck.load(path)
    arch = ck.arch_of(ckpt)
    if arch.grown and (member is not None or ensemble):
        raise MgError(f"{path}: is a grown net; --member and --ensemble apply to members "
                      "checkpoints")
    if member is not None and ensemble:
        raise MgError("give --member M or --ensemble, not both")
    if member is not None and not 0 <= member < arch.members:
        raise MgError(f"--member {member}: this checkpoint has members 0..{arch.members - 1}")
    recipe = override(ckpt["recipe"], sets, f"{path}: recipe")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    data = load_data(recipe.data, recipe.seed)
    part = data.val if split == "val" else data.test
    if len(part) == 0:
        raise MgError(f"{path}: the {split} split is empty (data.val_fraction = 0?)")
    shard = dist.active()
    loader = Loader(part, recipe.data.eval_batch_size, mean=data.mean, std=data.std,
                    train=False, device=dev, rank=dist.rank() if shard else 0,
                    world=dist.world_size() if shard else 1)
    model = ck.model_from(ckpt, dev)
    res = evaluate(model, loader.epoch(0), arch.members, arch.grown,
                   reduce=dist.sum_tensor if shard else None)
    head = {"checkpoint": str(path), "stage": ckpt["stage"], "split": split}
    if arch.grown:
        return {**head, "what": f"grown net ({arch.describe()})", **res}
    members = res.pop("members")
    if member is not None:
        return {**head, "what": f"member {member}", **members[member]}
    return {**head, "what": f"ensemble of {arch.members} members", **res, "members": members}


# ------------------------------------------------------------------ flops


def planned_images(r: Recipe) -> int | None:
    """Training images per epoch from the recipe alone (None when the data must be read)."""
    d = r.data
    n = {"cifar10": 50000, "cifar100": 50000, "synthetic": d.synthetic_images}.get(d.dataset)
    if n is None:
        return None
    if d.limit is not None:
        n = min(n, d.limit)
    return n - (max(1, round(d.val_fraction * n)) if d.val_fraction > 0 else 0)


def flops_report(source: Path, sets: list[str]) -> dict[str, Any]:
    """`mg flops`: costs of every stage of a recipe or checkpoint; reads no data."""
    ckpt = None
    if source.suffix == ".toml":
        recipe = load_recipe(source, sets)
        arch = recipe_arch(recipe)
    else:
        ckpt = ck.load(source)
        recipe = override(ckpt["recipe"], sets, f"{source}: recipe")
        arch = replace(ck.arch_of(ckpt), grown=False)
    images = planned_images(recipe)
    if ckpt is not None and images is None:
        images = _images_per_epoch(ckpt)
    epochs = {"members": recipe.train.epochs, **{n: g.epochs for n, g in recipe.grow.items()}}
    targets = {n: arch.as_grown() for n in recipe.grow}
    rep = fl.report(arch, targets, epochs=epochs, images_per_epoch=images,
                    batch_size=recipe.data.batch_size)
    rep["source"] = str(source)
    rep["images_per_epoch"] = images
    if images is not None:
        # The baseline the paper compares with: the grown shape trained from scratch for as
        # many epochs as one member trains (the 200-epoch WRN-28-10 of the paper's recipe).
        scratch = fl.train_flops(fl.count(arch.as_grown()).flops, images * recipe.train.epochs)
        rep["scratch_large"] = {"epochs": recipe.train.epochs, "train_flops": scratch,
                                "planned_ratio": {
                                    n: (rep["phases"]["members"]["train_flops"]
                                        + rep["phases"][f"grow:{n}"]["train_flops"]) / scratch
                                    for n in recipe.grow}}
    if ckpt is not None:
        rep["spent"] = ckpt["flops"]
        if "scratch_large" in rep:
            rep["scratch_large"]["spent_ratio"] = ckpt["flops"]["total"] / \
                rep["scratch_large"]["train_flops"]
    return rep


def _images_per_epoch(ckpt: dict[str, Any]) -> int | None:
    seen = ckpt["flops"].get("images", {})
    epochs = ckpt["train"].get("members", ckpt["train"]).get("epochs", {})
    for phase in ("members", "member0"):
        if seen.get(phase) and epochs.get(phase):
            return seen[phase] // epochs[phase]
    return None


def _n(v: int) -> str:
    return f"{v:,}"


def flops_text(rep: dict[str, Any]) -> str:
    lines = [f"# {rep['convention']}", f"# {rep['training_convention']}", ""]
    head = f"{'phase':<16}{'MACs':>18}{'FLOPs':>18}{'weights':>14}{'params':>14}{'synth FLOPs':>16}"
    lines.append(head)
    for name, p in rep["phases"].items():
        c = p["cost"]
        lines.append(f"{name:<16}{_n(c['macs']):>18}{_n(c['flops']):>18}{_n(c['weights']):>14}"
                     f"{_n(c['params']):>14}{_n(c['synthesis_flops']):>16}")
    if rep.get("total_train_flops") is not None:
        lines.append("")
        lines.append(f"planned training FLOPs ({rep['images_per_epoch']:,} images/epoch):")
        for name, p in rep["phases"].items():
            if "train_flops" in p:
                lines.append(f"  {name:<14}{p['epochs']:>5} epochs {_n(p['train_flops']):>26}")
        lines.append(f"  {'total':<26}{_n(rep['total_train_flops']):>24}")
    if "spent" in rep:
        lines.append("")
        lines.append("spent so far (training FLOPs):")
        for name, v in rep["spent"].get("phases", {}).items():
            lines.append(f"  {name:<14}{_n(v):>30}")
        lines.append(f"  {'total':<14}{_n(rep['spent'].get('total', 0)):>30}")
    if "scratch_large" in rep:
        s = rep["scratch_large"]
        lines.append("")
        lines.append(f"scratch-large: the grown shape from scratch, {s['epochs']} epochs: "
                     f"{_n(s['train_flops'])} FLOPs")
        for name, ratio in s["planned_ratio"].items():
            lines.append(f"  planned members + grow:{name} / scratch-large = {ratio:.3f}")
        if "spent_ratio" in s:
            lines.append(f"  spent so far / scratch-large = {s['spent_ratio']:.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ info


def info(path: Path) -> dict[str, Any]:
    """`mg info`: what a checkpoint holds, as plain data."""
    ckpt = ck.load(path)
    arch = ck.arch_of(ckpt)
    params = sum(v.numel() for k, v in ckpt["model"].items()
                 if v.is_floating_point() and "running" not in k)
    train = {k: v for k, v in ckpt["train"].items() if k not in ("current", "members")}
    cur = ckpt["train"].get("current") or {}
    train["position"] = {"phase": cur.get("phase"), "step": cur.get("step")}
    return {
        "checkpoint": str(path), "format": ckpt["format"], "version": ckpt["version"],
        "created": ckpt.get("created"), "stage": ckpt["stage"], "target": ckpt.get("target"),
        "arch": arch.to_dict(), "describe": arch.describe(),
        "tensors": {k: list(v.shape) for k, v in ckpt["model"].items()},
        "parameters": params, "lineage": ckpt["lineage"], "train": train,
        "flops": ckpt["flops"], "history": ckpt["history"],
    }


def info_text(res: dict[str, Any]) -> str:
    t = res["train"]
    lines = [f"{res['checkpoint']}: {res['describe']}",
             f"stage {res['stage']}" + (f" (target {res['target']})" if res["target"] else ""),
             f"parameters {res['parameters']:,} in {len(res['tensors'])} tensors",
             f"epochs done {t.get('epochs', {})}, finished: {t.get('done')}",
             f"training FLOPs so far {res['flops'].get('total', 0):,}",
             "lineage: " + " -> ".join(
                 op["op"] + (f"({op.get('target')}, {op.get('method')}, {op.get('coefs')})"
                             if op["op"] == "grow" else "") for op in res["lineage"])]
    for h in res["history"][-3:]:
        v = h.get("val_top1")
        lines.append(f"  {h['phase']} epoch {h['epoch']}: train loss {h['train_loss']:.4f}, "
                     f"val top1 {'-' if v is None else f'{100 * v:.2f}%'}")
    return "\n".join(lines)

