"""Template layers: a layer owns a bank of templates and coefficients, not a weight.

Every layer here serves k members at once. Channels are laid out member-major: channels
[m*C:(m+1)*C] belong to member m. Member m owns templates B[m] of shape (T, *weight) and

    members stage:  W_m    = sum_t c[m, t]    * B[m, t]     (block-diagonal net, groups=k)
    grown stage:    W[i,j] = sum_t c[i, j, t] * B[i, t]     (full k x k block grid)

so one member network is a slice of the members net, and growth only adds the
off-diagonal coefficient vectors c[i, j] (i != j) over templates that are already trained.
Each forward synthesises the weight in one batched matmul (the whole k x k grid at once);
at inference the weight is synthesised once and reused ("folded") until a parameter
changes, so a template net then costs exactly a plain one. BatchNorm needs nothing special:
its statistics are per channel, so k member BNs side by side are one BN over k x C channels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def init_templates(bank: Tensor, fan_in: int) -> None:
    """Kaiming-normal templates: with unit-norm coefficients, W has Kaiming variance."""
    with torch.no_grad():
        bank.normal_(0.0, math.sqrt(2.0 / fan_in))


def init_coefs(coefs: Tensor) -> None:
    """Random unit-norm coefficient vectors (last dim = templates)."""
    with torch.no_grad():
        coefs.normal_()
        coefs.div_(coefs.norm(dim=-1, keepdim=True))


class Synthesised(nn.Module):
    """A layer whose weight is synthesised from `templates` and `coefs`, folded at inference.

    Training (or any forward that records gradients) synthesises on every call, so gradients
    reach templates and coefficients. An eval-mode forward without autograd (torch.no_grad,
    inference_mode) reuses the weight it synthesised last, as long as both parameters are the
    same tensors, in the same storage, at the same `_version`: optimiser steps,
    load_state_dict and in-place edits under no_grad all bump `_version`, and `.to()` moves
    the storage, so a stale weight is never used. Edits through `param.data` bypass version
    counters; `train()` / `eval()` drop the folded weight, so call one after such an edit.
    """

    templates: nn.Parameter
    coefs: nn.Parameter

    def __init__(self) -> None:
        super().__init__()
        self._folded: tuple[tuple[Any, ...], Tensor] | None = None

    def weight(self) -> Tensor:
        raise NotImplementedError

    def _fold_key(self) -> tuple[Any, ...]:
        return tuple((id(p), p._version, p.data_ptr(), p.device, p.dtype)
                     for p in (self.templates, self.coefs))

    def current_weight(self) -> Tensor:
        """The weight this forward uses: synthesised now, or the folded one at inference."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.weight()
        key = self._fold_key()
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, self.weight())
        return self._folded[1]

    def train(self, mode: bool = True) -> Synthesised:
        self._folded = None  # a mode switch always resynthesises (covers `.data` edits)
        return super().train(mode)


class TemplateConv2d(Synthesised):
    """A k-member convolution whose weight is synthesised from templates.

    `split_input=False` is the stem: every member sees all input channels (the image), and
    the member weights stack along outputs. Otherwise input channels are member-major too and
    the layer is block-diagonal (members stage) or a full block grid (`grown=True`).
    """

    def __init__(self, members: int, templates: int, in_per_member: int, out_per_member: int,
                 kernel: int, stride: int = 1, split_input: bool = True, grown: bool = False):
        super().__init__()
        if grown and not split_input:
            raise ValueError("a stem layer has no block grid to grow")
        self.k, self.t = members, templates
        self.cin, self.cout = in_per_member, out_per_member
        self.kernel, self.stride, self.padding = kernel, stride, kernel // 2
        self.split_input, self.grown = split_input, grown
        self.templates = nn.Parameter(torch.empty(members, templates, out_per_member,
                                                  in_per_member, kernel, kernel))
        shape = (members, members, templates) if grown else (members, templates)
        self.coefs = nn.Parameter(torch.empty(shape))
        init_templates(self.templates, in_per_member * kernel * kernel)
        init_coefs(self.coefs)

    @property
    def in_channels(self) -> int:
        return self.k * self.cin if self.split_input else self.cin

    @property
    def out_channels(self) -> int:
        return self.k * self.cout

    @property
    def groups(self) -> int:
        return self.k if (self.split_input and not self.grown) else 1

    def weight(self) -> Tensor:
        """The synthesised weight: (k*out, k*in or in, kernel, kernel)."""
        k, o, n, h = self.k, self.cout, self.cin, self.kernel
        # One batched matmul over the member axis (bmm; measured a little faster than the
        # equivalent einsum on CPU). The bank is viewed, never copied.
        bank = self.templates.reshape(k, self.t, o * n * h * h)
        if self.grown:
            # (k, k, T) @ (k, T, D): every block (i, j) of the grid at once, in row i's
            # templates; one transpose-copy then lays blocks out as (i, o, j, n).
            w = torch.matmul(self.coefs, bank).view(k, k, o, n, h, h)
            return w.transpose(1, 2).reshape(k * o, k * n, h, h)
        return torch.matmul(self.coefs.unsqueeze(1), bank).view(k * o, n, h, h)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.current_weight(), None, self.stride, self.padding, 1,
                        self.groups)

    def extra_repr(self) -> str:
        stage = "grown" if self.grown else "members"
        return (f"k={self.k}, T={self.t}, {self.in_channels}->{self.out_channels}, "
                f"kernel={self.kernel}, stride={self.stride}, {stage}")


class TemplateLinear(Synthesised):
    """The k-member classifier. Members: k separate logit sets; grown: [W_0 | W_1 | ...].

    No bias, as the reference. The grown classifier reads all members' features, so its
    logits are the sum of member logits: that is what makes `--coefs zero` exact.
    """

    def __init__(self, members: int, templates: int, in_per_member: int, classes: int,
                 grown: bool = False):
        super().__init__()
        self.k, self.t, self.cin, self.classes, self.grown = (
            members, templates, in_per_member, classes, grown)
        self.templates = nn.Parameter(torch.empty(members, templates, classes, in_per_member))
        self.coefs = nn.Parameter(torch.empty(members, templates))
        init_templates(self.templates, in_per_member)
        init_coefs(self.coefs)

    def weight(self) -> Tensor:
        """(k, classes, in): member m's classifier is [m]."""
        k, bank = self.k, self.templates.reshape(self.k, self.t, -1)
        return torch.matmul(self.coefs.unsqueeze(1), bank).view(k, self.classes, self.cin)

    def plain_weight(self) -> Tensor:
        """The weight in PlainLinear's layout: (k, classes, in), or (classes, k*in) grown."""
        w = self.current_weight()
        return w.transpose(0, 1).reshape(self.classes, self.k * self.cin) if self.grown else w

    def forward(self, x: Tensor) -> Tensor:
        w = self.current_weight()
        if self.grown:  # [W_0 | W_1 | ...] over the concatenated features
            return F.linear(x, w.transpose(0, 1).reshape(self.classes, self.k * self.cin))
        # members: (k, N, classes), member m reads only its own features
        return torch.einsum("nki,koi->kno", x.view(x.shape[0], self.k, self.cin), w)

    def extra_repr(self) -> str:
        return f"k={self.k}, T={self.t}, {self.k * self.cin}->{self.classes}, grown={self.grown}"
