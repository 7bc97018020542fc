"""Growth: k trained members become one network k times wider, offline, without data.

`mixture` (MixtureGrowth): every hidden layer's grown weight is the k x k block grid
W[i][j] = sum_t c[i,j,t] B[i,t]. Diagonal blocks keep the trained member coefficients, so
each member is still inside; off-diagonal blocks get *new coefficient vectors over already
trained templates* (`new_coefs`). Stem, BatchNorm and classifier keep their tensors: the
member-major layout already makes them the stacked / concatenated grown layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import MgError
from .recipe import GrowConfig
from .templates import TemplateConv2d
from .wrn import WRN, build_model

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
    arch = model.arch
    if arch.grown:
        raise MgError("this checkpoint is already grown; grow a members checkpoint")
    if arch.kind != "template":
        raise MgError("--method mixture needs a template model (model.kind = 'template')")
    if arch.members < 2:
        raise MgError("growth needs at least 2 members (model.members)")
    gen = torch.Generator().manual_seed(seed)
    grown = build_model(arch.as_grown())
    state = model.state_dict()
    for name, layer in grown.named_modules():
        if isinstance(layer, TemplateConv2d) and layer.grown:
            key = f"{name}.coefs"
            state[key] = new_coefs(state[key], cfg.coefs, cfg.coef_scale, cfg.coef_noise, gen)
    grown.load_state_dict(state)
    return grown


def grow(model: WRN, cfg: GrowConfig, seed: int = 0) -> WRN:
    """Dispatch on `cfg.method`. Reads no data: the model's tensors are all it needs."""
    if cfg.method == "mixture":
        return grow_mixture(model, cfg, seed)
    raise MgError(f"--method {cfg.method} is not available yet")

