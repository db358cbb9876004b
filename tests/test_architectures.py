"""A cross-section of transformers architectures, each checkpointed by every strategy
form: loss and gradients bitwise equal to the plain step (dropout on, left-padded batch,
same weights and seed), and the estimate on fake tensors equal to the measurement.

The same checks as benchmarks/bench_architectures.py (its functions, imported), on ten
diverse types: decoders with learned and rotary positions, grouped-query attention and
a sliding window (mistral), parallel attention (falcon), encoders with a masked-LM head
(bert, roberta), a mixture of experts (mixtral), a state-space model (mamba). Every
architecture transformers has: the benchmark, ``python benchmarks/run.py architectures``.
"""

import importlib.util
import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memprop import model_config  # noqa: E402

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_architectures.py"
_spec = importlib.util.spec_from_file_location("bench_architectures_for_tests", BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TYPES = ("gpt2", "llama", "mistral", "falcon", "bert", "roberta", "opt", "gemma", "mixtral",
         "mamba")
SLOW = {"mamba"}                 # a Python scan: every form takes seconds
# planning is the costly form (a remat: scan simulates many candidates): a few types here,
# every type in the benchmark
BUDGET_TYPES = ("gpt2", "llama", "bert")
# (type, form) -> the StrategyError message expected instead of an exact step; none now
REFUSED: dict = {}


def _params(forms):
    return [pytest.param(t, f, marks=[pytest.mark.slow] if t in SLOW or f == "budget" else [])
            for t in TYPES for f in forms if f != "budget" or t in BUDGET_TYPES]


@pytest.fixture(scope="module")
def plain_steps():
    """The plain step of each type's sized config, computed once per module."""
    cache = {}

    def get(model_type):
        if model_type not in cache:
            cache[model_type] = bench.step(bench.config_for(model_type, "sized"))
        return cache[model_type]
    return get


@pytest.mark.parametrize("model_type", TYPES)
def test_tiny_defaults_build_and_full_is_exact(model_type):
    # hf:<type> exactly as a user types it: the tiny defaults build, and a checkpointed
    # step is the plain step, bit for bit
    cfg = model_config(f"hf:{model_type}")
    plain = bench.step(cfg)
    assert torch.isfinite(plain[0])
    assert bench.compare(plain, bench.step(cfg)) is None          # reproducible
    assert bench.compare(plain, bench.step(cfg, "full")) is None


def test_sized_config_sets_layers_and_dropout():
    fields = bench.sized_fields("gpt2")
    assert fields["num_hidden_layers"] == 3 and fields["use_cache"] is False
    assert fields["attn_pdrop"] == fields["resid_pdrop"] == fields["embd_pdrop"] == 0.1
    model = bench.config_for("gpt2", "sized").build()
    assert len(model.transformer.h) == 3 and model.config.attn_pdrop == 0.1
    # a composite config: the text sub-config's layers
    assert bench.sized_fields("gemma3")["text_config.num_hidden_layers"] == 3


@pytest.mark.parametrize("model_type,form", _params(bench.FORMS))
def test_form_is_exact_and_estimated(model_type, form, plain_steps):
    cfg = bench.config_for(model_type, "sized")
    plain = plain_steps(model_type)
    if (model_type, form) in REFUSED:
        from memprop.errors import StrategyError
        with pytest.raises(StrategyError, match=REFUSED[model_type, form]):
            bench.step(cfg, form)
        return
    if form == "budget":
        from memprop import measure
        from memprop.errors import BudgetError
        peak = measure(cfg, bench.BATCH, timing=False, flops=False, inference=False,
                       check_fits=False).peak_bytes
        budget = int(peak * bench.BUDGET_FRACTION)
        try:
            run = bench.step(cfg, plan_budget=budget)
        except BudgetError as exc:        # 60 % is below any plan: the plan its error
            budget = exc.smallest_feasible_bytes    # carries for the smallest it found
            assert exc.plan.predicted_peak_bytes == budget == exc.plan.budget_bytes
            run = (*bench.step(cfg, exc.plan.spec)[:2], exc.plan)
        spec = run[2].spec
    else:
        run, spec = bench.step(cfg, form), form
    assert bench.compare(plain, run) is None, spec
    got = bench.bytes_check(cfg, spec, inference=False)
    assert got["estimate"] == "exact", got
    if form == "budget":
        assert got["measured_peak"] <= budget, spec


@pytest.mark.parametrize("model_type", [pytest.param(t, marks=[pytest.mark.slow] if t in SLOW
                                                     else []) for t in TYPES])
def test_plain_estimate_equals_measurement(model_type):
    got = bench.bytes_check(bench.config_for(model_type, "sized"), "none", inference=True)
    assert got["estimate"] == "exact", got
