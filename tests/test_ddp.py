"""Multi-process training (torchrun / DDP) on CPU with gloo: 2 processes, tiny nets.

The exactness oracle: one DDP step on a global batch B split over 2 ranks gives the weights
of one single-process step on the same batch B (SyncBN makes BN statistics global).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from conftest import ROOT, tiny_sets

from mg_lib import checkpoint as ck
from mg_lib import distributed as dist
from mg_lib import ops
from mg_lib.recipe import Recipe, override
from mg_lib.train import new_run, resume, train_recipe
from mg_lib.wrn import Arch, build_model, extract_member

WORLD = 2
# 23 images: 7 held out for val (odd, so the two eval shards differ: 4 + 3), 16 train = one
# global batch of 16, i.e. exactly one optimiser step per phase, with crop, flip and cutout.
STEP = {
    "seed": 3,
    "data": {"dataset": "synthetic", "synthetic_images": 32, "limit": 23, "val_fraction": 0.3,
             "batch_size": 16, "eval_batch_size": 3, "crop": True, "flip": True, "cutout": 8},
    "model": {"depth": 10, "width": 1, "members": 2, "templates": 2, "stem": 8},
    "train": {"epochs": 1, "lr": 0.2, "momentum": 0.9, "members": "joint", "sync_bn": True},
    "grow": {"wide": {"epochs": 1, "lr": 0.2}},
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny nets run 50x slower on 2 busy cores when OpenMP threads fight the ranks for them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step_recipe(*sets: str) -> Recipe:
    return override(copy.deepcopy(STEP), list(sets), "step recipe")


def run_jobs(out: Path) -> None:
    """What both sides train: a joint and a sequential run, and a grown net's phase."""
    cpu = torch.device("cpu")
    train_recipe(step_recipe(), out / "joint", cpu)
    train_recipe(step_recipe("train.members='sequential'"), out / "seq", cpu)
    resume(out / "grown.pt", [], cpu)


def _worker(rank: int, store: str, out: str) -> None:
    """One rank with torchrun's environment, then mg's own training code.

    The process group meets through a file, not a TCP port another job could take; mg's
    dist.init (exercised through torchrun below) then finds it already initialised.
    """
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                             world_size=WORLD)
    dist.init(torch.device("cpu"))
    try:
        run_jobs(Path(out))
        train_recipe(step_recipe("train.sync_bn=false"), Path(out) / "nosync", torch.device("cpu"))
    finally:
        dist.shutdown()


def model_of(path: Path) -> dict[str, torch.Tensor]:
    return ck.load(path)["model"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_ddp_step_equals_single_process_step(tmp_path: Path) -> None:
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    members = ck.save(new_run(step_recipe()), tmp_path / "init.pt")
    grown = ops.grow_checkpoint(members, "wide", None, None, tmp_path / "grown.pt", [])
    for side in (ddp, one):
        side.mkdir()
        shutil.copy(grown, side / "grown.pt")
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(ddp)), nprocs=WORLD, join=True)
    run_jobs(one)
    runs = {"joint": "joint/members.pt", "seq": "seq/members.pt", "grown": "grown.pt"}
    start = {"joint": model_of(members), "seq": model_of(members), "grown": model_of(grown)}
    for name, rel in runs.items():
        a, b = model_of(ddp / rel), model_of(one / rel)
        assert max_diff(b, start[name]) > 1e-2, name  # the step moved the weights
        # Every tensor (templates, coefficients, BN affine and running statistics) matches.
        assert max_diff(a, b) < 1e-6, name
    assert ck.load(ddp / "seq/members.pt")["train"]["epochs"] == {"member0": 1, "member1": 1}
    # Logged training loss and accuracy are over the global batch, not rank 0's share.
    for run in ("joint", "seq"):
        a, b = (ck.load(side / run / "members.pt")["history"] for side in (ddp, one))
        assert [h["train_top1"] for h in a] == [h["train_top1"] for h in b]
        assert [h["train_loss"] for h in a] == pytest.approx([h["train_loss"] for h in b],
                                                             rel=1e-6)
    # Without SyncBN each rank normalises by its own half-batch statistics: not the same step.
    assert max_diff(model_of(ddp / "nosync/members.pt"), model_of(one / "joint/members.pt")) > 1e-4
    # Only rank 0 wrote: one checkpoint per run folder, no temporary files left behind, one
    # metrics line per epoch (phases: joint 1, seq 2).
    for run, epochs in (("joint", 1), ("seq", 2), ("nosync", 1)):
        assert sorted(p.name for p in (ddp / run).iterdir()) == [
            "members.pt", "metrics.jsonl", "recipe.toml"]
        assert len((ddp / run / "metrics.jsonl").read_text().splitlines()) == epochs
    # The val metrics the DDP run logged (4 + 3 images over 2 ranks, reduced) are exactly a
    # single-process evaluation of the checkpoint rank 0 wrote, BN statistics included (the
    # nosync run's ranks end the epoch with different running statistics).
    for run in ("joint", "nosync"):
        path = ddp / run / "members.pt"
        line = ck.load(path)["history"][-1]
        res = ops.eval_checkpoint(path, "val", None, False, [], "cpu")
        assert res["count"] == 7
        assert line["val_top1"] == res["top1"]
        assert line["val_loss"] == pytest.approx(res["loss"], rel=1e-6)


# ------------------------------------------------------------------ DDP needs no unused params


@pytest.mark.parametrize("kind", ["template", "plain"])
@pytest.mark.parametrize("shape", ["members", "member", "grown", "grown-no-mid-bn"])
def test_every_parameter_gets_a_gradient(kind: str, shape: str) -> None:
    """DDP runs with find_unused_parameters=False: every parameter must get a gradient."""
    arch = Arch(kind=kind, depth=10, width=1, members=2, templates=2, stem=8,
                grown=shape.startswith("grown"), mid_bn=shape != "grown-no-mid-bn")
    net = build_model(arch)
    if shape == "member":
        net = extract_member(net, 1)
    torch.manual_seed(0)
    net(torch.randn(2, 3, 8, 8)).square().sum().backward()  # 8x8: fast, BN still has 8 values
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing and len(list(net.parameters())) > 10


def test_sync_bn_keeps_checkpoint_keys_and_parameters() -> None:
    net = build_model(Arch(depth=10, width=1, members=2, stem=8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = {n: id(p) for n, p in net.named_parameters()}
    dist.convert_sync_bn(net, torch.device("cpu"))
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(isinstance(m, dist.GlobalBatchNorm2d) for m in bns)
    after = net.state_dict()
    assert list(after) == list(before) and max_diff(after, before) == 0.0
    # The very same Parameter objects: an optimiser built before the swap still updates them.
    assert {n: id(p) for n, p in net.named_parameters()} == params
    # Outside a process group it is plain BatchNorm.
    x = torch.randn(4, 3, 32, 32)
    ref = build_model(Arch(depth=10, width=1, members=2, stem=8))
    ref.load_state_dict(before)
    assert torch.equal(net(x), ref(x))


def test_eval_walks_only_this_ranks_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What rank 1 of 2 evaluates before the reduction: its own 3 of the 7 val images."""
    path = ck.save(new_run(step_recipe()), tmp_path / "m.pt")
    whole = ops.eval_checkpoint(path, "val", None, False, [], "cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "active", lambda: True)
    monkeypatch.setattr(dist, "sum_tensor", lambda t: t)  # no peer: rank 1's counts alone
    part = ops.eval_checkpoint(path, "val", None, False, [], "cpu")
    assert (whole["count"], part["count"]) == (7, 3)


# ------------------------------------------------------------------ through torchrun


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc_per_node=2 -m mg ARGS...` on CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", "-m", "mg", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_torchrun_train_stop_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Sequential members: each phase wraps a fresh member net in DDP; SyncBN on.
    sets = tiny_sets(**{"train.epochs": 2, "train.members": "sequential",
                        "train.sync_bn": True, "data.val_fraction": 0.27})
    r = torchrun("train", str(ROOT / "recipes/small.toml"), "--out", str(out), "--stop-after", "1",
                 *sets)
    assert r.returncode == 0, r.stderr
    path = out / "members.pt"
    assert r.stdout.splitlines() == [str(path)]  # one path, from rank 0 only
    assert sorted(p.name for p in out.iterdir()) == ["members.pt", "metrics.jsonl",
                                                     "recipe.toml"]
    c = ck.load(path)
    assert c["train"]["epochs"] == {"member0": 1} and not c["train"]["done"]
    assert len(c["history"]) == 1

    r = torchrun("train", "--resume", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(path)]
    c = ck.load(path)
    assert c["train"]["epochs"] == {"member0": 2, "member1": 2} and c["train"]["done"]
    assert [(h["phase"], h["epoch"]) for h in c["history"]] == [
        ("member0", 1), ("member0", 2), ("member1", 1), ("member1", 2)]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    # 13 val (7 + 6 per rank), 35 train: 2 steps of 16 an epoch, counted over both ranks.
    assert c["flops"]["images"] == {"member0": 64, "member1": 64}
    # The DDP validation of member 1 (sharded, reduced) equals a one-process evaluation.
    res = ops.eval_checkpoint(path, "val", 1, False, [], "cpu")
    assert c["history"][-1]["val_top1"] == res["top1"]
    assert c["history"][-1]["val_loss"] == pytest.approx(res["loss"], rel=1e-6)

    # `mg eval` under torchrun: shards reduced, one JSON object from rank 0, exactly the
    # one-process numbers (ensemble and per member, 13 images).
    r = torchrun("eval", str(path), "--json")
    assert r.returncode == 0, r.stderr
    got, one = json.loads(r.stdout), ops.eval_checkpoint(path, "val", None, False, [], "cpu")
    assert got["count"] == one["count"] == 13
    for a, b in [(got, one), *zip(got["members"], one["members"], strict=True)]:
        assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
