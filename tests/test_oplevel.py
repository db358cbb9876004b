"""Op-level checkpointing: policies per op call inside blocks, bitwise gradients, stored
bytes and recompute FLOPs derived from the traced ops, and the stored-bytes planner
choosing op-level policies."""

import pytest
import torch
from helpers import cfg_loss_and_grads

from memprop.checkpoint import apply_strategy, parse_strategy, remove_strategy
from memprop.checkpoint.forms.oplevel import Ops
from memprop.checkpoint.planning.planner import plan
from memprop.checkpoint.planning.profile import OpCall, block_options, trace_blocks
from memprop.checkpoint.planning.simulate import simulate
from memprop.errors import StrategyError
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.workload import build_workload

B, T, C = 4, 32, 32
TRANSFORMER = dict(depth=4, d_model=C, heads=4, seq_len=T, vocab=64)


def test_spec_round_trip_and_errors():
    assert parse_strategy("ops:addmm+sdpa") == Ops(every=frozenset({"addmm", "sdpa"}))
    s = parse_strategy("ops:0-1=sdpa+addmm#0,2-3")
    # NOTE [ Compact op-level specs ]: bare names first, then each op's call ranges
    assert s.spec == "ops:0-1=sdpa+addmm#0,2-3"
    assert s.groups(4) == {frozenset({"addmm#0", "sdpa"}): [(0, 0), (1, 1)],
                           frozenset(): [(2, 3)]}
    for bad in ("ops:0-1=a-b", "ops:3-1", "ops:0-2,1", "ops:0=x;y"):
        with pytest.raises(StrategyError):
            parse_strategy(bad)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("spec", ["ops:addmm+sdpa+bmm", "ops:0-1=addmm#0+addmm#2,2-3",
                                  "ops:addmm#2"])
def test_op_level_gradients_are_bitwise(spec, dropout):
    cfg = model_config("transformer", **TRANSFORMER, dropout=dropout)
    model, data = build_workload(cfg, B)
    ref = cfg_loss_and_grads(cfg, model, data)
    apply_strategy(model, spec)
    got = cfg_loss_and_grads(cfg, model, data)
    remove_strategy(model)
    assert torch.equal(ref[0], got[0])
    assert all(torch.equal(a, b) for a, b in zip(ref[1], got[1]))


def test_keeping_fc1_stores_input_plus_fc1_output_and_recomputes_the_rest():
    # block: ln1 -> qkv (addmm#0) -> sdpa -> proj (addmm#1) -> ln2 -> fc1 (addmm#2)
    # -> gelu -> fc2 (addmm#3). Keeping fc1's output (B·T·4C floats) and the block
    # input (B·T·C): stored per block = 5·B·T·C·4 bytes. Recompute: qkv, sdpa, proj
    # (fc2 is after the block's last saved tensor: never recomputed).
    cfg = model_config("transformer", **TRANSFORMER)
    model, data = build_workload(cfg, B)
    plain = measure_step(model, data, repeats=1, inference=False)
    full = simulate(model, data, [(k, k) for k in range(4)])
    apply_strategy(model, "ops:addmm#2")
    m = measure_step(model, data, repeats=1, inference=False)
    remove_strategy(model)
    assert m.saved_bytes - full.saved_bytes == 4 * (4 * B * T * C * 4)
    qkv, proj = 2 * B * T * C * 3 * C, 2 * B * T * C * C
    sdpa = 2 * (2 * B * T * T * C)                      # scores and output, full T×T
    # CPU attention counted as torch counts CUDA's (NOTE [ Attention FLOPs on CPU ])
    assert m.backward_flops - plain.backward_flops == 4 * (qkv + sdpa + proj)
    calls = trace_blocks(model, data)[0]
    keys = [c.key for c in calls if c.flops]
    assert keys == ["addmm#0", "sdpa#0", "addmm#1", "addmm#2", "addmm#3"]
    assert next(c for c in calls if c.key == "sdpa#0").flops == sdpa
    fc1 = next(c for c in calls if c.key == "addmm#2")
    assert fc1.out_bytes == 4 * B * T * C * 4 and fc1.flops == 2 * B * T * C * 4 * C


def test_block_options_by_hand():
    calls = [OpCall("addmm#0", 100, 10), OpCall("gelu#0", 100, 0),
             OpCall("addmm#1", 50, 20), OpCall("add#0", 0, 0), OpCall("addmm#2", 10, 5)]
    # the last 5 FLOPs (addmm#2) come after the block's last saved tensor
    options = {keys: (kept, flops) for keys, kept, flops in block_options(calls, early=5)}
    # keeping addmm#0 (100 B, 20 FLOPs left) is beaten by keeping addmm#1 (50 B, 10):
    # only the Pareto set remains
    assert options == {frozenset({"addmm#1"}): (50, 10.0),
                       frozenset({"addmm#0", "addmm#1"}): (150, 0.0)}


def test_stored_plan_uses_op_level_policies_and_is_exact():
    cfg = model_config("transformer", depth=4, d_model=64, heads=4, seq_len=64, vocab=64)
    model, data = build_workload(cfg, 4)
    plain = simulate(model, data, [])
    p = plan(model, data, int(plain.saved_bytes * 0.6), metric="stored", whole=False,
             objective="flops")
    assert p.spec.startswith("ops:") and "=" in p.spec
    # selective keeps every matmul and attention output; the plan stores less than it
    # or recomputes less than full checkpointing
    p.apply(model)
    m = measure_step(model, data, repeats=1, inference=False)
    remove_strategy(model)
    assert (m.saved_bytes, m.peak_bytes) == (p.predicted_saved_bytes, p.predicted_peak_bytes)
    assert m.backward_flops - plain.backward_flops == p.recompute_flops
    full = simulate(model, data, [(k, k) for k in range(4)])
    assert p.recompute_flops < full.backward_flops - plain.backward_flops


def test_peak_plan_uses_op_level_blocks_and_is_exact():
    """On the step peak too the planner weighs op-level blocks against segments: at 80 %
    of the plain peak it keeps matmul outputs and recomputes the rest, for fewer FLOPs
    than any block-level strategy that fits; predicted = measured, gradients bitwise."""
    cfg = model_config("transformer", depth=4, d_model=64, heads=4, seq_len=64, vocab=64)
    model, data = build_workload(cfg, 4)
    plain = simulate(model, data, [])
    budget = int(plain.peak_bytes * 0.8)
    p = plan(model, data, budget, objective="flops")
    assert p.spec.startswith("ops:") and p.predicted_peak_bytes <= budget
    for spec in ("full", "every:2", "sqrt", "segments:2"):
        fixed = simulate(model, data, parse_strategy(spec).segments(4))
        if fixed.peak_bytes <= budget:
            assert p.recompute_flops <= fixed.backward_flops - plain.backward_flops, spec
    ref = cfg_loss_and_grads(cfg, model, data)
    p.apply(model)
    got = cfg_loss_and_grads(cfg, model, data)
    m = measure_step(model, data, repeats=1, inference=False)
    remove_strategy(model)
    assert (m.peak_bytes, m.saved_bytes) == (p.predicted_peak_bytes, p.predicted_saved_bytes)
    assert m.backward_flops - plain.backward_flops == p.recompute_flops
    assert torch.equal(ref[0], got[0]) and all(map(torch.equal, ref[1], got[1]))


@pytest.mark.parametrize("spec", ["ops:adm", "ops:0-1=adm#0", "forward:adm", "remat:adm"])
def test_an_op_key_naming_no_aten_op_is_refused_when_parsed(spec):
    # a typo kept nothing in every block, silently (ops:) or at the first step only
    with pytest.raises(StrategyError, match=r"names \['adm'\], no aten op; .*did you mean "
                                            r"'addmm'\?"):
        parse_strategy(spec)
