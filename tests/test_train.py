"""The engine: exact resume (O7), joint == alone gradients, member independence,
divergence, interrupts, the files beside a checkpoint, training-FLOP totals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, sets_list, tiny_sets

from mg_lib import checkpoint as ck
from mg_lib.errors import RunError
from mg_lib.flops import phase_forward_flops
from mg_lib.recipe import apply_overrides, validate
from mg_lib.train import lr_at, member_losses, resume, train_recipe
from mg_lib.wrn import Arch, build_model, extract_member

CPU = torch.device("cpu")


def recipe(**extra: object):
    return validate(apply_overrides({}, sets_list(tiny_sets(**extra))))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return ck.load(path)["model"]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mode", ["joint", "sequential"])
def test_stop_and_resume_is_bit_identical(tmp_path: Path, mode: str) -> None:
    """O7: 2 epochs straight == stop after 1, --resume, train 1 (cosine schedule)."""
    r = recipe(**{"train.epochs": 2, "train.members": mode})
    straight = train_recipe(r, tmp_path / "a", CPU)
    part = train_recipe(r, tmp_path / "b", CPU, stop_after=1)
    mid = ck.load(part)
    assert not mid["train"]["done"]
    assert resume(part, [], CPU) == part
    assert_same(tensors(straight), tensors(part))
    done = ck.load(part)
    assert done["train"]["done"]
    assert ck.load(straight)["flops"] == done["flops"]


def test_extending_epochs_on_resume(tmp_path: Path) -> None:
    """Raising train.epochs on resume extends the run; with a schedule that does not depend
    on the total (constant), 1 epoch + resume to 2 equals 2 straight, bit for bit."""
    r = recipe(**{"train.epochs": 2, "train.schedule": "constant", "train.members": "joint"})
    straight = train_recipe(r, tmp_path / "a", CPU)
    r1 = recipe(**{"train.epochs": 1, "train.schedule": "constant", "train.members": "joint"})
    one = train_recipe(r1, tmp_path / "b", CPU)
    resume(one, ["train.epochs=2"], CPU)
    assert_same(tensors(straight), tensors(one))
    assert ck.load(one)["train"]["epochs"] == {"members": 2}


def test_joint_step_gives_each_member_its_own_gradient() -> None:
    """One joint step (all members, losses summed) == each member alone on the same batch."""
    torch.manual_seed(0)
    model = build_model(Arch(depth=10, width=1, members=2, templates=2))
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    member_losses(model(x), y).sum().backward()
    for m in range(2):
        alone = extract_member(model, m)
        alone.zero_grad()
        member_losses(alone(x), y).sum().backward()
        for (name, p), (_, q) in zip(alone.named_parameters(), model.named_parameters(),
                                         strict=True):
            n = p.shape[0]
            assert torch.allclose(p.grad, q.grad[m * n:(m + 1) * n], atol=1e-5), name


def test_sequential_member_does_not_touch_the_other(tmp_path: Path) -> None:
    r = recipe(**{"train.epochs": 1, "train.members": "sequential"})
    path = train_recipe(r, tmp_path, CPU, stop_after=1)  # member0 only
    after0 = ck.model_from(ck.load(path))
    resume(path, [], CPU)  # trains member1
    after1 = ck.model_from(ck.load(path))
    a, b = extract_member(after0, 0).state_dict(), extract_member(after1, 0).state_dict()
    # num_batches_tracked is one shared counter (unused: BN momentum is fixed); all else is
    # member 0's own and must be untouched while member 1 trains.
    assert_same({k: v for k, v in a.items() if v.dim()}, {k: v for k, v in b.items() if v.dim()})
    c, d = extract_member(after0, 1).state_dict(), extract_member(after1, 1).state_dict()
    assert any(not torch.equal(c[k], d[k]) for k in c)


def test_files_beside_checkpoint_and_flops(tmp_path: Path) -> None:
    r = recipe(**{"train.epochs": 2, "train.members": "joint"})
    path = train_recipe(r, tmp_path, CPU)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["phase"], x["epoch"]) for x in lines] == [("members", 1), ("members", 2)]
    for key in ("lr", "train_loss", "val_top1", "images_per_s", "seconds", "train_flops"):
        assert key in lines[0]
    saved = validate(__import__("tomllib").loads((tmp_path / "recipe.toml").read_text()))
    assert saved == r
    # 48 images, val 25% -> 36 train, batch 16 drop_last -> 32 images per epoch
    ckpt = ck.load(path)
    fwd = phase_forward_flops(ck.arch_of(ckpt), "members")
    assert ckpt["flops"]["images"] == {"members": 64}
    assert ckpt["flops"]["total"] == 3 * fwd * 64 == lines[-1]["train_flops"]


def test_lr_schedules() -> None:
    from mg_lib.recipe import PhaseConfig

    cos = PhaseConfig(lr=0.1, schedule="cosine")
    assert lr_at(cos, 0, 100, 10) == pytest.approx(0.1)
    assert lr_at(cos, 50, 100, 10) == pytest.approx(0.05)
    warm = PhaseConfig(lr=0.1, warmup_epochs=1)
    assert lr_at(warm, 4, 100, 10) == pytest.approx(0.05)  # 5/10 of the way up
    rest = PhaseConfig(lr=0.1, restarts=1)
    assert lr_at(rest, 50, 100, 10) == pytest.approx(0.1)  # restarted
    assert lr_at(rest, 25, 100, 10) == pytest.approx(0.05)


def test_nan_loss_stops_and_keeps_last_good(tmp_path: Path) -> None:
    r = recipe(**{"train.epochs": 3, "train.members": "joint", "train.lr": 1e30,
                  "train.schedule": "constant"})
    with pytest.raises(RunError, match="loss became"):
        train_recipe(r, tmp_path, CPU)
    ckpt = ck.load(tmp_path / "members.pt")  # the last good one still loads
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_sigterm_writes_resumable_checkpoint(tmp_path: Path) -> None:
    # One thread per process: on 2 busy cores, two threads per step can be 50x slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "mg", "train", str(ROOT / "recipes/small.toml"), "--out",
            str(tmp_path), *tiny_sets(**{"data.synthetic_images": 2000, "data.batch_size": 4,
                                         "train.epochs": 1, "train.members": "joint"})]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=env)
    ckpt = tmp_path / "members.pt"
    deadline = time.time() + 60
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # some steps in; the epoch takes ~6 s here, so the signal lands mid-epoch
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert out == ""
    assert "resume with" in err and "Traceback" not in err
    mid = ck.load(ckpt)
    assert not mid["train"]["done"]
    assert mid["train"]["current"]["step"] > 0  # stopped mid-epoch, at a step boundary
    done = subprocess.run([sys.executable, "-m", "mg", "train", "--resume", str(ckpt)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(ckpt)
    final = ck.load(ckpt)
    assert final["train"]["done"] and final["train"]["epochs"] == {"members": 1}
