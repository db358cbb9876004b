"""Per-rank planning, ``memprop fit`` and the closed forms beside them (issue 22, items
4 and 5). Every memprop figure here is a fake-process-group prediction; each test checks
it against an independent ``memprop.sharded.predict`` call, or against numbers derived by
hand (the closed forms)."""

import json

import pandas as pd
import pytest

import memprop
from memprop.cli import main
from memprop.errors import ConfigError
from memprop.sharded import FSDPConfig, predict
from memprop.sharded.closed_forms import (
    closed_forms,
    megatron_activation_bytes,
    transformer_dims,
    zero_model_state_bytes,
)
from memprop.sharded.fit import largest_batch
from memprop.sharded.plan import plan_rank

# 2 blocks, 1.7 MB per rank of state under Adam: each prediction well under a second
TINY = memprop.model_config("transformer", depth=2, d_model=64, heads=2, seq_len=32,
                            vocab=256)
TWO = FSDPConfig(world_size=2)
TINY_SETS = [a for kv in TINY.fields().items() for a in ("--set", f"{kv[0]}={kv[1]}")]


def test_zero_model_states_by_hand():
    # Psi = 1000 / tp 2 = 500 parameters per TP rank, N = 4 shards, 2 + 2 + 12 bytes each
    kw = dict(params=1000, shards=4, tp=2)
    assert zero_model_state_bytes(stage=0, **kw) == 16 * 500                  # 8000
    assert zero_model_state_bytes(stage=1, **kw) == 2 * 500 + 2 * 500 + 12 * 500 // 4
    assert zero_model_state_bytes(stage=2, **kw) == 2 * 500 + 14 * 500 // 4   # 2750
    assert zero_model_state_bytes(stage=3, **kw) == 16 * 500 // 4             # 2000
    # this run's bytes: bf16 parameters and gradients, Adam's two bf16 moments: 8 B each
    assert zero_model_state_bytes(stage=3, param_bytes=2, grad_bytes=2, optimizer_bytes=4,
                                  **kw) == 8 * 500 // 4
    with pytest.raises(ConfigError, match="ZeRO stage 4"):
        zero_model_state_bytes(stage=4, **kw)


def test_megatron_activations_by_hand():
    # s = 4, b = 2, h = 8, a = 2: s*b*h = 64, 5*a*s/h = 5; three layers
    kw = dict(seq_len=4, batch=2, hidden=8, heads=2, layers=3)
    assert megatron_activation_bytes(**kw) == 3 * 64 * (34 + 5)                      # 7488
    # TP 2 without sequence parallelism: 10 + 24/2 + 5/2 = 24.5
    assert megatron_activation_bytes(tp=2, **kw) == 3 * 64 * 24.5                   # 4704
    assert megatron_activation_bytes(tp=2, sequence_parallel=True, **kw) == 3 * 64 * 39 / 2
    assert megatron_activation_bytes(recompute="full", **kw) == 3 * 2 * 64           # 384
    # fused attention stores no s x s scores: 34 s b h per layer; with TP 10 + 24/t
    assert megatron_activation_bytes(attention_scores=False, **kw) == 3 * 64 * 34    # 6528
    assert megatron_activation_bytes(attention_scores=False, tp=2, **kw) == 3 * 64 * 22
    with pytest.raises(ConfigError, match="recompute 'some'"):
        megatron_activation_bytes(recompute="some", **kw)


def test_closed_forms_of_a_config():
    llama = memprop.model_config("hf:llama", hidden_size=4096, num_hidden_layers=32,
                                 num_attention_heads=32, seq_len=4096)
    assert transformer_dims(llama) == dict(seq_len=4096, hidden=4096, heads=32, layers=32)
    assert transformer_dims(memprop.model_config("mlp")) is None
    cf = closed_forms(TINY, 3, FSDPConfig(world_size=4, tp=2), optimizer="adam")
    params = cf.params
    assert cf.bytes_per_param == 4 * (2 + 2)               # float32: weights, grads, 2 moments
    assert cf.zero3_bytes == int(16 * params / 2 / 2)      # / tp 2 / 2 shards
    assert cf.megatron_scores_bytes == megatron_activation_bytes(
        seq_len=32, batch=3, hidden=64, heads=2, layers=2, tp=2)
    assert cf.megatron_none_bytes == 2 * 32 * 3 * 64 * (10 + 24 // 2)   # no scores, TP 2
    assert cf.peak("full") == cf.zero3_bytes + 2 * 32 * 3 * 64 * 2


def test_largest_batch_on_a_convex_peak():
    calls = []

    def peak(b):                       # two affine pieces: the second overtakes at b = 5
        calls.append(b)
        return max(100 + 10 * b, 50 + 20 * b)

    assert largest_batch(peak, 400) == 17          # 50 + 20 * 17 = 390, 18 -> 410
    assert {17, 18} <= set(calls) and len(calls) <= 8
    assert largest_batch(peak, 100) == 0
    assert largest_batch(peak, 10**9, limit=64) == 64


def test_plan_rank_fits_and_equals_its_prediction():
    plain = predict(TINY, 8, fsdp=TWO, optimizer="adam").peak_bytes
    full = predict(TINY, 8, fsdp=TWO, optimizer="adam", strategy="full").peak_bytes
    budget = (plain + full) // 2
    p = plan_rank(TINY, 8, TWO, budget, optimizer="adam")
    assert p.fits and p.spec != "none"
    again = predict(TINY, 8, fsdp=TWO, optimizer="adam", strategy=p.spec)
    assert p.predicted_peak_bytes == again.peak_bytes <= budget
    assert p.plain.peak_bytes == plain
    text = p.describe()
    assert "what sets the rank's peak" in text and "more shards" in text
    # the parts at the peak add up to it
    assert sum(p.peak_parts.values()) == p.predicted_peak_bytes
    # below full's peak nothing the planner finds fits: said, with the smallest found
    low = plan_rank(TINY, 8, TWO, full // 2, optimizer="adam", rounds=2)
    assert not low.fits and low.predicted_peak_bytes > full // 2
    assert "NOTHING FITS" in low.describe()


def test_fit_largest_batch_fits_and_one_more_does_not(capsys):
    budget = predict(TINY, 6, fsdp=TWO, optimizer="adam").peak_bytes   # none fits 6
    assert main(["fit", "--model", "transformer", *TINY_SETS, "--dtype", "float32",
                 "--device-memory", str(budget), "--world-sizes", "2", "--json"]) == 0
    table = pd.DataFrame(json.loads(capsys.readouterr().out)["rows"])
    rows = {r.strategy: r for r in table.itertuples()}
    assert rows["none"].batch_size == 6
    for name in ("none", "full", "plan"):
        r = rows[name]
        assert r.batch_size >= 1
        assert predict(TINY, r.batch_size, fsdp=TWO, optimizer="adam",
                       strategy=r.spec).peak_bytes == r.peak_bytes <= budget
        assert r.above_peak_bytes > budget
    assert rows["full"].batch_size > rows["none"].batch_size
    assert rows["full"].above_peak_bytes == predict(
        TINY, rows["full"].batch_size + 1, fsdp=TWO, optimizer="adam",
        strategy="full").peak_bytes
    assert rows["plan"].batch_size >= rows["full"].batch_size
    assert rows["none"].recompute_flops == 0 < rows["full"].recompute_flops


@pytest.mark.parametrize("argv, says", [
    (["--world-sizes", "8,x"], "'x' is not a whole number"),
    (["--world-sizes", "6", "--tp", "4"], "world size 6 is not divisible by TP degree 4"),
    (["--batch", "4"], "fit searches the micro-batch"),
    (["--device-memory", "-1GiB"], "device-memory"),
])
def test_fit_bad_input_is_one_line(capsys, argv, says):
    base = ["fit", "--model", "transformer", "--device-memory", "1GiB"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


def test_plan_fsdp_refuses_what_it_cannot_plan(capsys):
    assert main(["plan", "--model", "transformer", "--budget", "1GiB", "--fsdp", "2",
                 "--metric", "stored"]) == 2
    err = capsys.readouterr().err
    assert "--fsdp does not take --metric stored" in err and err.count("\n") == 1


def test_plan_fsdp_json(capsys):
    plain = predict(TINY, 4, fsdp=TWO, optimizer="adam").peak_bytes
    assert main(["plan", "--model", "transformer", *TINY_SETS, "--batch", "4", "--optimizer",
                 "adam", "--fsdp", "2", "--budget", str(plain), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["spec"] == "none" and out["plan"]["predicted_peak_bytes"] == plain
    assert [r["strategy"] for r in out["strategies"]] == ["none", "full", "plan: none"]
    assert out["closed_forms"]["zero3_bytes"] > 0


def test_plan_rank_under_tensor_parallelism_equals_its_prediction():
    fsdp = FSDPConfig(world_size=4, tp=2)            # FSDP2 over 2 x tensor parallel 2
    plain = predict(TINY, 8, fsdp=fsdp, optimizer="adam").peak_bytes
    full = predict(TINY, 8, fsdp=fsdp, optimizer="adam", strategy="full").peak_bytes
    p = plan_rank(TINY, 8, fsdp, (plain + full) // 2, optimizer="adam", rounds=2)
    assert p.fits and p.predicted_peak_bytes <= (plain + full) // 2
    assert p.predicted_peak_bytes == predict(TINY, 8, fsdp=fsdp, optimizer="adam",
                                             strategy=p.spec).peak_bytes


def test_plan_fsdp_nothing_fits_is_one_line(capsys):
    assert main(["plan", "--model", "transformer", *TINY_SETS, "--batch", "4", "--fsdp", "2",
                 "--budget", "1KiB"]) == 2
    captured = capsys.readouterr()
    assert "NOTHING FITS" in captured.out
    assert captured.err.startswith("error: memprop plan: no checkpointing plan fits 1.0 KiB "
                                   "per rank at batch 4 per rank")
    assert captured.err.count("\n") == 1


def test_the_rank_plan_falls_back_to_full_when_the_shifted_searches_miss():
    """Just above full's per-rank peak the shifted single-device plans overshoot the
    rank (the 70B run over 64 ranks said NOTHING FITS while full fitted at 18 GiB): full
    is weighed as it is, predicted on the rank."""
    cfg = memprop.model_config("transformer", depth=4, d_model=64, heads=4, seq_len=32,
                               vocab=50)
    fsdp = FSDPConfig(world_size=8)
    full = predict(cfg, 8, fsdp=fsdp, optimizer="adam", strategy="full").peak_bytes
    found = plan_rank(cfg, 8, fsdp, full + 1000, optimizer="adam")
    assert found.fits and found.predicted_peak_bytes <= full + 1000
    assert found.predicted_peak_bytes == predict(cfg, 8, fsdp=fsdp, optimizer="adam",
                                                 strategy=found.spec).peak_bytes
