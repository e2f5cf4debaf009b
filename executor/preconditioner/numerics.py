"""The numerical-safety counters (dpkfac.core.step.NUMERICS_COUNTERS) of one rank.

Only a layer's owner counts its events: with all-reduced factors every rank sees the same
factor events, and when decompositions are shared the same preconditioning events, so counting
them once keeps totals independent of the world size. Each owner's cumulative totals ride at the
end of its fused broadcast (see exchange), so every rank learns the other owners' totals."""
from __future__ import annotations

from collections import Counter, defaultdict

from dpkfac.core.step import NUMERICS_COUNTERS


class NumericsLedger:
    """Events per owned layer, and other owners' totals as their last broadcast carried them."""

    def __init__(self, owner: dict[str, int], rank: int) -> None:
        self._owner = owner
        self._rank = rank
        self.per_layer: dict[str, Counter] = defaultdict(Counter)
        self._peers: dict[int, list[int]] = {}

    def count(self, name: str, counter: str, n: int) -> None:
        """Record `n` events of `counter` on layer `name`, when this rank owns it."""
        if n and self._owner[name] == self._rank:
            self.per_layer[name][counter] += n

    def own(self) -> list[int]:
        """This rank's cumulative counts, in NUMERICS_COUNTERS order."""
        return [sum(c[k] for c in self.per_layer.values()) for k in NUMERICS_COUNTERS]

    def record_peer(self, rank: int, counts: list[int]) -> None:
        """Owner `rank`'s cumulative counts, in NUMERICS_COUNTERS order."""
        self._peers[rank] = counts

    def totals(self) -> dict[str, int]:
        """Cumulative counts summed over this rank and every owner heard from."""
        totals = self.own()
        for peer in self._peers.values():
            totals = [t + p for t, p in zip(totals, peer)]
        return dict(zip(NUMERICS_COUNTERS, totals))

    def state(self) -> dict[str, dict[str, int]]:
        """Per-layer counts, as plain dicts (for a checkpoint)."""
        return {n: dict(c) for n, c in self.per_layer.items()}

    def load(self, state: dict[str, dict[str, int]]) -> None:
        """Restore what state() returned (unknown counters are ignored)."""
        self.per_layer = defaultdict(Counter)
        for name, counts in state.items():
            self.per_layer[name].update({k: int(v) for k, v in counts.items()
                                         if k in NUMERICS_COUNTERS})
