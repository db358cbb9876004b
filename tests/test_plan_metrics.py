"""plan(metric="stored"): the cheapest placement whose bytes stored for backward fit,
optimal for the model (brute force), predicted = measured, never dearer than a fixed
strategy that fits; unknown metrics refused."""

import itertools
import random

import pytest
from helpers import random_chain

from memprop.checkpoint import apply_strategy, parse_strategy, remove_strategy
from memprop.checkpoint.planning.dp import TIE, segments_of
from memprop.checkpoint.planning.planner import plan
from memprop.checkpoint.planning.rotor import stored_fronts
from memprop.checkpoint.planning.searches import stored_model_bytes
from memprop.checkpoint.planning.simulate import simulate
from memprop.errors import ConfigError
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.workload import build_workload


def test_stored_front_equals_brute_force():
    rng = random.Random(3)
    for _ in range(100):
        chain = random_chain(rng)
        early = tuple(rng.randint(0, f) for f in chain.flops)
        front = stored_fronts(chain, early=early)
        brute = {}
        for labels in itertools.product("SCc", repeat=chain.n):
            if any(lab == "c" and (k == 0 or labels[k - 1] == "S")
                   for k, lab in enumerate(labels)):
                continue
            segs = segments_of(labels)
            stored = stored_model_bytes(chain, segs)
            cost = sum(chain.flops[k] for a, b in segs for k in range(a, b + 1))
            cost -= sum(early[b] for a, b in segs)
            cost += len(segs) * TIE            # the DP's tie-break per checkpoint
            brute[stored] = min(cost, brute.get(stored, float("inf")))
        for stored, cost, segs in front:
            assert stored_model_bytes(chain, segs) == stored
            assert cost == pytest.approx(min(c for s, c in brute.items() if s <= stored),
                                         abs=1e-9)
        assert front[0][0] == min(brute)


def test_stored_metric_plan_is_measured_exactly_and_beats_fixed_strategies():
    cfg = model_config("transformer", depth=6, d_model=32, heads=4, seq_len=32, vocab=64)
    model, data = build_workload(cfg, 8)
    plain = simulate(model, data, [])
    budget = int(plain.saved_bytes * 0.5)
    p = plan(model, data, budget, metric="stored", objective="flops")
    assert p.metric == "stored" and p.predicted_saved_bytes <= budget
    assert "bytes stored for backward" in p.describe()
    p.apply(model)
    measured = measure_step(model, data, repeats=1, inference=False)
    remove_strategy(model)
    assert measured.saved_bytes == p.predicted_saved_bytes
    assert measured.peak_bytes == p.predicted_peak_bytes
    for spec in ("full", "every:2", "segments:2", "sqrt", "blocks:0-2"):
        fixed = simulate(model, data, parse_strategy(spec).segments(6))
        if fixed.saved_bytes <= budget:
            assert p.recompute_flops <= fixed.backward_flops - plain.backward_flops, spec


def test_unknown_metric_is_refused():
    cfg = model_config("mlp", depth=2, width=8, d_in=8)
    model, data = build_workload(cfg, 4)
    with pytest.raises(ConfigError, match="choose one of: peak, stored"):
        plan(model, data, "1GiB", metric="bytes")


def test_apply_strategy_accepts_plan_specs_of_both_kinds():
    cfg = model_config("mlp", depth=6, width=16, d_in=16)
    model, data = build_workload(cfg, 8)
    assert apply_strategy(model, "nested:0-4[0-1]").spec == "nested:0-4[0-1]"
    remove_strategy(model)
