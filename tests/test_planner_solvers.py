"""Placement solvers: validity, optimality against brute force, bounds, memory caps."""
from __future__ import annotations

import itertools
import random

import pulp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpkfac.core.errors import InputError
from planner.solve.instance import brute_force_makespan_s
from planner.solve.solvers import (HEURISTICS, METHODS, OPTIMALITY_GAP, makespan_lower_bound_s,
                             makespan_s, memory_loads, smallest_cap_bounds, solve)


def random_instance(seed: int, *, layers: int, workers: int, memory: bool = False):
    rng = random.Random(seed)
    work = [rng.uniform(0.01, 1.0) for _ in range(layers)]
    mem = [rng.randint(1, 100) for _ in range(layers)] if memory else None
    return work, mem



def brute_force(work, workers, **kwargs) -> float:
    return brute_force_makespan_s(work=work, workers=workers, **kwargs)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 2 * OPTIMALITY_GAP * max(abs(a), abs(b)) + 1e-12


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layers,workers", [(1, 1), (7, 3), (12, 4), (3, 8)])
def test_every_layer_assigned_once_to_a_valid_rank(method, layers, workers):
    work, _ = random_instance(layers * 10 + workers, layers=layers, workers=workers)
    sol = solve(method, work=work, workers=workers, time_limit_s=2)
    assert len(sol.owners) == layers
    assert all(0 <= o < workers for o in sol.owners)
    assert sol.status in {"optimal", "feasible", "heuristic"}
    assert sol.makespan_s == pytest.approx(makespan_s(work=work, owners=sol.owners,
                                                      workers=workers))
    assert sol.lower_bound_s <= sol.makespan_s * (1 + 1e-12)


def test_round_robin_is_the_seed_rule():
    sol = solve("round-robin", work=[1.0] * 7, workers=3)
    assert sol.owners == (0, 1, 2, 0, 1, 2, 0)
    assert sol.method == "round-robin"


def test_block_assigns_contiguous_blocks_optimally():
    rng = random.Random(5)
    for _ in range(20):
        n, p = rng.randint(1, 9), rng.randint(1, 4)
        work = [rng.uniform(0, 1) for _ in range(n)]
        sol = solve("block", work=work, workers=p)
        assert list(sol.owners) == sorted(sol.owners)  # blocks in layer order
        best = min(max(sum(work[a:b]) for a, b in zip((0,) + cuts, cuts + (n,)))
                   for cuts in itertools.combinations_with_replacement(range(n + 1), p - 1))
        assert sol.makespan_s == pytest.approx(best)


@pytest.mark.parametrize("seed", range(6))
def test_ilp_never_worse_than_the_heuristics(seed):
    work, _ = random_instance(seed, layers=14, workers=2 + seed % 3)
    workers = 2 + seed % 3
    ilp = solve("ilp", work=work, workers=workers, time_limit_s=2)
    for method in HEURISTICS:
        other = solve(method, work=work, workers=workers)
        assert ilp.makespan_s <= other.makespan_s * (1 + 1e-9)
    best = solve("best", work=work, workers=workers, time_limit_s=2)
    assert best.makespan_s <= ilp.makespan_s * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_ilp_equals_brute_force_on_tiny_instances(seed):
    rng = random.Random(100 + seed)
    layers, workers = rng.randint(6, 8), rng.randint(2, 3)
    work, _ = random_instance(seed, layers=layers, workers=workers)
    sol = solve("ilp", work=work, workers=workers, time_limit_s=5)
    assert sol.status == "optimal"
    assert close(sol.makespan_s, brute_force(work, workers))


@pytest.mark.parametrize("seed", range(4))
def test_ilp_with_unequal_speeds_equals_brute_force(seed):
    work, _ = random_instance(seed, layers=7, workers=3)
    speeds = [1.0, 0.5, 2.0]
    sol = solve("ilp", work=work, workers=3, speeds=speeds, time_limit_s=5)
    assert sol.status == "optimal"
    assert close(sol.makespan_s, brute_force(work, 3, speeds=speeds))
    assert sol.makespan_s >= makespan_lower_bound_s(work=work, workers=3, speeds=speeds)


@pytest.mark.parametrize("seed", range(4))
def test_ilp_with_memory_cap_equals_brute_force(seed):
    work, mem = random_instance(seed, layers=7, workers=3, memory=True)
    lower, feasible = smallest_cap_bounds(memory=mem, workers=3)
    cap = (lower + feasible) // 2 if feasible > lower else feasible
    expected = brute_force(work, 3, memory=mem, cap=cap)
    if expected == float("inf"):
        with pytest.raises(InputError, match="cap"):
            solve("ilp", work=work, workers=3, memory=mem, memory_cap=cap, time_limit_s=5)
        return
    sol = solve("ilp", work=work, workers=3, memory=mem, memory_cap=cap, time_limit_s=5)
    assert max(memory_loads(memory=mem, owners=sol.owners, workers=3)) <= cap
    assert close(sol.makespan_s, expected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ilp_falls_back_to_cbc_when_highs_is_unavailable(monkeypatch):
    monkeypatch.setattr(pulp.HiGHS, "available", lambda self: False)
    work, _ = random_instance(3, layers=7, workers=2)
    sol = solve("ilp", work=work, workers=2, time_limit_s=10)
    assert sol.method == "ilp"
    assert close(sol.makespan_s, brute_force(work, 2))


@pytest.mark.parametrize("method", METHODS)
def test_memory_cap_is_respected(method):
    work, mem = random_instance(11, layers=12, workers=3, memory=True)
    _, feasible = smallest_cap_bounds(memory=mem, workers=3)
    cap = max(feasible, max(memory_loads(memory=mem, owners=[i % 3 for i in range(12)],
                                         workers=3)))
    sol = solve(method, work=work, workers=3, memory=mem, memory_cap=cap, time_limit_s=2)
    assert max(memory_loads(memory=mem, owners=sol.owners, workers=3)) <= cap


def test_cap_below_largest_layer_names_the_smallest_cap():
    mem = [10, 50, 20]
    with pytest.raises(InputError) as info:
        solve("best", work=[1, 1, 1], workers=3, memory=mem, memory_cap=49)
    assert "smallest cap that works is 50 bytes" in str(info.value)


def test_cap_below_total_share_is_rejected_with_bounds():
    mem = [30, 30, 30, 30, 20]
    with pytest.raises(InputError) as info:
        solve("greedy", work=[1] * 5, workers=2, memory=mem, memory_cap=60)
    message = str(info.value)
    assert "memory cap 60 bytes" in message and "70 bytes" in message


def test_cap_proven_infeasible_by_the_ilp_names_a_working_cap():
    # total 120 over 2 workers: 60 each would do, but no split of {33,33,33,21} has both <= 60.
    mem = [33, 33, 33, 21]
    with pytest.raises(InputError) as info:
        solve("best", work=[1, 1, 1, 1], workers=2, memory=mem, memory_cap=60)
    message = str(info.value)
    assert "proved" in message and "61 bytes" in message and "a cap of 66 bytes" in message


def test_heuristic_that_misses_a_feasible_cap_says_so():
    # round-robin puts layers 0 and 2 together (40 + 40 > 60); 40+20 | 40 fits.
    mem = [40, 20, 40]
    with pytest.raises(InputError, match="round-robin"):
        solve("round-robin", work=[1, 1, 1], workers=2, memory=mem, memory_cap=60)
    sol = solve("best", work=[1, 1, 1], workers=2, memory=mem, memory_cap=60)
    assert max(memory_loads(memory=mem, owners=sol.owners, workers=2)) <= 60


@pytest.mark.parametrize("workers", [0, -1])
def test_fewer_than_one_worker_is_an_input_error(workers):
    with pytest.raises(InputError, match="workers"):
        solve("best", work=[1.0], workers=workers)


def test_unknown_method_is_an_input_error():
    with pytest.raises(InputError, match="unknown solver"):
        solve("magic", work=[1.0], workers=1)


def test_more_workers_than_layers_leaves_some_idle():
    sol = solve("best", work=[3.0, 2.0, 1.0], workers=8)
    assert sorted(sol.owners) == sorted(set(sol.owners))
    assert sol.makespan_s == 3.0 and sol.status == "optimal"


def test_time_limited_ilp_claims_optimal_only_with_proof():
    work, _ = random_instance(7, layers=40, workers=4)
    sol = solve("ilp", work=work, workers=4, time_limit_s=0.2)
    if sol.status == "optimal":
        assert sol.makespan_s <= sol.lower_bound_s * (1 + 2 * OPTIMALITY_GAP)
    assert sol.solve_time_s < 5


def test_status_comes_from_the_solution_status_not_the_problem_status(monkeypatch):
    """At a time limit PuLP's problem status can read Optimal while the solution is only an
    incumbent (LpSolutionIntegerFeasible): that must not be reported as optimal."""
    import planner.solve.ilp as ilp

    original = pulp.LpProblem.solve

    def stopped_at_time_limit(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        self.sol_status = pulp.LpSolutionIntegerFeasible
        return result

    monkeypatch.setattr(pulp.LpProblem, "solve", stopped_at_time_limit)
    monkeypatch.setattr(ilp, "_dual_bound", lambda prob: None)
    # bound 8.67, optimum 9 (local search stops at 10): only a solver can prove it
    work = [2.0, 8.0, 3.0, 3.0, 2.0, 3.0, 5.0]
    sol = solve("ilp", work=work, workers=3)
    assert sol.makespan_s == pytest.approx(9.0)
    assert sol.status == "feasible"


@settings(deadline=None, max_examples=60)
@given(work=st.lists(st.floats(min_value=0.0, max_value=10.0, allow_nan=False), min_size=1,
                     max_size=7),
       workers=st.integers(min_value=1, max_value=4),
       method=st.sampled_from(METHODS))
def test_solution_invariants(work, workers, method):
    sol = solve(method, work=work, workers=workers, time_limit_s=2)
    assert len(sol.owners) == len(work)
    assert all(0 <= o < workers for o in sol.owners)
    span = makespan_s(work=work, owners=sol.owners, workers=workers)
    assert sol.makespan_s == pytest.approx(span)
    assert makespan_lower_bound_s(work=work, workers=workers) <= span * (1 + 1e-9) + 1e-12
    assert sol.lower_bound_s <= span * (1 + 1e-9) + 1e-12
    if method in ("best", "ilp"):
        for other in HEURISTICS:
            assert span <= solve(other, work=work, workers=workers).makespan_s * (1 + 1e-9) + 1e-12
    if sol.status == "optimal" and len(work) <= 6 and workers <= 3:
        assert span <= brute_force(work, workers) * (1 + 2 * OPTIMALITY_GAP) + 1e-12


# ----------------------------------------------------------------------------- in depth

from planner.solve.bounds import pigeonhole_lower_bound_s, trivial_lower_bound_s  # noqa: E402
from planner.solve.instance import make_instance  # noqa: E402
from planner.solve.localsearch import balance_memory, refine_makespan  # noqa: E402

works = st.lists(st.floats(min_value=0.0, max_value=10.0, allow_nan=False), min_size=1,
                 max_size=7)


@settings(deadline=None, max_examples=40)
@given(work=works, workers=st.integers(min_value=1, max_value=3),
       speeds=st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=3, max_size=3),
       seed=st.integers(0, 1000))
def test_bounds_never_exceed_the_brute_force_optimum(work, workers, speeds, seed):
    speeds = speeds[:workers]
    exact = brute_force(work, workers, speeds=speeds)
    for bound in (trivial_lower_bound_s, pigeonhole_lower_bound_s, makespan_lower_bound_s):
        assert bound(work=work, workers=workers, speeds=speeds) <= exact * (1 + 1e-9) + 1e-12


def test_pigeonhole_bound_proves_equal_layers():
    # 144 equal layers on 64 workers: some worker takes 3; the trivial bound says 2.25
    assert pigeonhole_lower_bound_s(work=[1.0] * 144, workers=64) == pytest.approx(3.0)
    sol = solve("best", work=[1.0] * 144, workers=64)
    assert sol.makespan_s == pytest.approx(3.0) and sol.status == "optimal"


@settings(deadline=None, max_examples=40)
@given(work=works, workers=st.integers(min_value=1, max_value=4),
       memory=st.lists(st.integers(0, 50), min_size=7, max_size=7),
       caps=st.lists(st.integers(30, 200), min_size=4, max_size=4),
       start=st.integers(0, 10 ** 6))
def test_local_search_keeps_caps_and_never_gets_worse(work, workers, memory, caps, start):
    memory, caps = memory[:len(work)], caps[:workers]
    inst = make_instance(work=work, workers=workers, memory=memory, memory_cap=caps)
    rng = random.Random(start)
    owners = [rng.randrange(workers) for _ in work]
    held = memory_loads(memory=memory, owners=owners, workers=workers)
    if any(h > c for h, c in zip(held, caps)):
        return
    before = makespan_s(work=work, owners=owners, workers=workers)
    refined = refine_makespan(inst, owners)
    after = makespan_s(work=work, owners=refined, workers=workers)
    assert after <= before * (1 + 1e-12) + 1e-12
    assert all(h <= c for h, c in zip(memory_loads(memory=memory, owners=refined,
                                                   workers=workers), caps))
    balanced = balance_memory(inst, refined, makespan_s=after)
    assert makespan_s(work=work, owners=balanced, workers=workers) <= after * (1 + 1e-9) + 1e-12
    assert max(memory_loads(memory=memory, owners=balanced, workers=workers)) <= max(
        memory_loads(memory=memory, owners=refined, workers=workers))


@settings(deadline=None, max_examples=30)
@given(work=works, workers=st.integers(min_value=1, max_value=3),
       memory=st.lists(st.integers(1, 40), min_size=7, max_size=7),
       caps=st.lists(st.integers(20, 120), min_size=3, max_size=3),
       method=st.sampled_from(METHODS))
def test_per_worker_caps_are_respected_or_refused(work, workers, memory, caps, method):
    memory, caps = memory[:len(work)], caps[:workers]
    try:
        sol = solve(method, work=work, workers=workers, memory=memory, memory_cap=caps,
                    time_limit_s=2)
    except InputError as exc:
        assert "cap" in str(exc)
        if method in ("ilp", "best"):  # exact methods refuse only what no plan can meet
            assert brute_force_caps(work, workers, memory, caps) == float("inf")
        return
    held = memory_loads(memory=memory, owners=sol.owners, workers=workers)
    assert all(h <= c for h, c in zip(held, caps))
    if method in ("ilp", "best") and len(work) <= 6:
        assert close(sol.makespan_s, brute_force_caps(work, workers, memory, caps))


def brute_force_caps(work, workers, memory, caps) -> float:
    best = float("inf")
    for owners in itertools.product(range(workers), repeat=len(work)):
        held = memory_loads(memory=memory, owners=owners, workers=workers)
        if all(h <= c for h, c in zip(held, caps)):
            best = min(best, makespan_s(work=work, owners=owners, workers=workers))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_eight_layers_three_workers_equal_brute_force(seed):
    work, _ = random_instance(200 + seed, layers=8, workers=3)
    sol = solve("best", work=work, workers=3, time_limit_s=5)
    assert close(sol.makespan_s, brute_force(work, 3)) and sol.status == "optimal"


def test_block_with_unequal_speeds_and_caps_equals_brute_force_over_blocks():
    rng = random.Random(9)
    for _ in range(15):
        n, p = rng.randint(1, 7), rng.randint(1, 3)
        work = [rng.uniform(0, 1) for _ in range(n)]
        memory = [rng.randint(1, 10) for _ in range(n)]
        speeds = [rng.choice([0.5, 1.0, 2.0]) for _ in range(p)]
        cap = rng.randint(10, 30)
        best = float("inf")
        for cuts in itertools.combinations_with_replacement(range(n + 1), p - 1):
            bounds = list(zip((0,) + cuts, cuts + (n,)))
            if any(sum(memory[a:b]) > cap for a, b in bounds):
                continue
            best = min(best, max(sum(work[a:b]) / s for (a, b), s in zip(bounds, speeds)))
        if best == float("inf"):
            with pytest.raises(InputError):
                solve("block", work=work, workers=p, speeds=speeds, memory=memory,
                      memory_cap=cap)
            continue
        sol = solve("block", work=work, workers=p, speeds=speeds, memory=memory, memory_cap=cap)
        assert sol.makespan_s == pytest.approx(best, rel=1e-9)


def test_large_instance_skips_the_ilp_and_is_fast():
    import time
    rng = random.Random(1)
    work = [rng.uniform(0.1, 1.0) for _ in range(1000)]
    start = time.perf_counter()
    sol = solve("best", work=work, workers=64, time_limit_s=2, ilp_max_binaries=20_000)
    assert time.perf_counter() - start < 3.0
    assert sol.ilp.startswith("skipped")
    assert sol.makespan_s <= 1.02 * trivial_lower_bound_s(work=work, workers=64)
    for method in HEURISTICS:
        assert sol.makespan_s <= solve(method, work=work, workers=64).makespan_s * (1 + 1e-9)


def test_ilp_warm_start_and_cbc_agree():
    work, _ = random_instance(42, layers=9, workers=3)
    highs = solve("ilp", work=work, workers=3, time_limit_s=5)
    assert highs.ilp.startswith("highs")
    assert close(highs.makespan_s, brute_force(work, 3))
