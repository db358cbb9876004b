"""Multi-level recompute: the rotor DP is optimal (brute force), reproduces Revolve's
binomial optimum on uniform chains, and its schedule, applied as nested checkpoints,
peaks exactly where the fake-tensor simulation says, within a budget below the
single-level floor, with bitwise-equal loss and gradients."""

import random

import pytest
import torch
from helpers import cfg_loss_and_grads, random_chain

from memprop.checkpoint import apply_strategy, parse_strategy, remove_strategy
from memprop.checkpoint.forms.multilevel import Nested, format_schedule, parse_schedule
from memprop.checkpoint.planning.dp import ChainCosts, min_peak, model_peak, solve
from memprop.checkpoint.planning.planner import plan
from memprop.checkpoint.planning.profile import early_stop_flops, profile_chain
from memprop.checkpoint.planning.rotor import (
    brute_force,
    cost_curve,
    revolve_forwards,
    run_schedule,
    solve_schedule,
    tree_schedule,
)
from memprop.checkpoint.planning.simulate import simulate
from memprop.errors import StrategyError
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.workload import build_workload

MiB = 2 ** 20


def test_dp_equals_brute_force_on_random_chains():
    rng = random.Random(0)
    compared = 0
    for _ in range(120):
        chain = random_chain(rng)            # the single-level test's chains
        if chain.n > 5:                      # brute force enumerates nested trees
            continue
        # FLOPs a recompute ending in block k skips (NOTE [ Early stop ]): some chains
        early = tuple(rng.randint(0, f) for f in chain.flops) if rng.random() < 0.5 else None
        everything = run_schedule(chain, tuple(range(chain.n)))[0]
        curve = cost_curve(chain, everything, quantum=1, early=early)
        lowest = curve[0][0]
        for budget in (lowest - 1, lowest, (lowest + everything) // 2, everything):
            dp = solve_schedule(chain, budget, quantum=1, early=early)
            brute = brute_force(chain, budget, early=early)
            assert (dp is None) == (brute is None), (chain, budget)
            if dp is not None:
                assert dp[0] == brute[0], (chain, budget)
                assert run_schedule(chain, dp[1], early=early)[1] == dp[0]
                assert run_schedule(chain, dp[1])[0] <= budget
                compared += 1
    assert compared > 200


def uniform(length: int, tape: int = 1000) -> ChainCosts:
    # Revolve's setting: each step's input is one unit; its tape (what its backward
    # needs) is so large that only one step is taped at a time
    return ChainCosts(t=(1,) * (length + 1), inner=(tape,) * length,
                      saves_in=(True,) * length, saves_out=(False,) * length,
                      keep=(False,) * (length + 1), flops=(1.0,) * length)


@pytest.mark.parametrize("snapshots", [1, 2, 3, 4])
def test_uniform_chain_recomputes_revolve_binomial_optimum(snapshots):
    # memory = the tape + the current state + s snapshots; forwards beyond the one taped
    # forward of each step equal r·l - C(s + r, r - 1) (Griewank & Walther 2000)
    for length in range(1, 22):
        found = solve_schedule(uniform(length), 1000 + 1 + snapshots, quantum=1)
        assert found[0] - length == revolve_forwards(length, snapshots), (length, snapshots)


def test_revolve_closed_form_by_hand():
    assert revolve_forwards(5, 1) == 10          # one snapshot: 4 + 3 + 2 + 1
    assert revolve_forwards(3, 2) == 2           # β(2,1) = 3: r = 1, 3 - β(3,0) = 2
    assert revolve_forwards(10, 2) == 3 * 10 - 10  # β(2,3) = 10: r = 3, β(3,2) = 10


def test_multilevel_goes_below_the_single_level_floor_of_the_relu_chain():
    # 12 Linear+ReLU blocks of one unit each (they save input and output)
    n = 12
    chain = ChainCosts(t=(10,) * (n + 1), inner=(0,) * n, saves_in=(True,) * n,
                       saves_out=(True,) * n, keep=(True,) + (False,) * n, flops=(1.0,) * n)
    floor = min_peak(chain)
    assert solve(chain, floor - 1) is None
    found = solve_schedule(chain, floor - 10, quantum=1)
    assert found is not None and run_schedule(chain, found[1])[0] <= floor - 10
    # where one level fits, the multi-level optimum is no cheaper
    single = solve(chain, floor + 20)
    assert solve_schedule(chain, floor + 20, quantum=1)[0] - n <= single[0]


def test_schedule_string_round_trips_and_rejects_bad_nesting():
    sched = ((0, 11, ((0, 5, ((0, 2, (0, 1, 2)), 3, 4, 5)), 6, (7, 9, (7, 8, 9)), 10, 11)),
             (12, 14, (12, 13, 14)), 15)
    text = format_schedule(sched)
    assert text == "0-11[0-5[0-2],7-9],12-14"
    assert tree_schedule(parse_schedule(text), 0, 16) == sched
    assert parse_strategy("nested:" + text) == Nested.parse(text)
    for bad in ("3-1", "0-5[4-7]", "0-5,2-3", "0-5[0-5]", "0-3[", "0-3]"):
        with pytest.raises(StrategyError):
            Nested.parse(bad)


@pytest.mark.parametrize("name,sizes,batch,spec", [
    ("mlp", dict(depth=16, width=64, d_in=64), 256, "0-11[0-5[0-2],7-9],12-14"),
    ("transformer", dict(depth=6, d_model=32, heads=4, seq_len=32, vocab=64, dropout=0.1),
     4, "0-4[0-2[0-1]]"),
    ("transformer", dict(depth=6, d_model=32, heads=4, seq_len=32, vocab=64),
     4, "0-3[0-1],4-5[5]"),
])
def test_nested_schedule_is_bitwise_and_costs_what_the_model_says(name, sizes, batch, spec):
    cfg = model_config(name, **sizes)
    model, data = build_workload(cfg, batch)
    plain = cfg_loss_and_grads(cfg, model, data, seed=1)
    plain_m = measure_step(model, data, repeats=1, inference=False)
    strategy = apply_strategy(model, "nested:" + spec)
    # dropout: the same mask, replayed by every level
    nested = cfg_loss_and_grads(cfg, model, data, seed=1)
    assert torch.equal(plain[0], nested[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], nested[1]))
    measured = measure_step(model, data, repeats=1, inference=False)
    remove_strategy(model)
    # recompute FLOPs = the schedule's extra forwards, counted by the DP's model
    costs, _ = profile_chain(model, data)
    early = early_stop_flops(model, data)
    schedule = tree_schedule(parse_schedule(spec), 0, costs.n)
    extra = run_schedule(costs, schedule, early=early)[1] - sum(costs.flops)
    assert measured.backward_flops - plain_m.backward_flops == extra
    assert str(strategy) == "nested:" + spec


@pytest.mark.slow
def test_readme_mlp_below_single_level_floor_at_37_mib():
    # the README's MLP: one level cannot go below ~38.1 MiB (parameters and their
    # gradients are 32.1 MiB of it); a multi-level schedule fits 37 MiB
    cfg = model_config("mlp", depth=64, width=256, d_in=256)
    model, data = build_workload(cfg, 1024)
    costs, _ = profile_chain(model, data)
    plain = simulate(model, data, [])
    overhead = plain.peak_bytes - model_peak(costs, ("S",) * costs.n)[0]
    assert min_peak(costs) + overhead > 37 * MiB          # single level: no plan
    p = plan(model, data, 37 * MiB, objective="flops")
    assert p.tree and p.spec.startswith("nested:")
    ref = cfg_loss_and_grads(cfg, model, data)
    p.apply(model)
    got = cfg_loss_and_grads(cfg, model, data)
    assert torch.equal(ref[0], got[0]) and all(torch.equal(a, b) for a, b in zip(ref[1], got[1]))
    measured = measure_step(model, data, repeats=1, inference=False, flops=False)
    assert measured.peak_bytes == p.predicted_peak_bytes <= 37 * MiB
