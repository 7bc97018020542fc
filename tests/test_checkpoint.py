"""O6 and O9: checkpoints reload bit-identically in a fresh process, load with
weights_only=True, and hold everything `mg eval` and `mg grow` need."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mg_lib import checkpoint as ck
from mg_lib.errors import RunError
from mg_lib.growth import grow
from mg_lib.recipe import GrowConfig, Recipe
from mg_lib.wrn import Arch, build_model


def grown_checkpoint(path: Path) -> dict:
    torch.manual_seed(0)
    members = build_model(Arch(depth=10, width=1, members=2, templates=3))
    members.train()
    with torch.no_grad():  # give BN real running statistics (the reference loses them)
        for _ in range(3):
            members(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    model = grow(members, GrowConfig(coefs="orthogonal"), seed=0)
    ckpt = ck.make(Recipe().dump(), model, lineage=[{"op": "grow"}], train={"epochs": {}},
                   history=[], flops={"phases": {}, "total": 0}, target="wide")
    ck.save(ckpt, path)
    return ckpt


def test_fresh_process_gives_bit_identical_logits(tmp_path: Path) -> None:
    """O6: a grown checkpoint re-loaded in a new process gives the very same logits."""
    path = tmp_path / "g.pt"
    grown_checkpoint(path)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    model = ck.model_from(ck.load(path)).eval()
    with torch.no_grad():
        here = model(x)
    code = (
        "import torch, sys; from mg_lib import checkpoint as ck\n"
        "torch.set_num_threads(1)\n"
        f"m = ck.model_from(ck.load({str(path)!r})).eval()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        f"with torch.no_grad(): torch.save(m(x), {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    there = torch.load(tmp_path / "y.pt", weights_only=True)
    torch.set_num_threads(1)
    with torch.no_grad():
        here = model(x)
    torch.set_num_threads(2)
    assert torch.equal(here, there)
    # BN running statistics survived the round trip (not reset to 0 / 1)
    bn = model.blocks[0].bn1
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_plain_containers_only(tmp_path: Path) -> None:
    """O9: the file loads with weights_only=True and holds only plain types and tensors."""
    path = tmp_path / "g.pt"
    grown_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    allowed = (dict, list, tuple, str, int, float, bool, type(None), torch.Tensor)

    def walk(v: object) -> None:
        assert isinstance(v, allowed), type(v)
        if isinstance(v, dict):
            for k, x in v.items():
                assert isinstance(k, (str, int))
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(raw)
    assert raw["format"] == ck.FORMAT and raw["version"] == ck.VERSION
    assert raw["stage"] == "grown" and raw["arch"]["grown"] is True
    assert all(t.device.type == "cpu" for t in raw["model"].values())


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "g.pt"
    grown_checkpoint(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RunError, match="disk full"):
        ck.save({"format": "x"}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.pt"]  # no temp file left behind
