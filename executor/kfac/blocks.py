"""Curvature blocks: each K-FAC layer kind knows its own factor and preconditioning math.

A block holds one layer's running Kronecker factors A (inputs) and G (output gradients), their
decomposition, and turns the layer's gradient dW (out x in[+1], bias as the last column) into the
preconditioned gradient. Only a rank that builds or preconditions a layer fills its block's state.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from dpkfac.core.errors import InputError
from dpkfac.core.step import decomposition_shapes

from ..runtime.finite import all_finite
from .decomposition import ComputeMethod, DecomposeOutcome, decompose_safely
from .factor_kernels import (
    channel_gram,
    mean_scale,
    patch_columns,
    patch_windows,
    row_gram,
    scaled_mm,
)


class KFACBlock(ABC):
    """One layer's K-FAC state and math. Tensor methods are pure: they do not touch the module."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self.factor_a: torch.Tensor | None = None
        self.factor_g: torch.Tensor | None = None
        self.decomposition: dict[str, torch.Tensor] = {}
        # (d_g, d_a, damping, transposed, denominator): the eigen preconditioner's
        # denominator, built once per decomposition instead of every step
        self._denominator: tuple | None = None

    # -- shapes -------------------------------------------------------------------------------
    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    @abstractmethod
    def dim_a(self) -> int:
        """Side of A: inputs per output (+1 with bias)."""

    @property
    @abstractmethod
    def dim_g(self) -> int:
        """Side of G: number of outputs."""

    @property
    def grad_numel(self) -> int:
        """Elements of the layer's gradient (weight and bias)."""
        return self.dim_a * self.dim_g

    # -- factor construction ----------------------------------------------------------------
    @abstractmethod
    def compute_factor_a(self, a: torch.Tensor) -> torch.Tensor:
        """A from one batch of the layer's inputs."""

    @abstractmethod
    def compute_factor_g(self, g: torch.Tensor) -> torch.Tensor:
        """G from one batch of the gradients w.r.t. the layer's outputs."""

    @abstractmethod
    def factor_rows(self, g: torch.Tensor) -> int:
        """Rows of the matrices A and G are built from, for a batch of output gradients `g`."""

    def update_factors(self, a: torch.Tensor | None, g: torch.Tensor | None, decay: float) -> None:
        """Fold ready-made factors into the running averages (the first one is taken as is)."""
        if a is not None:
            self.factor_a = _running_average(self.factor_a, a, decay)
        if g is not None:
            self.factor_g = _running_average(self.factor_g, g, decay)

    # -- decomposition and preconditioning ----------------------------------------------------
    def decompose_a(self, method: ComputeMethod, damping: float) -> DecomposeOutcome:
        """Decompose (or invert) the running A; on failure keep the previous result."""
        return self._decompose_side(self.factor_a, "a", method, damping)

    def decompose_g(self, method: ComputeMethod, damping: float) -> DecomposeOutcome:
        """Decompose (or invert) the running G; on failure keep the previous result."""
        return self._decompose_side(self.factor_g, "g", method, damping)

    def _decompose_side(self, factor: torch.Tensor | None, side: str, method: ComputeMethod,
                        damping: float) -> DecomposeOutcome:
        result, outcome = decompose_safely(factor, side, method, damping)
        if result is not None:
            self.decomposition.update(result)
        return outcome

    def ready(self, method: ComputeMethod) -> bool:
        """True when both factors have a decomposition to precondition with."""
        return all(key in self.decomposition
                   for key, _ in decomposition_shapes(self.dim_a, self.dim_g, method.value))

    def drop_nonfinite_factors(self) -> int:
        """Forget a running factor that holds NaN or inf (it restarts from the next batch);
        returns how many factors were dropped (0, 1 or 2). The decomposition is kept."""
        dropped = 0
        if self.factor_a is not None and not all_finite(self.factor_a):
            self.factor_a, dropped = None, dropped + 1
        if self.factor_g is not None and not all_finite(self.factor_g):
            self.factor_g, dropped = None, dropped + 1
        return dropped

    def precondition(self, grad: torch.Tensor, method: ComputeMethod, damping: float) -> torch.Tensor:
        """Preconditioned gradient of a dW matrix (dim_g x dim_a).

        eigen:   Q_G [(Q_G^T dW Q_A) / (d_G d_A^T + damping)] Q_A^T = ((G (x) A) + damping I)^-1 dW
        inverse: (G + sqrt(damping) I)^-1 dW (A + sqrt(damping) I)^-1
        """
        d = self.decomposition
        if _transposed_faster(self.dim_g, self.dim_a):  # the same products, transposed
            if method is ComputeMethod.EIGEN:
                v = d["q_a"].t() @ grad.t() @ d["q_g"]
                v.div_(self._eigen_denominator(damping, transposed=True))
                return (d["q_a"] @ v @ d["q_g"].t()).t().contiguous()
            return (d["inv_a"] @ grad.t() @ d["inv_g"]).t().contiguous()
        if method is ComputeMethod.EIGEN:
            v = d["q_g"].t() @ grad @ d["q_a"]
            v.div_(self._eigen_denominator(damping))
            return d["q_g"] @ v @ d["q_a"].t()
        return d["inv_g"] @ grad @ d["inv_a"]

    def precondition_rows(self, grad: torch.Tensor, method: ComputeMethod, damping: float,
                          start: int, stop: int) -> torch.Tensor:
        """The share of precondition(grad) that G-side directions start..stop-1 give (dim_g x
        dim_a); the shares of a partition of 0..dim_g-1 add up to precondition(grad), and each
        costs (stop - start) / dim_g of it. Where precondition() goes through the transpose
        so does this, returning a transposed (column-major) view; shares whose row counts are
        multiples of 8 then keep every product's rows aligned, as the planner's splits do.

        eigen:   Q_I [(Q_I^T dW Q_A) / (d_I d_A^T + damping)] Q_A^T, Q_I = Q_G[:, I], d_I = d_G[I]
        inverse: (G + sqrt(damping) I)^-1[:, I] (dW[I, :] (A + sqrt(damping) I)^-1)
        """
        d = self.decomposition
        if _transposed_faster(self.dim_g, self.dim_a):  # the same products, transposed: a view
            if method is ComputeMethod.EIGEN:
                q_i = d["q_g"][:, start:stop]
                v = d["q_a"].t() @ (grad.t() @ q_i)
                v.div_(self._eigen_denominator(damping, transposed=True)[:, start:stop])
                return ((d["q_a"] @ v) @ q_i.t()).t()
            return ((d["inv_a"] @ grad[start:stop].t()) @ d["inv_g"][:, start:stop].t()).t()
        if method is ComputeMethod.EIGEN:
            q_i = d["q_g"][:, start:stop]
            v = q_i.t() @ grad @ d["q_a"]
            v.div_(self._eigen_denominator(damping)[start:stop])
            return q_i @ (v @ d["q_a"].t())
        return d["inv_g"][:, start:stop] @ (grad[start:stop] @ d["inv_a"])

    def _eigen_denominator(self, damping: float, transposed: bool = False) -> torch.Tensor:
        """d_G d_A^T + damping (its transpose d_A d_G^T + damping when `transposed`: the same
        numbers) for the current eigendecomposition, cached while its eigenvalue tensors, the
        damping and the orientation stay the same."""
        d_g, d_a = self.decomposition["d_g"], self.decomposition["d_a"]
        cached = self._denominator
        if (cached is None or cached[0] is not d_g or cached[1] is not d_a
                or cached[2:4] != (damping, transposed)):
            rows, cols = (d_a, d_g) if transposed else (d_g, d_a)
            cached = (d_g, d_a, damping, transposed, torch.outer(rows, cols).add_(damping))
            self._denominator = cached
        return cached[4]

    def precondition_if_finite(self, grad: torch.Tensor, method: ComputeMethod,
                               damping: float) -> torch.Tensor | None:
        """precondition(), or None when the result holds NaN or inf (one device sync)."""
        result = self.precondition(grad, method, damping)
        return result if all_finite(result) else None

    # -- gradients of the module --------------------------------------------------------------
    def grad_matrix(self) -> torch.Tensor:
        """The module's gradient as one dim_g x dim_a matrix (bias as the last column)."""
        weight_grad = self.module.weight.grad.reshape(self.dim_g, -1)
        if self.has_bias:
            return torch.cat([weight_grad, self.module.bias.grad.reshape(-1, 1)], dim=1)
        return weight_grad

    def grad_or_zeros(self) -> torch.Tensor:
        """grad_matrix(), or zeros of its shape when the module has no gradient yet."""
        if self.module.weight.grad is None:
            return self.module.weight.new_zeros(self.dim_g, self.dim_a)
        return self.grad_matrix()

    def grad_inner(self, matrix: torch.Tensor) -> torch.Tensor:
        """sum(matrix * grad_matrix()) for a dim_g x dim_a `matrix`, without assembling the
        gradient matrix (a 0-dim tensor; 0 when the module has no gradient yet)."""
        weight = self.module.weight
        if weight.grad is None:
            return matrix.new_zeros(())
        cols = self.dim_a - int(self.has_bias)
        total = (matrix[:, :cols] * weight.grad.reshape(self.dim_g, cols)).sum()
        if self.has_bias:
            total = total + (matrix[:, -1] * self.module.bias.grad.reshape(-1)).sum()
        return total

    def set_grad_matrix(self, matrix: torch.Tensor, scale: float = 1.0) -> None:
        """Write a dim_g x dim_a matrix, times `scale`, back into the module's weight (and bias)
        gradients, in one pass (no scaled copy)."""
        weight = self.module.weight
        if self.has_bias:
            torch.mul(matrix[:, :-1].reshape(weight.shape), scale, out=weight.grad)
            torch.mul(matrix[:, -1].reshape(self.module.bias.shape), scale,
                      out=self.module.bias.grad)
        else:
            torch.mul(matrix.reshape(weight.shape), scale, out=weight.grad)

    # -- state ----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every second-order tensor this block holds."""
        state = dict(self.decomposition)
        if self.factor_a is not None:
            state["factor_a"] = self.factor_a
        if self.factor_g is not None:
            state["factor_g"] = self.factor_g
        return state

    def memory_usage(self) -> int:
        """Bytes of second-order state held."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from state_tensors()."""
        state = dict(state)
        self.factor_a = state.pop("factor_a", None)
        self.factor_g = state.pop("factor_g", None)
        self.decomposition = state


class LinearBlock(KFACBlock):
    """nn.Linear with inputs of any rank: leading dimensions (batch, tokens, ...) become rows."""

    @property
    def dim_a(self) -> int:
        return self.module.in_features + int(self.has_bias)

    @property
    def dim_g(self) -> int:
        return self.module.out_features

    def compute_factor_a(self, a: torch.Tensor) -> torch.Tensor:
        """Mean over rows of x x^T, x one input row (with a trailing 1 for the bias)."""
        rows = a.reshape(-1, a.shape[-1])
        return row_gram(rows, self.has_bias, mean_scale(rows.shape[0]))

    def compute_factor_g(self, g: torch.Tensor) -> torch.Tensor:
        """Mean over rows of (batch * dy)(batch * dy)^T: the loss is a batch mean, so g carries
        1/batch, which this undoes to get per-sample gradients."""
        rows = g.reshape(-1, g.shape[-1])
        batch = g.shape[0]
        return row_gram(rows, False, batch * batch * mean_scale(rows.shape[0]))

    def factor_rows(self, g: torch.Tensor) -> int:
        """All leading dimensions (batch, tokens, ...)."""
        return int(g.numel() // g.shape[-1])


class Conv2dBlock(KFACBlock):
    """nn.Conv2d (groups=1): A over unfolded input patches, G over output positions."""

    @property
    def dim_a(self) -> int:
        m = self.module
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1] + int(self.has_bias)

    @property
    def dim_g(self) -> int:
        return self.module.out_channels

    def compute_factor_a(self, a: torch.Tensor) -> torch.Tensor:
        """(1 / batch) * sum over samples and output positions of (p / positions)(...)^T, p one
        zero-padded input patch (channel, kernel row, kernel column order; a trailing 1 for
        the bias), as in KFC (Grosse 2016)."""
        m = self.module
        if isinstance(m.padding, str):
            raise ValueError(f"{self.name}: string padding {m.padding!r} is not supported")
        windows = patch_windows(a, m.kernel_size, m.stride, m.padding, m.dilation)
        cols = patch_columns(windows, self.has_bias)
        positions = windows.shape[2] * windows.shape[3]
        return scaled_mm(cols, cols.t(), mean_scale(a.shape[0] * positions * positions))

    def compute_factor_g(self, g: torch.Tensor) -> torch.Tensor:
        """Mean over output positions of (batch * positions * dy)(...)^T, dy one position's
        output gradient (channels): batch * positions * sum of dy dy^T."""
        positions = g.shape[2] * g.shape[3]
        return channel_gram(g, g.shape[0] * positions if g.shape[0] else float("nan"))

    def factor_rows(self, g: torch.Tensor) -> int:
        """Batch x output positions (one unfolded patch per position)."""
        return int(g.numel() // g.shape[1])


def make_block(module: nn.Module, name: str) -> KFACBlock | None:
    """The block for a supported module, or None for modules K-FAC does not precondition."""
    if isinstance(module, nn.Linear):
        return LinearBlock(module, name)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return Conv2dBlock(module, name)
    return None


def kfac_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every K-FAC layer of `model` that has trainable weights, in order."""
    found = []
    for name, module in model.named_modules():
        if make_block(module, name) is not None and module.weight.requires_grad:
            found.append((name, module))
    return found


def uncovered_layers(model: nn.Module) -> list[dict]:
    """Modules with trainable parameters of their own that K-FAC does not precondition
    (embeddings, norms, anything but the K-FAC layers): their gradients stay the plain averaged
    ones. Each as {"name": qualified name, "kind": class name, "numel": trainable elements}."""
    covered = {name for name, _ in kfac_layers(model)}
    found = []
    for name, module in model.named_modules():
        numel = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        if numel and name not in covered:
            found.append({"name": name, "kind": type(module).__name__, "numel": numel})
    return found


def require_kfac_layers(model: nn.Module, *, what: str) -> list[tuple[str, nn.Module]]:
    """kfac_layers(model); InputError naming `what` when it has none."""
    layers = kfac_layers(model)
    if not layers:
        raise InputError(f"{what} has no K-FAC layer (an nn.Linear or nn.Conv2d with trainable "
                         "weights): nothing to precondition; train it with --algorithm sgd")
    return layers


def _transposed_faster(dim_g: int, dim_a: int) -> bool:
    """Whether preconditioning a dim_g x dim_a gradient through its transpose is faster: the
    big products then write rows of dim_g floats instead of dim_a. BLAS runs markedly slower on
    rows whose length is not a multiple of 8 floats (a Linear layer with a bias has dim_a =
    inputs + 1): on this project's CPU hosts 0.72x the time at 1024 x 1025, 0.84x at
    1024 x 785; neutral below a few hundred rows, so only from 128 rows of G up."""
    return dim_g >= 128 and dim_g % 8 == 0 and dim_a % 8 != 0


def _running_average(old: torch.Tensor | None, new: torch.Tensor, decay: float) -> torch.Tensor:
    if old is None:
        return new.clone()
    return old.mul(decay).add_(new, alpha=1.0 - decay)  # a new tensor: the old one may be kept
