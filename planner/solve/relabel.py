"""Which rank label each owner group gets, among interchangeable workers.

The owners' broadcasts of preconditioned gradients go in ascending owner rank, and rank r posts
those of lower owners before its own preconditioning, so an owner that finishes early on a low
rank broadcasts while the others still compute; on a high rank it waits for them. The solvers
and the split pass do not look at labels. This pass relabels workers of identical speed and
memory cap (swapping them changes nothing else the step model sees): within each such class
the workers sorted by predicted precondition end take the class's ranks in ascending order,
repeated while it helps, and the relabelling is kept only when the predicted step drops, so
the result never predicts worse than its input. Split rows move with their rank label.
Pure functions over plain data and a callback; seconds throughout.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

Rows = tuple[int, ...]
Split = Mapping[int, Rows]

ROUNDS = 3        # relabel, re-predict, relabel again at most this often
MIN_GAIN = 1e-9   # a relabelling must shorten the predicted step by more than this fraction


def interchangeable(speeds: Sequence[float], caps: Sequence[int] | None
                    ) -> tuple[tuple[int, ...], ...]:
    """Classes (ascending ranks, at least two each) of workers with the same speed and the
    same state cap (caps None: no caps)."""
    classes: dict[tuple, list[int]] = {}
    for rank, speed in enumerate(speeds):
        classes.setdefault((speed, None if caps is None else caps[rank]), []).append(rank)
    return tuple(tuple(ranks) for ranks in classes.values() if len(ranks) > 1)


def relabelling(key: Sequence[float], classes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """perm[old rank] = new rank: within each class the ranks sorted by (key, rank) take the
    class's ranks in ascending order; other ranks keep theirs."""
    perm = list(range(len(key)))
    for ranks in classes:
        for new, old in zip(sorted(ranks), sorted(ranks, key=lambda r: (key[r], r))):
            perm[old] = new
    return tuple(perm)


def relabelled(perm: Sequence[int], owners: Sequence[int], split: Split
               ) -> tuple[tuple[int, ...], dict[int, Rows]]:
    """Owners and split (layer -> rows per rank) with rank r renamed perm[r]."""
    moved = {}
    for layer, rows in split.items():
        new = [0] * len(rows)
        for old, r in enumerate(rows):
            new[perm[old]] = r
        moved[layer] = tuple(new)
    return tuple(perm[o] for o in owners), moved


def search_relabel(owners: Sequence[int], split: Split, *, speeds: Sequence[float],
                   caps: Sequence[int] | None,
                   evaluate: Callable[[Sequence[int], Split], tuple[float, Sequence[float]]],
                   rounds: int = ROUNDS) -> tuple[tuple[int, ...], dict[int, Rows], bool]:
    """The owners and split relabelled (or as given) and whether they were. evaluate(owners,
    split) -> (predicted mean step, seconds; each worker's predicted precondition end)."""
    owners, split = tuple(owners), dict(split)
    classes = interchangeable(speeds, caps)
    if not classes:
        return owners, split, False
    best_s, key = evaluate(owners, split)
    changed = False
    for _ in range(rounds):
        perm = relabelling(key, classes)
        if perm == tuple(range(len(perm))):
            break
        trial_owners, trial_split = relabelled(perm, owners, split)
        step_s, trial_key = evaluate(trial_owners, trial_split)
        if not step_s < best_s * (1 - MIN_GAIN):
            break
        owners, split, best_s, key, changed = trial_owners, trial_split, step_s, trial_key, True
    return owners, split, changed
