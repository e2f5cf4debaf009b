"""The structure of one distributed K-FAC training step, shared by the planner's model of it
and the executor that runs it: the phases each rank times, the collectives with the bytes they
move, and the extra elements that ride on their buffers. Sizes in elements or bytes.

A step, on every rank, in this order (the executor's timers have the same names):

| phase              | what                                                                 |
| ------------------ | -------------------------------------------------------------------- |
| forward_backward   | forward, loss, backward on the local batch                           |
| allreduce          | the gradient all-reduce in buckets (dpkfac.core.buckets), the loss   |
|                    | at the end of bucket 0: each bucket posted from the last backward    |
|                    | once its gradients are ready and the earlier ones are posted         |
|                    | (serial step: all posted after backward, one after another); then    |
|                    | wait for all (overlapped: after the local phases below)              |
| factors            | batch factors A, G of the layers this rank builds, folded into the   |
|                    | running averages (every factor_update_freq steps)                    |
| factor_allreduce   | ALLREDUCED factors only: one fused all-reduce of every layer's A, G  |
| decompose          | the owned layers' decompositions due this step                       |
| precondition       | the layers this rank preconditions                                   |
| broadcast          | one fused broadcast per owner. Preconditioned gradients, every step, |
|                    | in ascending owner rank: rank r posts owners < r before its own      |
|                    | preconditioning, its own right after, then owners > r, then (split   |
|                    | layers) one fused all-reduce (sum) of every rank's share of their    |
|                    | preconditioned gradients; then waits for all. Decompositions         |
|                    | (DECOMPOSITION; split layers' at updates): posted together before    |
|                    | preconditioning                                                      |
| apply              | KL clip and write-back of the preconditioned gradients               |
| optimizer          | the optimizer's step                                                 |

A split layer (the placement's `precondition_split`, PRECONDITIONED_GRADIENT strategies) is
preconditioned by every rank with rows of its split: rank r takes rows[r] of the dim_g
directions of the G side (eigenvectors of G, or columns of G^-1), the owner still builds and
decomposes its factors; the shares add up to the layer's preconditioned gradient.

Traffic is counted as bytes a rank SENDS PLUS RECEIVES: a ring all-reduce of n bytes counts
4 (p-1)/p n, a broadcast n on every rank (sent by its owner, received by the others).
"""
from __future__ import annotations

import math
from typing import Iterable

from .strategy import FactorMode, SharedResult, Strategy

PHASES = ("forward_backward", "allreduce", "factors", "factor_allreduce", "decompose",
          "precondition", "broadcast", "apply", "optimizer")
SECOND_ORDER_PHASES = ("factors", "factor_allreduce", "decompose", "precondition", "broadcast")

TRAFFIC_KINDS = ("gradient_allreduce", "factor_allreduce", "decomposition_broadcast",
                 "preconditioned_gradient_broadcast", "preconditioned_gradient_allreduce",
                 "numerics_counters")
SECOND_ORDER_TRAFFIC = TRAFFIC_KINDS[1:]

LOSS_ELEMENTS = 1  # the loss rides at the end of the gradient all-reduce buffer

# Cumulative numerical-safety counters an owner appends to each of its broadcasts, in this
# order (one element each, in the gradients' dtype):
#   nonfinite_factors:  running factors (A or G) found NaN/inf and dropped
#   decompose_retries:  decompositions that failed at first and succeeded with more damping
#   decompose_failures: decompositions that failed at every damping; the previous one was kept
#   plain_gradient:     layer-steps that used the plain gradient (no usable decomposition, or a
#                       non-finite preconditioned gradient)
NUMERICS_COUNTERS = ("nonfinite_factors", "decompose_retries", "decompose_failures",
                     "plain_gradient")
NUMERICS_ELEMENTS = len(NUMERICS_COUNTERS)


def ring_allreduce_bytes(nbytes: float, ranks: int) -> int:
    """Bytes one rank sends plus receives in a ring all-reduce of `nbytes`: 4 (p-1)/p n,
    rounded to a whole byte per call (0 at one rank)."""
    if ranks < 1:
        raise ValueError(f"rank count must be >= 1, got {ranks}")
    return int(round(4 * (ranks - 1) / ranks * nbytes))


def factor_numel(dim_a: int, dim_g: int) -> int:
    """Elements of a layer's two Kronecker factors, A (dim_a^2) and G (dim_g^2)."""
    return dim_a * dim_a + dim_g * dim_g


def decomposition_shapes(dim_a: int, dim_g: int, compute_method: str
                         ) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the tensors of a layer's decomposition, in wire order: eigen Q_A, d_A,
    Q_G, d_G; inverse A^-1, G^-1."""
    if compute_method == "eigen":
        return [("q_a", (dim_a, dim_a)), ("d_a", (dim_a,)), ("q_g", (dim_g, dim_g)),
                ("d_g", (dim_g,))]
    return [("inv_a", (dim_a, dim_a)), ("inv_g", (dim_g, dim_g))]


def decomposition_numel(dim_a: int, dim_g: int, compute_method: str) -> int:
    """Elements of a layer's decomposition: eigen dim^2 + dim per factor, inverse dim^2."""
    return sum(math.prod(shape)
               for _, shape in decomposition_shapes(dim_a, dim_g, compute_method))


def traffic_by_kind(*, strategy: Strategy | None, workers: int, dtype_bytes: int,
                    model_grad_numel: int, layer_dims: Iterable[tuple[int, int]],
                    grad_numel: int, owners: int, compute_method: str,
                    factor_update_freq: int = 1, inv_update_freq: int = 1,
                    split_dims: Iterable[tuple[int, int]] = (), split_owners: int = 0
                    ) -> dict[str, float]:
    """Bytes one rank sends plus receives per step, by TRAFFIC_KINDS kind (strategy None: plain
    data-parallel SGD). The same on every rank; amortised kinds are per-call bytes / period.

    layer_dims: (dim_a, dim_g) of every K-FAC layer; grad_numel: elements of all K-FAC layers'
    gradients; owners: ranks that broadcast every step (own at least one layer that is not
    split). split_dims: (dim_a, dim_g) of the split layers (PRECONDITIONED_GRADIENT only);
    split_owners: ranks that own at least one of them.
    """
    kinds = dict.fromkeys(TRAFFIC_KINDS, 0.0)
    if workers == 1:
        return kinds
    kinds["gradient_allreduce"] = float(ring_allreduce_bytes(
        (model_grad_numel + LOSS_ELEMENTS) * dtype_bytes, workers))
    if strategy is None:
        return kinds
    dims = list(layer_dims)
    counters = owners * NUMERICS_ELEMENTS * dtype_bytes
    if strategy.factors is FactorMode.ALLREDUCED:
        factors = sum(factor_numel(a, g) for a, g in dims) * dtype_bytes
        kinds["factor_allreduce"] = ring_allreduce_bytes(factors, workers) / factor_update_freq
    if strategy.shared is SharedResult.PRECONDITIONED_GRADIENT:
        split = list(split_dims)
        split_numel = sum(a * g for a, g in split)
        kinds["preconditioned_gradient_broadcast"] = float((grad_numel - split_numel)
                                                           * dtype_bytes)
        kinds["preconditioned_gradient_allreduce"] = float(ring_allreduce_bytes(
            split_numel * dtype_bytes, workers))
        kinds["decomposition_broadcast"] = sum(
            decomposition_numel(a, g, compute_method) for a, g in split
        ) * dtype_bytes / inv_update_freq
        kinds["numerics_counters"] = (counters + split_owners * NUMERICS_ELEMENTS * dtype_bytes
                                      / inv_update_freq)
    else:
        decomps = sum(decomposition_numel(a, g, compute_method) for a, g in dims) * dtype_bytes
        kinds["decomposition_broadcast"] = decomps / inv_update_freq
        kinds["numerics_counters"] = counters / inv_update_freq
    return kinds


def comm_bytes_total(kinds: dict[str, float]) -> int:
    """All kinds' bytes per step, rounded to a whole byte."""
    return int(round(sum(kinds.get(kind, 0.0) for kind in TRAFFIC_KINDS)))
