"""A trial's times are flagged when they cannot be used: the timed steps disagree, or
the machine was loaded while they were taken (NOTE [ When a step's times are unusable ]
in memprop.sweep.worker; issue 24: the demo ran 10-100x slower beside another job while
``timing_noisy`` stayed False)."""

import os
import subprocess
import sys
import time

import pytest

from memprop.sweep.worker import (
    CPU_WALL_LIMIT,
    RUNQUEUE_WAIT_LIMIT,
    TIMING_SPREAD_LIMIT,
    CpuLoad,
    run_trial,
    timing_noise,
)


def test_steady_times_on_a_free_machine_are_usable():
    # the numbers of an MLP trial with a core to itself (NOTE's measurement)
    assert timing_noise(0.05, cpu_wall_ratio=1.0, runqueue_wait_ratio=0.002) is None
    assert timing_noise(None, cpu_wall_ratio=None, runqueue_wait_ratio=None) is None
    assert timing_noise(TIMING_SPREAD_LIMIT, runqueue_wait_ratio=RUNQUEUE_WAIT_LIMIT) is None


def test_a_wide_spread_is_noisy_and_says_so():
    assert timing_noise(0.6, runqueue_wait_ratio=0.0) == (
        "spread: the slowest and fastest timed steps differ by 0.60 times their median "
        "(limit 0.5)")


def test_equally_slow_steps_on_a_loaded_machine_are_noisy_and_say_so():
    # steady times (spread 0.02), but the threads waited 0.67 s for a CPU each second
    assert timing_noise(0.02, cpu_wall_ratio=0.33, runqueue_wait_ratio=0.67) == (
        "load: its threads waited 0.67 s for a CPU per second (limit 0.1), the machine "
        "was busy")
    both = timing_noise(5.63, cpu_wall_ratio=0.33, runqueue_wait_ratio=0.67)
    assert both.startswith("spread: ") and "; load: its threads waited 0.67 s" in both


def test_without_the_run_queue_wait_a_cpu_step_is_judged_by_its_cpu_time():
    assert timing_noise(0.02, cpu_wall_ratio=0.33) == (
        "load: it ran 0.33 s on a CPU per second (limit 0.8), the machine was busy")
    assert timing_noise(0.02, cpu_wall_ratio=CPU_WALL_LIMIT + 0.01) is None
    # a CUDA step's CPU waits for the device: its CPU time says nothing about load
    assert timing_noise(0.02, cpu_wall_ratio=0.05, device="cuda:0") is None
    assert timing_noise(0.02, cpu_wall_ratio=0.05, runqueue_wait_ratio=0.4,
                        device="cuda:0").startswith("load: ")
    # where the wait is known it decides: CPU time below 1 is also a step that sleeps
    assert timing_noise(0.02, cpu_wall_ratio=0.3, runqueue_wait_ratio=0.01) is None


def test_sleeping_is_not_load():
    with CpuLoad() as load:
        time.sleep(0.3)
    assert load.wall_s >= 0.3 and load.cpu_wall_ratio < 0.2
    if load.runqueue_wait_ratio is not None:
        assert 0 <= load.runqueue_wait_ratio < RUNQUEUE_WAIT_LIMIT


def _beside_a_busy_process(run):
    """``run()`` with this thread (and torch: one thread) pinned to one core that a busy
    process shares; restores affinity and torch's threads."""
    import torch
    core = min(os.sched_getaffinity(0))
    allowed, threads = os.sched_getaffinity(0), torch.get_num_threads()
    busy = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, "
                             f"{{{core}}})\nwhile True: pass"])
    try:
        os.sched_setaffinity(0, {core})
        torch.set_num_threads(1)
        time.sleep(0.3)                       # the busy process is running
        return run()
    finally:
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(threads)
        busy.kill()
        busy.wait()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_a_trial_beside_a_busy_process_on_its_core_is_flagged_as_loaded():
    """One real trial, its thread pinned to one core that a busy process shares: its
    times are flagged, and the row says the load is why."""
    from memprop.sweep.trial import Trial
    trial = Trial(spec="t", model="mlp", model_fields=(("d_in", 64), ("depth", 2),
                                                       ("width", 64)),
                  batch=32, repeats=10, threads=1, estimate=False)
    row = _beside_a_busy_process(lambda: run_trial(trial))
    assert row["status"] == "ok" and row["threads"] == 1
    assert row["timing_noisy"] is True and "load: " in row["timing_noisy_reason"]
    if row["runqueue_wait_ratio"] is not None:
        # sharing one core with one busy process: about half of every second waiting
        assert row["runqueue_wait_ratio"] > 2 * RUNQUEUE_WAIT_LIMIT
    else:
        assert row["cpu_wall_ratio"] < CPU_WALL_LIMIT


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_profile_says_its_times_are_unusable_beside_a_busy_process(capsys):
    import json

    from memprop.cli import main
    args = ["profile", "--set", "depth=2", "--set", "width=64", "--set", "d_in=64",
            "--batch", "16", "--repeats", "10"]
    assert _beside_a_busy_process(lambda: main(args)) == 0
    lines = capsys.readouterr().out.splitlines()
    (flag,) = [line for line in lines if line.startswith("  times UNUSABLE        ")]
    assert "load: " in flag and flag.endswith("; rerun on a quiet machine")
    assert _beside_a_busy_process(lambda: main([*args, "--json"])) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["timing_noisy"] is True and "load: " in row["timing_noisy_reason"]
    assert {"cpu_wall_ratio", "runqueue_wait_ratio"} <= set(row)
    assert main([*args[:-2], "--estimate", "--json"]) == 0      # nothing timed: no verdict
    assert "timing_noisy" not in json.loads(capsys.readouterr().out)


def test_the_sweep_says_how_many_trials_have_unusable_times():
    from memprop.cli.sweep_cmd import noisy_line
    reasons = ["load: its threads waited 0.67 s ...", "spread: ...; load: its threads ...",
               "spread: the slowest ..."]
    assert noisy_line(reasons, 12) == (
        "times unusable in 3 of 12 trials (2 under load, 2 with a wide spread; column "
        "timing_noisy_reason): rerun them on a quiet machine with --force")
    assert noisy_line(reasons[:1], 4).startswith("times unusable in 1 of 4 trials (1 under "
                                                 "load; column")
