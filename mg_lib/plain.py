"""Plain layers: ordinary weights of exactly the shapes the template layers synthesise.

They back the `plain` model kind (scratch baselines, speed comparisons, exported nets, and
the random and Net2Net growth baselines), so one WRN definition serves both kinds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PlainConv2d(nn.Conv2d):
    """nn.Conv2d for k members: grouped (block-diagonal) before growth, dense after."""

    def __init__(self, members: int, in_per_member: int, out_per_member: int, kernel: int,
                 stride: int = 1, split_input: bool = True, grown: bool = False):
        groups = members if split_input and not grown else 1
        cin = members * in_per_member if split_input else in_per_member
        super().__init__(cin, members * out_per_member, kernel, stride, kernel // 2,
                         groups=groups, bias=False)
        self.k, self.cin, self.cout = members, in_per_member, out_per_member
        self.split_input, self.grown = split_input, grown
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")


class PlainLinear(nn.Module):
    """The k-member classifier with a plain weight, no bias (see TemplateLinear)."""

    def __init__(self, members: int, in_per_member: int, classes: int, grown: bool = False):
        super().__init__()
        self.k, self.cin, self.classes, self.grown = members, in_per_member, classes, grown
        shape = (classes, members * in_per_member) if grown else (members, classes, in_per_member)
        self.weight = nn.Parameter(torch.empty(shape))
        with torch.no_grad():
            self.weight.normal_(0.0, math.sqrt(2.0 / in_per_member))

    def forward(self, x: Tensor) -> Tensor:
        if self.grown:
            return F.linear(x, self.weight)
        return torch.einsum("nki,koi->kno", x.view(x.shape[0], self.k, self.cin), self.weight)
