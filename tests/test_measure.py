"""Live memory, peaks, inference vs training, and fake-tensor estimates against measurement."""

import subprocess
import sys
import textwrap

import pytest
import torch

from memprop.estimate import estimate
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.tracker import CATEGORIES, LiveMemoryTracker
from memprop.workload import build_workload, measure

ZOO = {
    "d2l_mlp": dict(d=40, h=24, q=5),
    "mlp": dict(depth=4, width=48, d_in=20, d_out=6, phi="gelu"),
    "transformer": dict(depth=2, d_model=32, heads=4, seq_len=16, vocab=40),
    "convnet": dict(depth=3, channels=6, image_size=8),
}


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_estimate_equals_measurement_exactly(name, optimizer):
    cfg = model_config(name, **ZOO[name])
    real = measure(cfg, 6, optimizer=optimizer, repeats=1)
    fake = estimate(cfg, 6, optimizer=optimizer)
    assert fake.predicted and not real.predicted
    assert fake.saved_bytes == real.saved_bytes
    assert fake.peak_bytes == real.peak_bytes
    assert fake.peak_by_phase == real.peak_by_phase
    assert fake.inference_peak_bytes == real.inference_peak_bytes
    assert (fake.forward_flops, fake.backward_flops) == (real.forward_flops, real.backward_flops)
    assert fake.step_ms is None and real.step_ms > 0


@pytest.mark.parametrize("name", list(ZOO))
def test_inference_peak_below_training_and_stores_nothing(name):
    m = measure(model_config(name, **ZOO[name]), 8, repeats=1)
    assert m.inference_saved_bytes == 0
    assert m.inference_peak_bytes < m.peak_bytes
    assert m.saved_bytes > 0


def test_timeline_rises_in_forward_falls_in_backward_and_max_is_peak():
    cfg = model_config("mlp", depth=6, width=64, d_in=32, d_out=4)
    m = measure(cfg, 16, repeats=1)
    tl = m.timeline
    assert tl.total_bytes.max() == m.peak_bytes
    fwd, bwd = tl[tl.phase == "forward"], tl[tl.phase == "backward"]
    act_f, act_b = fwd.activation_bytes.to_numpy(), bwd.activation_bytes.to_numpy()
    # C1: the stored set only grows during forward, layer by layer
    assert (act_f[1:] >= act_f[:-1]).all() and act_f[-1] > act_f[0]
    # C2: it only shrinks during backward, and is gone at its end
    assert (act_b[1:] <= act_b[:-1]).all() and act_b[-1] == 0
    # the most activation bytes held is what the recorder counted as saved activations (the
    # batch has its own category). An op's *outputs* are tagged activation one row late
    # (autograd packs them after the op returns), so the full set shows at backward's start.
    assert tl.activation_bytes.max() == m.saved.query("kind == 'activation'").saved_bytes.sum()
    assert bwd.activation_bytes.iloc[0] == tl.activation_bytes.max()


def test_tracker_categories_match_shapes():
    cfg = model_config("mlp", depth=3, width=16, d_in=8, d_out=4)
    model, batch = build_workload(cfg, 5)
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    opt = torch.optim.Adam(model.parameters())
    loss = model.objective(model(*batch[0]), batch[1])
    loss.backward()
    opt.step()                      # creates Adam's state: exp_avg, exp_avg_sq, step
    opt.zero_grad(set_to_none=True)
    tracker = LiveMemoryTracker(model, optimizer=opt, inputs=batch)
    with tracker:
        start = tracker.live_by_category()
        tracker.phase = "forward"
        loss = model.objective(model(*batch[0]), batch[1])
        tracker.phase = "backward"
        loss.backward()
        del loss
        after_backward = tracker.live_by_category()
    assert start["parameter"] == param_bytes
    assert start["optimizer"] == 2 * param_bytes + 4 * len(list(model.parameters()))
    assert start["input"] == 5 * 8 * 4 + 5 * 8
    assert after_backward["gradient"] == param_bytes   # every .grad, tagged
    assert tracker.peak_by_category()["gradient"] == param_bytes


def test_measure_step_takes_any_module_and_loss():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(10, 4), torch.randn(10, 1)
    m = measure_step(net, ((x,), y), loss_fn=lambda mod, b: torch.nn.functional.mse_loss(
        mod(*b[0]), b[1]), repeats=2)
    # Linear1 saves x (input, 160 B); tanh saves its output (320 B, also Linear2's input);
    # mse saves its input (40 B) and the target (40 B, an input)
    assert m.saved_bytes == 10 * 4 * 4 + 10 * 8 * 4 + 10 * 4 + 10 * 4
    assert m.forward_flops == 2 * 10 * 4 * 8 + 2 * 10 * 8 * 1
    assert m.step_ms > 0 and m.device_peak_bytes > 0


def test_cpu_attention_flops_are_counted_forward_and_backward():
    """FlopCounterMode counts CPU attention as free; memprop counts it by hand:
    QKᵀ and AV forward (2 FLOPs a multiply-add); backward, as torch's formula for the
    CUDA kernels: the scores again, dV, dP, dQ, dK - five such products."""
    from memprop.flops import FlopCounter
    B, h, T, d = 2, 3, 16, 8
    q, k, v = (torch.randn(B, h, T, d, requires_grad=True) for _ in range(3))
    with FlopCounter() as fwd:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with FlopCounter() as bwd:
        out.sum().backward()
    assert fwd.total == 2 * (2 * B * h * T * T * d)
    assert bwd.total == 5 * (2 * B * h * T * T * d)


def test_estimate_of_a_config_beyond_this_machine_allocates_nothing():
    import psutil
    rss = psutil.Process().memory_info().rss
    m = estimate(model_config("mlp", depth=32, width=16384, d_in=16384), 4096, flops=False)
    assert m.peak_bytes > 40 * 2**30                       # far beyond 24 GiB of RAM
    assert psutil.Process().memory_info().rss - rss < 512 * 2**20
    # 31 hidden weights of 16384² floats are saved as Wᵀ (counted apart)
    assert m.param_saved_bytes == 31 * 16384 * 16384 * 4 + 10 * 16384 * 4


def test_flops_of_a_20000_block_chain_count_and_free_without_crashing():
    """FlopCounterMode's module wrappers overflowed the C stack freeing this graph (rc 139);
    memprop's counter has none. Run in a child so that a crash fails the test."""
    code = textwrap.dedent("""
        import torch
        from memprop.flops import FlopCounter
        torch.manual_seed(0)
        net = torch.nn.Sequential(*[torch.nn.Linear(2, 2, bias=False) for _ in range(20000)])
        x = torch.randn(3, 2)
        with FlopCounter() as fwd:
            loss = net(x).sum()
        with FlopCounter() as bwd:
            loss.backward()
        del loss
        print(fwd.total, bwd.total)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-500:]
    # one (3 x 2) @ (2 x 2) matmul = 2 * 3 * 2 * 2 FLOPs per block; backward: the weight's
    # gradient in every block, the input's in all but the first (x needs no gradient)
    assert out.stdout.split() == [str(20000 * 24), str(20000 * 24 + 19999 * 24)]


def test_tracker_sees_a_compiled_step_only_when_asked():
    """Under a dispatch mode torch.compile falls back to eager; ``compiled=True`` lets
    the compiled graph run and counts its ops. MLP 4×Linear(64)+ReLU, batch 32."""
    import torch._dynamo
    import torch._functorch.config as functorch_config
    cfg = model_config("mlp", depth=4, width=64, d_in=64, d_out=8)
    model, data = build_workload(cfg, 32)

    def stored_bytes(forward, compiled):
        tracker = LiveMemoryTracker(model, inputs=data, compiled=compiled)
        with tracker:
            loss = model.objective(forward(*data[0]), data[1])
            stored = tracker.live_by_category()["activation"]
            loss.backward()
        model.zero_grad(set_to_none=True)
        return stored

    loss_saves = 32 * 8 * 4 + 4            # log-softmax (32×8) and nll's total weight
    # eager stores the 4 ReLU outputs (the last is also the head's input)
    assert stored_bytes(model, False) == 4 * 32 * 64 * 4 + loss_saves
    torch._dynamo.reset()
    try:
        with functorch_config.patch(activation_memory_budget=0.1):
            fn = torch.compile(model, backend="aot_eager_decomp_partition")
            # at r = 0.1 the partitioner keeps only the batch and recomputes every
            # ReLU output in backward
            assert stored_bytes(fn, True) == loss_saves
            # without compiled=True dynamo skips the frame (for good) and runs eager
            assert stored_bytes(fn, False) == 4 * 32 * 64 * 4 + loss_saves
    finally:
        torch._dynamo.reset()


def test_summary_keeps_the_optimizer_phase_apart_from_the_optimizer_category():
    # "optimizer" is a phase and a category: one must not overwrite the other in a row
    cfg = model_config("mlp", depth=2, width=32, d_in=32)
    model, data = build_workload(cfg, 8)
    m = measure_step(model, data, optimizer="adam", repeats=1, inference=False, timing=False)
    row = m.summary()
    assert row["optimizer_peak_bytes"] == m.peak_by_phase["optimizer"]
    assert row["optimizer_max_bytes"] == m.peak_by_category["optimizer"]
    assert row["optimizer_peak_bytes"] != row["optimizer_max_bytes"]
    # the categories at the step's peak add up to it (their own maxima need not)
    assert sum(row[f"{c}_bytes_at_peak"] for c in CATEGORIES) == m.peak_bytes
    assert all(row[f"{c}_bytes_at_peak"] <= row[f"{c}_max_bytes"] for c in CATEGORIES)


class _GradInsideNoGrad(torch.nn.Module):
    """A forward that turns gradients on for one layer even under ``no_grad`` (as a
    model computing an input gradient at inference does): it stores tensors then."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 32)

    def forward(self, x):
        with torch.enable_grad():
            return torch.sigmoid(self.lin(x))


def test_the_inference_pass_sees_what_a_forward_stores():
    """Pass 5's recorder is the innermost saved-tensor hook: a forward that stores
    under ``no_grad`` is counted (sigmoid's output, 8 x 32 float32), so the zoo's
    ``inference_saved_bytes == 0`` above is a measurement, not a hook that never runs."""
    torch.manual_seed(0)
    m = measure_step(_GradInsideNoGrad(), torch.randn(8, 16), repeats=1, timing=False)
    assert m.inference_saved_bytes >= 8 * 32 * 4
