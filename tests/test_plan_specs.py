"""Readable plans (issue 21, item 4): op-level specs written compactly that parse back to
the same strategy (NOTE [ Compact op-level specs ], memprop.checkpoint.forms.oplevel), long
specs shortened where people read them and whole where they copy them, and
``plan --amp``."""

import json

import pandas as pd
import pytest
import torch

from memprop.checkpoint import apply_strategy, parse_strategy, remove_strategy
from memprop.checkpoint.forms.opkeys import canonical_keys
from memprop.checkpoint.forms.oplevel import Ops
from memprop.checkpoint.planning.planner import plan, short_spec
from memprop.cli import main
from memprop.cli._common import render_table
from memprop.cli.plan_cmd import apply_line, shown_table
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.workload import build_workload

FIVE = frozenset(f"mm#{i}" for i in range(5))      # a 7B llama block: q, k, v, o, gate
FOUR = frozenset(f"mm#{i}" for i in range(4))


def seven_b_plan() -> Ops:
    """The placement the planner builds for a 32-block chain: one part per keyed block
    (23 blocks keeping mm#0-4, 5 keeping mm#0-3), then a plain segment and a block
    stored (not in the spec)."""
    return Ops(tuple((k, k, FIVE) for k in range(23)) + tuple((k, k, FOUR) for k in range(
        23, 28)) + ((28, 30, frozenset()),))


def test_compact_spec_of_a_7b_plan_round_trips():
    ops = seven_b_plan()
    assert ops.spec == "ops:0-22=mm#0-4,23-27=mm#0-3,28-30"
    assert parse_strategy(ops.spec) == ops
    # the long form of before still parses, to the same strategy
    long = "ops:" + ",".join([f"{k}=mm#0+mm#1+mm#2+mm#3+mm#4" for k in range(23)]
                             + [f"{k}=mm#0+mm#1+mm#2+mm#3" for k in range(23, 28)]
                             + ["28-30"])
    assert len(long) == 758 and parse_strategy(long) == ops
    assert parse_strategy(long).spec == ops.spec
    # each keyed block is still its own checkpoint: 28 of them, and one plain segment
    assert ops.segments(32) == [(k, k) for k in range(28)] + [(28, 30)]
    # held in the shortest keys: one value however the keys were spelled
    five, four = frozenset({"mm#0-4"}), frozenset({"mm#0-3"})
    assert ops.parts == ((0, 22, five), (23, 27, four), (28, 30, frozenset()))
    assert ops.groups(32) == {five: [(k, k) for k in range(23)],
                              four: [(k, k) for k in range(23, 28)],
                              frozenset(): [(28, 30)]}


def test_what_merges_and_what_does_not():
    # keyed blocks merge only when next to each other with equal keys
    assert Ops(((0, 0, FIVE), (2, 2, FIVE))).spec == "ops:0=mm#0-4,2=mm#0-4"
    assert Ops(((0, 0, FIVE), (1, 1, FOUR), (2, 2, FIVE))).spec == (
        "ops:0=mm#0-4,1=mm#0-3,2=mm#0-4")
    # plain segments never merge: 0-1,2-3 is two recomputes, 0-3 one
    assert parse_strategy("ops:0-1,2-3").spec == "ops:0-1,2-3"
    assert parse_strategy("ops:0-1,2-3") != parse_strategy("ops:0-3")
    # a keyed range next to a plain segment stays apart
    assert parse_strategy("ops:0-1=sdpa,2-3").spec == "ops:0-1=sdpa,2-3"
    # one value per strategy, whichever way it was spelled
    assert parse_strategy("ops:0=sdpa,1=sdpa#0+sdpa") == parse_strategy("ops:0-1=sdpa")
    assert parse_strategy("ops:mm#0+mm#1+mm#2+mm#4") == parse_strategy("ops:mm#0-2+mm#4")
    assert parse_strategy("ops:mm#0+mm#1+mm#2+mm#4").spec == "ops:mm#0-2+mm#4"


def test_canonical_keys_by_hand():
    assert canonical_keys({"mm#0", "mm#1", "mm#2", "mm#4", "sdpa", "addmm#3", "addmm"}) == (
        "addmm", "sdpa", "mm#0-2", "mm#4")
    assert canonical_keys({"mm#3-5", "mm#0-1", "mm#2"}) == ("mm#0-5",)
    assert canonical_keys({"bmm#10", "bmm#9", "bmm#2"}) == ("bmm#2", "bmm#9-10")
    assert canonical_keys(()) == ()


def test_compact_and_long_forms_train_bitwise_alike():
    cfg = model_config("transformer", depth=4, d_model=32, heads=4, seq_len=16, vocab=64)
    model, data = build_workload(cfg, 4)

    def grads(spec):
        apply_strategy(model, spec)
        model.zero_grad(set_to_none=True)
        try:
            cfg.loss(model, data).backward()
        finally:
            remove_strategy(model)
        return [p.grad.clone() for p in model.parameters()]
    compact = grads("ops:0-2=addmm#0-1+sdpa,3")
    long = grads("ops:0=addmm#0+addmm#1+sdpa,1=addmm#0+addmm#1+sdpa,2=addmm#1+sdpa+addmm#0,3")
    assert all(torch.equal(a, b) for a, b in zip(compact, long))


def test_short_spec_cuts_at_a_separator_and_counts_what_it_left_out():
    spec = "ops:0-22=mm#0-4+sdpa,23-27=mm#0-3,28=mm#0-2,29=mm#1+mm#3,30-31"  # 62 chars
    assert short_spec(spec) == spec
    longer = spec + ",32=mm#0"                                              # 70 chars
    # the last separator within 64 characters is the comma after 30-31 (index 62)
    assert short_spec(longer) == spec + ",...(+7 chars)"
    assert short_spec("remat:addmm#0-4+addmm#6-7+bmm#1+mm#0", 20) == (
        "remat:addmm#0-4+...(+20 chars)")
    # no separator after the form's name: a plain cut
    assert short_spec("forward:" + "x" * 80, 20) == "forward:xxxxxxxxxxxx...(+68 chars)"


def test_table_column_fits_its_content_and_apply_line_has_the_whole_spec_once():
    spec = "ops:" + ",".join(f"{k}=mm#0-4+sdpa" for k in range(0, 60, 2))   # 448 chars
    table = pd.DataFrame(dict(strategy=["none", "full", f"plan: {spec}"],
                              peak_bytes=[3 << 30, 1 << 30, 2 << 30]))
    shown = shown_table(table)
    assert list(shown.strategy) == ["none", "full", f"plan: {short_spec(spec)}"]
    assert table.strategy[2] == f"plan: {spec}"          # the data keeps it whole
    assert short_spec(spec) == ("ops:0=mm#0-4+sdpa,2=mm#0-4+sdpa,4=mm#0-4+sdpa,6=mm#0-4+sdpa,"
                                "...(+388 chars)")
    # indent 2 + "plan: " 6 + the 75-character short spec + 1 + "peak_bytes" 10
    lines = render_table(shown).splitlines()
    assert max(len(line) for line in lines) == 2 + 6 + 75 + 1 + 10
    line = apply_line(spec, "bf16")
    assert line.count(spec) == 1 and line.startswith(
        f"apply it: memprop profile --strategy '{spec}' --amp bf16 ...\n")
    assert "448-character spec" in line
    assert apply_line("blocks:0-3") == ("apply it: memprop profile --strategy blocks:0-3 ...  "
                                        "or in Python: apply_strategy(model, 'blocks:0-3')")


TRANSFORMER = dict(depth=4, d_model=32, heads=4, seq_len=32, vocab=64)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_plan_predicts_the_autocast_step_exactly(amp):
    cfg = model_config("transformer", **TRANSFORMER)
    model, data = build_workload(cfg, 8)
    plain = measure_step(model, data, repeats=1, inference=False, amp=amp)
    full_precision = measure_step(model, data, repeats=1, inference=False)
    assert plain.peak_bytes < full_precision.peak_bytes      # half-precision activations
    budget = int(plain.peak_bytes * 0.8)
    p = plan(model, data, budget, loss_fn=cfg.loss, amp=amp)
    assert p.none_peak_bytes == plain.peak_bytes and p.predicted_peak_bytes <= budget
    p.apply(model)
    measured = measure_step(model, data, repeats=1, inference=False, amp=amp)
    remove_strategy(model)
    assert measured.peak_bytes == p.predicted_peak_bytes
    assert measured.saved_bytes == p.predicted_saved_bytes


def test_amp_is_refused_by_name():
    from memprop.errors import ConfigError
    cfg = model_config("transformer", **TRANSFORMER)
    model, data = build_workload(cfg, 2)
    with pytest.raises(ConfigError, match="amp 'bf8' is not allowed; choose one of: bf16, fp16"):
        plan(model, data, "1GiB", amp="bf8")


def test_plan_cli_amp(capsys):
    args = ["plan", "--model", "transformer", *(f"--set={k}={v}" for k, v in TRANSFORMER.items()),
            "--batch", "8", "--budget", "1GiB"]
    assert main([*args, "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main([*args, "--amp", "bf16", "--json"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert full["amp"] is None and half["amp"] == "bf16"
    cfg = model_config("transformer", **TRANSFORMER)
    model, data = build_workload(cfg, 8)
    measured = measure_step(model, data, repeats=1, inference=False, amp="bf16")
    assert half["plan"]["predicted_peak_bytes"] == measured.peak_bytes
    assert half["strategies"][0]["peak_bytes"] == measured.peak_bytes
    assert half["plan"]["predicted_peak_bytes"] < full["plan"]["predicted_peak_bytes"]
    assert main([*args, "--amp", "bf16"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("transformer (")
    assert ", float32 (autocast bf16), 4 blocks;" in out
