"""The step API inside a user's own loop, and mixed precision, against measure_step."""

import pytest
import torch
from torch import nn

import memprop
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.workload import build_workload, estimate, measure


def test_track_a_plain_loop_equals_measure_step():
    cfg = model_config("mlp", depth=4, width=64, d_in=32, d_out=8)
    model, batch = build_workload(cfg, 16)
    (x,), y = batch
    m = measure_step(model, batch, optimizer="adam", repeats=1)

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with memprop.track(model, opt, inputs=batch) as t:
        for _ in range(3):                                   # an ordinary training loop
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            del loss     # else the last step's 4-byte loss is still live in the next step
            opt.step()
            opt.zero_grad(set_to_none=True)
    steps = t.steps()
    assert len(steps) == 3
    # the steady steps (the optimizer state exists) are exactly measure_step's step
    assert steps[1]["peak_bytes"] == steps[2]["peak_bytes"] == m.peak_bytes
    assert steps[0]["peak_bytes"] == m.first_step_peak_bytes
    stored = int(m.saved.query("kind == 'activation'").saved_bytes.sum())
    assert [s["stored_bytes"] for s in steps] == [stored] * 3 and t.stored_bytes == stored
    tl = t.timeline()
    assert tl.total_bytes.max() == t.peak_bytes == m.peak_bytes
    assert {"forward", "backward", "optimizer"} <= set(tl.phase)
    assert t.peak_by_category()["optimizer"] == m.peak_by_category["optimizer"]


def test_track_sees_inference_under_no_grad():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with memprop.track(model) as t, torch.no_grad():
        model(torch.randn(4, 8))
    assert set(t.timeline().phase) <= {"setup", "inference"} and t.stored_bytes == 0


TRANSFORMER = dict(depth=2, d_model=64, heads=4, seq_len=32, vocab=128)


def test_bf16_autocast_stores_less_than_float32_and_is_predicted_exactly():
    cfg = model_config("transformer", **TRANSFORMER)
    fp32 = measure(cfg, 8, repeats=1)
    bf16 = measure(cfg, 8, amp="bf16", repeats=1)
    assert bf16.amp == "bf16" and bf16.dtype == "float32"     # float32 master weights
    assert bf16.saved_bytes < fp32.saved_bytes
    # autocast keeps bf16 copies of the weights for the step: saved with the parameters
    assert bf16.saved.query("kind == 'activation'").dtype.eq("bfloat16").any()
    fake = estimate(cfg, 8, amp="bf16")
    assert (fake.saved_bytes, fake.peak_bytes, fake.budget_peak_bytes) == (
        bf16.saved_bytes, bf16.peak_bytes, bf16.budget_peak_bytes)


def test_fp16_with_a_grad_scaler_runs_and_leaves_weights_alone():
    cfg = model_config("mlp", depth=3, width=32, d_in=16)
    model, batch = build_workload(cfg, 8)
    before = [p.clone() for p in model.parameters()]
    m = measure_step(model, batch, amp="fp16", optimizer="adam", repeats=1)
    assert m.amp == "fp16" and m.saved_bytes > 0 and m.step_ms > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bad_amp_is_a_clear_error():
    cfg = model_config("mlp", depth=1, width=8, d_in=8)
    with pytest.raises(memprop.ConfigError,
                       match="amp 'int8' is not allowed; choose one of: bf16, fp16"):
        measure(cfg, 2, amp="int8")
