"""forward:KEYS, one checkpoint around the whole forward (memprop.checkpoint.forms.whole):
spec forms, the knapsack front against brute force, predicted stored bytes and
recompute FLOPs = simulated = measured, gradients bitwise (dropout included), and the
stored-bytes planner choosing it where it is cheaper."""

import itertools
import random

import pytest
import torch
from helpers import InPlaceChain, cfg_loss_and_grads, square_loss
from torch import nn

from memprop.checkpoint import (
    Forward,
    Remat,
    applied_strategy,
    apply_strategy,
    parse_strategy,
    remove_strategy,
)
from memprop.checkpoint.forms.opkeys import canonical_keys
from memprop.checkpoint.planning.fronts import forward_front
from memprop.checkpoint.planning.planner import plan
from memprop.checkpoint.planning.profile import OpCall, stop_flops, trace_blocks
from memprop.checkpoint.planning.simulate import simulate as simulate_strategy
from memprop.errors import StrategyError
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.workload import build_workload

B = 4
TRANSFORMER = dict(depth=3, d_model=32, heads=4, seq_len=16, vocab=64)


def test_spec_forms():
    s = parse_strategy("forward:addmm#3+addmm#0-2+sdpa+mm#5")
    assert s == Forward(frozenset({"addmm#3", "addmm#0-2", "sdpa", "mm#5"}))
    assert s.spec == "forward:sdpa+addmm#0-3+mm#5"
    assert parse_strategy(s.spec).spec == s.spec
    assert parse_strategy("forward:-") == Forward() and Forward().spec == "forward:-"
    assert "+".join(canonical_keys({"bmm#1", "bmm#3", "bmm#2", "bmm#7"})) == "bmm#1-3+bmm#7"
    for bad in ("forward:a-b", "forward:addmm#x", "forward:addmm#1-"):
        with pytest.raises(StrategyError, match="forward:"):
            parse_strategy(bad)


def test_front_equals_brute_force():
    rng = random.Random(5)
    for _ in range(30):
        calls = [OpCall(f"op#{i}", rng.choice([0, 8, 16, 24, 40]), rng.choice([0, 3, 5, 9]))
                 for i in range(rng.randint(1, 9))]
        early = rng.choice([0.0, float(calls[-1].flops)])
        front = forward_front(calls, early=early)
        total = sum(c.flops for c in calls)
        starts = list(itertools.accumulate((c.flops for c in calls), initial=0))
        needed = [c for c, s in zip(calls, starts) if c.flops and s < total - early]
        best: dict = {}
        for r in range(len(needed) + 1):
            for subset in itertools.combinations(needed, r):
                kept = sum(c.out_bytes for c in subset)
                cost = sum(c.flops for c in needed) - sum(c.flops for c in subset)
                best[kept] = min(cost, best.get(kept, float("inf")))
        for kept, cost, keys in front:
            chosen = [c for c in needed if c.key in keys]
            assert sum(c.out_bytes for c in chosen) == kept
            assert sum(c.flops for c in needed if c.key not in keys) == cost
            assert cost == min(v for k, v in best.items() if k <= kept)
        # every budget gets the cheapest cost brute force finds within it
        for budget in best:
            fits = [cost for kept, cost, _ in front if kept <= budget]
            assert min(fits) == min(v for k, v in best.items() if k <= budget)


@pytest.mark.parametrize("name,sizes", [
    ("transformer", dict(TRANSFORMER, dropout=0.1)),
    ("hf:gpt2", dict(n_layer=2, n_embd=32, n_head=4, seq_len=16, use_cache=False)),
])
def test_prediction_equals_measurement_and_gradients_are_bitwise(name, sizes):
    pytest.importorskip("transformers") if name.startswith("hf:") else None
    cfg = model_config(name, **sizes)
    model, data = build_workload(cfg, B)
    calls = trace_blocks(model, data, loss_fn=cfg.loss, whole=True)[0]
    early = stop_flops(model, data, loss_fn=cfg.loss, whole=True)[0][0]
    front = forward_front(calls, early=early)
    assert front[0][0] == 0 and front[-1][1] == 0            # nothing kept .. all kept
    plain = measure_step(model, data, loss_fn=cfg.loss, repeats=1, inference=False,
                         timing=False)
    base = simulate_strategy(model, data, Forward(), loss_fn=cfg.loss).saved_bytes
    ref = cfg_loss_and_grads(cfg, model, data)
    for kept, cost, keys in (front[0], front[len(front) // 2], front[-1]):
        strategy = Forward(keys)
        predicted = simulate_strategy(model, data, strategy, loss_fn=cfg.loss)
        apply_strategy(model, strategy.spec)
        try:
            m = measure_step(model, data, loss_fn=cfg.loss, repeats=1, inference=False,
                             timing=False)
            got = cfg_loss_and_grads(cfg, model, data)
        finally:
            remove_strategy(model)
        assert m.saved_bytes == predicted.saved_bytes == base + kept
        assert m.peak_bytes == predicted.peak_bytes
        assert m.backward_flops - plain.backward_flops == cost
        assert torch.equal(ref[0], got[0])
        assert all(torch.equal(a, b) for a, b in zip(ref[1], got[1]))
    # nothing kept stores only what the loss and the batch need: less than `full`
    full = simulate_strategy(model, data, parse_strategy("full"), loss_fn=cfg.loss)
    assert base < full.saved_bytes


def test_any_module_apply_and_remove():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    ref = model(x).square().sum()
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    Forward(frozenset({"addmm#0"})).apply(model)
    assert applied_strategy(model).spec == "forward:addmm#0"
    with pytest.raises(StrategyError, match="already has"):
        Forward().apply(model)
    out = model(x).square().sum()
    out.backward()
    assert torch.equal(out, ref)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), ref_grads))
    remove_strategy(model)
    assert "forward" not in model.__dict__ and applied_strategy(model) is None


def test_stored_planner_takes_the_whole_forward_where_it_is_cheaper():
    cfg = model_config("transformer", **TRANSFORMER)
    model, data = build_workload(cfg, B)
    plain = simulate_strategy(model, data, parse_strategy("none"))
    budget = plain.saved_bytes // 2
    p = plan(model, data, budget, metric="stored", objective="flops")
    assert p.predicted_saved_bytes <= budget
    # at equal FLOPs remat:KEYS (the same kept outputs, rebuilt one at a time: a lower
    # peak) is taken over forward:KEYS (tests/test_remat.py)
    assert isinstance(p.strategy, (Forward, Remat))
    assert "whole forward" in p.describe() or "rebuilt on its own" in p.describe()
    # no placement on the chain storing as little is as cheap
    chain = plan(model, data, budget, metric="stored", whole=False, objective="flops")
    assert not isinstance(chain.strategy, (Forward, Remat))
    assert chain.recompute_flops > p.recompute_flops
    apply_strategy(model, p.strategy)
    try:
        m = measure_step(model, data, repeats=1, inference=False, timing=False)
    finally:
        remove_strategy(model)
    assert m.saved_bytes == p.predicted_saved_bytes and m.peak_bytes == p.predicted_peak_bytes
    # the smallest feasible stored bytes: the whole forward with nothing kept
    lowest = simulate_strategy(model, data, Forward()).saved_bytes
    assert plan(model, data, lowest, metric="stored",
                objective="flops").predicted_saved_bytes == lowest


def test_outputs_changed_in_place_are_never_kept():
    # a selective-checkpoint cache refuses a tensor mutated after caching (torch raises
    # in backward): such calls are recomputed, never offered as kept
    model, x = InPlaceChain(), torch.randn(8, 16)
    calls = trace_blocks(model, x, loss_fn=square_loss, whole=True)[0]
    assert all(c.mutated for c in calls if c.flops)
    front = forward_front(calls)
    assert [keys for _, _, keys in front] == [frozenset()]
    plain = simulate_strategy(model, x, parse_strategy("none"), loss_fn=square_loss)
    for fraction in (0.8, 0.5):
        p = plan(model, x, int(plain.saved_bytes * fraction), metric="stored",
                 loss_fn=square_loss)
        apply_strategy(model, p.strategy)
        try:
            square_loss(model, x).backward()           # runs: nothing mutated is cached
        finally:
            remove_strategy(model)


def test_a_loss_calling_the_model_twice_gets_no_whole_forward_plan():
    model, x = InPlaceChain(), torch.randn(8, 16)

    def twice(m, batch):
        with torch.no_grad():
            m(batch)                                    # not traced: no checkpoint runs
        return (m(batch) - m(batch.flip(0))).square().sum()

    with pytest.raises(StrategyError, match="2 times"):
        trace_blocks(model, x, loss_fn=twice, whole=True)
    plain = simulate_strategy(model, x, parse_strategy("none"), loss_fn=twice)
    p = plan(model, x, int(plain.saved_bytes * 0.6), metric="stored", loss_fn=twice)
    assert not isinstance(p.strategy, Forward)


def test_no_plan_fits_raises_budget_error_either_way():
    from memprop.errors import BudgetError
    cfg = model_config("transformer", **TRANSFORMER)
    model, data = build_workload(cfg, B)
    for whole, reached_by in ((True, "forward:-"), (False, "blocks:")):
        with pytest.raises(BudgetError, match=f"smallest feasible.*with {reached_by}"):
            plan(model, data, 1, metric="stored", whole=whole)


def test_call_ranges_in_op_keys():
    assert parse_strategy("ops:addmm#0-1").spec == "ops:addmm#0-1"
    assert parse_strategy("ops:0-1=addmm#0-2,2-3").spec == "ops:0-1=addmm#0-2,2-3"
    for bad in ("forward:addmm#5-2", "ops:addmm#3-1"):
        with pytest.raises(StrategyError, match="run backwards"):
            parse_strategy(bad)
    cfg = model_config("transformer", **TRANSFORMER)
    model, data = build_workload(cfg, B)
    same = [simulate_strategy(model, data, parse_strategy(spec)).saved_bytes
            for spec in ("ops:addmm#0-2", "ops:addmm#0+addmm#1+addmm#2")]
    assert same[0] == same[1]


class _NoChain(nn.Module):
    """Layers of different kinds: no chain of blocks to find."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        return self.fc(torch.tanh(self.norm(self.conv(x))).flatten(1))


def test_stored_plan_for_a_model_without_a_chain():
    model, x = _NoChain(), torch.randn(6, 4, 16)
    loss_fn = lambda m, batch: m(batch).square().mean()         # noqa: E731
    with pytest.raises(StrategyError, match="cannot find the block chain"):
        plan(model, x, 10**6, loss_fn=loss_fn, whole=False)      # the chain's plans need one
    plain = simulate_strategy(model, x, parse_strategy("none"), loss_fn=loss_fn)
    p = plan(model, x, plain.saved_bytes // 2, metric="stored", loss_fn=loss_fn)
    assert isinstance(p.strategy, (Forward, Remat)) and p.n_blocks == 0
    assert p.predicted_saved_bytes <= plain.saved_bytes // 2
    ref = [g.clone() for g in torch.autograd.grad(loss_fn(model, x), model.parameters())]
    apply_strategy(model, p.strategy)
    try:
        m = measure_step(model, x, loss_fn=loss_fn, repeats=1, inference=False, timing=False)
        got = torch.autograd.grad(loss_fn(model, x), model.parameters())
    finally:
        remove_strategy(model)
    assert m.saved_bytes == p.predicted_saved_bytes
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


@pytest.mark.parametrize("spec,named", [("forward:addmm#99", "addmm#99"),
                                        ("forward:linear", "linear"),
                                        ("ops:addmm#9", "addmm#9")])
def test_keys_naming_calls_the_forward_does_not_make_are_refused(spec, named):
    cfg = model_config("transformer", **TRANSFORMER)
    model, data = build_workload(cfg, B)
    apply_strategy(model, spec)
    try:
        with pytest.raises(StrategyError, match=f"{named}.*addmm#0-"):
            cfg.loss(model, data)
    finally:
        remove_strategy(model)
