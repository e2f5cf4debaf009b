"""The K-FAC step, given who does what (a WorkAssignment) and how to talk (an Exchange).

Each phase has one method per layer (batch_factor, fold_factors, decompose_factor,
precondition_layer) that `step()` runs over this rank's layers, and that the profiler times.
"""
from __future__ import annotations

from typing import Callable

import torch

from dpkfac.core.step import SECOND_ORDER_PHASES
from dpkfac.core.strategy import FactorMode, SharedResult

from ..kfac import ComputeMethod, DecomposeOutcome, KFACBlock, apply_preconditioned
from ..runtime.timing import PhaseTimer
from .assignment import WorkAssignment
from .capture import Capture
from .exchange import Exchange
from .numerics import NumericsLedger


class BaseKFACPreconditioner:
    """Distributed K-FAC over `blocks` (layer name -> block, in model order): `work` says what
    this rank does, `exchange` carries the collectives. Call `.step()` after backward (gradients
    already averaged across ranks) and before the optimizer's step.

    lr: learning rate (float, or a callable returning it), for the KL clip; damping: Tikhonov
    damping of the factors; factor_decay: their running-average decay; kl_clip: KL-clip bound
    (None: no clip); factor_update_freq / inv_update_freq: steps between factor / decomposition
    updates; precise_timing: synchronise the device around each phase; stagger_decompositions:
    whether `work` follows the placement's staggered schedule.
    """

    def __init__(self, blocks: dict[str, KFACBlock], work: WorkAssignment, exchange: Exchange,
                 *, lr: float | Callable[[], float], damping: float, factor_decay: float,
                 kl_clip: float | None, factor_update_freq: int, inv_update_freq: int,
                 compute_method: ComputeMethod, precise_timing: bool = False,
                 stagger_decompositions: bool = False) -> None:
        self.blocks = blocks
        self.work = work
        self.exchange = exchange
        self.strategy = work.strategy
        self.lr = lr
        self.damping = damping
        self.factor_decay = factor_decay
        self.kl_clip = kl_clip
        self.factor_update_freq = factor_update_freq
        self.inv_update_freq = inv_update_freq
        self.method = compute_method
        self.stagger_decompositions = stagger_decompositions
        self.steps = 0  # K-FAC steps taken, restored by load_state_dict
        self.calls = 0  # step() calls in this process (traffic is counted since construction)
        self.timer = PhaseTimer(SECOND_ORDER_PHASES, synchronize=precise_timing)
        self.ledger = NumericsLedger(work.owner, work.rank)
        self.capture = Capture({name: blocks[name].module for name in work.factor_layers},
                               due=lambda: self.steps % self.factor_update_freq == 0)

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Precondition every K-FAC layer's gradient in place (all ranks end with the same grads)."""
        self.timer.reset()
        with self.timer.phase("factors"):
            fresh = {name: (self.batch_factor(name, "a"), self.batch_factor(name, "g"))
                     for name in self.capture.complete(self.work.factor_layers)}
            self.capture.clear()
        if self.strategy.factors is FactorMode.ALLREDUCED:
            with self.timer.phase("factor_allreduce"):
                self.exchange.allreduce_factors(fresh.values())
        with self.timer.phase("factors"):
            for name, (a, g) in fresh.items():
                self.fold_factors(name, a, g)
        due = self.work.decompositions_due(self.steps, self.inv_update_freq)
        if due:
            with self.timer.phase("decompose"):
                for name in due:
                    self.decompose_factor(name, "a")
                    self.decompose_factor(name, "g")
        shares_decompositions = self.strategy.shared is SharedResult.DECOMPOSITION
        if shares_decompositions and self.steps % self.inv_update_freq == 0:
            with self.timer.phase("broadcast"):
                self.exchange.share_decompositions(self.blocks, self.work.layers_of_rank,
                                                   self.method, self.ledger)
        with self.timer.phase("precondition"):
            results = {name: self.precondition_layer(name)
                       for name in self.work.preconditioned_layers}
        if not shares_decompositions:
            with self.timer.phase("broadcast"):
                results = self.exchange.share_gradients(results, self.blocks,
                                                        self.work.layers_of_rank, self.ledger)
        self.apply(results)
        self.steps += 1
        self.calls += 1

    # -- one layer, one phase --------------------------------------------------------------------
    def batch_factor(self, name: str, side: str) -> torch.Tensor:
        """Layer `name`'s factor A (side "a") or G ("g") of the captured batch."""
        block = self.blocks[name]
        if side == "a":
            return block.compute_factor_a(self.capture.inputs[name])
        return block.compute_factor_g(self.capture.grad_outputs[name])

    def fold_factors(self, name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        """Fold batch factors into layer `name`'s running averages; drop non-finite ones."""
        block = self.blocks[name]
        block.update_factors(a, g, self.factor_decay)
        self.ledger.count(name, "nonfinite_factors", block.drop_nonfinite_factors())

    def decompose_factor(self, name: str, side: str) -> None:
        """Decompose layer `name`'s running A ("a") or G ("g"), if it has one, counting retries
        and failures (a failure keeps the previous decomposition)."""
        block = self.blocks[name]
        if side == "a":
            if block.factor_a is None:
                return
            outcome = block.decompose_a(self.method, self.damping)
        else:
            if block.factor_g is None:
                return
            outcome = block.decompose_g(self.method, self.damping)
        self.ledger.count(name, "decompose_retries", int(outcome is DecomposeOutcome.RETRIED))
        self.ledger.count(name, "decompose_failures", int(outcome is DecomposeOutcome.FAILED))

    def precondition_layer(self, name: str) -> torch.Tensor:
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
        self.ledger.count(name, "plain_gradient", 1)
        return grad

    def apply(self, results: dict[str, torch.Tensor]) -> None:
        """KL-clip every layer's preconditioned gradient and write it into the modules."""
        lr = self.lr() if callable(self.lr) else self.lr
        apply_preconditioned(self.blocks.values(), results, lr=lr, kl_clip=self.kl_clip)

    # -- around the step -------------------------------------------------------------------------
    def discard_captured(self) -> None:
        """Forget this step's captured inputs and output gradients (a skipped step)."""
        self.capture.clear()

    def remove_hooks(self) -> None:
        """Detach from the model."""
        self.capture.remove()

    @property
    def rank(self) -> int:
        """This process's rank in the group it communicates in."""
        return self.work.rank

    @property
    def world_size(self) -> int:
        """Ranks in the group it communicates in."""
        return self.exchange.world_size

    @property
    def owned(self) -> list[str]:
        """The layers this rank owns."""
        return self.work.owned

    @property
    def numerics(self) -> dict[str, int]:
        """Cumulative safety-net counters summed over every owner rank (the same on all ranks
        after each step; when decompositions are shared, other owners' as of the last
        decomposition update)."""
        return self.ledger.totals()

    @property
    def layer_numerics(self) -> dict[str, dict[str, int]]:
        """Safety-net events per layer this rank owns."""
        return self.ledger.per_layer

    def comm_bytes_per_step(self) -> dict[str, float]:
        """Mean bytes sent + received per step() call of this process, by second-order traffic
        kind, and 'broadcast' (every broadcast byte, counters included)."""
        calls = max(self.calls, 1)
        return {kind: nbytes / calls for kind, nbytes in self.exchange.bytes.items()}

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
        owned = set(self.work.owned)
        held = {n: b.state_tensors() for n, b in self.blocks.items()}
        return {"steps": self.steps, "world_size": self.world_size, "rank": self.rank,
                "blocks": {n: {k: v.clone() for k, v in tensors.items()}
                           for n, tensors in held.items() if tensors or n in owned},
                "numerics": self.ledger.state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned on this same rank."""
        self.steps = int(state["steps"])
        holds_any = (self.strategy.factors is FactorMode.ALLREDUCED
                     or self.strategy.shared is SharedResult.DECOMPOSITION)
        owned = set(self.work.owned)
        for name, tensors in state["blocks"].items():
            if name not in self.blocks or (name not in owned and not holds_any):
                raise ValueError(f"checkpoint holds layer {name!r} that rank {self.rank} "
                                 "does not own")
            self.blocks[name].load_state(tensors)
        self.ledger.load(state.get("numerics", {}))
