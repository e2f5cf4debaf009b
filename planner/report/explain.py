"""`dpkfac plan --explain`: why the bottleneck worker is the bottleneck, in plain sentences.

Pure function of a Plan; times in seconds, memory in bytes, formatted for people.
"""
from __future__ import annotations

import numpy as np

from planner.model.costs import layer_work_s, split_compute_lower_bound_s
from planner.plan import Plan
from planner.report.tables import format_bytes, format_seconds
from planner.solve.bounds import pigeonhole_lower_bound_s


def explain_lines(plan: Plan, *, top: int = 8) -> list[str]:
    """Sentences: the bottleneck worker, its heaviest layers with their parts, the lower bound
    that binds, and whether memory caps, speeds or communication explain the rest."""
    profile, config, sol = plan.profile, plan.config, plan.solution
    speeds = plan.cluster.speeds
    works = [layer_work_s(l, config=config) for l in profile.layers]
    loads = np.array(plan.prediction.compute_s)
    b = int(np.argmax(loads))
    span = float(loads[b])
    mine = sorted((i for i, o in enumerate(sol.owners) if o == b), key=lambda i: -works[i])
    works_b = _works_on(plan, works, b)
    lines = [f"Bottleneck: rank {b} computes {format_seconds(span)} per step (amortised) over "
             f"{len(mine)} layer(s) at speed {speeds[b]:g}; the next busiest rank computes "
             f"{format_seconds(float(np.sort(loads)[-2]) if len(loads) > 1 else 0.0)}."]
    for i in mine[:top]:
        layer = profile.layers[i]
        precondition = works_b[i] - works[i] + layer.precondition_s
        parts = (f"factors {format_seconds(layer.factor_s / config.factor_update_freq)}, "
                 f"decompose {format_seconds(layer.decompose_s / config.inv_update_freq)}, "
                 f"precondition {format_seconds(precondition)}"
                 + (" of its split rows" if i in plan.split else ""))
        share = works_b[i] / speeds[b] / span if span > 0 else 0.0
        lines.append(f"  {layer.name} (A {layer.dim_a} x G {layer.dim_g}): "
                     f"{format_seconds(works_b[i] / speeds[b])} = {share:.0%} of rank {b} "
                     f"({parts})")
    if len(mine) > top:
        lines.append(f"  ... and {len(mine) - top} smaller layer(s)")
    lines.extend(_bound_lines(plan, works=works, span=span, b=b, mine=mine))
    lines.extend(_cap_lines(plan, works=works, loads=loads, b=b, mine=mine))
    lines.extend(_step_lines(plan))
    return lines


def _works_on(plan: Plan, works, rank: int) -> list[float]:
    """Each layer's work on `rank` if it owns it (seconds at speed 1): a split layer's
    preconditioning counts only the rank's rows of it."""
    out = list(works)
    for i, rows in plan.split.items():
        layer = plan.profile.layers[i]
        out[i] += layer.precondition_s * (rows[rank] / layer.dim_g - 1)
    return out


def _bound_lines(plan: Plan, *, works, span, b, mine) -> list[str]:
    """The lower bound that binds and why the plan sits where it does."""
    speeds = plan.cluster.speeds
    out = (_split_bound_lines(plan, works=works, span=span) if plan.split
           else _whole_bound_lines(plan, works=works, span=span, b=b, mine=mine))
    if len(set(speeds)) > 1:
        out.append(f"Speeds differ (slowest {min(speeds):g}, fastest {max(speeds):g}); rank {b} "
                   f"runs at {speeds[b]:g}.")
    return out


def _owner_search_line(plan: Plan) -> str | None:
    """Why fewer owners than workers, when the owner search chose so."""
    chosen, all_owners = len(set(plan.solution.owners)), _full_owner_trial(plan)
    if all_owners is None or chosen >= all_owners.owners:
        return None
    return (f"Why: the owner search placed the layers on {chosen} of "
            f"{all_owners.owners} owners on purpose: a longer compute makespan, but one "
            f"broadcast per owner fewer, so a shorter predicted step "
            f"({format_seconds(plan.cycle.mean_step_time_s)} vs "
            f"{format_seconds(all_owners.step_time_s)}); --owners all keeps every owner.")


def _split_bound_lines(plan: Plan, *, works, span) -> list[str]:
    """The bound that holds when preconditioning may be split (the solvers' is whole-layer)."""
    speeds = plan.cluster.speeds
    bound = split_compute_lower_bound_s(plan.profile, workers=plan.cluster.workers,
                                        config=plan.config, speeds=speeds)
    gap = span / bound - 1 if bound > 0 else 0.0
    out = [f"Lower bound with split preconditioning {format_seconds(bound)} (gap {gap:.2%}): "
           f"a layer's factors and decompositions run whole on its owner, its preconditioning "
           f"may be spread; total work / total speed {format_seconds(sum(works) / sum(speeds))}."]
    line = _owner_search_line(plan)
    return out + ([line] if line else [])


def _whole_bound_lines(plan: Plan, *, works, span, b, mine) -> list[str]:
    speeds, workers = plan.cluster.speeds, plan.cluster.workers
    largest = max(works) / max(speeds) if works else 0.0
    share = sum(works) / sum(speeds)
    pigeon = pigeonhole_lower_bound_s(work=works, workers=workers, speeds=speeds)
    bound = plan.solution.lower_bound_s
    gap = span / bound - 1 if bound > 0 else 0.0
    out = [f"Lower bound {format_seconds(bound)} (gap {gap:.2%}, status {plan.solution.status}): "
           f"largest layer {format_seconds(largest)}, total work / total speed "
           f"{format_seconds(share)}, pigeonhole {format_seconds(pigeon)}."]
    owner_line = _owner_search_line(plan)
    if owner_line:
        out.append(owner_line)
    elif span <= largest * (1 + 1e-6) and len(mine) == 1:
        out.append("Why: rank {} holds only the largest layer, which must run whole on some "
                   "worker; no placement can beat it. Split work differently (a smaller "
                   "inv_update_freq period for it is the only lever) or accept it.".format(b))
    elif span <= share * (1 + 0.02):
        out.append("Why: the work is spread evenly (within 2% of total work / total speed); only "
                   "more or faster workers lower it.")
    elif span <= pigeon * (1 + 1e-6):
        out.append("Why: there are more large layers than workers, so some worker must take "
                   "several of them (pigeonhole); the plan meets that bound.")
    elif plan.solution.status == "optimal":
        out.append("Why: the solver proved no other assignment does better (the simple bounds "
                   "are not tight for these layer sizes).")
    else:
        out.append(f"Why not lower: the solver did not prove optimality within its time limit "
                   f"({plan.solution.ilp}); a longer --time-limit may close the gap.")
    return out


def _cap_lines(plan: Plan, *, works, loads, b, mine) -> list[str]:
    """Whether memory caps stop the obvious move of b's smallest layer to the least busy rank."""
    if plan.caps is None or not mine:
        return []
    held = np.array(plan.prediction.state_bytes)
    state = [l.state_bytes for l in plan.profile.layers]
    out = []
    for i in reversed(mine):  # smallest first
        fits = [w for w in range(len(loads)) if w != b and held[w] + state[i] <= plan.caps[w]]
        if not fits:
            out.append(f"Memory: moving {plan.profile.layers[i].name} "
                       f"({format_bytes(state[i])} of state) off rank {b} would break every "
                       f"other worker's cap; the caps bind.")
            break
    tight = [w for w in range(len(held)) if held[w] >= 0.95 * plan.caps[w]]
    if tight:
        out.append(f"Memory: {len(tight)} worker(s) within 5% of their cap.")
    return out


def _step_lines(plan: Plan) -> list[str]:
    cycle = plan.cycle
    worst = cycle.steps[cycle.worst_step]
    bcast = worst.broadcast_s
    path = " -> ".join(f"{s.kind}" + (f"[{s.worker}]" if s.worker is not None else "")
                       + (f" x{s.count}" if s.count > 1 else "") for s in worst.critical_path)
    out = [f"Step: simulated {format_seconds(cycle.mean_step_time_s)} mean over a cycle of "
           f"{len(cycle.steps)} step(s); broadcasts {format_seconds(bcast)} and the gradient "
           f"all-reduce {format_seconds(worst.allreduce_s)} per step.",
           f"Critical path of the slowest step: {path}."]
    if plan.split:
        names = ", ".join(plan.profile.layers[i].name for i in sorted(plan.split))
        out.append(f"Split: every worker preconditions its rows of {names}; the owners still "
                   f"build and decompose their factors and broadcast the decompositions every "
                   f"{plan.config.inv_update_freq} step(s), and one all-reduce per step adds "
                   f"the shares (--no-split keeps every layer whole).")
    if plan.relabel is not None and plan.relabel.applied:
        out.append(f"Ranks: workers of equal speed and cap were renamed so the owners that "
                   f"finish preconditioning first broadcast first (broadcasts go in ascending "
                   f"owner rank): predicted step {format_seconds(plan.relabel.step_time_s_before)}"
                   f" -> {format_seconds(plan.relabel.step_time_s_after)}.")
    if plan.staggered is not None:
        st = plan.staggered
        out.append(f"Decompositions: by default the executor runs them all in step 0 of each cycle "
                   f"(busiest worker {format_seconds(max(st.executor_per_step_makespan_s))}); "
                   f"the staggered schedule in the placement ('decomposition_step', followed "
                   f"with `dpkfac train --stagger-decompositions`) caps it at "
                   f"{format_seconds(max(st.per_step_makespan_s))} for a mean step of "
                   f"{format_seconds(st.cycle.mean_step_time_s)}.")
    return out


def _full_owner_trial(plan: Plan):
    """The owner search's trial of the solvers' own placement (None without a search)."""
    return plan.owner_trials[0] if plan.owner_trials else None
