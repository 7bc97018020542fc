"""O1: a template layer is exactly F.conv2d / F.linear with the synthesised weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mg_lib.templates import TemplateConv2d, TemplateLinear


def naive_weight(layer: TemplateConv2d) -> torch.Tensor:
    """The block rule of DESIGN §1 written out block by block (the slow, obvious way)."""
    k, b, c = layer.k, layer.templates, layer.coefs
    if not layer.split_input:
        return torch.cat([sum(c[i, t] * b[i, t] for t in range(layer.t)) for i in range(k)])
    if not layer.grown:
        return torch.cat([sum(c[i, t] * b[i, t] for t in range(layer.t)) for i in range(k)])
    rows = [torch.cat([sum(c[i, j, t] * b[i, t] for t in range(layer.t)) for j in range(k)],
                      dim=1) for i in range(k)]
    return torch.cat(rows, dim=0)


@pytest.mark.parametrize("k,split,grown,stride,kernel", [
    (1, True, False, 1, 3), (2, True, False, 2, 3), (2, True, True, 1, 3),
    (4, True, True, 2, 1), (2, False, False, 1, 3), (3, True, True, 1, 3)])
def test_conv_matches_f_conv2d(k: int, split: bool, grown: bool, stride: int,
                               kernel: int) -> None:
    torch.manual_seed(0)
    layer = TemplateConv2d(k, 3, 2, 3, kernel, stride, split_input=split, grown=grown).double()
    x = torch.randn(2, layer.in_channels, 6, 6, dtype=torch.float64)
    w = naive_weight(layer)
    groups = k if split and not grown else 1
    ref = F.conv2d(x, w, None, stride, kernel // 2, 1, groups)
    assert torch.allclose(layer(x), ref, atol=1e-12)
    assert layer.weight().shape == w.shape


@pytest.mark.parametrize("grown", [False, True])
def test_conv_gradcheck(grown: bool) -> None:
    torch.manual_seed(1)
    layer = TemplateConv2d(2, 2, 1, 2, 3, 1, grown=grown).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"templates": b, "coefs": c}, (x,))

    b = layer.templates.detach().clone().requires_grad_()
    c = layer.coefs.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, b, c))
    # and the gradient equals that of F.conv2d through the synthesised weight
    out = layer(x)
    out.square().sum().backward()
    w = naive_weight(layer).detach().requires_grad_()
    F.conv2d(x.detach(), w, None, 1, 1, 1, 1 if grown else 2).square().sum().backward()
    gw = w.grad
    # dL/dc[i, (j,) t] = <dL/dW_block, B[i, t]>
    if grown:
        blocks = gw.view(2, 2, 2, 1, 3, 3).permute(0, 2, 1, 3, 4, 5)  # (i, j, o, n, h, w)
        expect = torch.einsum("ijonhw,itonhw->ijt", blocks, layer.templates.detach())
    else:
        blocks = gw.view(2, 2, 1, 3, 3)
        expect = torch.einsum("ionhw,itonhw->it", blocks, layer.templates.detach())
    assert torch.allclose(layer.coefs.grad, expect, atol=1e-10)


@pytest.mark.parametrize("grown", [False, True])
def test_linear_matches_f_linear(grown: bool) -> None:
    torch.manual_seed(2)
    k, t, cin, classes = 3, 2, 4, 5
    layer = TemplateLinear(k, t, cin, classes, grown=grown).double()
    x = torch.randn(7, k * cin, dtype=torch.float64)
    ws = [sum(layer.coefs[i, s] * layer.templates[i, s] for s in range(t)) for i in range(k)]
    out = layer(x)
    if grown:
        ref = F.linear(x, torch.cat(ws, dim=1))  # [W_0 | W_1 | W_2]
        assert torch.allclose(out, ref, atol=1e-12)
    else:
        for i in range(k):
            ref = F.linear(x[:, i * cin:(i + 1) * cin], ws[i])
            assert torch.allclose(out[i], ref, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: layer(z), (x.requires_grad_(),))


def test_unit_coefficients_give_kaiming_scale() -> None:
    # init: templates ~ N(0, 2/fan_in), unit-norm coefs => W has Kaiming variance
    torch.manual_seed(3)
    layer = TemplateConv2d(2, 4, 64, 64, 3)
    w = layer.weight().detach()
    expected = 2.0 / (64 * 9)
    assert abs(w.var().item() / expected - 1.0) < 0.05
