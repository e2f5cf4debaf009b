"""Staggered decompositions: with inv_update_freq K > 1, give each layer's decomposition one of
the K steps of the cycle (its slot) so that no single step carries all of them.

Each step ends with a collective (broadcasts, then the next all-reduce), so a cycle costs the sum
over its steps of the busiest worker's compute. By default the executor decomposes every layer
on the same step (step % K == 0): that step pays each worker's whole decomposition work at once. The
amortised makespan max_w(sum_l work_l / speed_w), which the solvers minimise, is reached only if
each worker spreads its decompositions evenly over the K steps; this module spreads them, per
worker, by longest processing time first onto the K slots on top of that slot's fixed work
(preconditioning every step, factor construction on steps where step % factor_update_freq == 0).
Seconds throughout.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dpkfac.core.profile import Profile
from planner.model.costs import PlanConfig, Split, per_owner, precondition_per_worker_s


def slot_base_s(profile: Profile, *, owners: Sequence[int], workers: int,
                config: PlanConfig, split: Split | None = None) -> np.ndarray:
    """[worker, slot] seconds at speed 1 of the work that does not move: preconditioning in
    every slot (split layers' by their rows: precondition_per_worker_s), factor construction in
    slots k with k % factor_update_freq == 0, and the split layers' decompositions in slot 0
    (split layers are never staggered)."""
    K = config.inv_update_freq
    factor_slots = np.array([k % config.factor_update_freq == 0 for k in range(K)], dtype=float)
    precondition = precondition_per_worker_s(profile, owners=owners, workers=workers,
                                             split=split)
    factors = per_owner([l.factor_s for l in profile.layers], owners, workers)
    base = precondition[:, None] + factors[:, None] * factor_slots[None, :]
    index = sorted(split or {})
    base[:, 0] += per_owner([profile.layers[i].decompose_s for i in index],
                            [owners[i] for i in index], workers)
    return base


def stagger_decompositions(profile: Profile, *, owners: Sequence[int], workers: int,
                           config: PlanConfig, split: Split | None = None) -> tuple[int, ...]:
    """The slot (0..K-1) of every layer's decomposition: per worker, largest decomposition first
    to the slot with the least work so far (ties: the earliest slot); split layers (`split`:
    layer index -> rows per rank) keep slot 0. All 0 when K == 1."""
    K = config.inv_update_freq
    slots = [0] * len(profile.layers)
    if K == 1:
        return tuple(slots)
    split = split or {}
    load = slot_base_s(profile, owners=owners, workers=workers, config=config, split=split)
    order = sorted((i for i in range(len(profile.layers)) if i not in split),
                   key=lambda i: (-profile.layers[i].decompose_s, i))
    for i in order:
        w = owners[i]
        k = int(np.argmin(load[w]))
        slots[i] = k
        load[w, k] += profile.layers[i].decompose_s
    return tuple(slots)


def per_slot_makespan_s(profile: Profile, *, owners: Sequence[int], workers: int,
                        config: PlanConfig, slots: Sequence[int] | None,
                        speeds: Sequence[float] | None = None,
                        split: Split | None = None) -> tuple[float, ...]:
    """The busiest worker's K-FAC compute in each of the K slots of the cycle, seconds.
    slots None: the executor's rule (every decomposition in slot 0); split layers always in
    slot 0."""
    split = split or {}
    load = slot_base_s(profile, owners=owners, workers=workers, config=config, split=split)
    for i, (layer, owner) in enumerate(zip(profile.layers, owners)):
        if i not in split:
            load[owner, 0 if slots is None else slots[i]] += layer.decompose_s
    speed = np.ones(workers) if speeds is None else np.asarray(speeds, dtype=float)
    return tuple(float(v) for v in (load / speed[:, None]).max(axis=0))
