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
from planner.model.costs import PlanConfig


def slot_base_s(profile: Profile, *, owners: Sequence[int], workers: int,
                config: PlanConfig) -> np.ndarray:
    """[worker, slot] seconds at speed 1 of the work that does not move: preconditioning in
    every slot, factor construction in slots k with k % factor_update_freq == 0."""
    K = config.inv_update_freq
    base = np.zeros((workers, K))
    factor_slots = np.array([k % config.factor_update_freq == 0 for k in range(K)], dtype=float)
    for layer, owner in zip(profile.layers, owners):
        base[owner] += layer.precondition_s + layer.factor_s * factor_slots
    return base


def stagger_decompositions(profile: Profile, *, owners: Sequence[int], workers: int,
                           config: PlanConfig) -> tuple[int, ...]:
    """The slot (0..K-1) of every layer's decomposition: per worker, largest decomposition first
    to the slot with the least work so far (ties: the earliest slot). All 0 when K == 1."""
    K = config.inv_update_freq
    slots = [0] * len(profile.layers)
    if K == 1:
        return tuple(slots)
    load = slot_base_s(profile, owners=owners, workers=workers, config=config)
    order = sorted(range(len(profile.layers)),
                   key=lambda i: (-profile.layers[i].decompose_s, i))
    for i in order:
        w = owners[i]
        k = int(np.argmin(load[w]))
        slots[i] = k
        load[w, k] += profile.layers[i].decompose_s
    return tuple(slots)


def per_slot_makespan_s(profile: Profile, *, owners: Sequence[int], workers: int,
                        config: PlanConfig, slots: Sequence[int] | None,
                        speeds: Sequence[float] | None = None) -> tuple[float, ...]:
    """The busiest worker's K-FAC compute in each of the K slots of the cycle, seconds.
    slots None: the executor's rule (every decomposition in slot 0)."""
    load = slot_base_s(profile, owners=owners, workers=workers, config=config)
    for i, (layer, owner) in enumerate(zip(profile.layers, owners)):
        load[owner, 0 if slots is None else slots[i]] += layer.decompose_s
    speed = np.ones(workers) if speeds is None else np.asarray(speeds, dtype=float)
    return tuple(float(v) for v in (load / speed[:, None]).max(axis=0))
