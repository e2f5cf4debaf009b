"""K-FAC factor kernels (float32) against dense references: explicit rows for Linear, F.unfold
patches for Conv2d (zero padding, dilation, a grouped layer built directly: A over all input
channels, as before), and bf16 inputs through the preconditioner."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from executor import DPKFAC
from executor.kfac import Conv2dBlock, LinearBlock, factor_kernels

from executor_fixtures import placement_dict

TOL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float64."""
    return float((got.double() - want.double()).norm() / want.double().norm())


def _with_ones(rows: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1) if bias else rows


def linear_reference(a: torch.Tensor, g: torch.Tensor, bias: bool):
    """Dense A and G of a Linear layer, in float64."""
    rows_a = _with_ones(a.double().reshape(-1, a.shape[-1]), bias)
    rows_g = g.double().reshape(-1, g.shape[-1]) * g.shape[0]
    return rows_a.t() @ rows_a / len(rows_a), rows_g.t() @ rows_g / len(rows_g)


def conv_reference(conv: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, bias: bool):
    """Dense A and G of a Conv2d layer from F.unfold patches, in float64."""
    patches = F.unfold(a.double(), conv.kernel_size, dilation=conv.dilation,
                       padding=conv.padding, stride=conv.stride)
    n, positions = a.shape[0], patches.shape[-1]
    rows_a = _with_ones(patches.transpose(1, 2).reshape(-1, patches.shape[1]), bias) / positions
    rows_g = g.double().permute(0, 2, 3, 1).reshape(-1, g.shape[1]) * (n * positions)
    return rows_a.t() @ rows_a / n, rows_g.t() @ rows_g / len(rows_g)


@pytest.mark.parametrize("assemble", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", [(4,), (8,), (3, 5)])
def test_linear_factors(bias, leading, assemble, monkeypatch):
    """Both ways of adding the bias's ones: a copied ones column and assembled blocks."""
    if assemble:
        monkeypatch.setattr(factor_kernels, "SMALL_ROWS", 0)
    torch.manual_seed(0)
    block = LinearBlock(nn.Linear(7, 4, bias=bias), "fc")
    a, g = torch.randn(*leading, 7), torch.randn(*leading, 4)
    want_a, want_g = linear_reference(a, g, bias)
    got_a, got_g = block.compute_factor_a(a), block.compute_factor_g(g)
    assert got_a.shape == (block.dim_a, block.dim_a) and got_g.shape == (4, 4)
    assert got_a.dtype == got_g.dtype == torch.float32
    assert rel_err(got_a, want_a) < TOL and rel_err(got_g, want_g) < TOL


CONVS = [  # (in, out, kernel, stride, padding, extra Conv2d arguments, input H x W)
    (3, 5, 3, 1, 1, {}, (9, 9)),
    (3, 5, 3, 2, 1, {}, (9, 9)),
    (3, 5, 3, 1, 0, {}, (7, 10)),
    (3, 5, 3, 2, 0, {}, (10, 7)),
    (4, 6, 1, 1, 0, {}, (6, 5)),
    (4, 6, 1, 2, 0, {}, (7, 7)),
    (2, 3, (3, 2), (2, 1), (1, 0), {}, (8, 6)),
    (3, 4, 3, 1, 2, {"dilation": 2}, (9, 8)),
    (4, 6, 3, 1, 1, {"groups": 2}, (6, 6)),
    (3, 4, 3, 1, 1, {"padding_mode": "reflect"}, (6, 7)),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cin,cout,kernel,stride,padding,extra,size", CONVS)
def test_conv_factors(cin, cout, kernel, stride, padding, extra, size, bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias, **extra)
    block = Conv2dBlock(conv, "conv")
    a = torch.randn(3, cin, *size)
    g = torch.randn_like(conv(a).detach())
    want_a, want_g = conv_reference(conv, a, g, bias)
    got_a, got_g = block.compute_factor_a(a), block.compute_factor_g(g)
    assert got_a.shape == (block.dim_a, block.dim_a) and got_g.shape == (cout, cout)
    assert got_a.dtype == got_g.dtype == torch.float32
    assert rel_err(got_a, want_a) < TOL and rel_err(got_g, want_g) < TOL


def test_conv_factors_of_channels_last_tensors():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    block = Conv2dBlock(conv, "conv")
    a = torch.randn(2, 4, 5, 6)
    g = torch.randn(2, 6, 5, 6)
    want_a, want_g = conv_reference(conv, a, g, True)
    last = torch.channels_last
    assert rel_err(block.compute_factor_a(a.to(memory_format=last)), want_a) < TOL
    assert rel_err(block.compute_factor_g(g.to(memory_format=last)), want_g) < TOL


def test_conv_string_padding_is_refused():
    block = Conv2dBlock(nn.Conv2d(2, 3, 3, padding="same"), "conv")
    with pytest.raises(ValueError, match="string padding"):
        block.compute_factor_a(torch.randn(1, 2, 5, 5))


def conv_linear() -> nn.Module:
    """Conv2d (bias) -> Linear on 1x6x6 inputs, 5 classes."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(108, 5))


def test_bf16_inputs_give_float32_factors():
    model = conv_linear()
    placement = placement_dict("tests:conv_linear", {"0": 0, "3": 0}, 1)
    precond = DPKFAC(model, placement, lr=0.05, damping=0.01)
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 5, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.cross_entropy(model(x).float(), y).backward()
    references = {"0": lambda a, g: conv_reference(model[0], a, g, True),
                  "3": lambda a, g: linear_reference(a, g, True)}
    try:
        for name, reference in references.items():
            a, g = precond.capture.batch_inputs(name), precond.capture.batch_grad_outputs(name)
            assert g.dtype == torch.bfloat16 and (name == "0" or a.dtype == torch.bfloat16)
            got_a, got_g = precond.batch_factor(name, "a"), precond.batch_factor(name, "g", 1.0)
            assert got_a.dtype == got_g.dtype == torch.float32
            want_a, want_g = reference(a, g)
            assert rel_err(got_a, want_a) < TOL and rel_err(got_g, want_g) < TOL
    finally:
        precond.remove_hooks()


@pytest.mark.parametrize("block", [LinearBlock(nn.Linear(5, 3), "fc"),
                                   Conv2dBlock(nn.Conv2d(2, 4, 3, padding=1), "conv")])
def test_an_empty_batch_gives_non_finite_factors_not_an_error(block):
    """No rows to average over: NaN factors (dropped and counted by fold_factors), never an
    exception or a zero factor that would pull the running average down."""
    if isinstance(block, LinearBlock):
        a, g = torch.zeros(0, 5), torch.zeros(0, 3)
    else:
        a, g = torch.zeros(0, 2, 6, 6), torch.zeros(0, 4, 6, 6)
    assert not torch.isfinite(block.compute_factor_a(a)).all()
    assert not torch.isfinite(block.compute_factor_g(g)).all()
