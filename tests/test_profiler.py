"""Profiler pieces: timing helpers, the alpha-beta fit, and a real (small) profile run."""
from __future__ import annotations

import statistics

import pytest
import torch

from executor.runtime.distributed import WorldInfo
import dpkfac
from executor.workload.models import build_model
from executor.profiling import ProfileOptions
from executor.workload import load_data
from executor.profiling.alphabeta import fit_alpha_beta
from executor.profiling.collectives import message_sizes, time_collectives
from executor.runtime.timing import PhaseTimer
from dpkfac.core.profile import profile_from_dict


def test_phase_timer_accumulates_per_phase():
    timer = PhaseTimer(("a", "b"))
    with timer.phase("a"):
        pass
    with timer.phase("a"):
        pass
    assert set(timer.times()) == {"a", "b"} and timer.times()["b"] == 0.0
    timer.reset()
    assert timer.times() == {"a": 0.0, "b": 0.0}


def test_alpha_beta_fit_recovers_known_parameters():
    sizes = message_sizes(1 << 20)
    assert sizes[0] == 1024 and sizes[-1] == 4 << 20  # at least up to 4 MiB
    seconds = [5e-5 + n * 2e-10 for n in sizes]
    fit = fit_alpha_beta(sizes, seconds)
    assert fit["alpha_s"] == pytest.approx(5e-5, rel=1e-6)
    assert fit["beta_s_per_byte"] == pytest.approx(2e-10, rel=1e-6)
    assert message_sizes(1 << 40)[-1] == 64 << 20  # never beyond 64 MiB


def test_profile_of_a_real_model_is_a_valid_profile():
    """dpkfac.profile in process: a valid profile of the model on the batches, which leaves the
    model's weights, buffers and gradients as they were."""
    model = build_model("digits-mlp")
    digits = load_data({"spec": "digits"}, model).train
    batches = [digits[16 * i:16 * (i + 1)] for i in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    doc = dpkfac.profile(model, batches, name="digits-mlp",
                         warmup=1, repeats=3, factor_batches=4, keep_freed_memory=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert doc["model"] == "digits-mlp" and doc["loss"] == "cross-entropy"
    assert doc["data"] == {"spec": "in-process", "input_shape": [1, 8, 8],
                           "input_dtype": "float32"}
    profile = profile_from_dict(doc)
    assert [layer.name for layer in profile.layers] == ["1", "3", "5"]
    assert all(layer.decompose_a_s > 0 and layer.factor_g_s > 0 for layer in profile.layers)
    assert profile.layers[0].state_bytes == 4 * (2 * 65 ** 2 + 65 + 2 * 128 ** 2 + 128)
    assert profile.pack_s > 0 and profile.apply_s > 0
    assert profile.backward_allreduce_s == 0.0  # one rank: nothing posted from backward
    assert doc["comm"]["world_size"] == 1 and doc["comm"]["source"].startswith("assumed")
    assert doc["layers"][0]["rows_a"] == 16
    assert "fits" not in doc  # the planner reads measured costs, not fitted curves
    assert doc["environment"]["flush_denormal"] is True  # timed as `train` runs by default
    assert doc["environment"]["malloc"]["malloc_trim_threshold"] > 0


def test_flushing_denormals_zeroes_subnormal_floats_inside_the_block():
    from executor.runtime.cpu_runtime import flush_denormal_enabled, flushed_denormals

    tiny = torch.tensor([1], dtype=torch.int32).view(torch.float32)  # smallest subnormal
    assert not flush_denormal_enabled()  # torch's default, and every block restores it
    with flushed_denormals(True) as flushing:
        if not flushing:
            pytest.skip("this CPU cannot flush subnormals")
        assert (tiny * 1.0).item() == 0.0
        with flushed_denormals(False) as inner:
            assert inner is False and (tiny * 1.0).item() > 0.0
        assert flush_denormal_enabled()
    assert (tiny * 1.0).item() > 0.0


def _interleaved_trials(rank: int, world_size: int) -> dict:
    import time

    calls: list[str] = []
    options = ProfileOptions(warmup=1, repeats=2)

    def op(name: str, sleep_s: float):
        def call() -> None:
            calls.append(name)
            time.sleep(sleep_s if rank == 1 else 0.0)  # rank 1 is the slow one
        return call

    world = WorldInfo(rank=rank, world_size=world_size, local_rank=rank,
                      device=torch.device("cpu"), backend="gloo")
    means = time_collectives([op("a", 0.002), op("b", 0.02)], world, options,
                             before=lambda: None, between=lambda trial: calls.append(trial))
    idle = time_collectives([op("d", 0.0)], world, options,  # every rank computes 10 ms
                            before=lambda: time.sleep(0.01)).idle_s
    late = time_collectives([op("c", 0.0)], world, options,  # rank 1 computes 20 ms longer
                            before=lambda: time.sleep(0.02 if rank == 1 else 0.0))
    root = time_collectives([op("e", 0.0), lambda: time.sleep(0.005 if rank == 0 else 0.0)],
                            world, options, before=lambda: None)  # rank 0 takes 5 ms
    befores = iter(range(1000))
    spiky = time_collectives(  # 10 ms of compute before each call, once 200 ms on rank 1
        [op("f", 0.0)], world, ProfileOptions(warmup=1, repeats=5),
        before=lambda: time.sleep(0.2 if rank == 1 and next(befores) == 3 else 0.01)).compute_s
    return {"calls": [c for c in calls if c not in ("c", "d", "e", "f")], "means": means.seconds,
            "late": late.seconds[0], "idle": idle, "late_rank0": late.rank0_after_last_s[0],
            "rank0": root.rank0_after_last_s, "spiky": spiky}


def test_collective_trials_interleave_and_run_from_mean_arrival_to_last_return():
    from distributed_helpers import run_distributed

    results = run_distributed(_interleaved_trials, 2)
    trials = 1 + 2 * 2  # warm-up + 2 x repeats
    for result in results:
        # trial i of every op, then between(i), then trial i + 1
        assert result["calls"] == [call for i in range(trials) for call in ("a", "b", i)]
        a_s, b_s = result["means"]
        assert a_s >= 0.002 and b_s >= 0.02  # rank 1's sleeps: the slowest rank's time counts
        # a late arrival counts from the ranks' mean arrival: half of rank 1's 20 ms
        assert 0.009 <= result["late"] <= 0.016
        assert 0.01 <= result["idle"] <= 0.02  # the link idles while the ranks compute
        # the compute before the calls: a trimmed mean per rank drops rank 1's 200 ms
        assert 0.01 <= result["spiky"] <= 0.016
        # rank 0's own time counts from the last arrival: none when it returned before that
        assert result["late_rank0"] == 0.0
        assert result["rank0"][0] <= 0.003 and 0.005 <= result["rank0"][1] <= 0.012
    assert results[0]["means"] == results[1]["means"]
    assert results[0]["rank0"] == results[1]["rank0"]


def _chain_trials(rank: int, world_size: int) -> dict:
    """bucket_chain_s over 2 ranks where rank 1's buckets each finish 5 ms late."""
    import time

    from executor.profiling import collectives

    post = collectives.dist.all_reduce

    class Late:
        def __init__(self, work):
            self.work = work

        def wait(self):
            self.work.wait()
            time.sleep(0.005 if rank == 1 else 0.0)

    collectives.dist.all_reduce = lambda buf, **kw: Late(post(buf, **kw))
    try:
        world = WorldInfo(rank=rank, world_size=world_size, local_rank=rank,
                          device=torch.device("cpu"), backend="gloo")
        return {"chain": collectives.bucket_chain_s(
            world, ProfileOptions(warmup=1, repeats=2), (4096, 1024))}
    finally:
        collectives.dist.all_reduce = post


def test_the_bucket_chain_is_timed_from_posting_to_the_slowest_ranks_last_completion():
    from distributed_helpers import run_distributed

    first, second = (r["chain"] for r in run_distributed(_chain_trials, 2))
    assert first == second  # every rank records the slowest rank's time
    assert 0.01 <= first < 0.5  # its two buckets each 5 ms late


def _profile_order(rank: int, world_size: int) -> dict:
    """A 2-rank profile of a small CNN, logging its timed steps and its collectives' trials."""
    from executor.profiling import collectives, kernels
    from executor_fixtures import small_cnn

    log: list[str] = []
    step, trials = kernels.StepTimer.step, collectives.time_collectives

    def logged_step(self):
        log.append("step")
        step(self)

    def logged_trials(ops, world, options, before, between=lambda trial: None):
        def logged(trial):
            log.append("trial")
            between(trial)
        return trials(ops, world, options, before, logged)

    kernels.StepTimer.step, collectives.time_collectives = logged_step, logged_trials
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(rank)
    batch = (torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen))
    doc = dpkfac.profile(small_cnn(), batch, warmup=1, repeats=4, factor_batches=2)
    return {"log": log, "decompose_a": doc["layers"][0]["decompose_a_s"]}


def test_the_profiles_steps_are_spread_over_the_collectives_trials():
    """A shared host's slow seconds meet a few of the profile's timed steps, not all: after
    the warm-up steps, one timed step runs after each trial of the collectives, `repeats` of
    each kind (buckets posted from backward and after it)."""
    from distributed_helpers import run_distributed

    for result in run_distributed(_profile_order, 2):
        # the warm-up step, then a timed step after each of trials 0-7 of the 9 (warm-up +
        # 2 x repeats); the broadcast overlap's trials follow
        assert result["log"][:18] == ["step"] + ["trial", "step"] * 8 + ["trial"]
        assert result["log"].count("step") == 1 + 2 * 4
        assert result["decompose_a"] > 0


def test_alpha_beta_fit_recovers_a_line_and_clamps_at_zero():
    from executor.profiling.alphabeta import fit_alpha_beta

    sizes = [1024, 4096, 65536, 1 << 20]
    fit = fit_alpha_beta(sizes, [2e-5 + n * 1e-9 for n in sizes])
    assert fit["alpha_s"] == pytest.approx(2e-5) and fit["beta_s_per_byte"] == pytest.approx(1e-9)
    assert fit["fit_mean_rel_error"] == pytest.approx(0.0, abs=1e-9)
    falling = fit_alpha_beta(sizes, [4e-3, 3e-3, 2e-3, 1e-3])  # no line with beta >= 0 fits
    assert falling["beta_s_per_byte"] == 0.0 and falling["alpha_s"] > 0


def test_message_sizes_include_the_steps_own_messages():
    sizes = message_sizes(150_000, extra=(150_004, 75_000, 1_100_000, 512, 1 << 30))
    assert {150_004, 75_000, 1_100_000} <= set(sizes)
    assert 512 not in sizes and (1 << 30) not in sizes  # only within 1 KiB..the largest
    assert list(sizes) == sorted(set(sizes))


def test_step_record_takes_forward_backward_level_from_the_trials():
    from executor.profiling.kernels import OVERLAPPED_FB, STEP_PHASES, bucket_key, step_record

    samples = {**{k: [0.001] * 10 for k in STEP_PHASES}, "forward_backward": [0.004] * 10,
               OVERLAPPED_FB: [0.005] * 10, bucket_key(0): [0.002] * 10,
               bucket_key(1): [0.0035] * 10}
    steps_only = step_record(samples, [100, 50])
    assert steps_only["forward_backward_s"] == pytest.approx(0.004)
    assert steps_only["backward_allreduce_s"] == pytest.approx(0.001)
    record = step_record(samples, [100, 50], forward_backward_s=0.003)
    # the trials' level, the steps' shape: posting's share and the ready fractions kept
    assert record["forward_backward_s"] == pytest.approx(0.003)
    assert record["backward_allreduce_s"] == pytest.approx(0.00075)
    assert [b["ready_s"] for b in record["gradient_buckets"]] == pytest.approx([0.0015, 0.002625])
    assert record["optimizer_s"] == steps_only["optimizer_s"]


def test_kernel_figures_are_trimmed_means():
    """A kernel's figure drops a shared host's odd samples at each end, like a median, but
    follows a time that flips between two speeds by how often it ran at each (a run's mean
    step does), where a median jumps to whichever holds half the samples."""
    from executor.profiling.robust import TRIM, trimmed_mean

    assert TRIM == 0.1
    spikes = [1.0] * 18 + [50.0, 0.0]  # one slow and one impossibly fast sample of 20
    assert trimmed_mean(spikes) == 1.0
    flips = [13.5] * 9 + [19.5] * 11  # 45% fast, 55% slow
    assert statistics.median(flips) == 19.5
    assert trimmed_mean(flips) == pytest.approx((7 * 13.5 + 9 * 19.5) / 16)
    assert trimmed_mean([2.0]) == 2.0
