"""DP-KFAC: each K-FAC layer has one owner rank that builds, decomposes and preconditions it.

Only the owner captures a layer's inputs and output gradients (from its own local batch), keeps
the running factors and their decomposition, preconditions the already all-reduced gradient and
broadcasts the result; every owner's results travel in one fused asynchronous broadcast.
Non-owners never hold the layer's factors. The placement decides owners; nothing here is clever
about placing.

Numerical safety (counted in `numerics`, per owner and in total, see NUMERICS_COUNTERS): a running
factor that turns NaN/inf is dropped and rebuilt from the next batch; a decomposition that fails
or comes out non-finite is retried with more damping, else the previous decomposition stays; a
layer with no usable decomposition, or whose preconditioned gradient is non-finite, gets its plain
(all-reduced) gradient this step. Each owner's cumulative counters ride at the end of its fused
broadcast (4 numbers), so every rank knows the totals after every step. Non-finite *gradients*
are the training loop's to handle (executor/train.py skips such steps on all ranks).
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from planner.placement import check_placement_matches, load_placement

from .blocks import ComputeMethod, DecomposeOutcome, KFACBlock, kfac_layers, make_block
from .distributed import world_rank_and_size
from .timing import PhaseTimer

PHASES = ("factors", "decompose", "precondition", "broadcast")

# Event counters of the numerical safety net (cumulative, per owner rank and per layer):
#   nonfinite_factors:  running factors (A or G) found NaN/inf and dropped
#   decompose_retries:  decompositions that failed at first and succeeded with more damping
#   decompose_failures: decompositions that failed at every damping; the previous one was kept
#   plain_gradient:     layer-steps that used the plain gradient (no usable decomposition, or a
#                       non-finite preconditioned gradient)
NUMERICS_COUNTERS = ("nonfinite_factors", "decompose_retries", "decompose_failures",
                     "plain_gradient")


class DPKFAC:
    """The DP-KFAC preconditioner. Call `.step()` after backward (gradients already averaged
    across ranks) and before the optimizer's step.

    Args:
        model: the (unwrapped or DDP-wrapped) model.
        placement: a dpkfac.placement/1 file path or its parsed dict.
        lr: learning rate (float or a callable returning it), used by the KL clip.
        damping: Tikhonov damping added to the Kronecker factors.
        factor_decay: running-average decay of the factors.
        kl_clip: KL-clip bound; None disables clipping.
        factor_update_freq / inv_update_freq: steps between factor / decomposition updates;
            default: the placement's config.
        compute_method: "eigen" or "inverse"; default: the placement's config, else eigen.
        process_group: the group to communicate in (default group when None).
        precise_timing: synchronise the device around each phase so phase times are exact.
    """

    def __init__(
        self,
        model: nn.Module,
        placement: str | os.PathLike | dict,
        *,
        lr: float | Callable[[], float] = 0.1,
        damping: float = 0.003,
        factor_decay: float = 0.95,
        kl_clip: float | None = 0.001,
        factor_update_freq: int | None = None,
        inv_update_freq: int | None = None,
        compute_method: str | ComputeMethod | None = None,
        process_group: Any = None,
        precise_timing: bool = False,
    ) -> None:
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.placement = load_placement(placement)
        config = self.placement["config"]
        self.rank, self.world_size = world_rank_and_size(process_group)
        layers = kfac_layers(module)
        check_placement_matches(self.placement, layer_names=[n for n, _ in layers],
                                world_size=self.world_size, source="placement")
        self.lr = lr
        self.damping = damping
        self.factor_decay = factor_decay
        self.kl_clip = kl_clip
        self.factor_update_freq = factor_update_freq or config["factor_update_freq"]
        self.inv_update_freq = inv_update_freq or config["inv_update_freq"]
        self.method = ComputeMethod(compute_method or config.get("compute_method", "eigen"))
        self.process_group = process_group
        self.steps = 0
        self.timer = PhaseTimer(PHASES, synchronize=precise_timing)
        self.comm_bytes: dict[str, int] = {"broadcast": 0}
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
        self._hooks = [h for name in self.owned for h in self._register_hooks(name)]

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
            self._update_factors()
        if self.steps % self.inv_update_freq == 0:
            with self.timer.phase("decompose"):
                self._decompose()
        with self.timer.phase("precondition"):
            mine = {name: self._precondition(name) for name in self.owned}
        with self.timer.phase("broadcast"):
            results = self._exchange(mine)
        self._apply(results)
        self.steps += 1

    def _update_factors(self) -> None:
        for name in self.owned:
            a = self._captured_a.pop(name, None)
            g = self._captured_g.pop(name, None)
            if a is None or g is None:
                continue
            block = self.blocks[name]
            block.update_factor_a(a, self.factor_decay)
            block.update_factor_g(g, self.factor_decay)
            self._count(name, "nonfinite_factors", block.drop_nonfinite_factors())

    def _decompose(self) -> None:
        for name in self.owned:
            block = self.blocks[name]
            outcomes = []
            if block.factor_a is not None:
                outcomes.append(block.decompose_a(self.method, self.damping))
            if block.factor_g is not None:
                outcomes.append(block.decompose_g(self.method, self.damping))
            self._count(name, "decompose_retries", outcomes.count(DecomposeOutcome.RETRIED))
            self._count(name, "decompose_failures", outcomes.count(DecomposeOutcome.FAILED))

    def _precondition(self, name: str) -> torch.Tensor:
        """The owner's preconditioned gradient of `name`, or its plain gradient when there is
        no usable decomposition or the result is not finite."""
        block = self.blocks[name]
        grad = self._grad_or_zeros(block)
        if block.module.weight.grad is None:
            return grad
        if block.ready(self.method):
            result = block.precondition(grad, self.method, self.damping)
            if bool(torch.isfinite(result).all()):
                return result
        self._count(name, "plain_gradient", 1)
        return grad

    def _count(self, name: str, counter: str, n: int) -> None:
        if n:
            self.layer_numerics[name][counter] += n

    def _own_numerics(self) -> list[int]:
        """This rank's cumulative counters, in NUMERICS_COUNTERS order."""
        return [sum(c[k] for c in self.layer_numerics.values()) for k in NUMERICS_COUNTERS]

    @property
    def numerics(self) -> dict[str, int]:
        """Cumulative safety-net counters summed over every owner rank (the same on all ranks
        after each step)."""
        totals = self._own_numerics()
        for peer in self._peer_numerics.values():
            totals = [t + p for t, p in zip(totals, peer)]
        return dict(zip(NUMERICS_COUNTERS, totals))

    def _exchange(self, mine: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every owner broadcasts its preconditioned gradients, fused into one flat buffer."""
        if self.world_size == 1:
            return mine
        pending = []
        for src in range(self.world_size):
            names = self.layers_of_rank.get(src, [])
            if not names:
                continue
            ref = self._grad_or_zeros(self.blocks[names[0]])
            if src == self.rank:
                counters = torch.tensor(self._own_numerics(), dtype=ref.dtype, device=ref.device)
                flat = torch.cat([mine[n].reshape(-1) for n in names] + [counters])
            else:
                numel = sum(self.blocks[n].grad_numel for n in names) + len(NUMERICS_COUNTERS)
                flat = torch.empty(numel, dtype=ref.dtype, device=ref.device)
            work = dist.broadcast(flat, src=src, group=self.process_group, async_op=True)
            pending.append((src, names, flat, work))
            self.comm_bytes["broadcast"] += flat.numel() * flat.element_size()
        results = dict(mine)
        for src, names, flat, work in pending:
            work.wait()
            if src != self.rank:
                tail = flat[-len(NUMERICS_COUNTERS):]
                self._peer_numerics[src] = [int(v) for v in tail.tolist()]
            offset = 0
            for n in names:
                block = self.blocks[n]
                results[n] = flat[offset:offset + block.grad_numel].view(block.dim_g, block.dim_a)
                offset += block.grad_numel
        return results

    def _apply(self, results: dict[str, torch.Tensor]) -> None:
        """KL-clip and write the preconditioned gradients into the modules."""
        scale = 1.0
        if self.kl_clip is not None:
            lr = self.lr() if callable(self.lr) else self.lr
            products = [(results[n] * self._grad_or_zeros(b)).sum() for n, b in self.blocks.items()]
            vg_sum = float(torch.stack(products).sum()) * lr ** 2
            if vg_sum != 0.0:
                scale = min(1.0, (self.kl_clip / abs(vg_sum)) ** 0.5)
        for name, block in self.blocks.items():
            if block.module.weight.grad is None:
                continue
            block.set_grad_matrix(results[name].mul(scale))

    @staticmethod
    def _grad_or_zeros(block: KFACBlock) -> torch.Tensor:
        weight = block.module.weight
        if weight.grad is None:
            return weight.new_zeros(block.dim_g, block.dim_a)
        return block.grad_matrix()

    # -- introspection and state ----------------------------------------------------------------
    def memory_usage(self) -> int:
        """Bytes of second-order state this rank holds (0 for a rank that owns no layer)."""
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
        """This rank's preconditioner state: step count and its owned blocks' tensors."""
        return {"steps": self.steps, "world_size": self.world_size, "rank": self.rank,
                "blocks": {n: {k: v.clone() for k, v in self.blocks[n].state_tensors().items()}
                           for n in self.owned},
                "numerics": {n: dict(c) for n, c in self.layer_numerics.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned on this same rank."""
        self.steps = int(state["steps"])
        for name, tensors in state["blocks"].items():
            if name not in self.owned:
                raise ValueError(f"checkpoint holds layer {name!r} that rank {self.rank} does not own")
            self.blocks[name].load_state(tensors)
        self.layer_numerics = defaultdict(Counter)
        for name, counts in state.get("numerics", {}).items():
            self.layer_numerics[name].update({k: int(v) for k, v in counts.items()
                                              if k in NUMERICS_COUNTERS})
