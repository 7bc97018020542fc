"""The fast paths are exact: eval folding never serves a stale weight, gradients still reach
templates and coefficients, and `mg export` gives a plain WRN with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mg
from mg_lib import checkpoint as ck
from mg_lib.export import FORMAT, load_export, to_plain
from mg_lib.growth import grow
from mg_lib.recipe import GrowConfig, Recipe
from mg_lib.templates import Synthesised
from mg_lib.wrn import Arch, build_model


def tiny(grown: bool = False, k: int = 2, seed: int = 0) -> torch.nn.Module:
    """A WRN-10-1 template net with non-trivial BatchNorm tensors (so copying them matters)."""
    torch.manual_seed(seed)
    model = build_model(Arch(depth=10, width=1, members=k, templates=2))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    if grown:
        model = grow(model, GrowConfig(coefs="orthogonal", coef_scale=0.5), seed=seed)
    return model.eval()


def layers(model: torch.nn.Module) -> list[Synthesised]:
    return [m for m in model.modules() if isinstance(m, Synthesised)]


def fresh_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits from a rebuilt copy that has never folded anything."""
    other = build_model(model.arch)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        return other.eval()(x)


X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("grown", [False, True])
def test_folding_reuses_the_weight_until_a_parameter_changes(grown: bool) -> None:
    model = tiny(grown)
    with torch.no_grad():
        a = model(X)
        folded = [m._folded[1] for m in layers(model)]  # type: ignore[index]
        b = model(X)
    assert torch.equal(a, b)
    assert all(m._folded[1] is w for m, w in zip(layers(model), folded, strict=True))  # type: ignore[index]
    assert torch.allclose(a, fresh_logits(model, X), atol=1e-6)
    # An in-place edit of one coefficient (no_grad, eval mode) must reach the output.
    conv = model.blocks[0].conv1
    with torch.no_grad():
        conv.coefs[(0, 0, 0) if grown else (0, 0)] += 1.0
        c = model(X)
    assert (c - a).abs().max().item() > 1e-3
    assert torch.allclose(c, fresh_logits(model, X), atol=1e-6)
    # ... and so must load_state_dict of other tensors.
    other = tiny(grown, seed=1)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        d = model(X)
    assert torch.allclose(d, fresh_logits(other, X), atol=1e-6)
    assert (d - c).abs().max().item() > 1e-3


def test_optimizer_steps_in_eval_mode_are_seen() -> None:
    """Fine-tuning with frozen BN (eval mode, grad on) then predicting: never a stale weight."""
    model = tiny()
    with torch.no_grad():
        before = model(X)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(X).square().mean().backward()  # eval mode, grad enabled: synthesised, not folded
    assert all(m.templates.grad is not None and m.coefs.grad.abs().sum() > 0
               for m in layers(model))
    opt.step()
    with torch.no_grad():
        after = model(X)
    assert (after - before).abs().max().item() > 1e-3
    assert torch.allclose(after, fresh_logits(model, X), atol=1e-6)


@pytest.mark.parametrize("grown", [False, True])
def test_train_mode_gradients_reach_templates_and_coefs(grown: bool) -> None:
    model = tiny(grown)
    with torch.no_grad():
        model(X)  # fold first: training must not use the folded weight
    model.train()
    assert all(m._folded is None for m in layers(model))
    model(X).logsumexp(-1).sum().backward()
    for m in layers(model):
        assert m.templates.grad is not None and m.templates.grad.abs().sum() > 0
        assert m.coefs.grad is not None and m.coefs.grad.abs().sum() > 0


@pytest.mark.parametrize("grown", [False, True])
def test_to_plain_gives_the_same_function(grown: bool) -> None:
    model = tiny(grown)
    plain = to_plain(model)
    assert plain.arch.kind == "plain" and not layers(plain)
    with torch.no_grad():
        assert (plain(X) - model(X)).abs().max().item() <= 1e-5
    model.train(), plain.train()  # batch statistics: BN affine tensors were copied too
    with torch.no_grad():
        assert (plain(X) - model(X)).abs().max().item() <= 1e-5


def save_ckpt(model: torch.nn.Module, path: Path) -> Path:
    ckpt = ck.make(Recipe().dump(), model, lineage=[], train={"epochs": {}, "current": None,
                   "done": False}, history=[], flops={"phases": {}, "images": {}, "total": 0},
                   target="wide" if model.arch.grown else None)
    return ck.save(ckpt, path)


def cli(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(mg.app, list(args))
    return res.exit_code, res.stdout, res.stderr


@pytest.mark.parametrize("grown", [False, True])
def test_mg_export_loads_into_the_plain_kind(tmp_path: Path, grown: bool) -> None:
    model = tiny(grown)
    src = save_ckpt(model, tmp_path / "m.pt")
    code, out, err = cli("export", str(src), "--out", str(tmp_path / "plain.pt"))
    assert code == 0, err
    assert out == f"{tmp_path / 'plain.pt'}\n"  # stdout is the path and nothing else
    blob = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert blob["format"] == FORMAT and blob["stage"] == ("grown" if grown else "members")
    arch = Arch.from_dict(blob["arch"])
    assert arch == Arch.from_dict({**model.arch.to_dict(), "kind": "plain"})
    plain = build_model(arch)
    plain.load_state_dict(blob["state_dict"])  # strict: every key and shape matches
    assert not any(k.endswith(("templates", "coefs")) for k in blob["state_dict"])
    with torch.no_grad():
        want = model(X)
        assert (plain.eval()(X) - want).abs().max().item() <= 1e-5
        assert (load_export(tmp_path / "plain.pt")(X) - want).abs().max().item() <= 1e-5
    # Re-exporting over an export is fine; the default path sits beside CKPT.
    assert cli("export", str(src), "--out", str(tmp_path / "plain.pt"))[0] == 0
    code, out, _ = cli("export", str(src))
    assert code == 0 and out.strip() == str(tmp_path / "m-plain.pt")


def test_mg_export_refuses_to_overwrite_a_checkpoint(tmp_path: Path) -> None:
    src = save_ckpt(tiny(), tmp_path / "m.pt")
    other = save_ckpt(tiny(seed=3), tmp_path / "other.pt")
    before = other.read_bytes()
    code, out, err = cli("export", str(src), "--out", str(other))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "not an mg plain export" in err and other.read_bytes() == before
    code, _, err = cli("export", str(src), "--out", str(src), "--force")
    assert code == 2 and "is the checkpoint being exported" in err
    code, out, err = cli("export", str(tmp_path / "missing.pt"))
    assert code == 2 and out == "" and "not found" in err
