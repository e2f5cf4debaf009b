"""Who does what for each K-FAC layer, seen from one rank: the work assignment a strategy and a
placement give (each layer's owner, the layers this rank captures and builds factors for,
decomposes, preconditions, and the step slot of each layer's decomposition)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

from dpkfac.core.strategy import DP_KFAC, FactorMode, SharedResult, Strategy


@dataclass(frozen=True)
class WorkAssignment:
    """This rank's share of the K-FAC work.

    owner: layer -> owner rank, in the model's layer order; the owner decomposes the layer.
    decomposition_slot: layer -> k in 0..inv_update_freq-1; the layer is decomposed on steps
        where step % inv_update_freq == k (every layer on step 0, to start).
    """
    rank: int
    strategy: Strategy
    owner: dict[str, int]
    decomposition_slot: dict[str, int]

    @classmethod
    def from_placement(cls, placement: dict, layer_names: Sequence[str], *, rank: int,
                       strategy: Strategy, stagger: bool) -> WorkAssignment:
        """Owners from the placement's assignment. With `stagger`, decomposition slots from its
        `decomposition_step` schedule: that lowers the peak step, not the mean (synchronous
        steps already overlap every worker's decompositions), so it is opt-in; strategies that
        broadcast decompositions keep every layer on slot 0 (one fused exchange per cycle)."""
        staggered = stagger and strategy.shared is not SharedResult.DECOMPOSITION
        schedule = placement.get("decomposition_step", {}) if staggered else {}
        return cls(rank=rank, strategy=strategy,
                   owner={name: int(placement["assignment"][name]) for name in layer_names},
                   decomposition_slot={name: int(schedule.get(name, 0)) for name in layer_names})

    @classmethod
    def single_rank(cls, layer_names: Sequence[str], strategy: Strategy = DP_KFAC
                    ) -> WorkAssignment:
        """Every layer owned by rank 0 of a one-rank world."""
        return cls(rank=0, strategy=strategy, owner=dict.fromkeys(layer_names, 0),
                   decomposition_slot=dict.fromkeys(layer_names, 0))

    @property
    def layers(self) -> list[str]:
        """Every K-FAC layer, in model order."""
        return list(self.owner)

    @cached_property
    def layers_of_rank(self) -> dict[int, list[str]]:
        """Owner rank -> its layers in model order, ranks ascending (owners of no layer absent)."""
        by_rank: dict[int, list[str]] = {}
        for name, rank in self.owner.items():
            by_rank.setdefault(rank, []).append(name)
        return dict(sorted(by_rank.items()))

    @property
    def owned(self) -> list[str]:
        """The layers this rank owns."""
        return list(self.layers_of_rank.get(self.rank, []))

    @property
    def factor_layers(self) -> list[str]:
        """Layers this rank captures and builds factors for: its own (LOCAL) or all (ALLREDUCED)."""
        if self.strategy.factors is FactorMode.ALLREDUCED:
            return self.layers
        return self.owned

    @property
    def preconditioned_layers(self) -> list[str]:
        """Layers this rank preconditions: its own, or all when decompositions are shared."""
        if self.strategy.shared is SharedResult.DECOMPOSITION:
            return self.layers
        return self.owned

    def decompositions_due(self, step: int, inv_update_freq: int) -> list[str]:
        """Owned layers whose decomposition falls on `step` (all of them on step 0)."""
        slot = step % inv_update_freq
        return [name for name in self.owned
                if step == 0 or self.decomposition_slot[name] % inv_update_freq == slot]
