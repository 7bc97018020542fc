"""The command line, end to end: train -> grow -> eval -> resume, stdout contracts,
O3 through the CLI (grown top-1 == ensemble top-1), O5 (grow reads no data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_sets
from typer.testing import CliRunner

import mg

SMALL = str(ROOT / "recipes" / "small.toml")


def run(*args: str, code: int = 0) -> str:
    res = CliRunner().invoke(mg.app, list(args))
    assert res.exit_code == code, (res.stdout, res.stderr, res.exception)
    return res.stdout


def test_help_lists_commands() -> None:
    out = run("--help")
    for cmd in ("train", "grow", "eval", "flops", "info"):
        assert cmd in out


def test_end_to_end_on_real_images(tmp_path: Path, npz_path: Path) -> None:
    """Train 1 epoch on 50 real images, grow (zero coefs), eval, resume the grown net."""
    sets = ["--set", "data.dataset=npz", "--set", f"data.path={npz_path}",
            "--set", "data.limit=50", "--set", "data.batch_size=16", "--set", "train.epochs=1",
            "--set", "model.depth=10", "--set", "data.val_fraction=0.2"]
    ck = run("train", SMALL, "--out", str(tmp_path / "run"), *sets).strip()
    assert ck == str(tmp_path / "run" / "members.pt")  # stdout is the path and nothing else
    g = run("grow", ck, "--to", "wide", "--coefs", "zero", "--out", str(tmp_path / "g.pt"))
    assert g.strip() == str(tmp_path / "g.pt")
    grown = json.loads(run("eval", g.strip(), "--json"))
    ens = json.loads(run("eval", ck, "--ensemble", "--json"))
    assert grown["count"] == ens["count"] == 10
    assert grown["top1"] == ens["top1"]  # O3 through the CLI
    assert 0.0 <= grown["top1"] <= 1.0 and 0.0 <= grown["top5"] <= 1.0
    one = json.loads(run("eval", ck, "--member", "1", "--json"))
    assert one["top1"] == ens["members"][1]["top1"]
    test = json.loads(run("eval", g.strip(), "--split", "test", "--json"))
    assert test["count"] == 1000
    r = run("train", "--resume", g.strip(), "--set", "grow.wide.epochs=1").strip()
    assert r == g.strip()
    info = json.loads(run("info", r, "--json"))
    assert info["stage"] == "grown" and info["train"]["epochs"] == {"grow:wide": 1}
    assert [op["op"] for op in info["lineage"]] == ["init", "grow"]
    assert info["history"][-1]["phase"] == "grow:wide"
    torch.load(r, weights_only=True)
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "recipe.toml").exists()


def test_grow_reads_no_data(tmp_path: Path) -> None:
    """O5: growth works with the dataset gone."""
    data = tmp_path / "d.npz"
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(40) % 10, x_test=rng.integers(0, 255, (10, 32, 32, 3),
                                                              dtype=np.uint8),
             y_test=np.arange(10) % 10, classes=np.array([str(i) for i in range(10)]))
    ck = run("train", SMALL, "--out", str(tmp_path / "run"), "--set", "data.dataset=npz",
             "--set", f"data.path={data}", "--set", "train.epochs=0",
             "--set", "model.depth=10").strip()
    data.unlink()
    g = run("grow", ck, "--to", "wide").strip()
    assert Path(g).exists() and g.endswith("grown-wide.pt")
    info = json.loads(run("info", g, "--json"))
    assert info["lineage"][-1]["coefs"] == "orthogonal"  # the default


def test_flops_reads_no_data_and_prints_json(tmp_path: Path) -> None:
    out = json.loads(run("flops", SMALL, "--json", "--set", "model.depth=16",
                         "--set", "model.width=2", "--set", "data.dataset=cifar10"))
    assert out["phases"]["grow:wide"]["cost"]["flops"] == 785_224_704


@pytest.mark.parametrize("args,msg", [
    (["train", "missing.toml"], "recipe not found"),
    (["grow", "missing.pt", "--to", "wide"], "checkpoint not found"),
    (["train"], "give a RECIPE"),
])
def test_user_errors_are_one_line(args: list[str], msg: str) -> None:
    res = CliRunner().invoke(mg.app, args)
    assert res.exit_code == 2
    assert res.stdout == ""
    assert msg in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_tiny_joint_then_grow_and_resume(tmp_path: Path) -> None:
    ck = run("train", SMALL, "--out", str(tmp_path), *tiny_sets()).strip()
    g = run("grow", ck, "--to", "wide").strip()
    r = run("train", "--resume", g).strip()
    assert r == g
    res = json.loads(run("eval", r, "--json"))
    assert res["stage"] == "grown" and res["count"] == 12


def test_issue_3_resume_on_real_images(tmp_path: Path, npz_path: Path) -> None:
    """small.toml on the real subset: 2 epochs straight == stop after 1 + --resume to 2."""
    sets = ["--set", "data.dataset=npz", "--set", f"data.path={npz_path}",
            "--set", "data.limit=120", "--set", "data.batch_size=32", "--set", "train.epochs=2",
            "--set", "model.depth=10"]
    a = run("train", SMALL, "--out", str(tmp_path / "a"), *sets).strip()
    b = run("train", SMALL, "--out", str(tmp_path / "b"), "--stop-after", "1", *sets).strip()
    assert torch.load(b, weights_only=True)["train"]["done"] is False
    assert run("train", "--resume", b).strip() == b
    ta, tb = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    for d in ("a", "b"):
        assert (tmp_path / d / "metrics.jsonl").exists() and (tmp_path / d / "recipe.toml").exists()


def test_grown_checkpoint_has_its_files_beside(tmp_path: Path) -> None:
    ck = run("train", SMALL, "--out", str(tmp_path / "run"), *tiny_sets()).strip()
    g = run("grow", ck, "--to", "wide", "--out", str(tmp_path / "elsewhere" / "g.pt")).strip()
    folder = Path(g).parent
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["phase"] for x in lines] == ["members"]
    assert "[grow.wide]" in (folder / "recipe.toml").read_text()


def test_flops_issue_4_anchor() -> None:
    out = json.loads(run("flops", SMALL, "--json", "--set", "model.depth=28",
                         "--set", "model.width=5", "--set", "model.members=2",
                         "--set", "data.dataset=cifar100"))
    cost = out["phases"]["grow:wide"]["cost"]
    assert (cost["flops"], cost["macs"]) == (10_486_772_736, 5_243_386_368)
