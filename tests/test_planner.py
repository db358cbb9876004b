"""The planner: its DP is optimal for the cost model (against brute force), its
predicted peak matches the measured one, and impossible budgets say what is feasible."""

import random

import pytest
import torch
from helpers import random_chain
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from memprop.checkpoint import apply_strategy, parse_strategy, remove_strategy
from memprop.checkpoint.planning.dp import TIE, ChainCosts, brute_force, min_peak, model_peak, solve
from memprop.checkpoint.planning.planner import plan
from memprop.checkpoint.planning.simulate import simulate
from memprop.errors import BudgetError
from memprop.measure import DataDependentStepError, measure_step
from memprop.models import model_config
from memprop.workload import build_workload


def test_dp_cost_equals_brute_force_on_random_chains():
    rng = random.Random(0)
    compared = 0
    for _ in range(150):
        chain = random_chain(rng)
        everything = model_peak(chain, ("S",) * chain.n)[0]
        lowest = min_peak(chain)
        for budget in (lowest - 1, lowest, (lowest + everything) // 2, everything):
            dp, brute = solve(chain, budget), brute_force(chain, budget)
            assert (dp is None) == (brute is None), (chain, budget)
            if dp is not None:
                # same optimal cost (costs carry TIE per checkpoint, summed in other orders)
                assert dp[0] == pytest.approx(brute[0], abs=1e-9), (chain, budget)
                peak, cost = model_peak(chain, dp[1])
                assert cost == pytest.approx(dp[0], abs=1e-9) and peak <= budget
                compared += 1
    assert compared > 300


def test_dp_with_op_level_options_equals_brute_force():
    """Op-level alternatives (keys, kept bytes, recompute FLOPs) per block: the DP stays
    optimal for the model, and uses them where they pay."""
    rng = random.Random(1)
    compared = used = 0
    for _ in range(120):
        chain = random_chain(rng)
        if chain.n > 5:
            continue
        options = [[(frozenset({f"op{i}"}), rng.randint(0, 40), rng.randint(0, 15))
                    for i in range(rng.randint(0, 2))] for _ in range(chain.n)]
        everything = model_peak(chain, ("S",) * chain.n)[0]
        lowest = min_peak(chain)
        for budget in (lowest - 1, lowest, (lowest + everything) // 2, everything):
            dp, brute = solve(chain, budget, options), brute_force(chain, budget, options)
            assert (dp is None) == (brute is None), (chain, options, budget)
            if dp is not None:
                # costs carry TIE (a FLOP per checkpoint),
                # summed in different orders
                assert dp[0] == pytest.approx(brute[0], abs=1e-9), (chain, options, budget)
                peak, cost = model_peak(chain, dp[1], options)
                assert cost == pytest.approx(dp[0], abs=1e-9) and peak <= budget
                used += any(label not in ("S", "C", "c") for label in dp[1])
                compared += 1
    assert compared > 150 and used > 10


def test_relu_chain_sharing_makes_per_block_checkpointing_pointless():
    # Linear+ReLU blocks: each saves its input and its output, and the output is the
    # next input. Storing every block keeps t[0..6] = 70. Checkpointing every block keeps
    # t[0..5] = 60, but recomputing the last block brings t[6] back: the peak is 70
    # again, for 6 recomputed blocks. Two segments of three keep t0, t3 (20) and hold at
    # most 20 + t4 + t5 + t6 = 50 while the second is recomputed.
    n = 6
    chain = ChainCosts(t=(10,) * (n + 1), inner=(0,) * n, saves_in=(True,) * n,
                       saves_out=(True,) * n, keep=(True,) + (False,) * n, flops=(1.0,) * n)
    flops = lambda blocks, checkpoints: pytest.approx(blocks + checkpoints * TIE)  # noqa: E731
    assert model_peak(chain, ("S",) * n) == (70, 0.0)
    assert model_peak(chain, ("C",) * n) == (70, flops(6, 6))
    assert model_peak(chain, ("C", "c", "c", "C", "c", "c")) == (50, flops(6, 2))
    # cheapest at 50: store block 0, recompute blocks 1-3 once, store 4-5 (3 blocks)
    assert solve(chain, 50) == (flops(3, 1), ("S", "C", "c", "c", "S", "S"))


WORKLOADS = [
    ("transformer", dict(depth=6, d_model=32, heads=4, seq_len=32, vocab=64), 8),
    ("convnet", dict(depth=6, channels=8, image_size=16), 8),
    ("mlp", dict(depth=12, width=64, d_in=64, phi="gelu"), 512),
]


@pytest.mark.parametrize("name,sizes,batch", WORKLOADS)
@pytest.mark.parametrize("fraction", [0.85, 0.65])
def test_predicted_peak_matches_measured_peak_and_fits(name, sizes, batch, fraction):
    cfg = model_config(name, **sizes)
    model, data = build_workload(cfg, batch)
    plain = measure_step(model, data, repeats=1, inference=False)
    budget = int(plain.peak_bytes * fraction)
    # the chain's plans (the default also weighs remat:KEYS: tests/test_remat.py)
    p = plan(model, data, budget, whole=False)
    assert p.predicted_peak_bytes <= budget and p.segments
    assert p.none_peak_bytes == plain.peak_bytes
    real, real_data = build_workload(cfg, batch)
    p.apply(real)
    measured = measure_step(real, real_data, repeats=1, inference=False)
    # the prediction is a fake-tensor simulation of the same step: within 2 %, and in
    # fact equal to the byte on CPU
    assert abs(p.predicted_peak_bytes - measured.peak_bytes) <= 0.02 * measured.peak_bytes
    assert p.predicted_peak_bytes == measured.peak_bytes
    assert p.recompute_flops == measured.backward_flops - plain.backward_flops


def test_impossible_budget_states_smallest_feasible_and_that_one_fits():
    cfg = model_config("transformer", depth=4, d_model=32, heads=4, seq_len=32, vocab=64)
    model, data = build_workload(cfg, 8)
    with pytest.raises(BudgetError) as info:
        plan(model, data, 1000)
    smallest = info.value.smallest_feasible_bytes
    assert "the smallest feasible budget found is about" in str(info.value)
    assert f"({smallest} bytes, with remat:" in str(info.value)   # below full's 1101832
    p = plan(model, data, smallest)
    assert p.predicted_peak_bytes <= smallest
    # the error carries the plan that reached it: no second search needed to apply one
    carried = info.value.plan
    assert carried.spec.startswith("remat:")
    assert carried.predicted_peak_bytes == carried.budget_bytes == smallest
    carried.apply(model)
    try:
        measured = measure_step(model, data, repeats=1, timing=False, inference=False)
    finally:
        remove_strategy(model)
    assert measured.peak_bytes == smallest
    # the same for the bytes stored for backward
    with pytest.raises(BudgetError) as info:
        plan(model, data, 1000, metric="stored")
    smallest, carried = info.value.smallest_feasible_bytes, info.value.plan
    assert carried.predicted_saved_bytes == carried.budget_bytes == smallest


def test_generous_budget_recomputes_nothing():
    cfg = model_config("transformer", depth=3, d_model=16, heads=2, seq_len=16, vocab=32)
    model, data = build_workload(cfg, 4)
    p = plan(model, data, "1GiB")
    assert p.segments == [] and p.recompute_flops == 0 and p.spec == "none"


def test_planner_never_pays_more_than_a_fixed_strategy_that_fits():
    cfg = model_config("transformer", depth=8, d_model=32, heads=4, seq_len=32, vocab=64)
    model, data = build_workload(cfg, 8)
    plain = simulate(model, data, [])
    budget = int(plain.peak_bytes * 0.7)
    p = plan(model, data, budget, objective="flops")
    blocks = list(range(8))
    for spec in ("full", "every:2", "segments:2", "segments:4", "sqrt", "blocks:0-3"):
        segments = parse_strategy(spec).segments(len(blocks))
        fixed = simulate(model, data, segments)
        if fixed.peak_bytes <= budget:
            assert p.recompute_flops <= fixed.backward_flops - plain.backward_flops, spec


def test_budget_strategy_string_applies_the_plan():
    cfg = model_config("convnet", depth=4, channels=8, image_size=16)
    model, data = build_workload(cfg, 8)
    plain = simulate(model, data, [])
    budget = int(plain.peak_bytes * 0.8)
    strategy = apply_strategy(model, f"budget:{budget}", example_batch=data)
    m = measure_step(model, data, repeats=1, inference=False)
    assert m.peak_bytes <= budget
    assert str(strategy).startswith("budget:")


class _ReadsAValue(torch.nn.Module):
    """A block whose forward reads a tensor's value (ibert's quantisation does, with
    ``.item()``): fake tensors have none."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        return y * 2 if y.abs().max().item() > 1 else y


def test_a_forward_that_reads_values_gets_a_one_line_refusal_from_plan():
    model = torch.nn.Sequential(_ReadsAValue(), _ReadsAValue(), _ReadsAValue())
    x = torch.randn(4, 8)
    with pytest.raises(DataDependentStepError, match=r"plan\(\) profiles the model on fake "
                       r"tensors; choose a strategy by hand") as caught:
        plan(model, x, 1000, loss_fn=lambda m, b: m(b).sum())
    assert "\n" not in str(caught.value) and "_local_scalar_dense" in str(caught.value)
    # nothing of the failed trace stays on torch's dispatch-mode stack (it did: every
    # later step in the process ran under its FLOP counter and op trace)
    assert _get_current_dispatch_mode_stack() == []


def test_a_profile_keeps_nothing_of_its_trace_alive():
    """The traced forward's graph held its saved tensors, each saved output its own node
    (a cycle through autograd that Python's collector cannot see): every plan() kept
    its trace alive (about 17,000 objects on a tiny Mistral). After a profile, nothing
    of it remains."""
    import gc

    from memprop.checkpoint.planning.profile import OpTrace, profile

    def traces() -> int:
        gc.collect()
        return sum(isinstance(o, OpTrace) for o in gc.get_objects())

    cfg = model_config("transformer", depth=2, d_model=32, seq_len=8, vocab=50)
    model, data = build_workload(cfg, 2)
    before = traces()
    prof = profile(model, data, loss_fn=cfg.loss)
    assert prof.block_calls and traces() == before


def test_a_larger_budget_never_needs_more_recompute_on_the_chain():
    """The chain's placement tightens its model budget by each simulated overshoot; on
    tiny Mistral at 24 MiB small overshoots used up its rounds and the plan fell back to
    three whole blocks, where at 23.8 MiB an ops: placement of fewer FLOPs fit. After
    the rounds by the overshoot it at least doubles the tightening, so a larger budget
    finds a plan at least as cheap."""
    pytest.importorskip("transformers")
    cfg = model_config("hf:mistral", num_hidden_layers=4, hidden_size=128, seq_len=128)
    torch.manual_seed(0)
    model, data = build_workload(cfg, 8)
    smaller, larger = (plan(model, data, budget, loss_fn=cfg.loss, whole=False,
                            objective="flops") for budget in (24_959_832, 24 * 2**20))
    assert larger.predicted_peak_bytes <= 24 * 2**20
    assert larger.recompute_flops <= smaller.recompute_flops, (larger.spec, smaller.spec)
