"""A block that checkpoints a part of itself (NOTE [ Checkpointing a part of a block ],
memprop.checkpoint.forms.oplevel): ``ops:0-1,2-3=@mlp``. Gradients bitwise those of the
plain step, the bytes it frees measured against the profile's prediction and against a
hook count of what the child saves, the simulated peak equal to the measured one, and
the planner weighing it under the time objective."""

import copy

import pytest
import torch
from helpers import cfg_loss_and_grads, quiet_apply

from memprop.checkpoint import parse_strategy, remove_strategy
from memprop.checkpoint.forms.oplevel import Ops
from memprop.checkpoint.planning.planner import plan
from memprop.checkpoint.planning.profile import profile
from memprop.checkpoint.planning.searches import child_options
from memprop.checkpoint.planning.simulate import simulate
from memprop.checkpoint.planning.timing import checkpoints_of, python_ops_of
from memprop.errors import StrategyError
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.saved import storage_key
from memprop.workload import build_workload

CFG = model_config("transformer", depth=4, d_model=32, heads=2, seq_len=16, dropout=0.1)


@pytest.fixture(scope="module")
def zoo():
    model, data = build_workload(CFG, 4)
    return model, data, cfg_loss_and_grads(CFG, copy.deepcopy(model), data)


def _measure(model, data):
    return measure_step(model, data, loss_fn=CFG.loss, timing=False, inference=False)


@pytest.mark.parametrize("spec, canonical", [
    ("ops:0-1,2-3=@mlp", "ops:0-1,2-3=@mlp"),
    ("ops:2=@mlp,3=@mlp", "ops:2-3=@mlp"),            # runs of one entry merge
    ("ops:@mlp+@attn", "ops:@attn+@mlp"),             # every block, sorted
    ("ops:0=@attention.self,1=addmm", "ops:0=@attention.self,1=addmm"),
])
def test_spec_round_trips(spec, canonical):
    strategy = parse_strategy(spec)
    assert strategy.spec == canonical
    assert parse_strategy(canonical) == strategy


def test_entry_naming_children_and_ops_is_refused():
    with pytest.raises(StrategyError, match=r"bad entry key\(s\) \['mm'\].*names children "
                                            "or op keys, not both"):
        parse_strategy("ops:0=@mlp+mm")


def test_unknown_child_is_refused_with_the_blocks_children(zoo):
    model = copy.deepcopy(zoo[0])
    with pytest.raises(StrategyError, match=r"names @mpl in block 1 \(TransformerBlock\), "
                                            r"which has no such submodule; its children: "
                                            r"@ln1, @attn, @ln2, @mlp"):
        parse_strategy("ops:1=@mpl").apply(model)
    assert "forward" not in model.blocks[0].mlp.__dict__      # nothing left applied


@pytest.mark.parametrize("spec", ["ops:0-1,2-3=@mlp", "ops:@mlp", "ops:@attn+@mlp",
                                  "ops:0=@ln1+@attn,1-3"])
def test_gradients_bitwise_and_peak_as_simulated(zoo, spec):
    """Dropout inside the MLP replays (RNG preserved): the step's loss and every
    gradient equal the plain step's; the fake-tensor simulation's peak is the measured
    one to the byte, and below the plain step's."""
    model, data, plain = zoo
    checkpointed = copy.deepcopy(model)
    quiet_apply(checkpointed, spec)
    got = cfg_loss_and_grads(CFG, checkpointed, data)
    assert got[0] == plain[0]
    assert all(torch.equal(a, b) for a, b in zip(plain[1], got[1]))
    measured = _measure(checkpointed, data)
    remove_strategy(checkpointed)
    assert simulate(checkpointed, data, parse_strategy(spec), loss_fn=CFG.loss).peak_bytes \
        == measured.peak_bytes
    assert measured.peak_bytes < _measure(checkpointed, data).peak_bytes


def test_bytes_freed_match_the_profile_and_a_hook_count(zoo):
    """``ops:@mlp`` stores, per block, the MLP's saved tensors less its input (which
    the checkpoint keeps) and its held output: the profile's ``ChildCost.freed`` says
    so before the step runs, and a saved-tensor hook on the plain step's MLPs counts
    the same bytes."""
    model, data, _ = zoo
    plain = _measure(model, data).saved_bytes
    checkpointed = copy.deepcopy(model)
    quiet_apply(checkpointed, "ops:@mlp")
    freed = plain - _measure(checkpointed, data).saved_bytes

    prof = profile(model, data, loss_fn=CFG.loss, whole=False)
    predicted = sum(c.freed for block in prof.block_children for c in block
                    if c.path == "mlp")
    # the independent count: storages saved while each MLP runs, less its input
    params = {storage_key(p) for p in model.parameters()}
    seen: dict = {}
    current: list = []

    def pack(t):
        if current and storage_key(t) not in params:
            seen.setdefault(current[-1], {})[storage_key(t)] = t.untyped_storage().nbytes()
        return t
    def enter(module, args):
        current.append((id(module), storage_key(args[0])))

    def leave(module, args, output):
        current.pop()
    handles = [h for block in model.blocks for h in (
        block.mlp.register_forward_pre_hook(enter), block.mlp.register_forward_hook(leave))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        CFG.loss(model, data).backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    counted = sum(nbytes for (_, input_key), saved in seen.items()
                  for key, nbytes in saved.items() if key != input_key)
    assert freed == predicted == counted > 0


def test_planner_weighs_children_and_prices_no_policy(zoo):
    """Under the time objective a plan of plain segments and checkpointed children is
    among the candidates priced (NOTE [ Pricing a plan in seconds ]); a checkpointed
    child runs no selective policy, so the fake-model pricing counts no policy calls;
    every candidate's simulated peak fits and the chosen plan's is measured."""
    model, data, _ = zoo
    plain = _measure(model, data)
    prof = profile(model, data, loss_fn=CFG.loss, whole=False)
    options = child_options(prof)
    assert all(all(key.startswith("@") for key in keys) for block in options
               for keys, _, _ in block) and all(options)
    budget = int(plain.peak_bytes * 0.7)
    found = plan(model, data, budget, loss_fn=CFG.loss, whole=False)
    specs = [spec for spec, _, _ in found.weighed]
    children = [spec for spec in specs if "@" in spec]
    assert children, specs
    for spec, peak, _ in found.weighed:
        assert peak <= budget, spec
    child = parse_strategy(children[0])
    assert isinstance(child, Ops) and child.children(len(model.blocks))
    assert python_ops_of(child, plain, plain, block_ops=(10,) * 4) == (0.0, 0.0)
    applied = copy.deepcopy(model)
    found.apply(applied)
    assert _measure(applied, data).peak_bytes == found.predicted_peak_bytes
    if "@" in found.spec:
        assert "blocks checkpoint a part of themselves alone" in found.describe()


def test_each_further_child_costs_a_checkpoint_in_the_options(zoo):
    """child_options(per_checkpoint=c): an option of r children costs their FLOPs and
    (r - 1) * c (the first stands in for the block's own checkpoint), so a norm's
    checkpoint, which recomputes no FLOPs, is no longer free; the bytes each option
    stores do not change."""
    model, data, _ = zoo
    prof = profile(model, data, loss_fn=CFG.loss, whole=False)
    free, priced = child_options(prof), child_options(prof, per_checkpoint=1e9)
    by_keys = [{keys: (kept, cost) for keys, kept, cost in block} for block in free]
    compared = 0
    for block, costs in zip(priced, by_keys):
        for keys, kept, cost in block:
            if keys in costs:
                assert kept == costs[keys][0]
                assert cost == costs[keys][1] + 1e9 * (len(keys) - 1)
                compared += 1
    assert compared and any(len(keys) > 1 for block in free for keys, _, _ in block)


def test_child_shared_between_blocks_is_refused_and_never_offered():
    """A module two blocks share (one rotary table, one norm): its checkpoint would cover
    both blocks' calls, so applying it is refused, and the profile offers it to no block."""
    model, data = build_workload(CFG, 2)
    shared = model.blocks[0].ln2
    for block in model.blocks:
        block.ln2 = shared
    with pytest.raises(StrategyError, match=r"names @ln2 in block 0, a module block 1 "
                                            "shares"):
        parse_strategy("ops:0=@ln2").apply(model)
    prof = profile(model, data, loss_fn=CFG.loss, whole=False)
    assert all(c.path != "ln2" for block in prof.block_children for c in block)
    assert any(c.path == "mlp" for block in prof.block_children for c in block)


@pytest.mark.parametrize("spec, checkpoints", [
    ("none", 0), ("full", 4), ("blocks:0-1,3", 2), ("ops:0-1,2-3=@attn+@mlp", 5),
    ("ops:@mlp", 4), ("ops:0=addmm,1-3", 2), ("forward:-", 1), ("remat:-", 0),
    ("offload", 0)])
def test_checkpoints_a_form_enters(spec, checkpoints):
    """What a fake model's pricing charges one checkpoint's own cost for (Rates
    .ms_per_checkpoint): one per segment, per keyed block, per checkpointed child."""
    assert checkpoints_of(parse_strategy(spec), 4) == checkpoints


def test_containers_aliases_and_mixed_every_are_refused(zoo):
    """Never less than asked, silently: a ModuleList is never called (its checkpoint
    would cover nothing), one module under two paths would be checkpointed twice, and an
    every-block entry mixing children and op keys would drop the keys."""
    model = copy.deepcopy(zoo[0])
    model.blocks[0].extra = torch.nn.ModuleList([torch.nn.Identity()])
    with pytest.raises(StrategyError, match=r"@extra in block 0, a container that is never "
                                            r"called: name the modules in it \(@extra.0\)"):
        parse_strategy("ops:0=@extra").apply(model)
    model.blocks[0].alias = model.blocks[0].mlp
    with pytest.raises(StrategyError, match="names twice under two paths"):
        parse_strategy("ops:0=@alias+@mlp").apply(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(StrategyError, match="names child modules and op keys"):
        Ops(every=frozenset({"@mlp", "addmm"}))


def test_sequential_children_are_named_by_index():
    """A block that is an nn.Sequential of composite modules: its children are 0, 1, ...;
    the planner's spec names them (@0) and parses back."""
    assert parse_strategy("ops:0-1=@0.1").spec == "ops:0-1=@0.1"


def test_hf_children_bitwise_eager_and_within_rounding_compiled():
    """NOTE [ A part of a block under torch.compile ] (forms.oplevel): eager, a
    checkpointed child is bitwise; compiled, Dynamo splits the graph at it and autograd
    sums the residual's gradient in another order than one compiled graph does: equal
    loss, gradients within rounding of the compiled plain model (measured <= 2.2e-8 here)."""
    pytest.importorskip("transformers")
    cfg = model_config("hf:llama", num_hidden_layers=2, seq_len=32, pad=2)
    base, data = build_workload(cfg, 2)
    spec = "ops:1=@self_attn"
    model = copy.deepcopy(base)
    quiet_apply(model, spec)
    plain = cfg_loss_and_grads(cfg, base, data)
    eager = cfg_loss_and_grads(cfg, model, data)
    assert torch.equal(plain[0], eager[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], eager[1]))
    torch._dynamo.reset()
    compiled_plain = cfg_loss_and_grads(cfg, torch.compile(base, backend="aot_eager"), data)
    torch._dynamo.reset()
    compiled = cfg_loss_and_grads(cfg, torch.compile(model, backend="aot_eager"), data)
    torch._dynamo.reset()
    assert torch.equal(compiled_plain[0], compiled[0])
    for a, b in zip(compiled_plain[1], compiled[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
