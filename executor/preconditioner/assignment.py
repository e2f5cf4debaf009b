"""Who does what for each K-FAC layer, seen from one rank: the work assignment a strategy and a
placement give (each layer's owner, the layers this rank captures and builds factors for,
decomposes, preconditions, and the step slot of each layer's decomposition), and the layers
whose preconditioning every rank shares (the placement's precondition_split)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

from dpkfac.core.strategy import DP_KFAC, FactorMode, SharedResult, Strategy


@dataclass(frozen=True)
class WorkAssignment:
    """This rank's share of the K-FAC work.

    owner: layer -> owner rank, in the model's layer order; the owner decomposes the layer.
    decomposition_slot: layer -> k in 0..inv_update_freq-1; the layer is decomposed on steps
        where step % inv_update_freq == k (every layer on step 0, to start).
    split: layer -> rows of its G side each rank preconditions (index = rank), for the layers
        whose preconditioning every rank shares; their owners decompose on slot 0 and share
        the decomposition (DP-KFAC only: LOCAL factors, PRECONDITIONED_GRADIENT).
    """
    rank: int
    strategy: Strategy
    owner: dict[str, int]
    decomposition_slot: dict[str, int]
    split: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.split and not splits_allowed(self.strategy):
            raise ValueError(f"precondition_split needs LOCAL factors and shared preconditioned "
                             f"gradients (DP-KFAC), not {self.strategy}")

    @classmethod
    def from_placement(cls, placement: dict, layer_names: Sequence[str], *, rank: int,
                       strategy: Strategy, stagger: bool,
                       split: dict[str, tuple[int, ...]] | None = None) -> WorkAssignment:
        """Owners from the placement's assignment. With `stagger`, decomposition slots from its
        `decomposition_step` schedule: that lowers the peak step, not the mean (synchronous
        steps already overlap every worker's decompositions), so it is opt-in; strategies that
        broadcast decompositions, and split layers, keep slot 0 (one fused exchange per
        cycle). `split` (the placement's precondition_split, checked) applies to DP-KFAC only;
        other strategies ignore it."""
        staggered = stagger and strategy.shared is not SharedResult.DECOMPOSITION
        split = dict(split or {}) if splits_allowed(strategy) else {}
        schedule = placement.get("decomposition_step", {}) if staggered else {}
        return cls(rank=rank, strategy=strategy,
                   owner={name: int(placement["assignment"][name]) for name in layer_names},
                   decomposition_slot={name: 0 if name in split else int(schedule.get(name, 0))
                                       for name in layer_names},
                   split={name: split[name] for name in layer_names if name in split})

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
        return _by_rank(self.owner)

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
        """Layers this rank preconditions whole: its own that are not split, or all when
        decompositions are shared."""
        if self.strategy.shared is SharedResult.DECOMPOSITION:
            return self.layers
        return [name for name in self.owned if name not in self.split]

    @property
    def split_layers(self) -> list[str]:
        """Layers every rank preconditions a share of, in model order."""
        return list(self.split)

    def rows(self, name: str) -> tuple[int, int]:
        """This rank's rows start..stop-1 of split layer `name`'s G side."""
        rows = self.split[name]
        start = sum(rows[:self.rank])
        return start, start + rows[self.rank]

    @cached_property
    def split_layers_of_rank(self) -> dict[int, list[str]]:
        """Owner rank -> its split layers (whose decompositions it shares), ranks ascending."""
        return _by_rank({n: r for n, r in self.owner.items() if n in self.split})

    @cached_property
    def broadcast_layers_of_rank(self) -> dict[int, list[str]]:
        """Owner rank -> its layers that are not split (whose preconditioned gradients it
        broadcasts), ranks ascending."""
        return _by_rank({n: r for n, r in self.owner.items() if n not in self.split})

    def decompositions_due(self, step: int, inv_update_freq: int) -> list[str]:
        """Owned layers whose decomposition falls on `step` (all of them on step 0)."""
        slot = step % inv_update_freq
        return [name for name in self.owned
                if step == 0 or self.decomposition_slot[name] % inv_update_freq == slot]


def splits_allowed(strategy: Strategy) -> bool:
    """Whether `strategy` can split a layer's preconditioning across ranks: its owner builds the
    factors alone (LOCAL) and owners share preconditioned gradients (DP-KFAC)."""
    return (strategy.factors is FactorMode.LOCAL
            and strategy.shared is SharedResult.PRECONDITIONED_GRADIENT)


def _by_rank(owner: dict[str, int]) -> dict[int, list[str]]:
    """Owner rank -> its layers in the order of `owner`, ranks ascending."""
    by_rank: dict[int, list[str]] = {}
    for name, rank in owner.items():
        by_rank.setdefault(rank, []).append(name)
    return dict(sorted(by_rank.items()))
