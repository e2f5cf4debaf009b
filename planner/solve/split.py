"""Split preconditioning: which layers' preconditioning every worker should share, and in what
rows.

Under DP-KFAC a layer's owner builds and decomposes its factors; its preconditioning (rows of
the dim_g directions of the G side) can be spread over all workers, at the price of a
decomposition broadcast at every decomposition update and one all-reduce of the split layers'
gradients every step instead of the owner's broadcast. With one dominant layer this evens out
a makespan that no whole-layer placement can. The search is greedy over the largest
preconditioning costs: each candidate's precondition seconds are water-filled over the workers
against their current compute (speeds respected), rounded to whole rows (largest remainder, in
multiples of 8 where the layer allows), then moved a granule at a time between the most and
the least loaded workers while the predicted step drops (the water-fill evens the mean compute,
the step model sees each step's: an owner that also decomposes idles others on its
decomposition steps only), and the split is kept only when the predicted step drops by more
than `min_gain`.
Pure functions over plain data and callbacks; seconds throughout, rows as integers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

MAX_CANDIDATES = 8   # layers tried, largest precondition_s first
MIN_GAIN = 0.005     # a split must shorten the predicted step by more than 0.5%
ROW_GRANULE = 8      # rows per granule of a split (row_granule)
MAX_MOVES = 32       # granules refine_rows moves, at most, in each direction

Rows = tuple[int, ...]


@dataclass(frozen=True)
class SplitTrial:
    """One layer tried: its index, the rows per rank tried, the predicted mean step with it
    (seconds; None when the split would break a memory cap) and whether the split was kept."""
    layer: int
    rows: Rows
    step_time_s: float | None
    kept: bool


def water_fill(amount_s: float, *, base_s: Sequence[float],
               speeds: Sequence[float]) -> np.ndarray:
    """Fractions (summing to 1) of `amount_s` seconds of work at speed 1 that bring the least
    loaded workers (base_s: seconds each already computes) up to one common level L:
    worker w takes max(0, L - base_s[w]) * speeds[w] of it."""
    base = np.asarray(base_s, dtype=float)
    speed = np.asarray(speeds, dtype=float)
    if amount_s <= 0:
        return speed / speed.sum()
    order = np.argsort(base, kind="stable")
    b, s = base[order], speed[order]
    levels = (amount_s + np.cumsum(b * s)) / np.cumsum(s)  # level when the first k+1 fill
    above = np.append(b[1:], np.inf)
    k = int(np.argmax(levels <= above))                   # the first level that fits
    fractions = np.zeros_like(base)
    fractions[order] = np.maximum(levels[k] - b, 0.0) * s
    return fractions / fractions.sum()


def largest_remainder(fractions: Sequence[float], total: int, granule: int = 1) -> Rows:
    """Whole rows per worker adding up to `total`, in multiples of `granule` (but for the
    total % granule rows left over, which go to the largest fraction), each within one
    granule of fractions[w] * total: floors first, the granules left to the largest
    remainders (ties: the lower rank)."""
    units, odd = divmod(total, granule)
    exact = np.asarray(fractions, dtype=float) * units
    rows = np.floor(exact).astype(int)
    left = units - int(rows.sum())
    order = np.argsort(-(exact - rows), kind="stable")
    rows[order[:left]] += 1
    rows *= granule
    rows[int(np.argmax(fractions))] += odd
    return tuple(int(r) for r in rows)


def row_granule(dim_g: int, workers: int) -> int:
    """Rows of a split come in multiples of ROW_GRANULE when every worker can take one: the
    shares' matrix products then keep rows of whole 32-byte vectors (an unaligned share ran
    1.2x slower than its part of the whole on this project's CPU hosts); else single rows."""
    return ROW_GRANULE if dim_g >= ROW_GRANULE * workers else 1


def split_candidates(precondition_s: Sequence[float], dims_g: Sequence[int], *, workers: int,
                     limit: int = MAX_CANDIDATES) -> tuple[int, ...]:
    """Indices of the layers worth trying, largest precondition_s first (ties: lower index): at
    most `limit`, each with dim_g >= workers and some preconditioning; none on one worker."""
    if workers < 2:
        return ()
    order = sorted(range(len(precondition_s)), key=lambda i: (-precondition_s[i], i))
    return tuple(i for i in order if dims_g[i] >= workers and precondition_s[i] > 0)[:limit]


def search_split(*, candidates: Sequence[int], precondition_s: Sequence[float],
                 dims_g: Sequence[int], owners: Sequence[int], speeds: Sequence[float],
                 compute_of: Callable[[Mapping[int, Rows]], Sequence[float]],
                 step_time_of: Callable[[Mapping[int, Rows]], float],
                 fits: Callable[[Mapping[int, Rows]], bool] = lambda split: True,
                 min_gain: float = MIN_GAIN) -> tuple[dict[int, Rows], tuple[SplitTrial, ...]]:
    """Greedy split: for each candidate in order, water-fill its precondition_s over the workers
    against compute_of(split so far) (seconds per worker, speeds applied) less its own share on
    its owner, round to rows, refine them (refine_rows), and keep it when step_time_of(split with it) is below the best
    step so far by more than `min_gain` (a fraction) and `fits(split with it)` (memory caps).
    A candidate whose rows all fall on its owner, after the water-fill or after refining, is
    not kept: it would move no work, only trade its owner's broadcast for a larger all-reduce
    and add a decomposition broadcast (the other workers may take all of its rows). Returns
    the split (layer -> rows per rank) and every trial."""
    speed = np.asarray(speeds, dtype=float)
    split: dict[int, Rows] = {}
    best_s = step_time_of(split)
    trials = []
    for i in candidates:
        base = np.array(compute_of(split), dtype=float)
        base[owners[i]] -= precondition_s[i] / speed[owners[i]]
        rows = largest_remainder(water_fill(precondition_s[i], base_s=np.maximum(base, 0.0),
                                            speeds=speed), dims_g[i],
                                 row_granule(dims_g[i], len(speeds)))
        if rows[owners[i]] == dims_g[i]:  # all on its owner: nothing moves
            continue
        trial, step_s = {**split, i: rows}, None
        if fits(trial):
            trial, step_s = refine_rows(trial, i, granule=row_granule(dims_g[i], len(speeds)),
                                        load_s=compute_of(trial), step_time_of=step_time_of,
                                        fits=fits)
        rows = trial[i]
        moved = rows[owners[i]] < dims_g[i]  # refined back onto its owner: nothing moves
        kept = moved and step_s is not None and step_s < best_s * (1 - min_gain)
        trials.append(SplitTrial(layer=i, rows=rows, step_time_s=step_s, kept=kept))
        if kept:
            split[i], best_s = rows, step_s
    return split, tuple(trials)


def refine_rows(split: Mapping[int, Rows], layer: int, *, granule: int, load_s: Sequence[float],
                step_time_of: Callable[[Mapping[int, Rows]], float],
                fits: Callable[[Mapping[int, Rows]], bool] = lambda split: True,
                max_moves: int = MAX_MOVES) -> tuple[dict[int, Rows], float]:
    """`split` with `layer`'s rows moved `granule` at a time from the most loaded worker
    (load_s: seconds each computes) to the least loaded one, or else the other way, while
    step_time_of drops and the split fits, at most `max_moves` moves; the split and its
    predicted step (seconds)."""
    best, best_s = dict(split), step_time_of(split)
    heavy, light = int(np.argmax(load_s)), int(np.argmin(load_s))
    for src, dst in ((heavy, light), (light, heavy))[:2 if heavy != light else 0]:
        for _ in range(max_moves):
            rows = list(best[layer])
            if rows[src] < granule:
                break
            rows[src] -= granule
            rows[dst] += granule
            trial = {**best, layer: tuple(rows)}
            if not fits(trial):
                break
            step_s = step_time_of(trial)
            if step_s >= best_s:
                break
            best, best_s = trial, step_s
        if best[layer] != split[layer]:
            break
    return best, best_s
