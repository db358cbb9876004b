"""Mixture-of-experts models on fake tensors: the grouped GEMM's fake rule allocates what
the kernel allocates (NOTE [ Fake grouped GEMMs allocate what the kernel allocates ],
memprop.fake), so the estimate of hf:mixtral and other grouped-experts models equals
the measured step to the byte, for every routing (NOTE [ MoE routing and the estimate
], memprop.measure), and says so. Experts run one by one: tests/test_routing.py."""

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import memprop.fake  # noqa: F401 - registers the fake grouped-GEMM rule
from memprop.cli import main
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.workload import build_workload, estimate, measure

pytest.importorskip("transformers")

MIXTRAL = dict(num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2,
               num_key_value_heads=2, seq_len=16)
KEYS = ("saved_bytes", "saved_count", "param_saved_bytes", "peak_bytes", "start_bytes",
        "first_step_peak_bytes", "budget_peak_bytes", "inference_peak_bytes")


def mixtral(**fields):
    return model_config("hf:mixtral", **{**MIXTRAL, **fields})


def figures(m):
    return {k: getattr(m, k) for k in KEYS} | {"peak_by_phase": m.peak_by_phase}


def _layout(t):
    return tuple(t.shape), t.stride(), t.dtype, t.untyped_storage().nbytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,n", [(8, 16), (32, 8), (16, 12)])
def test_fake_grouped_mm_allocates_what_the_kernel_allocates(dtype, k, n):
    """Forward (2D x 3D) and both backward GEMMs (2D x 3D, 2D x 2D): sizes, strides and
    storage bytes as the CPU kernel's, whose rows are padded to 16 bytes."""
    x, w = torch.randn(10, k, dtype=dtype), torch.randn(3, n, k, dtype=dtype)
    offs = torch.tensor([3, 7, 10], dtype=torch.int32)
    grad = torch.randn(10, n, dtype=dtype)

    def run(x, w, offs, grad):
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        try:
            out = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
            out.backward(grad)
        except RuntimeError as exc:            # the kernel's own checks, as messages
            return str(exc)
        return [_layout(t) for t in (out, x.grad, w.grad)]

    real = run(x, w, offs, grad)
    mode = FakeTensorMode()
    with mode:
        fake = run(*(mode.from_tensor(t) for t in (x, w, offs, grad)))
    assert fake == real
    if dtype == torch.float32:
        assert not isinstance(real, str)       # float32 runs on CPU (the meta kernel refused)


def test_fake_grouped_mm_pads_the_output_rows_as_the_kernel_does():
    x = torch.randn(10, 8)
    w = torch.randn(3, 6, 8).transpose(-2, -1)       # 6 float32 columns: rows padded to 8
    offs = torch.tensor([3, 7, 10], dtype=torch.int32)
    real = torch._grouped_mm(x, w, offs=offs)
    mode = FakeTensorMode()
    with mode:
        fake = torch._grouped_mm(*(mode.from_tensor(t) for t in (x, w, offs)))
    assert _layout(fake) == _layout(real) == ((10, 6), (8, 1), torch.float32, 312)


def test_mixtral_estimate_equals_the_measured_step_and_names_the_routing():
    cfg = mixtral()
    real = measure(cfg, 4, repeats=1, flops=False)     # its won't-fit check runs fake
    fake = estimate(cfg, 4, flops=False)
    assert figures(fake) == figures(real)
    grouped = lambda m: m.timeline.query("op == '_grouped_mm'")[  # noqa: E731
        ["phase", "module", "total_bytes"]].reset_index(drop=True)
    assert len(grouped(real)) > 0 and grouped(fake).equals(grouped(real))
    assert fake.routing.startswith("any (experts_implementation grouped_mm)")
    assert "every routing" in fake.routing and "worst case" in fake.routing
    assert real.routing.startswith("measured with this batch's own routing")
    assert fake.summary()["routing"] == fake.routing         # a result row carries it
    assert estimate(model_config("mlp", depth=2, width=8), 2).routing is None


@pytest.mark.parametrize("kw", [dict(amp="fp16", optimizer="adam"), dict(strategy="sqrt"),
                                dict(dtype="bfloat16")])
def test_mixtral_estimate_is_exact_under_amp_checkpointing_and_bf16(kw):
    cfg = mixtral(num_hidden_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # KV cache off under a strategy
        real = measure(cfg, 2, repeats=1, flops=False, check_fits=False, **kw)
        fake = estimate(cfg, 2, flops=False, **kw)
    assert figures(fake) == figures(real)


def _route_counts(model, batch, loss_fn):
    """Tokens per expert in the first MoE layer, from a hook on its experts."""
    counts = []
    experts = model.model.layers[0].mlp.experts
    handle = experts.register_forward_hook(
        lambda mod, args, out: counts.append(torch.bincount(args[1].flatten(),
                                                            minlength=4).tolist()))
    with torch.no_grad():
        loss_fn(model, batch)
    handle.remove()
    return counts[0]


def test_mixtral_bytes_are_the_same_for_every_routing():
    """The batch's own routing and the most skewed one (every token to the same 2 experts)
    give the same bytes, both equal to the estimate: exact for every routing."""
    cfg = mixtral()
    fake = estimate(cfg, 4, flops=False, inference=False)
    model, batch = build_workload(cfg, 4)
    own = _route_counts(model, batch, cfg.loss)
    plain = measure_step(model, batch, loss_fn=cfg.loss, forward_fn=cfg.forward,
                         repeats=1, flops=False, inference=False)
    with torch.no_grad():               # equal logits: every token picks the same 2 experts
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
    skewed = _route_counts(model, batch, cfg.loss)
    tokens = 4 * MIXTRAL["seq_len"]
    assert sorted(skewed) == [0, 0, tokens, tokens] and sorted(own) != sorted(skewed)
    worst = measure_step(model, batch, loss_fn=cfg.loss, forward_fn=cfg.forward,
                         repeats=1, flops=False, inference=False)
    assert figures(plain) == figures(worst) == figures(fake)


def test_plan_runs_on_mixtral(capsys):
    args = ["plan", "--model", "hf:mixtral", "--batch", "4", "--budget", "64MiB", "--json"]
    for key, value in MIXTRAL.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    assert "sqrt" in capsys.readouterr().out


@pytest.mark.parametrize("arch,fields", [
    ("qwen2_moe", dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=32,
                       vocab_size=256)),
    ("olmoe", dict(num_key_value_heads=2, vocab_size=256)),
    # MLA attention (no grouped KV heads to set); MoE from the first layer on
    ("deepseek_v3", dict(vocab_size=256, first_k_dense_replace=0, n_routed_experts=4,
                         num_experts_per_tok=2, n_group=1, topk_group=1,
                         moe_intermediate_size=32)),
])
def test_other_grouped_experts_models_are_estimated_exactly(arch, fields):
    cfg = model_config(f"hf:{arch}", seq_len=16, **fields)
    real = measure(cfg, 2, repeats=1, flops=False, inference=False, check_fits=False)
    fake = estimate(cfg, 2, flops=False, inference=False)
    assert figures(fake) == figures(real)
    assert (real.timeline.op == "_grouped_mm").any() and fake.routing.startswith("any")


def test_cli_profile_prints_the_routing(capsys):
    args = ["profile", "--model", "hf:mixtral", "--batch", "2", "--estimate"]
    for key, value in MIXTRAL.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "expert routing        any (experts_implementation grouped_mm)" in out


def test_grouped_gemm_flops_forward_and_backward():
    # forward 2*M*K*N; backward: grad of a (2-d x 3-d) and of b (2-d x 2-d, groups
    # splitting M), each as much: twice the forward, as for a plain matmul (pointwise
    # ops count 0 in torch's formulas)
    from memprop.flops import FlopCounter
    offs = torch.tensor([3, 7, 10], dtype=torch.int32)
    a = torch.randn(10, 8, requires_grad=True)
    b = torch.randn(3, 8, 8, requires_grad=True)
    with FlopCounter() as fc:
        out = torch._grouped_mm(a, b, offs=offs)
    assert fc.total == 2 * 10 * 8 * 8
    with FlopCounter() as fc:
        out.square().sum().backward()
    assert fc.total == 2 * (2 * 10 * 8 * 8)
