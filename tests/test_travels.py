"""A checkpointed model is still an ordinary module (NOTE [ A strategy travels with the
model ], memprop.checkpoint.forms.patch): every strategy form x every workflow a model goes
through gives the loss and gradients of the same workflow without checkpointing,
bitwise, or a StrategyError."""

import copy
import io
import os
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
from helpers import assert_same_step, loss_and_grads, quiet_apply
from torch.nn.parallel import DistributedDataParallel

from memprop.checkpoint import applied_strategy, remove_strategy
from memprop.checkpoint.planning.simulate import simulate
from memprop.errors import StrategyError
from memprop.models import model_config
from memprop.workload import build_workload

CFG = model_config("transformer", depth=3, d_model=16, heads=2, seq_len=8, vocab=30,
                   dropout=0.2)
FORMS = ["none", "full", "every:2", "segments:2", "sqrt", "blocks:0-1", "selective",
         "offload", "nested:0-2[0-1]", "ops:addmm", "ops:0-1=addmm#0,2", "forward:-",
         "forward:addmm#0-3", "remat:-", "remat:addmm#0-3", "ops:0,1-2=@mlp", "budget"]


def loss_of(model, batch):
    """The zoo's loss through any wrapper (DDP, compile): the objective of the inner
    model on the wrapper's output."""
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    inputs, targets = batch
    return inner.objective(model(*inputs), targets)


@pytest.fixture(scope="module")
def base():
    model, batch = build_workload(CFG, 4)
    plain = loss_and_grads(loss_of, copy.deepcopy(model), batch)
    return model, batch, plain


_PLANNED = {}


def checkpointed(base, form):
    """A fresh copy of the base model with ``form`` applied (budget: 70 % of the plain
    tensor peak, planned from the batch once, then copied: planning takes seconds)."""
    model, batch, _ = base
    if form == "budget":
        if "budget" not in _PLANNED:
            _PLANNED["budget"] = planned = copy.deepcopy(model)
            peak = simulate(planned, batch, []).peak_bytes
            quiet_apply(planned, f"budget:{peak * 7 // 10}B", example_batch=batch)
        return copy.deepcopy(_PLANNED["budget"])
    model = copy.deepcopy(model)
    if form != "none":
        quiet_apply(model, form)
    return model


@pytest.mark.parametrize("form", FORMS)
def test_deepcopy_trains_its_own_parameters(base, form):
    batch, plain = base[1], base[2]
    original = checkpointed(base, form)
    clone = copy.deepcopy(original)
    assert_same_step(plain, loss_and_grads(loss_of, clone, batch), form)
    assert all(p.grad is None for p in original.parameters()), \
        f"{form}: training the copy wrote gradients into the original"
    assert str(applied_strategy(clone)) == str(applied_strategy(original))
    # the copy's strategy is its own: removing it leaves the original checkpointed
    remove_strategy(clone)
    assert "forward" not in clone.__dict__
    assert all("forward" not in m.__dict__ for m in clone.modules())
    assert_same_step(plain, loss_and_grads(loss_of, clone, batch), form + " removed")
    assert applied_strategy(original) is not None or form == "none"
    assert_same_step(plain, loss_and_grads(loss_of, original, batch), form + " original")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_saved_and_loaded_model_trains_identically(base, form, how):
    batch, plain = base[1], base[2]
    model = checkpointed(base, form)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert str(applied_strategy(loaded)) == str(applied_strategy(model))
    assert_same_step(plain, loss_and_grads(loss_of, loaded, batch), f"{form} {how}")


@pytest.mark.parametrize("form", FORMS)
def test_state_dicts_load_both_ways_and_dtype_moves(base, form):
    plain_model, batch, plain = base
    model = checkpointed(base, form)
    fresh = build_workload(CFG, 4, seed=1)[0]
    assert list(model.state_dict()) == list(plain_model.state_dict())
    fresh.load_state_dict(model.state_dict())             # checkpointed -> plain
    model.load_state_dict(copy.deepcopy(plain_model).state_dict())   # plain -> checkpointed
    assert_same_step(plain, loss_and_grads(loss_of, model, batch), form)
    doubled = model.to(torch.float64)
    batch64 = ([x if not x.is_floating_point() else x.double() for x in batch[0]], batch[1])
    ref = copy.deepcopy(plain_model).to(torch.float64)
    assert_same_step(loss_and_grads(loss_of, ref, batch64),
                     loss_and_grads(loss_of, doubled, batch64), form + " float64")


@pytest.fixture(scope="module")
def compiled_plain(base):
    model, batch, _ = base
    torch._dynamo.reset()
    plain = copy.deepcopy(model)
    return loss_and_grads(loss_of, torch.compile(plain, backend="aot_eager"), batch,
                          params=plain)


@pytest.mark.parametrize("form", FORMS)
def test_compiled_model_matches_the_compiled_plain_model(base, compiled_plain, form):
    model = checkpointed(base, form)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    got = loss_and_grads(loss_of, compiled, base[1], params=model)
    assert_same_step(compiled_plain, got, form)


@pytest.fixture(scope="module")
def one_rank_group():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("form", FORMS)
def test_ddp_after_apply(base, one_rank_group, form):
    plain_ddp = DistributedDataParallel(copy.deepcopy(base[0]))
    want = loss_and_grads(loss_of, plain_ddp, base[1], params=plain_ddp.module)
    model = checkpointed(base, form)
    ddp = DistributedDataParallel(model)
    assert_same_step(want, loss_and_grads(loss_of, ddp, base[1], params=model), form)


def _sharded(model):
    """FSDP2 as torchtitan applies it: every block, then the root (one rank, CPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (1,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full_grads(step):
    loss, grads = step
    return loss, {n: g if g is None or not hasattr(g, "full_tensor") else g.full_tensor()
                  for n, g in grads.items()}


@pytest.mark.parametrize("form", FORMS)
def test_fsdp2_after_apply_is_exact_or_refused(base, one_rank_group, form):
    want = _full_grads(loss_and_grads(loss_of, _sharded(copy.deepcopy(base[0])), base[1]))
    model = _sharded(checkpointed(base, form))
    try:
        got = _full_grads(loss_and_grads(loss_of, model, base[1]))
    except StrategyError as exc:           # a region spanning sharded modules
        assert "sharded with FSDP2" in str(exc)
        assert form in ("segments:2", "sqrt", "blocks:0-1", "nested:0-2[0-1]", "forward:-",
                        "forward:addmm#0-3", "remat:-", "remat:addmm#0-3", "budget"), form
        return
    assert_same_step(want, got, form)


def _accumulated(model, batch):
    """Two micro-batches (halves of the batch), gradients accumulated."""
    (tokens,), targets = batch
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    losses = []
    for half in (slice(0, 2), slice(2, 4)):
        loss = loss_of(model, ((tokens[half],), targets[half]))
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("form", FORMS)
def test_gradient_accumulation(base, form):
    model = checkpointed(base, form)
    assert_same_step(_accumulated(copy.deepcopy(base[0]), base[1]),
                     _accumulated(model, base[1]), form)


@pytest.mark.parametrize("form", FORMS)
def test_half_the_parameters_frozen(base, form):
    def freeze(model):
        for i, p in enumerate(model.parameters()):
            p.requires_grad_(i % 2 == 0)
        return model
    want = loss_and_grads(loss_of, freeze(copy.deepcopy(base[0])), base[1])
    model = freeze(checkpointed(base, form))
    assert_same_step(want, loss_and_grads(loss_of, model, base[1]), form)


@pytest.mark.parametrize("form", FORMS)
def test_no_grad_inference(base, form):
    (tokens,), _ = base[1]
    with torch.no_grad():
        want = copy.deepcopy(base[0]).eval()(tokens)
        model = checkpointed(base, form).eval()
        got = model(tokens)
    assert torch.equal(want, got), form
    assert all(p.grad is None for p in model.parameters())


def test_hf_copy_restores_its_own_kv_cache():
    pytest.importorskip("transformers")
    cfg = model_config("hf:gpt2")
    model = cfg.build()
    assert model.config.use_cache
    quiet_apply(model, "full")
    clone = copy.deepcopy(model)
    assert clone.config is not model.config and not clone.config.use_cache
    remove_strategy(clone)
    assert clone.config.use_cache and not model.config.use_cache
    remove_strategy(model)
    assert model.config.use_cache


def test_a_budget_applied_under_no_grad_plans_a_training_step(base):
    model, batch, plain = base
    model = copy.deepcopy(model)
    peak = simulate(model, batch, []).peak_bytes
    with torch.no_grad():
        quiet_apply(model, f"budget:{peak * 7 // 10}B", example_batch=batch)
    assert str(applied_strategy(model)).startswith("budget:")
    assert_same_step(plain, loss_and_grads(loss_of, model, batch))
