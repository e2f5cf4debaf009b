"""Distributed K-FAC preconditioning with one owner per layer; DP-KFAC and its baselines.

One core, `KFACPreconditioner`, with the distribution strategy injected (planner/strategy.py):

* factors LOCAL (DP-KFAC): only a layer's owner captures its inputs and output gradients, builds
  A and G from ITS OWN local batch (running average), decomposes them; non-owners never hold them.
* factors ALLREDUCED (MPD-KFAC, KAISA): every rank captures every layer, builds the batch factors
  of all layers and averages them in one fused all-reduce; every rank keeps all running factors;
  the owner decomposes.
* shared PRECONDITIONED_GRADIENT: the owner preconditions the (already all-reduced) gradient and
  every owner's results travel in one fused asynchronous broadcast per owner, every step.
* shared DECOMPOSITION (KAISA COMM-OPT): at each decomposition update every owner broadcasts its
  layers' decompositions (fused, one broadcast per owner); every rank preconditions every layer.

The placement decides owners for every strategy. `DPKFAC` is this class with its default
strategy (DP-KFAC), so `DPKFAC(model, placement)` behaves as it always did.

Traffic is counted per kind in `comm_bytes` (bytes SENT PLUS RECEIVED by this rank: a ring
all-reduce of n bytes counts 4 (p-1)/p n, a broadcast counts n on every rank), with the
numerical-safety counters that ride at the end of each owner's broadcast counted separately.

Numerical safety (counted in `numerics`, per owner and in total, see NUMERICS_COUNTERS): a running
factor that turns NaN/inf is dropped and rebuilt from the next batch; a decomposition that fails
or comes out non-finite is retried with more damping, else the previous decomposition stays; a
layer with no usable decomposition, or whose preconditioned gradient is non-finite, gets its plain
(all-reduced) gradient this step. Only a layer's owner counts its events (with all-reduced
factors every rank sees the same factor events, and under COMM-OPT the same preconditioning
events, so counting them once keeps totals independent of the world size). Each owner's
cumulative counters ride at the end of its fused broadcast (4 numbers), so every rank knows the
totals after every step; under COMM-OPT the broadcast is the decomposition one, so other owners'
totals are as of the last decomposition update (the training summary adds the per-layer counts
of every rank, which is exact). Non-finite *gradients* are the training loop's to handle
(executor/train.py skips such steps on all ranks).
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from dpkfac.core.placement import check_placement_matches, load_placement
from dpkfac.core.step import NUMERICS_COUNTERS, NUMERICS_ELEMENTS, ring_allreduce_bytes
from dpkfac.core.strategy import DP_KFAC, FactorMode, SharedResult, Strategy

from .blocks import (ComputeMethod, DecomposeOutcome, KFACBlock, apply_preconditioned, kfac_layers,
                     make_block)
from .distributed import allreduce_mean_, world_rank_and_size
from .timing import PhaseTimer

PHASES = ("factors", "factor_allreduce", "decompose", "precondition", "broadcast")

# Traffic kinds this class counts (bytes sent + received by this rank, cumulative).
COMM_KINDS = ("factor_allreduce", "decomposition_broadcast", "preconditioned_gradient_broadcast",
              "numerics_counters")


class KFACPreconditioner:
    """Distributed K-FAC under a placement. Call `.step()` after backward (gradients already
    averaged across ranks) and before the optimizer's step.

    Args:
        model: the (unwrapped or DDP-wrapped) model.
        placement: a dpkfac.placement/1 file path or its parsed dict (who owns which layer).
        strategy: factors LOCAL/ALLREDUCED and shared PRECONDITIONED_GRADIENT/DECOMPOSITION
            (dpkfac.core.strategy); default DP-KFAC.
        lr: learning rate (float or a callable returning it), used by the KL clip.
        damping: Tikhonov damping added to the Kronecker factors.
        factor_decay: running-average decay of the factors.
        kl_clip: KL-clip bound; None disables clipping.
        factor_update_freq / inv_update_freq: steps between factor / decomposition updates;
            default: the placement's config.
        compute_method: "eigen" or "inverse"; default: the placement's config, else eigen.
        process_group: the group to communicate in (default group when None).
        precise_timing: synchronise the device around each phase so phase times are exact.
        stagger_decompositions: follow the placement's `decomposition_step` schedule (spread
            each owner's decompositions over the inv_update_freq steps of a cycle).
    """

    def __init__(
        self,
        model: nn.Module,
        placement: str | os.PathLike | dict,
        *,
        strategy: Strategy = DP_KFAC,
        lr: float | Callable[[], float] = 0.1,
        damping: float = 0.003,
        factor_decay: float = 0.95,
        kl_clip: float | None = 0.001,
        factor_update_freq: int | None = None,
        inv_update_freq: int | None = None,
        compute_method: str | ComputeMethod | None = None,
        process_group: Any = None,
        precise_timing: bool = False,
        stagger_decompositions: bool = False,
    ) -> None:
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.placement = load_placement(placement)
        config = self.placement["config"]
        self.rank, self.world_size = world_rank_and_size(process_group)
        layers = kfac_layers(module)
        check_placement_matches(self.placement, layer_names=[n for n, _ in layers],
                                world_size=self.world_size, source="placement")
        self.strategy = strategy
        self.lr = lr
        self.damping = damping
        self.factor_decay = factor_decay
        self.kl_clip = kl_clip
        self.factor_update_freq = factor_update_freq or config["factor_update_freq"]
        self.inv_update_freq = inv_update_freq or config["inv_update_freq"]
        self.method = ComputeMethod(compute_method or config.get("compute_method", "eigen"))
        self.process_group = process_group
        self.steps = 0
        self.stagger_decompositions = stagger_decompositions
        self.calls = 0  # step() calls in this process (comm_bytes counts since construction)
        self.timer = PhaseTimer(PHASES, synchronize=precise_timing)
        self.comm_bytes: dict[str, int] = dict.fromkeys(("broadcast", *COMM_KINDS), 0)
        self.layer_numerics: dict[str, Counter] = defaultdict(Counter)  # owned layers' events
        self._peer_numerics: dict[int, list[int]] = {}  # other owners' totals, from broadcasts

        assignment = self.placement["assignment"]
        self.blocks: dict[str, KFACBlock] = {name: make_block(m, name) for name, m in layers}
        self.owner: dict[str, int] = {name: int(assignment[name]) for name, _ in layers}
        self.layers_of_rank: dict[int, list[str]] = defaultdict(list)
        for name, _ in layers:
            self.layers_of_rank[self.owner[name]].append(name)
        self.owned: list[str] = self.layers_of_rank.get(self.rank, [])
        self._captured_a: dict[str, torch.Tensor] = {}
        self._captured_g: dict[str, torch.Tensor] = {}
        self._hooks = [h for name in self.factor_layers for h in self._register_hooks(name)]
        # With stagger_decompositions, the planner's staggered schedule: layer -> slot k in
        # 0..inv_update_freq-1, decomposed on steps where step % inv_update_freq == k (every layer
        # on step 0, to start). It lowers the peak step, not the mean (synchronous steps already
        # overlap every worker's decompositions in step 0), so it is opt-in. Strategies that
        # broadcast decompositions keep them all on slot 0 (one fused exchange per cycle).
        stagger = (stagger_decompositions
                   and self.strategy.shared is not SharedResult.DECOMPOSITION)
        self.decomposition_slot: dict[str, int] = {
            name: int(self.placement.get("decomposition_step", {}).get(name, 0)) if stagger else 0
            for name, _ in layers}

    # -- what this rank does under the strategy --------------------------------------------------
    @property
    def factor_layers(self) -> list[str]:
        """Layers whose factors this rank builds and keeps: its own (LOCAL) or all (ALLREDUCED)."""
        if self.strategy.factors is FactorMode.ALLREDUCED:
            return list(self.blocks)
        return list(self.owned)

    @property
    def preconditioned_layers(self) -> list[str]:
        """Layers this rank preconditions: its own, or all when decompositions are shared."""
        if self.strategy.shared is SharedResult.DECOMPOSITION:
            return list(self.blocks)
        return list(self.owned)

    # -- capture --------------------------------------------------------------------------------
    def _capture_due(self) -> bool:
        return self.steps % self.factor_update_freq == 0

    def _register_hooks(self, name: str) -> list:
        module = self.blocks[name].module

        def save_input(mod: nn.Module, inputs: tuple) -> None:
            if mod.training and torch.is_grad_enabled() and self._capture_due():
                self._captured_a[name] = inputs[0].detach()

        def save_grad_hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if mod.training and output.requires_grad and self._capture_due():
                output.register_hook(lambda grad: self._captured_g.__setitem__(name, grad.detach()))

        return [module.register_forward_pre_hook(save_input),
                module.register_forward_hook(save_grad_hook)]

    def discard_captured(self) -> None:
        """Forget this step's captured inputs and output gradients (a skipped step)."""
        self._captured_a.clear()
        self._captured_g.clear()

    def remove_hooks(self) -> None:
        """Detach from the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Precondition every K-FAC layer's gradient in place (all ranks end with the same grads)."""
        self.timer.reset()
        with self.timer.phase("factors"):
            fresh = self._build_factors()
        if self.strategy.factors is FactorMode.ALLREDUCED:
            with self.timer.phase("factor_allreduce"):
                self._allreduce_factors(fresh)
        with self.timer.phase("factors"):
            self._fold_factors(fresh)
        shares_decomposition = self.strategy.shared is SharedResult.DECOMPOSITION
        due = self._due_decompositions()
        if due:
            with self.timer.phase("decompose"):
                self._decompose(due)
        if shares_decomposition and self.steps % self.inv_update_freq == 0:
            with self.timer.phase("broadcast"):
                self._exchange_decompositions()
        with self.timer.phase("precondition"):
            mine = {name: self._precondition(name) for name in self.preconditioned_layers}
        if shares_decomposition:
            results = mine
        else:
            with self.timer.phase("broadcast"):
                results = self._exchange(mine)
        self._apply(results)
        self.steps += 1
        self.calls += 1

    def _build_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """This step's batch factors (A, G) of every layer this rank builds and captured."""
        fresh = {}
        for name in self.factor_layers:
            a = self._captured_a.pop(name, None)
            g = self._captured_g.pop(name, None)
            if a is None or g is None:
                continue
            block = self.blocks[name]
            fresh[name] = (block.compute_factor_a(a), block.compute_factor_g(g))
        return fresh

    def _fold_factors(self, fresh: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fold batch factors into the running averages and drop non-finite ones."""
        for name, (a, g) in fresh.items():
            block = self.blocks[name]
            block.update_factors(a, g, self.factor_decay)
            self._count(name, "nonfinite_factors", block.drop_nonfinite_factors())

    def _allreduce_factors(self, fresh: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Average every layer's batch factors across ranks in place (every rank captures the
        same layers, so the fused buffers line up)."""
        if self.world_size == 1 or not fresh:
            return
        tensors = [t for pair in fresh.values() for t in pair]
        nbytes = allreduce_mean_(tensors, self.world_size, self.process_group)
        self._add_bytes("factor_allreduce", ring_allreduce_bytes(nbytes, self.world_size))

    def _due_decompositions(self) -> list[str]:
        """Owned layers whose decomposition falls on this step (all of them on step 0)."""
        slot = self.steps % self.inv_update_freq
        return [name for name in self.owned
                if self.steps == 0 or self.decomposition_slot[name] % self.inv_update_freq == slot]

    def _decompose(self, names: list[str]) -> None:
        for name in names:
            block = self.blocks[name]
            outcomes = []
            if block.factor_a is not None:
                outcomes.append(block.decompose_a(self.method, self.damping))
            if block.factor_g is not None:
                outcomes.append(block.decompose_g(self.method, self.damping))
            self._count(name, "decompose_retries", outcomes.count(DecomposeOutcome.RETRIED))
            self._count(name, "decompose_failures", outcomes.count(DecomposeOutcome.FAILED))

    def _precondition(self, name: str) -> torch.Tensor:
        """The preconditioned gradient of `name`, or its plain gradient when there is no usable
        decomposition or the result is not finite."""
        block = self.blocks[name]
        grad = block.grad_or_zeros()
        if block.module.weight.grad is None:
            return grad
        if block.ready(self.method):
            result = block.precondition_if_finite(grad, self.method, self.damping)
            if result is not None:
                return result
        self._count(name, "plain_gradient", 1)
        return grad

    def _count(self, name: str, counter: str, n: int) -> None:
        """Record `n` events of `counter` on `name`; only its owner counts them."""
        if n and self.owner[name] == self.rank:
            self.layer_numerics[name][counter] += n

    def _own_numerics(self) -> list[int]:
        """This rank's cumulative counters, in NUMERICS_COUNTERS order."""
        return [sum(c[k] for c in self.layer_numerics.values()) for k in NUMERICS_COUNTERS]

    @property
    def numerics(self) -> dict[str, int]:
        """Cumulative safety-net counters summed over every owner rank (the same on all ranks
        after each step; under COMM-OPT other owners' as of the last decomposition update)."""
        totals = self._own_numerics()
        for peer in self._peer_numerics.values():
            totals = [t + p for t, p in zip(totals, peer)]
        return dict(zip(NUMERICS_COUNTERS, totals))

    def _add_bytes(self, kind: str, nbytes: int) -> None:
        self.comm_bytes[kind] += nbytes
        if kind.endswith("broadcast") or kind == "numerics_counters":
            self.comm_bytes["broadcast"] += nbytes

    def comm_bytes_per_step(self) -> dict[str, float]:
        """Mean bytes sent + received per step() call of this process, by kind (COMM_KINDS, and
        'broadcast': every broadcast byte, counters included)."""
        calls = max(self.calls, 1)
        return {kind: nbytes / calls for kind, nbytes in self.comm_bytes.items()}

    def _broadcast_fused(self, chunks_of: Callable[[list[str]], list[torch.Tensor]],
                         sizes_of: Callable[[str], int], kind: str
                         ) -> list[tuple[list[str], torch.Tensor]]:
        """One asynchronous broadcast per owner of [its layers' chunks..., its counters]; waits
        for all, records peers' counters and the bytes; returns (layers, payload) per owner."""
        pending = []
        ref = next(iter(self.blocks.values())).module.weight
        for src in range(self.world_size):
            names = self.layers_of_rank.get(src, [])
            if not names:
                continue
            if src == self.rank:
                counters = torch.tensor(self._own_numerics(), dtype=ref.dtype, device=ref.device)
                flat = torch.cat([c.reshape(-1) for c in chunks_of(names)] + [counters])
            else:
                numel = sum(sizes_of(n) for n in names) + NUMERICS_ELEMENTS
                flat = torch.empty(numel, dtype=ref.dtype, device=ref.device)
            work = dist.broadcast(flat, src=src, group=self.process_group, async_op=True)
            pending.append((src, names, flat, work))
            tail = NUMERICS_ELEMENTS * flat.element_size()
            self._add_bytes(kind, flat.numel() * flat.element_size() - tail)
            self._add_bytes("numerics_counters", tail)
        received = []
        for src, names, flat, work in pending:
            work.wait()
            if src != self.rank:
                self._peer_numerics[src] = [int(v) for v in flat[-NUMERICS_ELEMENTS:].tolist()]
            received.append((names, flat[:-NUMERICS_ELEMENTS]))
        return received

    def _exchange(self, mine: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every owner broadcasts its preconditioned gradients, fused into one flat buffer."""
        if self.world_size == 1:
            return mine
        received = self._broadcast_fused(lambda names: [mine[n] for n in names],
                                         lambda n: self.blocks[n].grad_numel,
                                         "preconditioned_gradient_broadcast")
        results = dict(mine)
        for names, payload in received:
            offset = 0
            for n in names:
                block = self.blocks[n]
                results[n] = payload[offset:offset + block.grad_numel].view(block.dim_g,
                                                                             block.dim_a)
                offset += block.grad_numel
        return results

    def _decomposition_shapes(self, name: str) -> list[tuple[str, tuple[int, ...]]]:
        """(key, shape) of the tensors of a layer's decomposition under this compute method."""
        a, g = self.blocks[name].dim_a, self.blocks[name].dim_g
        if self.method is ComputeMethod.EIGEN:
            return [("q_a", (a, a)), ("d_a", (a,)), ("q_g", (g, g)), ("d_g", (g,))]
        return [("inv_a", (a, a)), ("inv_g", (g, g))]

    def _decomposition_numel(self, name: str) -> int:
        return sum(_numel(shape) for _, shape in self._decomposition_shapes(name))

    def _decomposition_chunks(self, names: list[str]) -> list[torch.Tensor]:
        """An owner's decompositions, flat; a layer without one travels as NaN (receivers then
        keep none, as the owner has none: decompositions are always finite)."""
        chunks = []
        for name in names:
            block = self.blocks[name]
            if block.ready(self.method):
                chunks.extend(block.decomposition[k].reshape(-1)
                              for k, _ in self._decomposition_shapes(name))
            else:
                ref = block.module.weight
                chunks.append(torch.full((self._decomposition_numel(name),), float("nan"),
                                         dtype=ref.dtype, device=ref.device))
        return chunks

    def _exchange_decompositions(self) -> None:
        """Every owner broadcasts its layers' decompositions (COMM-OPT); every rank, the owner
        included, loads them from the broadcast buffer, so all precondition with tensors of the
        same bits and memory layout (eigh returns column-major ones; layout changes matmul's
        rounding) and end with identical parameters."""
        if self.world_size == 1:
            return
        received = self._broadcast_fused(self._decomposition_chunks, self._decomposition_numel,
                                         "decomposition_broadcast")
        for names, payload in received:
            offset = 0
            for name in names:
                numel = self._decomposition_numel(name)
                chunk = payload[offset:offset + numel]
                offset += numel
                if bool(torch.isfinite(chunk).all()):  # the owner too: same bits, same layout
                    self.blocks[name].decomposition = self._unpack(name, chunk)

    def _unpack(self, name: str, chunk: torch.Tensor) -> dict[str, torch.Tensor]:
        tensors, offset = {}, 0
        for key, shape in self._decomposition_shapes(name):
            tensors[key] = chunk[offset:offset + _numel(shape)].reshape(shape).clone()
            offset += _numel(shape)
        return tensors

    def _apply(self, results: dict[str, torch.Tensor]) -> None:
        """KL-clip and write the preconditioned gradients into the modules."""
        lr = self.lr() if callable(self.lr) else self.lr
        apply_preconditioned(self.blocks.values(), results, lr=lr, kl_clip=self.kl_clip)

    # -- introspection and state ----------------------------------------------------------------
    def memory_usage(self) -> int:
        """Bytes of second-order state this rank holds (factors and decompositions; 0 for a
        DP-KFAC rank that owns no layer)."""
        return sum(block.memory_usage() for block in self.blocks.values())

    @property
    def current_phase(self) -> str | None:
        """The phase of `.step()` running now, or the one an exception left it in."""
        return self.timer.current

    @property
    def phase_times(self) -> dict[str, float]:
        """Seconds spent in each phase of the last step."""
        return self.timer.times()

    def state_dict(self) -> dict:
        """This rank's preconditioner state: step count, the tensors of every block it holds
        state for (its own layers; all layers' factors when factors are all-reduced)."""
        held = {n: b.state_tensors() for n, b in self.blocks.items()}
        return {"steps": self.steps, "world_size": self.world_size, "rank": self.rank,
                "blocks": {n: {k: v.clone() for k, v in tensors.items()}
                           for n, tensors in held.items() if tensors or n in self.owned},
                "numerics": {n: dict(c) for n, c in self.layer_numerics.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned on this same rank."""
        self.steps = int(state["steps"])
        holds_any = (self.strategy.factors is FactorMode.ALLREDUCED
                     or self.strategy.shared is SharedResult.DECOMPOSITION)
        for name, tensors in state["blocks"].items():
            if name not in self.blocks or (name not in self.owned and not holds_any):
                raise ValueError(f"checkpoint holds layer {name!r} that rank {self.rank} does not own")
            self.blocks[name].load_state(tensors)
        self.layer_numerics = defaultdict(Counter)
        for name, counts in state.get("numerics", {}).items():
            self.layer_numerics[name].update({k: int(v) for k, v in counts.items()
                                              if k in NUMERICS_COUNTERS})


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for side in shape:
        count *= side
    return count


DPKFAC = KFACPreconditioner  # the public name: DP-KFAC is the default strategy
