"""The K-FAC step, given who does what (a WorkAssignment) and how to talk (an Exchange).

Each phase has one method per layer (batch_factor, fold_factors, decompose_factor,
precondition_layer) that `step()` runs over this rank's layers, and that the profiler times.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from dpkfac.core.step import SECOND_ORDER_PHASES
from dpkfac.core.strategy import FactorMode, SharedResult

from ..kfac import ComputeMethod, DecomposeOutcome, KFACBlock, apply_preconditioned
from ..runtime.finite import all_finite
from ..runtime.timing import PhaseTimer
from .assignment import WorkAssignment
from .capture import Capture
from .exchange import Exchange
from .numerics import NumericsLedger


class BaseKFACPreconditioner:
    """Distributed K-FAC over `blocks` (layer name -> block, in model order): `work` says what
    this rank does, `exchange` carries the collectives. Call `.step()` after backward (gradients
    already averaged across ranks) and before the optimizer's step.

    The hyper-parameters (lr, damping, factor_decay, kl_clip, the update periods,
    precise_timing, stagger_decompositions, factor_dtype, grad_scaler, overlap) are those of
    KFACPreconditioner (from_placement), documented there. step() runs with autocast disabled;
    with a grad_scaler it first checks that every gradient of `parameters` is finite (one fused
    check) and, if one is not, drops the captured tensors, counts the skip in `skipped_steps`
    and returns False without any factor or collective.

    parameters: the parameters whose gradients that check covers (default: the K-FAC layers'),
    kept as `params`.

    The overlapped step (overlap=True, the default): with the gradient all-reduce in flight
    (e.g. pending = start_gradient_average(grads, world_size)), call prepare() (an owner's
    factors and decompositions, from its own batch), then pending.wait(), then finish() if
    the averaged gradients are finite, else rollback(). The results equal step()'s to the bit.
    overlap=False: prepare() does nothing and finish() is step().

    Gradient accumulation: the factors of a step are those of the concatenation (along the
    batch dimension) of every micro-batch captured since the last step (see Capture). With K
    micro-batches of B samples whose losses are each their batch mean divided by K (backward K
    times, then step() once), every output gradient carries 1/(K*B) and the blocks' G
    multiplies by the concatenated batch size K*B, so A and G equal exactly those of one
    backward over the whole K*B batch with a mean loss. Micro-batches must have equal sizes for
    G to be exact.
    """

    def __init__(self, blocks: dict[str, KFACBlock], work: WorkAssignment, exchange: Exchange,
                 *, lr: float | Callable[[], float], damping: float, factor_decay: float,
                 kl_clip: float | None, factor_update_freq: int, inv_update_freq: int,
                 compute_method: ComputeMethod, precise_timing: bool = False,
                 stagger_decompositions: bool = False, factor_dtype: torch.dtype = torch.float32,
                 grad_scaler: Any = None, parameters: Iterable[nn.Parameter] | None = None,
                 overlap: bool = True) -> None:
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
        self.factor_dtype = factor_dtype
        self.grad_scaler = grad_scaler
        self.overlap = overlap
        self.params = list(parameters if parameters is not None else
                           (p for b in blocks.values() for p in b.module.parameters()))
        self._check_decomposition_wire_dtype()
        self.steps = 0  # K-FAC steps taken, restored by load_state_dict
        self.skipped_steps = 0  # steps skipped for non-finite gradients, restored too
        self.calls = 0  # step() calls that ran (skips excluded) in this process, since construction
        self._undo: tuple[dict, dict] | None = None  # what rollback() restores after prepare()
        self.timer = PhaseTimer(SECOND_ORDER_PHASES, synchronize=precise_timing)
        self.ledger = NumericsLedger(work.owner, work.rank)
        self.capture = Capture({name: blocks[name].module for name in work.factor_layers},
                               due=lambda: self.steps % self.factor_update_freq == 0)

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """Precondition every K-FAC layer's gradient in place (all ranks end with the same
        grads); True, or False for a step skipped for non-finite gradients (with a
        grad_scaler only)."""
        self._check_nothing_pending("step()")
        self.timer.reset()
        if self.grad_scaler is not None and not self.gradients_finite():
            self.capture.clear()
            self.skipped_steps += 1
            return False
        with torch.autocast(self._device_type(), enabled=False):
            self._step()
        return True

    @torch.no_grad()
    def prepare(self) -> bool:
        """The step's local phases now, before the gradients are reduced (the overlapped step:
        call it while the gradient all-reduce is in flight, then finish() or rollback() once it
        is done). Only strategies whose factors are LOCAL have such phases (an owner's factors
        from its own batch and their decompositions); returns whether it ran them. Their
        effects stay undoable until finish(). With overlap=False, or alone (world size 1: no
        all-reduce to hide behind), it runs nothing (finish() is then step(): the serial step)."""
        self._check_nothing_pending("prepare()")
        if (not self.overlap or self.strategy.factors is not FactorMode.LOCAL
                or self.exchange.world_size == 1):
            return False
        self.timer.reset()
        self._undo = self._snapshot()
        with torch.autocast(self._device_type(), enabled=False):
            self._local_phases()
        return True

    @torch.no_grad()
    def finish(self) -> bool:
        """The rest of a step begun with prepare() (or all of it, when prepare() ran nothing),
        the gradients now averaged: as step(), whose results it gives to the bit."""
        if self._undo is None:
            return self.step()
        if self.grad_scaler is not None and not self.gradients_finite():
            self.rollback()
            self.skipped_steps += 1
            return False
        with torch.autocast(self._device_type(), enabled=False):
            self._shared_phases()
        self._undo = None
        return True

    def rollback(self) -> None:
        """Undo prepare() (the step is skipped: its averaged gradients are not finite): the
        factors, decompositions and counters are as before it; captured tensors dropped."""
        if self._undo is not None:
            held, counters = self._undo
            for name, (factor_a, factor_g, decomposition) in held.items():
                block = self.blocks[name]
                block.factor_a, block.factor_g, block.decomposition = \
                    factor_a, factor_g, decomposition
            self.ledger.load(counters)
            self._undo = None
            self.timer.reset()  # the skipped step's phases are not the step's
        self.capture.clear()

    def _check_nothing_pending(self, call: str) -> None:
        if self._undo is not None:
            raise RuntimeError(f"{call} with a step begun by prepare() pending: call finish() "
                               "or rollback() first")

    def _snapshot(self) -> tuple[dict, dict]:
        """What prepare() may change, by reference (folding and decomposing replace tensors,
        never write into them): each factor layer's factors and decomposition, the counters."""
        held = {name: (self.blocks[name].factor_a, self.blocks[name].factor_g,
                       dict(self.blocks[name].decomposition))
                for name in self.work.factor_layers}
        return held, self.ledger.state()

    def _step(self) -> None:
        self._local_phases()
        self._shared_phases()

    def _local_phases(self) -> None:
        """Factors (all-reduced when the strategy says so), then the due decompositions."""
        with self.timer.phase("factors"):
            g_scale = self.g_factor_scale()
            fresh = {name: (self.batch_factor(name, "a"), self.batch_factor(name, "g", g_scale))
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

    def _shared_phases(self) -> None:
        """Shared decompositions (of every layer, or of the split ones) or preconditioned
        gradients (the split layers' shares summed), then the write-back."""
        due = self.steps % self.inv_update_freq == 0
        if self.strategy.shared is SharedResult.DECOMPOSITION:
            if due:
                self._share_decompositions(self.work.layers_of_rank)
            with self.timer.phase("precondition"):
                results = {name: self.precondition_layer(name)
                           for name in self.work.preconditioned_layers}
        else:
            results = self._precondition_and_share(self.work.split_layers_of_rank if due else {})
        self.apply(results)
        self.steps += 1
        self.calls += 1

    def _share_decompositions(self, layers_of_rank: dict[int, list[str]]) -> None:
        """The owners' broadcasts of `layers_of_rank`'s decompositions, loaded on every rank."""
        if layers_of_rank:
            with self.timer.phase("broadcast"):
                self.exchange.share_decompositions(self.blocks, layers_of_rank, self.method,
                                                   self.ledger)
                self._decompositions_to_factor_dtype()

    def _precondition_and_share(self, decompositions: dict[int, list[str]]
                                ) -> dict[str, torch.Tensor]:
        """Every layer's preconditioned gradient, on every rank: this rank's own layers and
        shares of the split layers, the owners' broadcasts, the shares summed; first the split
        layers' `decompositions` (owner -> layers) where this step shares them.

        Serial (overlap=False): decompositions, own layers, broadcasts, shares, their sum.
        Overlapped, with split layers: the shares come first and their all-reduce runs while
        this rank preconditions its own layers; on a step that shares decompositions the own
        layers come first instead, under the decompositions' broadcasts (a rank need not wait
        for another owner's decomposition before it computes), then the shares, summed after
        the gradient broadcasts."""
        overlapped = self.overlap and bool(self.work.split_layers)
        decomposing = None
        if overlapped and decompositions:
            with self.timer.phase("broadcast"):
                decomposing = self.exchange.post_decompositions(
                    self.blocks, decompositions, self.method, self.ledger)
        else:
            self._share_decompositions(decompositions)
        summing = None
        if overlapped and decomposing is None:
            with self.timer.phase("precondition"):
                summing = self.exchange.post_share_sum(self._precondition_shares())
        receiving = self.exchange.post_gradient_receives(
            self.blocks, self.work.broadcast_layers_of_rank, self.ledger)
        with self.timer.phase("precondition"):
            results = {name: self.precondition_layer(name)
                       for name in self.work.preconditioned_layers}
        if decomposing is not None:
            with self.timer.phase("broadcast"):
                self.exchange.load_decompositions(self.blocks, decomposing, self.method,
                                                  self.ledger)
                self._decompositions_to_factor_dtype()
        if summing is None:
            with self.timer.phase("precondition"):
                summing = self._precondition_shares()
        with self.timer.phase("broadcast"):
            results, totals = self.exchange.share_gradients(
                results, self.blocks, self.work.broadcast_layers_of_rank, self.ledger,
                receiving, shares=summing)
        results.update({name: self._finite_or_plain(name, totals.get(name))
                        for name in self.work.split_layers})
        return results

    def _precondition_shares(self) -> dict[str, torch.Tensor]:
        """This rank's shares of the split layers' preconditioned gradients (those it has)."""
        return {name: share for name in self.work.split_layers
                if (share := self.precondition_share(name)) is not None}

    def gradients_finite(self) -> bool:
        """Whether every gradient of `params` is free of NaN/inf: one fused max-norm over
        all of them and one device sync."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return True
        norms = torch._foreach_norm(grads, float("inf"))
        device = grads[0].device
        return bool(torch.stack([n.to(device) for n in norms]).isfinite().all())

    def g_factor_scale(self) -> float:
        """What batch G factors are multiplied by: 1 / s**2 for the grad_scaler's current loss
        scale s (the output gradients carry s), else 1."""
        if self.grad_scaler is None:
            return 1.0
        return 1.0 / float(self.grad_scaler.get_scale()) ** 2

    # -- one layer, one phase --------------------------------------------------------------------
    def batch_factor(self, name: str, side: str, g_scale: float | None = None) -> torch.Tensor:
        """Layer `name`'s factor A (side "a") or G ("g"), in factor_dtype, of the concatenation
        of the micro-batches captured since the last step; G is multiplied by `g_scale`
        (default g_factor_scale(), which undoes a grad_scaler's loss scale)."""
        block = self.blocks[name]
        if side == "a":
            return block.compute_factor_a(self.capture.batch_inputs(name).to(self.factor_dtype))
        factor = block.compute_factor_g(self.capture.batch_grad_outputs(name).to(self.factor_dtype))
        scale = self.g_factor_scale() if g_scale is None else g_scale
        return factor if scale == 1.0 else factor.mul_(scale)

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
            result = block.precondition_if_finite(grad.to(self.factor_dtype), self.method,
                                                  self.damping)
            if result is not None:
                return result.to(grad.dtype)
        self.ledger.count(name, "plain_gradient", 1)
        return grad

    def precondition_share(self, name: str) -> torch.Tensor | None:
        """This rank's share (its rows of the G side) of split layer `name`'s preconditioned
        gradient, in the gradient's dtype; None when there is no gradient or no decomposition
        (the same on every rank: the gradients are averaged and the decomposition shared)."""
        block = self.blocks[name]
        if block.module.weight.grad is None or not block.ready(self.method):
            return None
        grad = block.grad_matrix()
        start, stop = self.work.rows(name)
        share = block.precondition_rows(grad.to(self.factor_dtype), self.method, self.damping,
                                        start, stop)
        return share.to(grad.dtype)

    def _finite_or_plain(self, name: str, total: torch.Tensor | None) -> torch.Tensor:
        """A split layer's summed preconditioned gradient, row-major (shares summed through the
        transpose are column-major: transposed once here, not in every pass of the write-back),
        or its plain gradient when there is none or it is not finite (every rank decides alike:
        it holds the same sum)."""
        if total is not None and all_finite(total):
            return total.contiguous()
        block = self.blocks[name]
        if block.module.weight.grad is not None:
            self.ledger.count(name, "plain_gradient", 1)
        return block.grad_or_zeros()

    def apply(self, results: dict[str, torch.Tensor]) -> None:
        """KL-clip every layer's preconditioned gradient and write it into the modules."""
        lr = self.lr() if callable(self.lr) else self.lr
        apply_preconditioned(self.blocks.values(), results, lr=lr, kl_clip=self.kl_clip)

    # -- around the step -------------------------------------------------------------------------
    def _device_type(self) -> str:
        """The device type ("cpu", "cuda", ...) of the K-FAC layers' weights."""
        return next((b.module.weight.device.type for b in self.blocks.values()), "cpu")

    def _decompositions_to_factor_dtype(self) -> None:
        """Cast shared decompositions (they travel in the weights' dtype) back to factor_dtype."""
        for block in self.blocks.values():
            block.decomposition = {k: v.to(self.factor_dtype)
                                   for k, v in block.decomposition.items()}

    def _check_decomposition_wire_dtype(self) -> None:
        """Shared decompositions travel in the weights' dtype: it must hold factor_dtype exactly."""
        shared = self.strategy.shared is SharedResult.DECOMPOSITION or self.work.split
        if not shared or not self.blocks or self.exchange.world_size == 1:
            return
        wire = next(iter(self.blocks.values())).module.weight.dtype
        if torch.promote_types(wire, self.factor_dtype) != wire:
            raise ValueError(f"factor_dtype {self.factor_dtype} is wider than the weights' "
                             f"dtype {wire}, in which shared decompositions are broadcast")

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
        self._check_nothing_pending("state_dict()")
        owned = set(self.work.owned)
        held = {n: b.state_tensors() for n, b in self.blocks.items()}
        return {"steps": self.steps, "skipped_steps": self.skipped_steps,
                "world_size": self.world_size, "rank": self.rank,
                "blocks": {n: {k: v.clone() for k, v in tensors.items()}
                           for n, tensors in held.items() if tensors or n in owned},
                "numerics": self.ledger.state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned on this same rank (tensors cast to factor_dtype;
        a state without skipped_steps counts 0)."""
        self._check_nothing_pending("load_state_dict()")
        self.steps = int(state["steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        holds_any = (self.strategy.factors is FactorMode.ALLREDUCED
                     or self.strategy.shared is SharedResult.DECOMPOSITION)
        owned = set(self.work.owned) | set(self.work.split_layers)
        for name, tensors in state["blocks"].items():
            if name not in self.blocks or (name not in owned and not holds_any):
                raise ValueError(f"checkpoint holds layer {name!r} that rank {self.rank} "
                                 "does not own")
            self.blocks[name].load_state({k: v.to(self.factor_dtype) for k, v in tensors.items()})
        self.ledger.load(state.get("numerics", {}))
