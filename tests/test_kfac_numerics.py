"""K-FAC block numerics against the dense formulas, on small random layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from executor.kfac import ComputeMethod, Conv2dBlock, LinearBlock, make_block



@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons: run every test in double precision, then restore the default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _capture(module: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """Inputs, output gradients (of a batch-mean loss) and the block after one backward."""
    saved = {}

    def hook(mod, args, out):
        saved["a"] = args[0].detach()
        out.register_hook(lambda g: saved.__setitem__("g", g.detach()))

    handle = module.register_forward_hook(hook)
    out = module(x)
    loss = F.mse_loss(out, target, reduction="none").flatten(1).sum(1).mean()
    module.zero_grad()
    loss.backward()
    handle.remove()
    return saved["a"], saved["g"], make_block(module, "layer")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", [(5,), (3, 4)])
def test_linear_factors_match_per_sample_sums(bias, leading):
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=bias)
    x = torch.randn(*leading, 6)
    a, g, block = _capture(layer, x, torch.randn(*leading, 4))
    batch = leading[0]
    rows_a = x.reshape(-1, 6)
    if bias:
        rows_a = torch.cat([rows_a, torch.ones(len(rows_a), 1)], 1)
    expected_a = sum(torch.outer(r, r) for r in rows_a) / len(rows_a)
    per_sample_g = g.reshape(-1, 4) * batch  # gradient of each sample's own loss
    expected_g = sum(torch.outer(r, r) for r in per_sample_g) / len(per_sample_g)
    assert torch.allclose(block.compute_factor_a(a), expected_a)
    assert torch.allclose(block.compute_factor_g(g), expected_g)
    assert block.dim_a == 6 + bias and block.dim_g == 4


@pytest.mark.parametrize("bias", [True, False])
def test_one_sample_kronecker_product_is_the_exact_fisher(bias):
    """With one sample, G (x) A is exactly vec(dW) vec(dW)^T (row-major vec)."""
    torch.manual_seed(1)
    layer = nn.Linear(5, 3, bias=bias)
    a, g, block = _capture(layer, torch.randn(1, 5), torch.randn(1, 3))
    fisher = torch.kron(block.compute_factor_g(g), block.compute_factor_a(a))
    vec = block.grad_matrix().reshape(-1)
    assert torch.allclose(fisher, torch.outer(vec, vec))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_conv_factors_match_explicit_patches(bias, stride, padding):
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=stride, padding=padding, bias=bias)
    x = torch.randn(4, 2, 6, 6)
    a, g, block = _capture(conv, x, torch.randn_like(conv(x)))
    n, _, oh, ow = g.shape
    positions = oh * ow
    xp = F.pad(x, (padding,) * 4)
    patches, grads = [], []
    for i in range(n):
        for r in range(oh):
            for c in range(ow):
                patch = xp[i, :, r * stride:r * stride + 3, c * stride:c * stride + 3].reshape(-1)
                if bias:
                    patch = torch.cat([patch, torch.ones(1)])
                patches.append(patch / positions)
                grads.append(g[i, :, r, c] * n * positions)
    expected_a = sum(torch.outer(p, p) for p in patches) / n
    expected_g = sum(torch.outer(q, q) for q in grads) / len(grads)
    assert torch.allclose(block.compute_factor_a(a), expected_a)
    assert torch.allclose(block.compute_factor_g(g), expected_g)
    assert block.grad_matrix().shape == (3, 18 + bias)


def _random_spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n + 2, generator=gen)
    return m @ m.t() / n


@pytest.mark.parametrize("block_type", [LinearBlock, Conv2dBlock])
def test_eigen_preconditioning_is_the_damped_kronecker_inverse(block_type):
    module = nn.Linear(4, 3) if block_type is LinearBlock else nn.Conv2d(1, 3, 2)
    block = block_type(module, "layer")
    damping = 0.05
    block.factor_a, block.factor_g = _random_spd(block.dim_a, 3), _random_spd(block.dim_g, 4)
    block.decompose_a(ComputeMethod.EIGEN, damping)
    block.decompose_g(ComputeMethod.EIGEN, damping)
    grad = torch.randn(block.dim_g, block.dim_a)
    dense = torch.kron(block.factor_g, block.factor_a) + damping * torch.eye(grad.numel())
    expected = torch.linalg.solve(dense, grad.reshape(-1)).reshape(grad.shape)
    got = block.precondition(grad, ComputeMethod.EIGEN, damping)
    assert torch.allclose(got, expected, atol=1e-8)


def test_inverse_preconditioning_matches_the_dense_formula():
    block = LinearBlock(nn.Linear(5, 4), "layer")
    damping = 0.01
    block.factor_a, block.factor_g = _random_spd(6, 5), _random_spd(4, 6)
    block.decompose_a(ComputeMethod.INVERSE, damping)
    block.decompose_g(ComputeMethod.INVERSE, damping)
    grad = torch.randn(4, 6)
    l = damping ** 0.5
    expected = (torch.linalg.inv(block.factor_g + l * torch.eye(4)) @ grad
                @ torch.linalg.inv(block.factor_a + l * torch.eye(6)))
    assert torch.allclose(block.precondition(grad, ComputeMethod.INVERSE, damping), expected,
                          atol=1e-8)


@pytest.mark.parametrize("method", [ComputeMethod.EIGEN, ComputeMethod.INVERSE])
def test_transposed_preconditioning_is_the_same_formula(method):
    """128 outputs, 201 inputs with the bias: preconditioned through the transpose (rows of
    128 floats, not 201); the result is the untransposed formula's, computed in float64."""
    from executor.kfac.blocks import _transposed_faster

    block = LinearBlock(nn.Linear(200, 128), "layer")
    assert _transposed_faster(block.dim_g, block.dim_a)
    damping = 0.01
    block.factor_a, block.factor_g = _random_spd(201, 7), _random_spd(128, 8)
    block.decompose_a(method, damping)
    block.decompose_g(method, damping)
    grad = torch.randn(128, 201)
    d = {k: v.double() for k, v in block.decomposition.items()}
    g64 = grad.double()
    if method is ComputeMethod.EIGEN:
        inner = d["q_g"].t() @ g64 @ d["q_a"] / (torch.outer(d["d_g"], d["d_a"]) + damping)
        expected = d["q_g"] @ inner @ d["q_a"].t()
    else:
        expected = d["inv_g"] @ g64 @ d["inv_a"]
    got = block.precondition(grad, method, damping)
    assert got.shape == grad.shape and got.is_contiguous()
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-6 * expected.abs().max())


def test_running_average_and_memory():
    block = LinearBlock(nn.Linear(3, 2), "layer")
    assert block.memory_usage() == 0
    first, second = _random_spd(4, 1), _random_spd(4, 2)
    block.update_factors(first, _random_spd(2, 3), decay=0.9)
    block.update_factors(second, _random_spd(2, 4), decay=0.9)
    assert torch.allclose(block.factor_a, 0.9 * first + 0.1 * second)
    block.decompose_a(ComputeMethod.EIGEN, 0.1)
    block.decompose_g(ComputeMethod.EIGEN, 0.1)
    # factors 4x4 + 2x2, eigenvectors 4x4 + 2x2, eigenvalues 4 + 2 (float64)
    assert block.memory_usage() == 8 * (16 + 4 + 16 + 4 + 4 + 2)


def test_grad_matrix_round_trip_conv_with_bias():
    conv = nn.Conv2d(2, 3, 3, bias=True)
    conv.weight.grad = torch.randn_like(conv.weight)
    conv.bias.grad = torch.randn_like(conv.bias)
    block = make_block(conv, "c")
    matrix = block.grad_matrix()
    assert matrix.shape == (3, 19)
    block.set_grad_matrix(2 * matrix)
    assert torch.allclose(block.grad_matrix(), 2 * matrix)


@pytest.mark.parametrize("kind, bias", [("conv", True), ("conv", False), ("linear", True),
                                        ("linear", False)])
def test_grad_inner_and_scaled_write_back_match_the_gradient_matrix(kind, bias):
    """The KL clip's inner product and the scaled write-back work on the module's gradients in
    place, for row- and column-major (transposed-view) results alike."""
    module = nn.Conv2d(2, 3, 3, bias=bias) if kind == "conv" else nn.Linear(5, 4, bias=bias)
    block = make_block(module, "m")
    assert float(block.grad_inner(torch.ones(block.dim_g, block.dim_a))) == 0.0  # no grad yet
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    for matrix in (torch.randn(block.dim_g, block.dim_a),
                   torch.randn(block.dim_a, block.dim_g).t()):
        dense = block.grad_matrix().clone()
        torch.testing.assert_close(block.grad_inner(matrix), (matrix * dense).sum())
        block.set_grad_matrix(matrix, 0.5)
        assert torch.equal(block.grad_matrix(), matrix * 0.5)
    block.set_grad_matrix(dense)
    assert torch.equal(block.grad_matrix(), dense)


def test_unsupported_modules_have_no_block():
    assert make_block(nn.ReLU(), "r") is None
    assert make_block(nn.Conv2d(4, 4, 3, groups=2), "g") is None
