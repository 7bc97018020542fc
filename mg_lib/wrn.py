"""Wide ResNet (Zagoruyko & Komodakis) for 32x32 inputs, built for k members.

One definition serves every case: the members stage (k narrow nets side by side, as one
block-diagonal net), the grown stage (one net k times wider), template or plain layers.
Widths: a member has stem/k stem channels and 16w, 32w, 64w channels in its three groups,
so the grown net of 2 x WRN-28-5 members has exactly the shapes of a plain WRN-28-10.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .plain import PlainConv2d, PlainLinear
from .templates import TemplateConv2d, TemplateLinear


@dataclass(frozen=True)
class Arch:
    """Everything needed to rebuild a model's shapes; stored in every checkpoint."""

    kind: str = "template"  # template | plain
    depth: int = 16
    width: int = 1  # member width factor
    members: int = 2
    templates: int = 2
    stem: int = 16  # grown stem channels; each member gets stem // members
    classes: int = 10
    grown: bool = False
    mid_bn: bool = True

    @property
    def blocks_per_group(self) -> int:
        return (self.depth - 4) // 6

    @property
    def group_channels(self) -> tuple[int, int, int]:
        """Channels of one member in each of the three groups."""
        return (16 * self.width, 32 * self.width, 64 * self.width)

    def as_grown(self) -> Arch:
        return replace(self, grown=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Arch:
        return cls(**d)

    def describe(self) -> str:
        k, w = self.members, self.width
        if self.grown:
            return f"WRN-{self.depth}-{k * w} grown from {k} x WRN-{self.depth}-{w} ({self.kind})"
        return f"{k} x WRN-{self.depth}-{w} members ({self.kind}, T={self.templates})"


class Layers:
    """Factory for the layers of one arch: template or plain, members or grown."""

    def __init__(self, arch: Arch):
        self.a = arch

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1,
             split_input: bool = True) -> nn.Module:
        a, grown = self.a, self.a.grown and split_input
        if a.kind == "plain":
            return PlainConv2d(a.members, cin, cout, kernel, stride, split_input, grown)
        return TemplateConv2d(a.members, a.templates, cin, cout, kernel, stride, split_input, grown)

    def bn(self, channels: int) -> nn.BatchNorm2d:
        # Per-channel statistics: k member BNs side by side are one BN over k x C channels.
        return nn.BatchNorm2d(self.a.members * channels)

    def linear(self, cin: int, classes: int) -> nn.Module:
        a = self.a
        if a.kind == "plain":
            return PlainLinear(a.members, cin, classes, a.grown)
        return TemplateLinear(a.members, a.templates, cin, classes, a.grown)


class Block(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut."""

    def __init__(self, make: Layers, cin: int, cout: int, stride: int, mid_bn: bool):
        super().__init__()
        self.bn1 = make.bn(cin)
        self.conv1 = make.conv(cin, cout, 3, stride)
        self.bn2 = make.bn(cout) if mid_bn else None
        self.conv2 = make.conv(cout, cout, 3)
        # 1x1 projection where the shape changes; it reads the pre-activated input.
        self.shortcut = make.conv(cin, cout, 1, stride) if (cin != cout or stride != 1) else None

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y) if self.bn2 is not None else y)
        y = self.conv2(y)
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WRN(nn.Module):
    """forward(x) gives (k, N, classes) member logits before growth, (N, classes) after."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        make = Layers(arch)
        self.stem = make.conv(3, arch.stem // arch.members, 3, split_input=False)
        blocks: list[nn.Module] = []
        cin = arch.stem // arch.members
        for g, cout in enumerate(arch.group_channels):
            for b in range(arch.blocks_per_group):
                stride = 2 if (g > 0 and b == 0) else 1
                blocks.append(Block(make, cin, cout, stride, arch.mid_bn))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.bn = make.bn(cin)
        self.fc = make.linear(cin, arch.classes)

    def features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = F.relu(self.bn(x))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def build_model(arch: Arch) -> WRN:
    return WRN(arch)


# ------------------------------------------------------------ one member alone
# A member is a 1-member WRN (stem/k stem channels). Sequential training trains that small
# net, so the other members' tensors are never touched: no weight decay or momentum leaks
# into them, and no compute is spent on them. Every tensor of the members net is member-major
# along dim 0, so member m's share of a tensor of n rows per member is rows [m*n, (m+1)*n).


def member_arch(arch: Arch) -> Arch:
    if arch.grown:
        raise ValueError("a grown net has no separable members")
    return replace(arch, members=1, stem=arch.stem // arch.members)


def _member_rows(full: Tensor, part: Tensor, m: int) -> Tensor:
    if full.dim() == 0:  # num_batches_tracked
        return full
    n = part.shape[0]
    assert full.shape[0] == n * (full.shape[0] // n) and full.shape[1:] == part.shape[1:]
    return full[m * n:(m + 1) * n]


def extract_member(model: WRN, m: int) -> WRN:
    """Member m of a members-stage net as a standalone 1-member net (a copy)."""
    sub = build_model(member_arch(model.arch)).to(next(model.parameters()).device)
    full = model.state_dict()
    sub.load_state_dict({k: _member_rows(full[k], v, m).clone() for k, v in
                         sub.state_dict().items()})
    return sub


@torch.no_grad()
def insert_member(model: WRN, m: int, sub: WRN) -> None:
    """Write a trained 1-member net back into member m's slices of `model`, in place."""
    full = model.state_dict()
    for k, v in sub.state_dict().items():
        if v.dim() == 0:
            full[k].copy_(v)
        else:
            _member_rows(full[k], v, m).copy_(v)
