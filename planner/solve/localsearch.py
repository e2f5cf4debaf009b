"""Local search over assignments: moves (one layer to another worker) and swaps (two layers
between two workers), for instances too large for the exact ILP within its time limit.

`refine_makespan` lowers the busiest worker's time; `balance_memory` then lowers the largest
per-worker memory without letting any worker's time exceed a given makespan. Both accept only
strict improvements of (max value, number of workers at the max), so they stop; both keep every
worker within its memory cap. Times in seconds, memory in bytes.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from planner.solve.instance import Instance, as_arrays

_EPS = 1e-12


def refine_makespan(inst: Instance, owners: Sequence[int], *, time_limit_s: float = 1.0,
                    max_steps: int = 100_000) -> tuple[int, ...]:
    """Moves and swaps that make the busiest worker less busy, until none helps (or time)."""
    return _descend(inst, owners, objective="time", time_cap_s=np.inf,
                    time_limit_s=time_limit_s, max_steps=max_steps)


def balance_memory(inst: Instance, owners: Sequence[int], *, makespan_s: float,
                   time_limit_s: float = 0.5, max_steps: int = 100_000) -> tuple[int, ...]:
    """Moves and swaps that lower the largest per-worker memory while every worker's time stays
    at most `makespan_s` (so the makespan never grows)."""
    return _descend(inst, owners, objective="memory", time_cap_s=makespan_s * (1 + 1e-12),
                    time_limit_s=time_limit_s, max_steps=max_steps)


def _descend(inst: Instance, owners: Sequence[int], *, objective: str, time_cap_s: float,
             time_limit_s: float, max_steps: int) -> tuple[int, ...]:
    work, speeds, memory, caps = as_arrays(inst)
    own = np.asarray(owners, dtype=np.int64)
    if len(own) == 0 or inst.workers == 1:
        return tuple(int(o) for o in own)
    load = np.bincount(own, weights=work, minlength=inst.workers)
    held = np.bincount(own, weights=memory, minlength=inst.workers)
    deadline = time.perf_counter() + time_limit_s
    for _ in range(max_steps):
        if time.perf_counter() > deadline:
            break
        value = load / speeds if objective == "time" else held
        b = int(np.argmax(value))
        current = value[b]
        if current <= 0:
            break
        best = _best_change(b=b, own=own, work=work, speeds=speeds, memory=memory, caps=caps,
                            load=load, held=held, objective=objective, time_cap_s=time_cap_s)
        if best is None or best[0] >= current * (1 - _EPS):
            break
        _, a, w, c = best
        own[a] = w
        load[b] -= work[a]; load[w] += work[a]
        held[b] -= memory[a]; held[w] += memory[a]
        if c >= 0:
            own[c] = b
            load[w] -= work[c]; load[b] += work[c]
            held[w] -= memory[c]; held[b] += memory[c]
    return tuple(int(o) for o in own)


def _best_change(*, b, own, work, speeds, memory, caps, load, held, objective, time_cap_s):
    """The move or swap out of worker b with the least resulting max(b's value, partner's value).

    Returns (value, layer a leaving b, partner worker w, layer c coming back from w or -1)."""
    mine = np.flatnonzero(own == b)
    if len(mine) == 0:
        return None
    others = np.arange(len(speeds)) != b
    best = None
    # moves: layer a (row) to worker w (column)
    new_load_b = load[b] - work[mine]                                  # [a]
    new_held_b = held[b] - memory[mine]
    new_load_w = load[None, :] + work[mine][:, None]                   # [a, w]
    new_held_w = held[None, :] + memory[mine][:, None]
    ok = (new_held_w <= caps[None, :]) & others[None, :]
    ok &= new_load_w / speeds[None, :] <= time_cap_s
    ok &= (new_load_b / speeds[b] <= time_cap_s)[:, None]
    if objective == "time":
        score = np.maximum(new_load_b[:, None] / speeds[b], new_load_w / speeds[None, :])
    else:
        score = np.maximum(new_held_b[:, None], new_held_w)
    score = np.where(ok, score, np.inf)
    i, w = np.unravel_index(int(np.argmin(score)), score.shape)
    if np.isfinite(score[i, w]):
        best = (float(score[i, w]), int(mine[i]), int(w), -1)
    # swaps: layer a (row) on b with layer c (column) elsewhere
    theirs = np.flatnonzero(own != b)
    if len(theirs) == 0:
        return best
    partner = own[theirs]
    d_work = work[mine][:, None] - work[theirs][None, :]               # what b sheds, [a, c]
    d_mem = memory[mine][:, None] - memory[theirs][None, :]
    nb_load = load[b] - d_work
    nw_load = load[partner][None, :] + d_work
    nb_held = held[b] - d_mem
    nw_held = held[partner][None, :] + d_mem
    ok = (nb_held <= caps[b]) & (nw_held <= caps[partner][None, :])
    ok &= (nb_load / speeds[b] <= time_cap_s) & (nw_load / speeds[partner][None, :] <= time_cap_s)
    if objective == "time":
        score = np.maximum(nb_load / speeds[b], nw_load / speeds[partner][None, :])
    else:
        score = np.maximum(nb_held, nw_held)
    score = np.where(ok, score, np.inf)
    i, j = np.unravel_index(int(np.argmin(score)), score.shape)
    if np.isfinite(score[i, j]) and (best is None or score[i, j] < best[0]):
        best = (float(score[i, j]), int(mine[i]), int(partner[j]), int(theirs[j]))
    return best
