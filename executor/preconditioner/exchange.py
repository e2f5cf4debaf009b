"""The collectives of a K-FAC step and the bytes they move.

Wire format of the fused per-owner broadcast: every owner sends one flat buffer, in the
gradients' dtype, holding its layers' payloads in model order followed by its cumulative
numerical-safety counters (NUMERICS_ELEMENTS elements, NUMERICS_COUNTERS order). A payload is
a layer's preconditioned gradient (dim_g x dim_a, row-major) or its decomposition (the tensors of
dpkfac.core.step.decomposition_shapes, in that order, each row-major; all NaN when the owner has
none). Owners' broadcasts are posted asynchronously in ascending owner rank on every rank and
waited for together; preconditioned gradients' receives from owners ranked below a rank are
posted before it preconditions (post_gradient_receives), so they flow while it computes. The
split layers' shares are summed in one all-reduce (post_share_sum), posted after the broadcasts
or, in the overlapped step, before the receives, while the ranks precondition their own layers.
In the overlapped step that shares the split layers' decompositions, their broadcasts
(post_decompositions) are posted first and run while the ranks precondition their own layers;
the shares and their sum follow the gradient broadcasts.

Traffic is counted per dpkfac.core.step.TRAFFIC_KINDS kind in bytes SENT PLUS RECEIVED by this
rank (a ring all-reduce of n bytes counts 4 (p-1)/p n, a broadcast n on every rank), plus
'broadcast': every broadcast byte, counters included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from dpkfac.core.step import (
    NUMERICS_ELEMENTS,
    SECOND_ORDER_TRAFFIC,
    decomposition_numel,
    decomposition_shapes,
    ring_allreduce_bytes,
)

from ..kfac import ComputeMethod, KFACBlock
from ..runtime.distributed import allreduce_mean_, world_rank_and_size
from .numerics import NumericsLedger


@dataclass
class PendingBroadcast:
    """One owner's broadcast in flight: its layers, the buffer (sent or received into)."""
    src: int
    names: list[str]
    flat: torch.Tensor
    work: Any


@dataclass
class PendingSum:
    """The split layers' shares, their fused all-reduce (sum) in flight (flat and work None
    when there is nothing to sum: one rank or no shares)."""
    shares: dict[str, torch.Tensor]
    flat: torch.Tensor | None = None
    work: Any = None


class Exchange:
    """One rank's communicator for K-FAC: the factor all-reduce and the fused per-owner
    broadcasts, over `process_group` (the default group when None), with byte accounting."""

    def __init__(self, rank: int, world_size: int, process_group: Any = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.process_group = process_group
        self.bytes: dict[str, int] = dict.fromkeys(("broadcast", *SECOND_ORDER_TRAFFIC), 0)

    @classmethod
    def over(cls, process_group: Any = None) -> Exchange:
        """The communicator of this process in `process_group` (a world of one without one)."""
        rank, world_size = world_rank_and_size(process_group)
        return cls(rank, world_size, process_group)

    def _count(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += nbytes
        if kind.endswith("broadcast") or kind == "numerics_counters":
            self.bytes["broadcast"] += nbytes

    def allreduce_factors(self, factors: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Average every layer's batch factors (A, G) across ranks in place, in one fused
        all-reduce (every rank passes the same layers, so the buffers line up)."""
        tensors = [t for pair in factors for t in pair]
        if self.world_size == 1 or not tensors:
            return
        nbytes = allreduce_mean_(tensors, self.world_size, self.process_group)
        self._count("factor_allreduce", ring_allreduce_bytes(nbytes, self.world_size))

    def post_broadcasts(self, layers_of_rank: dict[int, list[str]],
                        chunks_of: Callable[[list[str]], list[torch.Tensor]],
                        numel_of: Callable[[str], int], ledger: NumericsLedger, *,
                        kind: str, like: torch.Tensor) -> list[PendingBroadcast]:
        """Post one asynchronous broadcast per owner in `layers_of_rank` (in its order): this
        rank's own payload (chunks_of(its layers) and its counters) or a buffer to receive
        into; counts the bytes under `kind`. Every rank must post the same owners in the same
        order."""
        pending = []
        for src, names in layers_of_rank.items():
            if src == self.rank:
                counters = torch.tensor(ledger.own(), dtype=like.dtype, device=like.device)
                flat = torch.cat([c.reshape(-1) for c in chunks_of(names)] + [counters])
            else:
                numel = sum(numel_of(n) for n in names) + NUMERICS_ELEMENTS
                flat = torch.empty(numel, dtype=like.dtype, device=like.device)
            work = dist.broadcast(flat, src=src, group=self.process_group, async_op=True)
            pending.append(PendingBroadcast(src, names, flat, work))
            tail = NUMERICS_ELEMENTS * flat.element_size()
            self._count(kind, flat.numel() * flat.element_size() - tail)
            self._count("numerics_counters", tail)
        return pending

    def collect_broadcasts(self, pending: list[PendingBroadcast], ledger: NumericsLedger
                           ) -> list[tuple[list[str], torch.Tensor]]:
        """Wait for posted broadcasts, record the peers' counters in `ledger`; (layers, payload
        without counters) per owner."""
        received = []
        for item in pending:
            item.work.wait()
            if item.src != self.rank:
                ledger.record_peer(item.src,
                                   [int(v) for v in item.flat[-NUMERICS_ELEMENTS:].tolist()])
            received.append((item.names, item.flat[:-NUMERICS_ELEMENTS]))
        return received

    def post_gradient_receives(self, blocks: dict[str, KFACBlock],
                               layers_of_rank: dict[int, list[str]], ledger: NumericsLedger
                               ) -> list[PendingBroadcast]:
        """Post now the broadcasts of the owners ranked below this rank (its receives), so their
        preconditioned gradients flow while this rank preconditions its own; the rest follow in
        share_gradients (owners in ascending rank order on every rank)."""
        if self.world_size == 1:
            return []
        return self._post_gradients({src: names for src, names in layers_of_rank.items()
                                     if src < self.rank}, {}, blocks, ledger)

    def share_gradients(self, mine: dict[str, torch.Tensor], blocks: dict[str, KFACBlock],
                        layers_of_rank: dict[int, list[str]], ledger: NumericsLedger,
                        posted: list[PendingBroadcast] = (), *,
                        shares: dict[str, torch.Tensor] | PendingSum | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Every owner in `layers_of_rank` broadcasts its preconditioned gradients of the layers
        listed there (those in `posted`, from post_gradient_receives, already are), then the
        split layers' `shares` are summed (their all-reduce posted after every broadcast, or
        already in flight: a PendingSum from post_share_sum); returns (those layers' and
        `mine`, the shares' totals), on every rank."""
        if self.world_size == 1:
            return mine, (shares.shares if isinstance(shares, PendingSum) else shares or {})
        posted = list(posted)
        done = {item.src for item in posted}
        later = {src: names for src, names in layers_of_rank.items() if src not in done}
        pending = posted + self._post_gradients(later, mine, blocks, ledger)
        summing = shares if isinstance(shares, PendingSum) else self.post_share_sum(shares or {})
        results = dict(mine)
        for names, payload in self.collect_broadcasts(pending, ledger):
            offset = 0
            for name in names:
                block = blocks[name]
                results[name] = payload[offset:offset + block.grad_numel].view(block.dim_g,
                                                                               block.dim_a)
                offset += block.grad_numel
        return results, self.collect_share_sum(summing)

    def _post_gradients(self, layers_of_rank: dict[int, list[str]], mine: dict[str, torch.Tensor],
                        blocks: dict[str, KFACBlock], ledger: NumericsLedger
                        ) -> list[PendingBroadcast]:
        return self.post_broadcasts(
            layers_of_rank, lambda names: [mine[n] for n in names],
            lambda n: blocks[n].grad_numel, ledger, kind="preconditioned_gradient_broadcast",
            like=_reference(blocks))

    def post_share_sum(self, shares: dict[str, torch.Tensor]) -> PendingSum:
        """Post the fused all-reduce (sum) of every rank's shares of the split layers'
        preconditioned gradients, asynchronously (every rank passes the same layers and posts
        it at the same point of its sequence of collectives); collect_share_sum gives each
        layer's total."""
        if self.world_size == 1 or not shares:
            return PendingSum(shares)
        flat = torch.cat([_in_storage_order(t) for t in shares.values()])
        work = dist.all_reduce(flat, group=self.process_group, async_op=True)
        self._count("preconditioned_gradient_allreduce",
                    ring_allreduce_bytes(flat.numel() * flat.element_size(), self.world_size))
        return PendingSum(shares, flat, work)

    @staticmethod
    def collect_share_sum(pending: PendingSum) -> dict[str, torch.Tensor]:
        """Wait for a posted sum of shares; each split layer's total (views of one buffer)."""
        if pending.work is None:
            return pending.shares
        pending.work.wait()
        totals, offset = {}, 0
        for name, share in pending.shares.items():
            totals[name] = _laid_out_like(pending.flat[offset:offset + share.numel()], share)
            offset += share.numel()
        return totals

    def share_decompositions(self, blocks: dict[str, KFACBlock],
                             layers_of_rank: dict[int, list[str]], method: ComputeMethod,
                             ledger: NumericsLedger) -> None:
        """Every owner broadcasts its layers' decompositions; every rank, the owner included,
        loads them from the broadcast buffer, so all precondition with tensors of the same bits
        and memory layout (eigh returns column-major ones; layout changes matmul's rounding)
        and end with identical parameters. A layer sent as NaN (no decomposition yet) keeps
        none. post_decompositions then load_decompositions."""
        self.load_decompositions(
            blocks, self.post_decompositions(blocks, layers_of_rank, method, ledger), method,
            ledger)

    def post_decompositions(self, blocks: dict[str, KFACBlock],
                            layers_of_rank: dict[int, list[str]], method: ComputeMethod,
                            ledger: NumericsLedger) -> list[PendingBroadcast]:
        """Post share_decompositions' broadcasts (asynchronously, one per owner in
        `layers_of_rank`'s order, on every rank alike); load_decompositions waits for them."""
        if self.world_size == 1 or not layers_of_rank:
            return []
        return self.post_broadcasts(
            layers_of_rank,
            lambda names: [piece for n in names for piece in pack_decomposition(blocks[n], method)],
            lambda n: _decomposition_numel(blocks[n], method), ledger,
            kind="decomposition_broadcast", like=_reference(blocks))

    def load_decompositions(self, blocks: dict[str, KFACBlock], pending: list[PendingBroadcast],
                            method: ComputeMethod, ledger: NumericsLedger) -> None:
        """Wait for post_decompositions' broadcasts and load every finite decomposition from
        its broadcast buffer (the owner's too)."""
        for names, payload in self.collect_broadcasts(pending, ledger):
            offset = 0
            for name in names:
                numel = _decomposition_numel(blocks[name], method)
                chunk = payload[offset:offset + numel]
                offset += numel
                if bool(torch.isfinite(chunk).all()):  # the owner too: same bits, same layout
                    blocks[name].decomposition = unpack_decomposition(blocks[name], method, chunk)


def pack_decomposition(block: KFACBlock, method: ComputeMethod) -> list[torch.Tensor]:
    """A block's decomposition as flat pieces in wire order; one NaN piece when it has none
    (decompositions are always finite, so NaN means "none")."""
    if block.ready(method):
        return [block.decomposition[key].reshape(-1)
                for key, _ in decomposition_shapes(block.dim_a, block.dim_g, method.value)]
    ref = block.module.weight
    return [torch.full((_decomposition_numel(block, method),), float("nan"), dtype=ref.dtype,
                       device=ref.device)]


def unpack_decomposition(block: KFACBlock, method: ComputeMethod, chunk: torch.Tensor
                         ) -> dict[str, torch.Tensor]:
    """The decomposition tensors of a flat chunk in wire order, each a fresh copy."""
    tensors, offset = {}, 0
    for key, shape in decomposition_shapes(block.dim_a, block.dim_g, method.value):
        numel = math.prod(shape)
        tensors[key] = chunk[offset:offset + numel].reshape(shape).clone()
        offset += numel
    return tensors


def _decomposition_numel(block: KFACBlock, method: ComputeMethod) -> int:
    return decomposition_numel(block.dim_a, block.dim_g, method.value)


def _reference(blocks: dict[str, KFACBlock]) -> torch.Tensor:
    """A tensor with the dtype and device the broadcasts use (the first layer's weight)."""
    return next(iter(blocks.values())).module.weight


def _column_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()


def _in_storage_order(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor's elements flattened in memory order (no copy for row- or column-major)."""
    return t.t().reshape(-1) if _column_major(t) else t.reshape(-1)


def _laid_out_like(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of _in_storage_order for a tensor laid out as `like`: a view of `flat`."""
    if _column_major(like):
        return flat.view(like.shape[1], like.shape[0]).t()
    return flat.view_as(like)
