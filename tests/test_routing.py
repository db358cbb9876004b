"""Mixture-of-experts steps whose experts run one by one, predicted on fake tensors under
a routing the estimate names (NOTE [ Predicting experts that run one by one ],
memprop.routing): the batch's own (recorded from one real forward), a uniform split or
the capacity bound, each equal to the byte to a real step routed the same way
(``ForcedRouting``); a value the routing does not give stays a clear error."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memprop.cli import main
from memprop.errors import ConfigError
from memprop.measure import DataDependentStepError, measure_step, moe_routing
from memprop.models import model_config
from memprop.routing import ForcedRouting, Routing
from memprop.sweep.trial import Trial
from memprop.sweep.worker import run_trial
from memprop.workload import build_workload, estimate, measure

KEYS = ("saved_bytes", "saved_count", "param_saved_bytes", "peak_bytes", "start_bytes",
        "first_step_peak_bytes", "budget_peak_bytes", "inference_peak_bytes")


def figures(m):
    return {k: getattr(m, k) for k in KEYS} | {"peak_by_phase": m.peak_by_phase}


class ToyMoE(nn.Module):
    """Top-2 of 4 experts, run one by one from a ``bincount`` of the routing, as a user
    might write it (not transformers' code)."""

    def __init__(self, d: int = 8, experts: int = 4, k: int = 2):
        super().__init__()
        self.k, self.n = k, experts
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 16), nn.GELU(),
                                                   nn.Linear(16, d)) for _ in range(experts))

    def forward(self, x):
        _, idx = self.router(x).topk(self.k, dim=-1)
        flat = idx.flatten()
        counts = torch.bincount(flat, minlength=self.n).tolist()
        tokens = flat.argsort() // self.k
        out = torch.zeros_like(x)
        for expert, part in zip(self.experts, torch.split(tokens, counts)):
            if len(part):
                out.index_add_(0, part, expert(x[part]))
        return out


def toy_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), ToyMoE(), nn.Tanh(), ToyMoE(), nn.Linear(8, 3))


def toy_batch(tokens: int = 24):
    g = torch.Generator().manual_seed(1)
    return torch.randn(tokens, 8, generator=g), torch.randint(0, 3, (tokens,), generator=g)


def _measure(model, batch, routing=None, **kw):
    with ForcedRouting(routing) if routing is not None else warnings.catch_warnings():
        return measure_step(model, batch, repeats=1, flops=False, **kw)


@pytest.mark.parametrize("strategy", ["none", "full"])
def test_a_users_moe_is_estimated_under_its_batchs_own_routing(strategy):
    """The default for a real module and batch: the routing of that batch, recorded from
    one forward; equal to the measured step to the byte, also when checkpointing
    recomputes the routers in backward."""
    from memprop.checkpoint import apply_strategy
    model, batch = toy_net(), toy_batch()
    if strategy != "none":
        apply_strategy(model, strategy, blocks_attr="")
    fake = estimate(model, batch, loss_fn=F.cross_entropy)
    real = _measure(model, batch, loss_fn=F.cross_entropy)
    assert figures(fake) == figures(real)
    assert fake.routing.startswith("this batch's own routing")
    assert fake.capacity_routing_peak_bytes is not None
    assert real.routing.startswith("measured with this batch's own routing")


@pytest.mark.parametrize("kind", ["uniform", "capacity"])
def test_a_stated_routing_is_exact_for_that_routing(kind):
    model, batch = toy_net(), toy_batch()
    fake = estimate(model, batch, loss_fn=F.cross_entropy, routing=kind)
    real = _measure(model, batch, Routing(kind), loss_fn=F.cross_entropy)
    assert figures(fake) == figures(real)
    other = "capacity" if kind == "uniform" else "uniform"
    assert figures(fake) != figures(_measure(model, batch, Routing(other),
                                             loss_fn=F.cross_entropy))   # it matters here
    assert fake.capacity_routing_peak_bytes == _measure(
        model, batch, Routing("capacity"), loss_fn=F.cross_entropy).peak_bytes


def test_the_uniform_split_and_the_capacity_bound_route_as_they_say():
    uniform = Routing("uniform").indices(("m", 0), torch.Size([10, 2]), 1, 4)
    assert torch.bincount(uniform.flatten(), minlength=4).tolist() == [5, 5, 5, 5]
    assert all(len(set(row.tolist())) == 2 for row in uniform)    # distinct per token
    bound = Routing("capacity").indices(("m", 0), torch.Size([2, 10]), 0, 4)
    assert bound.shape == (2, 10) and bound[:, 3].tolist() == [0, 1]
    with pytest.raises(ConfigError, match="routing 'skewed' is not allowed"):
        Routing("skewed")


class OverwrittenMoE(nn.Module):
    """Routes, then overwrites the mask with values that are not the routing's, and
    reads it: the routing no longer says what the step reads."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4)

    def forward(self, x):
        idx = self.router(x).topk(2, dim=-1)[1]
        mask = F.one_hot(idx, 4).sum(1)
        mask.copy_((x[:, :4] > 0).long())
        return self.router(x)[mask.nonzero()[:, 0]]


def test_a_value_the_routing_does_not_give_stays_a_clear_error():
    model, (x, _) = OverwrittenMoE(), toy_batch()
    with pytest.raises(DataDependentStepError, match=r"aten.nonzero.default in \(the model\)"):
        estimate(model, x)
    _measure(model, x)                                      # the real step runs


TINY_MIXTRAL = dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                    num_key_value_heads=2, seq_len=16, experts_implementation="eager")


@pytest.mark.parametrize("name,fields", [
    ("hf:mixtral", TINY_MIXTRAL),
    ("hf:jetmoe", {}),                # memprop's tiny defaults, as a user types it
    ("hf:longcat_flash",              # zero-compute experts besides the routed ones
     {"experts_implementation": "eager"}),   # (grouped by default from transformers 5.25)
])
def test_transformers_experts_run_one_by_one_are_estimated_exactly(name, fields):
    pytest.importorskip("transformers")
    cfg = model_config(name, **fields)
    model, batch = build_workload(cfg, 2)
    step = dict(loss_fn=cfg.loss, forward_fn=cfg.forward)
    own = estimate(model, batch, **step)
    assert figures(own) == figures(_measure(model, batch, **step))
    assert figures(estimate(cfg, 2, routing="batch")) == figures(own)   # built for real
    uniform = estimate(cfg, 2)                       # a config: no real batch
    assert uniform.routing.startswith("a uniform split")
    assert figures(uniform) == figures(_measure(model, batch, Routing("uniform"), **step))
    assert own.capacity_routing_peak_bytes == uniform.capacity_routing_peak_bytes == \
        _measure(model, batch, Routing("capacity"), **step).peak_bytes


def test_grouped_experts_read_no_routing_and_say_so():
    pytest.importorskip("transformers")
    fields = {k: v for k, v in TINY_MIXTRAL.items() if k != "experts_implementation"}
    model, batch = build_workload(model_config("hf:mixtral", **fields), 2)
    fake = estimate(model, batch)
    assert fake.routing.startswith("any (experts_implementation grouped_mm)")
    assert fake.capacity_routing_peak_bytes is None


@pytest.mark.parametrize("key", ["experts_implementation", "_experts_implementation"])
def test_the_experts_implementation_a_user_sets_is_the_one_built(key):
    """Either spelling (the config kwarg, or the attribute a config reads back) builds
    experts run one by one: transformers 5.25 ignores the private one as a keyword, so a
    user's setting silently became grouped experts."""
    pytest.importorskip("transformers")
    fields = {k: v for k, v in TINY_MIXTRAL.items() if k != "experts_implementation"}
    cfg = model_config("hf:mixtral", **fields, **{key: "eager"})
    assert cfg.hf_config()._experts_implementation == "eager"
    model, _ = build_workload(cfg, 2)
    assert moe_routing(model, predicted=False).endswith("(experts_implementation eager)")


@pytest.mark.parametrize("fields", [
    {"text_config.experts_implementation": "eager"},     # transformers would drop it
    {"text_config._attn_implementation": "eager"},
    {"experts_implementation": "eager", "_experts_implementation": "grouped_mm"},
])
def test_an_implementation_set_where_it_would_be_dropped_is_refused(fields):
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="implementation"):
        model_config("hf:llama4", **fields)


def test_routing_batch_needs_a_real_batch():
    """A model that is already fake has no values to route a batch with."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprop.fake import fake_batch, fake_copy
    mode = FakeTensorMode()
    model, batch = fake_copy(toy_net(), mode), fake_batch(toy_batch(), mode)
    with pytest.raises(ConfigError, match="routing='batch' reads the routing from one real"):
        estimate(model, batch, loss_fn=F.cross_entropy, routing="batch")
    assert estimate(model, batch, loss_fn=F.cross_entropy).routing.startswith("a uniform")
    with pytest.raises(ConfigError, match="routing 'own' is not allowed"):
        estimate(toy_net(), toy_batch(), loss_fn=F.cross_entropy, routing="own")


def test_a_sweep_trial_predicts_experts_run_one_by_one():
    pytest.importorskip("transformers")
    cfg = model_config("hf:mixtral", **TINY_MIXTRAL)
    trial = Trial(spec="moe", model=cfg.name, model_fields=tuple(sorted(cfg.fields().items())),
                  batch=2, repeats=1, warmup=0)
    row = run_trial(trial)
    assert row["status"] == "ok", row.get("error")
    assert row["predicted_routing"].startswith("a uniform split")
    assert row["predicted_peak_bytes"] > 0 and row["predicted_capacity_routing_peak_bytes"] > 0
    assert row["routing"].startswith("measured")
    assert measure(cfg, 2, repeats=1, flops=False).routing.startswith("measured")


def _mixtral_args():
    args = ["--model", "hf:mixtral", "--batch", "2"]
    for key, value in TINY_MIXTRAL.items():
        args += ["--set", f"{key}={value}"]
    return args


def test_cli_estimate_names_the_routing_and_its_capacity_bound(capsys):
    pytest.importorskip("transformers")
    assert main(["profile", *_mixtral_args(), "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "expert routing        a uniform split" in out
    assert "capacity bound        peak " in out
    assert main(["profile", *_mixtral_args(), "--estimate", "--routing", "capacity",
                 "--json"]) == 0
    import json
    row = json.loads(capsys.readouterr().out)
    assert row["routing"].startswith("the capacity bound")
    assert row["capacity_routing_peak_bytes"] == row["peak_bytes"]


def test_cli_routing_without_estimate_is_one_line(capsys):
    assert main(["profile", "--model", "mlp", "--routing", "uniform"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: memprop profile: --routing uniform chooses the routing")
    assert err.count("\n") == 1


class DroppedMoE(ToyMoE):
    """Dropout before the router: each step routes the batch differently."""

    def forward(self, x):
        return super().forward(F.dropout(x, 0.5, self.training))


def test_a_routing_that_varies_from_step_to_step_is_said_to():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), DroppedMoE(), nn.Linear(8, 3))
    fake = estimate(model, toy_batch(), loss_fn=F.cross_entropy)
    assert "a second forward routed it otherwise" in fake.routing
    assert "second forward" not in estimate(toy_net(), toy_batch(),
                                            loss_fn=F.cross_entropy).routing


@pytest.mark.parametrize("fraction", [0.8, 0.7])
def test_a_plan_for_experts_run_one_by_one_peaks_where_it_says(fraction):
    """plan() routes its fake steps as the batch is routed, keeps to block-level forms
    (op keys count calls, and an expert with no token makes none), and says both; the
    plan's predicted peak is the measured one."""
    from memprop.checkpoint import apply_strategy, plan, remove_strategy
    model, batch = toy_net(), toy_batch(64)
    plain = _measure(model, batch, loss_fn=F.cross_entropy)
    found = plan(model, batch, int(plain.peak_bytes * fraction), loss_fn=F.cross_entropy,
                 blocks_attr="")
    assert any(n.startswith("experts run one by one: planned under this batch's own")
               for n in found.notes)
    assert not found.spec.startswith(("ops:", "remat:", "forward:"))
    apply_strategy(model, found.spec, blocks_attr="")
    try:
        real = _measure(model, batch, loss_fn=F.cross_entropy)
    finally:
        remove_strategy(model)
    assert real.peak_bytes == found.predicted_peak_bytes <= plain.peak_bytes * fraction


def test_a_plan_for_the_capacity_bound_peaks_where_it_says_under_that_routing():
    from memprop.checkpoint import apply_strategy, plan, remove_strategy
    model, batch = toy_net(), toy_batch(64)
    bound = Routing("capacity")
    plain = _measure(model, batch, bound, loss_fn=F.cross_entropy)
    found = plan(model, batch, int(plain.peak_bytes * 0.8), loss_fn=F.cross_entropy,
                 blocks_attr="", routing="capacity")
    assert any("planned under the capacity bound" in n for n in found.notes)
    apply_strategy(model, found.spec, blocks_attr="")
    try:
        assert _measure(model, batch, bound, loss_fn=F.cross_entropy).peak_bytes == \
            found.predicted_peak_bytes
    finally:
        remove_strategy(model)
    with pytest.raises(ConfigError, match="routing 'most' is not allowed"):
        plan(model, batch, plain.peak_bytes, loss_fn=F.cross_entropy, blocks_attr="",
             routing="most")


def test_cli_plan_of_experts_run_one_by_one_names_its_routing(capsys):
    pytest.importorskip("transformers")
    assert main(["plan", *_mixtral_args(), "--budget", "3.5MiB"]) == 0
    out = capsys.readouterr().out
    assert "experts run one by one: planned under a uniform split" in out
    assert main(["plan", *_mixtral_args(), "--budget", "3.5MiB", "--routing",
                 "capacity"]) == 0
    assert "planned under the capacity bound" in capsys.readouterr().out


class Mixer(ToyMoE):
    """The toy's experts under a name memprop does not take for experts."""


def test_experts_under_another_name_are_refused_saying_how_to_route_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), Mixer(), nn.Linear(8, 3))
    with pytest.raises(DataDependentStepError, match=r"aten.bincount.default in 1 \(Mixer\).*"
                                                     r"class is named \.\.\.Experts, \.\.\.MoE"):
        estimate(model, toy_batch(), loss_fn=F.cross_entropy)


def test_cli_routing_on_a_model_without_such_experts_says_it_changed_nothing(capsys):
    assert main(["profile", "--model", "mlp", "--batch", "2", "--estimate", "--routing",
                 "capacity"]) == 0
    assert "note: --routing capacity changed nothing" in capsys.readouterr().out
