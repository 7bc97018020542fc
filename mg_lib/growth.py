"""Growth: k trained members become one network k times wider, offline, without data.

`mixture` (MixtureGrowth): every hidden layer's grown weight is the k x k block grid
W[i][j] = sum_t c[i,j,t] B[i,t]. Diagonal blocks keep the trained member coefficients, so
each member is still inside; off-diagonal blocks get *new coefficient vectors over already
trained templates* (`new_coefs`). Stem, BatchNorm and classifier keep their tensors: the
member-major layout already makes them the stacked / concatenated grown layers.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .errors import MgError
from .export import plain_state_dict
from .plain import PlainConv2d, PlainLinear
from .recipe import GrowConfig
from .templates import TemplateConv2d
from .wrn import WRN, Arch, build_model, extract_member

COEF_MODES = ("zero", "orthogonal", "copy", "random")


def new_coefs(diag: Tensor, mode: str, scale: float = 0.1, noise: float = 0.01,
              generator: torch.Generator | None = None) -> Tensor:
    """The (k, k, T) coefficient grid whose diagonal is the trained `diag` (k, T).

    zero:       c_ij = 0 (function-preserving: grown(x) = sum of member logits).
    orthogonal: c_ij orthogonal to c_ii and to row i's other new vectors as far as T allows
                (T >= k: all of them; else orthogonal to c_ii only; T = 1: a random sign),
                with norm scale * ||c_ii||.
    copy:       c_ij = c_ii + noise * ||c_ii|| * unit random direction.
    random:     a random direction with norm scale * ||c_ii||.
    """
    if mode not in COEF_MODES:
        raise MgError(f"unknown --coefs '{mode}' (choose from {', '.join(COEF_MODES)})")
    k, t = diag.shape
    d = diag.detach().to(torch.float64)
    grid = torch.zeros(k, k, t, dtype=torch.float64)
    for i in range(k):
        cii, norm = d[i], d[i].norm()
        basis = [cii / norm] if norm > 0 else []
        for j in range(k):
            if i == j:
                grid[i, j] = cii
                continue
            if mode == "zero":
                continue
            v = torch.randn(t, generator=generator, dtype=torch.float64)
            if mode == "copy":
                grid[i, j] = cii + noise * norm * v / v.norm()
                continue
            if mode == "orthogonal":
                # Gram-Schmidt against what T still allows; c_ii always comes first.
                room = len(basis) < t
                for u in basis if room else basis[:1] if t > 1 else []:
                    v = v - (v @ u) * u
                if room:
                    basis.append(v / v.norm())
            grid[i, j] = scale * norm * v / v.norm()
    return grid.to(diag.dtype)


def grow_mixture(model: WRN, cfg: GrowConfig, seed: int = 0) -> WRN:
    """Grow a members-stage template WRN by recombining its templates (DESIGN §1)."""
    _check_members(model)
    if model.arch.kind != "template":
        raise MgError("--method mixture needs a template model (model.kind = 'template')")
    arch = model.arch
    gen = torch.Generator().manual_seed(seed)
    grown = build_model(arch.as_grown())
    state = model.state_dict()
    for name, layer in grown.named_modules():
        if isinstance(layer, TemplateConv2d) and layer.grown:
            key = f"{name}.coefs"
            state[key] = new_coefs(state[key], cfg.coefs, cfg.coef_scale, cfg.coef_noise, gen)
    grown.load_state_dict(state)
    return grown


# ------------------------------------------------------------ baselines
# Both baselines produce a *plain* grown net (ordinary weights of the grown shapes): they are
# what the paper compares against, not template mixtures.


def _plain_grown(arch: Arch) -> WRN:
    return build_model(replace(arch, kind="plain", grown=True))


def grow_random(model: WRN, cfg: GrowConfig, seed: int = 0) -> WRN:
    """Naive growth: members stay on the diagonal, the new off-diagonal blocks get fresh
    random weights (Frobenius norm coef_scale x the diagonal block's, as the mixture's new
    blocks have) instead of new combinations of trained templates."""
    _check_members(model)
    gen = torch.Generator().manual_seed(seed)
    k = model.arch.members
    grown = _plain_grown(model.arch)
    state = plain_state_dict(model)  # the members as plain tensors: grouped convs, BN, fc
    for name, layer in grown.named_modules():
        key = f"{name}.weight"
        if isinstance(layer, PlainConv2d) and layer.grown:
            w = state[key]  # (k*o, n, h, w): member blocks stacked on rows
            o, n = layer.cout, layer.cin
            full = torch.zeros(k * o, k * n, *w.shape[2:])
            for i in range(k):  # k x k blocks, once, offline
                diag = w[i * o:(i + 1) * o]
                for j in range(k):
                    block = diag
                    if i != j:
                        r = torch.randn(diag.shape, generator=gen)
                        block = r * (cfg.coef_scale * diag.norm() / r.norm())
                    full[i * o:(i + 1) * o, j * n:(j + 1) * n] = block
            state[key] = full
        elif isinstance(layer, PlainLinear):  # (k, classes, in) -> [W_0 | W_1 | ...]
            state[key] = state[key].permute(1, 0, 2).reshape(layer.classes, -1)
    grown.load_state_dict(state)
    return grown


def grow_net2net(model: WRN, cfg: GrowConfig, seed: int = 0) -> WRN:
    """Net2Net-wider (Chen et al. 2016) from member 0 alone to k x its width.

    Every unit is replicated k times (new channel c reads old channel c mod C); a layer's
    weights from replicated inputs are divided by k, so the sum over the copies is the old
    weight and the widened net computes member 0's logits exactly. BN is replicated. Then
    noise (relative std `cfg.noise`) breaks the symmetry between the copies.
    """
    _check_members(model)
    k = model.arch.members
    gen = torch.Generator().manual_seed(seed)
    grown = _plain_grown(model.arch)
    layers = dict(grown.named_modules())
    state: dict[str, Tensor] = {}
    for key, v in plain_state_dict(extract_member(model, 0)).items():
        owner = layers[key.rpartition(".")[0]]
        if isinstance(owner, PlainConv2d):  # (o, n, h, w) of member 0
            split = k if owner.split_input else 1
            state[key] = _jitter(v.repeat(k, split, 1, 1) / split, cfg.noise, gen)
        elif isinstance(owner, PlainLinear):  # (1, classes, in) of member 0
            state[key] = _jitter(v[0].repeat(1, k) / k, cfg.noise, gen)
        else:  # BatchNorm: every channel's statistics and affine, replicated
            state[key] = v.repeat(k) if v.dim() else v
    grown.load_state_dict(state)
    return grown


def _jitter(w: Tensor, noise: float, gen: torch.Generator) -> Tensor:
    if noise == 0:
        return w
    return w + noise * w.std() * torch.randn(w.shape, generator=gen)


def _check_members(model: WRN) -> None:
    if model.arch.grown:
        raise MgError("this checkpoint is already grown; grow a members checkpoint")
    if model.arch.members < 2:
        raise MgError("growth needs at least 2 members (model.members)")


def grow(model: WRN, cfg: GrowConfig, seed: int = 0) -> WRN:
    """Dispatch on `cfg.method`. Reads no data: the model's tensors are all it needs."""
    methods = {"mixture": grow_mixture, "random": grow_random, "net2net": grow_net2net}
    if cfg.method not in methods:
        raise MgError(f"unknown --method '{cfg.method}' (choose from {', '.join(methods)})")
    return methods[cfg.method](model, cfg, seed)

