"""O2, O3, O4: growth builds the k x k block grid, preserves the function with zero
coefficients, and concatenates member BatchNorms. Plus the coefficient inits."""

from __future__ import annotations

import pytest
import torch

from mg_lib.growth import grow, new_coefs
from mg_lib.recipe import GrowConfig
from mg_lib.templates import TemplateConv2d
from mg_lib.wrn import Arch, build_model, extract_member


def trained_like(k: int, templates: int = 2, seed: int = 0) -> torch.nn.Module:
    """A members net with non-trivial BN statistics and affine parameters."""
    torch.manual_seed(seed)
    model = build_model(Arch(depth=10, width=1, members=k, templates=templates))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("mode", ["orthogonal", "copy", "random", "zero"])
def test_block_grid(k: int, mode: str) -> None:
    """O2: every grown hidden weight is [sum_t c_ij[t] B_i[t]]_ij, block by block."""
    members = trained_like(k)
    grown = grow(members, GrowConfig(coefs=mode, coef_scale=0.3), seed=1)
    layers = dict(grown.named_modules())
    checked = 0
    for name, old in members.named_modules():
        if not isinstance(old, TemplateConv2d):
            continue
        new = layers[name]
        assert torch.equal(new.templates, old.templates)  # templates are reused as they are
        w = new.weight().detach()
        o, n = new.cout, new.cin
        if not old.split_input:  # the stem stacks member blocks along outputs
            assert torch.allclose(w, old.weight().detach())
            continue
        for i in range(k):
            for j in range(k):
                c = new.coefs[i, j].detach()
                block = torch.einsum("t,tonhw->onhw", c, new.templates[i].detach())
                assert torch.allclose(w[i * o:(i + 1) * o, j * n:(j + 1) * n], block, atol=1e-6)
            # the diagonal is the trained member: its coefficients are unchanged
            assert torch.equal(new.coefs[i, i], old.coefs[i])
        checked += 1
    assert checked == 9  # WRN-10: 3 blocks x 2 convs + 3 projection shortcuts
    # classifier [W_0 | W_1 | ...]
    assert torch.equal(grown.fc.templates, members.fc.templates)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("train_mode", [False, True])
def test_zero_coefs_preserve_function(k: int, train_mode: bool) -> None:
    """O3: with zero new coefficients the grown logits are the sum of member logits."""
    members = trained_like(k, seed=k)
    grown = grow(members, GrowConfig(coefs="zero"))
    members.train(train_mode)
    grown.train(train_mode)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        summed = members(x).sum(0)
        out = grown(x)
    assert out.shape == summed.shape == (8, 10)
    assert (out - summed).abs().max().item() <= 1e-5
    # and each member alone (its own 1-member net) is still inside
    with torch.no_grad():
        alone = sum(extract_member(members, m).train(train_mode)(x)[0] for m in range(k))
    assert (out - alone).abs().max().item() <= 1e-5


def test_nonzero_coefs_change_function() -> None:
    members = trained_like(2).eval()
    grown = grow(members, GrowConfig(coefs="orthogonal", coef_scale=1.0)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (grown(x) - members(x).sum(0)).abs().max().item() > 1e-2


@pytest.mark.parametrize("k", [2, 4])
def test_grown_bn_is_member_concatenation(k: int) -> None:
    """O4: the grown BN holds the member BNs side by side (weight, bias, mean, var)."""
    members = trained_like(k)
    grown = grow(members, GrowConfig(coefs="zero"))
    subs = [extract_member(members, m) for m in range(k)]
    gbn = dict(grown.named_modules())
    n = 0
    for name, mod in subs[0].named_modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                cat = torch.cat([getattr(dict(s.named_modules())[name], attr) for s in subs])
                assert torch.equal(getattr(gbn[name], attr), cat)
            n += 1
    assert n == 7  # WRN-10: 3 blocks x 2 BNs + the final BN (counted to catch a lost BN)


def test_orthogonal_coefs() -> None:
    g = torch.Generator().manual_seed(0)
    for k, t in [(2, 2), (2, 5), (4, 4), (4, 8)]:
        diag = torch.randn(k, t)
        grid = new_coefs(diag, "orthogonal", scale=0.1, generator=g)
        for i in range(k):
            row = grid[i]
            gram = row @ row.T
            off = gram - torch.diag(torch.diagonal(gram))
            assert off.abs().max().item() < 1e-5 * diag[i].norm().item() ** 2  # all orthogonal
            norms = row.norm(dim=1) / diag[i].norm()
            assert torch.allclose(norms, torch.tensor([1.0 if j == i else 0.1 for j in range(k)]))


def test_orthogonal_when_t_is_small() -> None:
    # T = 2 < k = 4: each new vector is still orthogonal to c_ii (as far as T allows)
    diag = torch.randn(4, 2)
    grid = new_coefs(diag, "orthogonal", scale=0.5, generator=torch.Generator().manual_seed(1))
    for i in range(4):
        for j in range(4):
            if i != j:
                assert abs(float(grid[i, j] @ diag[i])) < 1e-5
                assert abs(grid[i, j].norm().item() / diag[i].norm().item() - 0.5) < 1e-5


def test_copy_and_random_coefs() -> None:
    diag = torch.randn(2, 3)
    cp = new_coefs(diag, "copy", noise=0.01, generator=torch.Generator().manual_seed(2))
    assert abs((cp[0, 1] - diag[0]).norm().item() / diag[0].norm().item() - 0.01) < 1e-5
    rnd = new_coefs(diag, "random", scale=0.3, generator=torch.Generator().manual_seed(2))
    assert abs(rnd[1, 0].norm().item() / diag[1].norm().item() - 0.3) < 1e-5
    zero = new_coefs(diag, "zero")
    assert zero[0, 1].abs().sum() == 0 and torch.equal(zero[1, 1], diag[1])


def test_growth_is_seeded() -> None:
    members = trained_like(2)
    a = grow(members, GrowConfig(coefs="random"), seed=5).state_dict()
    b = grow(members, GrowConfig(coefs="random"), seed=5).state_dict()
    c = grow(members, GrowConfig(coefs="random"), seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("k", [2, 4])
def test_net2net_preserves_member0_before_noise(k: int) -> None:
    """Net2Net-wider: replicated units, split outgoing weights -> member 0's exact logits."""
    members = trained_like(k).eval()
    grown = grow(members, GrowConfig(method="net2net", noise=0.0)).eval()
    assert grown.arch.kind == "plain" and grown.arch.grown
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (grown(x) - members(x)[0]).abs().max().item() <= 1e-5
        noisy = grow(members, GrowConfig(method="net2net", noise=0.05)).eval()
        assert (noisy(x) - members(x)[0]).abs().max().item() > 1e-4  # symmetry broken


def test_random_growth_blocks() -> None:
    members = trained_like(2).eval()
    grown = grow(members, GrowConfig(method="random", coef_scale=0.3), seed=0).eval()
    assert grown.arch.kind == "plain"
    conv, old = grown.blocks[1].conv1, members.blocks[1].conv1
    o, n = conv.cout, conv.cin
    w, members_w = conv.weight.detach(), old.weight().detach()
    for i in range(2):
        diag = members_w[i * o:(i + 1) * o]
        assert torch.allclose(w[i * o:(i + 1) * o, i * n:(i + 1) * n], diag)
        off = w[i * o:(i + 1) * o, (1 - i) * n:(2 - i) * n]
        assert abs(off.norm().item() / diag.norm().item() - 0.3) < 1e-4
        # fresh weights: not in the span of member i's templates
        basis = members.blocks[1].conv1.templates[i].detach().reshape(2, -1)
        coef = torch.linalg.lstsq(basis.T, off.reshape(-1, 1)).solution
        resid = off.reshape(-1) - (basis.T @ coef).reshape(-1)
        assert resid.norm().item() > 0.9 * off.norm().item()
    with torch.no_grad():
        zero = grow(members, GrowConfig(method="random", coef_scale=0.0)).eval()
        x = torch.randn(4, 3, 32, 32)
        assert (zero(x) - members(x).sum(0)).abs().max().item() <= 1e-5
