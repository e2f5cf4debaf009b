"""Ranks sharing a host's cores in the step model: processor sharing of the compute between
collectives, and an overlapped all-reduce's CPU part beside it."""
from __future__ import annotations

import numpy as np
import pytest

from dpkfac.core.profile import Contention, profile_from_dict, profile_to_dict
from planner.model.costs import PlanConfig, gradient_allreduce_cpu_s, second_order_lower_bound_s
from planner.model.sharing import shared_chunk_ends
from planner.model.simulate import simulate_step
from planner.model.timeline import Timeline

from test_planner_simulate import COUNTERS, hand_profile

ONE_CORE = Contention(ranks=2, slowdown=2.0)  # 2 ranks on 1 core: alone twice as fast
SERIAL, OVERLAPPED = PlanConfig(overlap=False), PlanConfig()


def test_time_factor_is_cores_shared_among_the_ranks_computing():
    two_cores = Contention(ranks=3, slowdown=1.5)
    assert [two_cores.time_factor(k) for k in (1, 2, 3)] == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert [ONE_CORE.time_factor(k) for k in (1, 2)] == pytest.approx([0.5, 1.0])
    assert two_cores.applies(3) and not two_cores.applies(2) and not two_cores.applies(6)
    no_sharing = Contention(ranks=3, slowdown=0.97)  # noise below 1: a core (GPU) per rank
    assert not no_sharing.applies(3)
    assert [no_sharing.time_factor(k) for k in (1, 2, 3)] == [1.0, 1.0, 1.0]


def test_time_factor_never_shares_more_cores_than_the_host_has():
    """Busy figures timed with 3 ranks on 2 cores read 1.3x alone (their kernels did not all
    run at once throughout); with all 3 computing each still gets 2/3 of a core: 1.5x alone."""
    crowded = Contention(ranks=3, slowdown=1.3, cores=2)
    assert [crowded.time_factor(k) for k in (1, 2, 3)] == \
        pytest.approx([1 / 1.3, 1 / 1.3, 1.5 / 1.3])
    assert crowded.applies(3) and not crowded.applies(2)
    # below 1 (noise) with fewer cores than ranks still shares them
    noisy = Contention(ranks=3, slowdown=0.97, cores=2)
    assert noisy.applies(3) and noisy.time_factor(3) == pytest.approx(1.5)
    # enough cores: the cap changes nothing
    roomy = Contention(ranks=3, slowdown=1.5, cores=8)
    assert [roomy.time_factor(k) for k in (1, 2, 3)] == pytest.approx([2 / 3, 2 / 3, 1.0])


def shared_ends(starts: np.ndarray, work: np.ndarray, f) -> np.ndarray:
    """Each worker's end with one phase of `work` seconds."""
    return shared_chunk_ends(starts, np.asarray(work)[:, None], f)[0][:, 0]


def test_shared_ends_by_hand():
    f = ONE_CORE.time_factor
    # together at rate 1 until worker 0 is done at 1 s; worker 1's 2 s left alone at rate 2
    assert shared_ends(np.zeros(2), np.array([1.0, 3.0]), f) == pytest.approx([1.0, 2.0])
    # worker 0 alone for its first second (rate 2: done), then worker 1 alone
    assert shared_ends(np.array([0.0, 1.0]), np.array([2.0, 2.0]), f) == pytest.approx([1.0, 2.0])
    # a worker with nothing to do ends where it starts, and does not slow the other
    assert shared_ends(np.array([0.5, 0.0]), np.array([0.0, 1.0]), f) == pytest.approx([0.5, 0.5])
    # no sharing: every worker at its busy figures
    assert shared_ends(np.array([0.0, 2.0]), np.array([1.0, 3.0]), lambda k: 1.0) == \
        pytest.approx([1.0, 5.0])


def test_shared_chunk_ends_by_hand():
    f = ONE_CORE.time_factor
    # together at rate 1 until worker 1 is done at 0.5 s (its empty second phase with it);
    # worker 0's last 0.5 s of its first phase and 1 s of its second alone, at rate 2
    ends, _ = shared_chunk_ends(np.zeros(2), np.array([[1.0, 1.0], [0.5, 0.0]]), f)
    assert ends == pytest.approx(np.array([[0.75, 1.25], [0.5, 0.5]]))
    # a thread released when its worker's first phase ends (alone: 0.5 s) shares the core
    # with the second: both at rate 1 until the thread's 0.5 s are done, then the worker alone
    ends, threads = shared_chunk_ends(np.zeros(1), np.array([[1.0, 1.0]]), f,
                                      threads=np.array([0.5]), thread_after=1)
    assert ends == pytest.approx(np.array([[0.5, 1.25]])) and threads == pytest.approx([1.0])
    # a thread without work ends where it would start; one with a later fixed start waits
    _, threads = shared_chunk_ends(np.zeros(1), np.array([[1.0]]), f, threads=np.zeros(1),
                                   thread_after=1)
    assert threads == pytest.approx([0.5])
    ends, threads = shared_chunk_ends(np.zeros(1), np.array([[1.0]]), f, threads=np.array([1.0]),
                                      thread_starts=np.array([2.0]))
    assert ends == pytest.approx(np.array([[0.5]])) and threads == pytest.approx([2.5])


def _profile(contention: Contention | None = ONE_CORE, **comm) -> object:
    doc = hand_profile()
    if contention is not None:
        doc["contention"] = {"ranks": contention.ranks, "slowdown": contention.slowdown,
                             **({"cores": contention.cores} if contention.cores else {})}
    doc["comm"].update(comm)
    return profile_from_dict(doc)


def test_an_owner_left_computing_alone_runs_at_its_alone_speed():
    profile = _profile()
    step = simulate_step(profile, owners=[0, 0, 1], workers=2, config=SERIAL)
    plain = simulate_step(_profile(None), owners=[0, 0, 1], workers=2, config=SERIAL)
    # rank 0: 8 s of second-order compute, rank 1: 4.5 s (busy figures). Together (rate 1)
    # until rank 1 is done at 4.5 s, then rank 0's last 3.5 s alone at twice the speed
    rank0 = 4.5 + 3.5 / 2
    # rank 1, the last broadcast's root, is done once rank 0's broadcast reached it (its own
    # is buffered), b1 before rank 0: its optimizer step starts alone, and rank 0's ends alone
    b1 = 1e-3 + (2000 + COUNTERS) * 1e-9
    assert plain.step_time_s - step.step_time_s == pytest.approx(8.0 - rank0 + b1)
    # its phases in order: factors (1.5 s) and decompositions (3 s) beside rank 1's compute
    # at their busy figures, its preconditioning (3.5 s) alone, in half the time
    assert step.phases_s["factors"][0] == pytest.approx(1.5)
    assert step.phases_s["decompose"][0] == pytest.approx(3.0)
    assert step.phases_s["precondition"][0] == pytest.approx(3.5 / 2)
    assert step.phases_s["decompose"][1] == pytest.approx(4.0)  # never alone: busy figures
    assert step.phases_s["forward_backward"] == plain.phases_s["forward_backward"]
    path = step.critical_path
    assert all(a.end_s == pytest.approx(b.start_s) for a, b in zip(path, path[1:]))
    assert path[-1].end_s == pytest.approx(step.step_time_s)
    bound = second_order_lower_bound_s(profile, workers=2, config=SERIAL)
    assert bound <= step.second_order_s
    # at another world size the host sharing is unknown: busy figures, as without it
    assert simulate_step(profile, owners=[0, 1, 2], workers=3, config=SERIAL).step_time_s == \
        simulate_step(_profile(None), owners=[0, 1, 2], workers=3, config=SERIAL).step_time_s


def test_an_overlapped_all_reduce_shares_the_cores_for_its_cpu_seconds_only():
    allreduce = 2.0 + 1000 * 4 * 1e-9
    profile = _profile(gradient_allreduce_cpu_s=1.0,
                       allreduce={"alpha_s": 2.0, "beta_s_per_byte": 1e-9})
    assert gradient_allreduce_cpu_s(profile, workers=2) == 1.0
    step = simulate_step(profile, owners=[0, 0, 1], workers=2, config=OVERLAPPED)
    # from 0.1 s: local work 4.5 / 4.25 s and 1 s of all-reduce CPU on each rank, 4 at once on
    # one core (rate 1/2) until the all-reduce's threads are done (2 s); then both owners at
    # rate 1 until rank 1 is done (3.25 s), then rank 0's last 0.25 s alone (rate 2)
    local_end = 0.1 + 2.0 + 3.25 + 0.125
    assert local_end > 0.1 + allreduce  # the all-reduce was over before anyone waited
    assert step.phases_s["allreduce"] == (0.0, 0.0)
    # preconditioning 3.5 / 0.25 s: rank 1 (from 0.125 s earlier) alone, done as rank 0
    # starts; rank 0's 3.5 s alone
    b = 2 * (1e-3 + (2000 + COUNTERS) * 1e-9)
    # rank 1, the last broadcast's root, is done b / 2 before rank 0 (rank 0's broadcast has
    # reached it, its own is buffered): its optimizer step begins alone and rank 0's ends alone
    assert step.step_time_s == pytest.approx(local_end + 3.5 / 2 + b + 0.01 - b / 2)
    # without contention its measured CPU seconds run before the local work (the rest of the
    # all-reduce is waiting, which takes no core); without them, all that is not on the wire
    plain = _profile(None, gradient_allreduce_cpu_s=1.0,
                     allreduce={"alpha_s": 2.0, "beta_s_per_byte": 1e-9})
    assert gradient_allreduce_cpu_s(plain, workers=2) == pytest.approx(1.0)
    assert simulate_step(plain, owners=[0, 0, 1], workers=2, config=OVERLAPPED).step_time_s == \
        pytest.approx(0.1 + 1.0 + 4.5 + 3.5 + b + 0.01)
    unmeasured = _profile(None, allreduce={"alpha_s": 2.0, "beta_s_per_byte": 1e-9})
    assert gradient_allreduce_cpu_s(unmeasured, workers=2) == pytest.approx(allreduce)


def test_a_posted_collectives_threads_start_when_it_does():
    """A collective posted once the last rank arrives: every rank's thread starts then, not
    at its own earlier clock, so it competes with the compute of the ranks still busy."""
    line = Timeline(2, trace=False, contention=ONE_CORE)
    line.compute("precondition", np.array([4.0, 0.0]))  # rank 0 alone at rate 2: 2 s
    assert line.t == pytest.approx([2.0, 0.0])
    seg = line.post("broadcast", 0.5)
    line.background("broadcast", 1.0, start_s=seg.start_s)
    line.compute("precondition", np.array([0.0, 5.0]))
    # rank 1 alone (rate 2) until 2 s, 1 s left; then it and both threads, 1 s of CPU each,
    # three at once on one core (rate 1/1.5): all done at 3.5 s. Threads started at each
    # rank's clock, rank 1's would run beside its compute from 0 and end by 3 s
    line.wait(seg)
    assert line.t == pytest.approx([3.5, 3.5])


def test_contention_survives_the_file_round_trip():
    profile = _profile(gradient_allreduce_cpu_s=0.002)
    again = profile_from_dict(profile_to_dict(profile))
    assert again.contention == ONE_CORE
    assert again.comm.gradient_allreduce_cpu_s == 0.002
    crowded = Contention(ranks=2, slowdown=1.1, cores=1)  # the host's cores, when recorded
    assert profile_from_dict(profile_to_dict(_profile(crowded))).contention == crowded
    assert "cores" not in profile_to_dict(profile)["contention"]


def test_the_shared_cores_are_every_cpu_a_rank_may_use():
    """Ranks pinned to cores of their own (taskset, numactl) share all of them; each rank
    sees only its own, so the profile counts the union."""
    from executor.profiling.document import shared_cores

    assert shared_cores([("host", [0], "cpu"), ("host", [1], "cpu")]) == 2
    assert shared_cores([("host", [0, 1], "cpu"), ("host", [0, 1], "cpu")]) == 2
    assert shared_cores([("host", [0, 1], "cpu"), ("host", [0, 1], "cpu"),
                         ("host", [1], "cpu")]) == 2
    # several hosts, or a GPU: the ranks do not share one host's cores
    assert shared_cores([("a", [0], "cpu"), ("b", [0], "cpu")]) is None
    assert shared_cores([("host", [0], "cuda"), ("host", [1], "cuda")]) is None


def _time_steps_with_alone_steps(rank: int, world_size: int) -> dict:
    """time_steps on 2 gloo ranks with alone steps: which samples each timed step went to."""
    import torch

    from executor.profiling import ProfileOptions
    from executor.profiling import kernels
    from executor_fixtures import small_cnn

    torch.manual_seed(0)
    model = small_cnn()
    precond = kernels.one_rank_preconditioner(model, ProfileOptions())
    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen))]
    kernels.accumulate_factors(model, precond, batches, torch.nn.functional.cross_entropy)
    order: list[int] = []
    timed_step = kernels._time_one_step

    def recording(*args, **kwargs):
        order.append(id(args[6]))  # the samples dict the step is timed into
        return timed_step(*args, **kwargs)

    kernels._time_one_step = recording
    measured = kernels.time_steps(model, precond, batches, torch.nn.functional.cross_entropy,
                                  ProfileOptions(warmup=1, repeats=4), advance=lambda: None,
                                  align=torch.distributed.barrier, world_size=world_size,
                                  alone=rank == 0)
    kinds = {id(measured.busy): "busy", id(measured.alone): "alone"}
    return {"order": [kinds[i] for i in order], "alone": measured.alone,
            "busy_decompositions": len(measured.busy["0"]["decompose_a"]),
            "slowdown": (kernels.contention_slowdown(measured.busy, measured.alone)
                         if measured.alone else None)}


def test_the_profiles_alone_steps_alternate_with_the_busy_ones():
    """Contention is timed at the same moments as the busy figures: rank 0 times each step
    again alone right after every rank timed it (the others only in its traffic), so a drift
    of the host's speed between two spans is not read as contention."""
    from distributed_helpers import run_distributed

    first, second = run_distributed(_time_steps_with_alone_steps, 2)
    # warm-up + 4 repeats of each kind (buckets posted from backward, and after it), each
    # timed twice
    assert first["order"] == ["busy", "alone"] * 9
    assert second["order"] == ["busy"] * 9 and second["alone"] is None
    assert first["busy_decompositions"] == second["busy_decompositions"] == 8
    assert all(len(v) == 8 for v in first["alone"]["0"].values())
    assert first["slowdown"] > 0
