"""FLOPs, parameters and training-cost accounting (DESIGN §5).

Conventions, printed with every number:
- MACs: multiply-accumulates of conv and linear layers for ONE image (batch 1, image_size^2
  input). FLOPs = 2 x MACs, the convention of torch's FlopCounterMode. BN, ReLU, pooling and
  the residual adds are not counted.
- Template layers synthesise their weights once per forward (an einsum over coefficients and
  templates), independent of batch size: that cost is `synthesis_macs`, kept apart.
- A members-stage arch is the whole members net: all k members, one forward each
  (= k x one member, see `count_member`). A grown arch is the one k-times-wider net.
- Training FLOPs of a phase = 3 x forward FLOPs x images seen (backward ~ 2 x forward).

Everything here is a pure function of archs and numbers: no data, no checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .plain import PlainConv2d, PlainLinear
from .templates import TemplateConv2d, TemplateLinear
from .wrn import Arch, build_model, member_arch

CONVENTION = ("FLOPs = 2 x MACs of conv and linear layers, batch 1, {s}x{s} input; "
              "weight synthesis counted separately (per forward, independent of batch size)")
TRAIN_CONVENTION = ("training FLOPs = 3 x forward FLOPs x images seen (backward ~ 2 x forward); "
                    "synthesis training FLOPs = 3 x synthesis FLOPs x optimiser steps")

_CONVS = (TemplateConv2d, PlainConv2d)
_LINEARS = (TemplateLinear, PlainLinear)


@dataclass(frozen=True)
class Cost:
    """Cost of one forward of one image through a whole net."""

    macs: int  # conv + linear multiply-accumulates
    flops: int  # 2 * macs
    weights: int  # synthesised (plain-equivalent) conv + linear weight entries
    params: int  # trainable parameters: templates + coefficients + BN (plain: weights + BN)
    synthesis_macs: int  # synthesising every weight once (0 for plain layers)

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "synthesis_flops": 2 * self.synthesis_macs}


def _meta_model(arch: Arch) -> nn.Module:
    # Meta tensors carry shapes only: a WRN-28-10 costs no memory and no arithmetic.
    with torch.device("meta"):
        return build_model(arch).eval()


def layer_weights(mod: nn.Module) -> int:
    """Weight entries of a layer as it runs with member=None: blocks x one block.

    Stem and classifier have k blocks (stacked outputs / concatenated inputs); hidden convs
    have k blocks before growth (block-diagonal) and k x k after (the full grid).
    """
    if isinstance(mod, _CONVS):
        kernel = mod.kernel if isinstance(mod, TemplateConv2d) else mod.kernel_size[0]
        blocks = mod.k * mod.k if (mod.split_input and mod.grown) else mod.k
        return blocks * mod.cout * mod.cin * kernel * kernel
    if isinstance(mod, _LINEARS):
        return mod.k * mod.classes * mod.cin
    raise TypeError(f"not a conv or linear layer of mg: {type(mod).__name__}")


def count(arch: Arch, image_size: int = 32) -> Cost:
    """Analytic cost of `arch` (members stage: all k members; grown: the wide net).

    Each layer costs (its weight entries) x (its output positions); a shape-only pass on the
    meta device tells each conv its output size, so any net built from mg layers works.
    """
    model = _meta_model(arch)
    positions: dict[nn.Module, int] = {}

    def hook(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
        positions[mod] = out.shape[-2] * out.shape[-1] if isinstance(mod, _CONVS) else 1

    layers = [m for m in model.modules() if isinstance(m, _CONVS + _LINEARS)]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    for h in handles:
        h.remove()
    macs = weights = synthesis = 0
    for m in layers:
        w = layer_weights(m)
        macs += w * positions[m]
        weights += w
        # einsum c[t] * B[t] per weight entry: T MACs each, whatever the batch size.
        synthesis += m.t * w if isinstance(m, (TemplateConv2d, TemplateLinear)) else 0
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Cost(macs, 2 * macs, weights, params, synthesis)


def count_member(arch: Arch, image_size: int = 32) -> Cost:
    """Cost of one member as a standalone 1-member net (what sequential training runs).

    The members net costs exactly `arch.members` times this. A grown arch is taken back to
    its members stage: a member costs the same before and after growth.
    """
    return count(member_arch(replace(arch, grown=False)), image_size)


def _fold_weights(model: nn.Module) -> None:
    """Synthesise each template layer's weight now, so a later forward runs without it."""
    for m in model.modules():
        if isinstance(m, (TemplateConv2d, TemplateLinear)):
            w = m.weight()
            # An instance attribute shadows the method: forward() gets the folded weight.
            m.weight = lambda _w=w: _w  # type: ignore[method-assign]


def count_with_torch(arch: Arch, image_size: int = 32) -> int:
    """Forward FLOPs measured by FlopCounterMode (batch 1, meta device), synthesis excluded.

    The template weights are synthesised before the counter starts, so it sees only the
    convs and linears. An independent check of `count(arch).flops`.
    """
    model = _meta_model(arch)
    with torch.no_grad():
        _fold_weights(model)
        x = torch.empty(1, 3, image_size, image_size, device="meta")
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops()


def synthesis_flops_with_torch(arch: Arch) -> int:
    """FLOPs of synthesising every weight once, measured by FlopCounterMode."""
    model = _meta_model(arch)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for m in model.modules():
            if isinstance(m, (TemplateConv2d, TemplateLinear)):
                m.weight()
    return counter.get_total_flops()


def train_flops(forward_flops: int, images: int) -> int:
    """Training FLOPs: forward + backward ~ 3 x forward, per image seen."""
    return 3 * forward_flops * images


def phase_forward_flops(arch: Arch, phase: str, image_size: int = 32) -> int:
    """Forward FLOPs per image (synthesis excluded) of a training phase.

    phase: "member{m}" (one member alone), "members" (all k jointly) or "grow:<name>" (the
    grown net; every growth method yields the same shapes, so the name is only a label).
    """
    members = replace(arch, grown=False)
    if phase == "members":
        return count(members, image_size).flops
    if phase.startswith("grow:") and len(phase) > 5:
        return count(members.as_grown(), image_size).flops
    if phase.startswith("member") and phase[6:].isdigit():
        m = int(phase[6:])
        if m >= arch.members:
            raise ValueError(f"phase {phase!r}: member {m} out of range 0..{arch.members - 1}")
        return count_member(arch, image_size).flops
    raise ValueError(f"unknown phase {phase!r}: expected member<m>, members or grow:<name>")


def _phase(arch: Arch, cost: Cost, epochs: int | None, images_per_epoch: int | None,
           batch_size: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"arch": arch.describe(), "cost": cost.to_dict()}
    if epochs is None or images_per_epoch is None:
        return out
    images = epochs * images_per_epoch
    out |= {"epochs": epochs, "images": images, "train_flops": train_flops(cost.flops, images)}
    if batch_size is not None:
        # Synthesis runs once per step, forward and backward: 3 x its FLOPs per step.
        steps = epochs * math.ceil(images_per_epoch / batch_size)
        out |= {"steps": steps, "synthesis_train_flops": 3 * 2 * cost.synthesis_macs * steps}
    return out


def report(arch_members: Arch, grow_targets: Mapping[str, Arch] | None = None, *,
           epochs: Mapping[str, int] | None = None, images_per_epoch: int | None = None,
           batch_size: int | None = None, image_size: int = 32) -> dict[str, Any]:
    """Costs of the members stage and each grow target, with their conventions spelled out.

    grow_targets: name -> grown arch. epochs: "members" (epochs each member trains; joint or
    sequential cost the same FLOPs, since members = k x one member) and grow target names.
    With images_per_epoch, each phase gets its planned training FLOPs; with batch_size too,
    the synthesis training FLOPs (one synthesis per optimiser step; last batch kept).
    """
    members = replace(arch_members, grown=False)
    epochs = dict(epochs or {})
    cost = count(members, image_size)
    phases = {"members": _phase(members, cost, epochs.get("members"), images_per_epoch,
                                batch_size)}
    phases["members"]["member"] = count_member(members, image_size).to_dict()
    for name, arch in (grow_targets or {}).items():
        phases[f"grow:{name}"] = _phase(arch, count(arch, image_size), epochs.get(name),
                                        images_per_epoch, batch_size)
    out: dict[str, Any] = {
        "convention": CONVENTION.format(s=image_size),
        "training_convention": TRAIN_CONVENTION,
        "image_size": image_size,
        "phases": phases,
    }
    if all("train_flops" in p for p in phases.values()):
        out["total_train_flops"] = sum(p["train_flops"] for p in phases.values())
    if all("synthesis_train_flops" in p for p in phases.values()):
        out["total_synthesis_train_flops"] = sum(
            p["synthesis_train_flops"] for p in phases.values())
    return out
