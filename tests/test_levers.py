"""When parameters and gradients set the peak, the plan says so and names the levers;
each lever's predicted peak equals the measured one."""

from memprop.checkpoint.planning.levers import StepInBackward, peak_composition
from memprop.checkpoint.planning.planner import plan
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.workload import build_workload

MiB = 2 ** 20


def test_gradient_bound_peak_is_described_and_levers_predicted_exactly():
    # 4 layers of 1024x1024 floats (4 MiB each, 16.1 MiB with the head) at batch 16: the
    # activations are 64 KiB each, so parameters and their gradients set the peak
    cfg = model_config("mlp", depth=4, width=1024, d_in=1024)
    model, data = build_workload(cfg, 16)
    p = plan(model, data, "1GiB")
    assert p.spec == "none"
    text = p.describe()
    assert "parameters, gradients and optimizer state set the peak" in text
    assert p.peak_parts["parameter"] == sum(q.numel() * 4 for q in model.parameters())
    fused, bf16, offload = p.levers
    assert fused.name == "optimizer step in backward" and offload.predicted_peak_bytes is None
    # applied: the measured peaks are the predicted ones, to the byte
    lever = StepInBackward("sgd")
    lever.apply(model)
    measured = measure_step(model, data, repeats=1, inference=False, flops=False)
    lever.remove()
    assert measured.peak_bytes == fused.predicted_peak_bytes < p.predicted_peak_bytes
    # the gradients are never alive together: at most the largest layer's 4 MiB of them
    assert peak_composition(measured)["gradient"] <= 4 * MiB + 4096
    half = measure_step(model, data, repeats=1, inference=False, flops=False, amp="bf16")
    assert half.peak_bytes == bf16.predicted_peak_bytes


def test_activation_bound_peak_names_no_levers():
    cfg = model_config("mlp", depth=4, width=64, d_in=64)
    model, data = build_workload(cfg, 512)
    p = plan(model, data, "1GiB")
    assert p.levers == () and "set the peak" not in p.describe()
    assert "at the peak:" in p.describe()
