"""Replays that check themselves (NOTE [ Verifying a replay ], memprop.checkpoint.forms.verify):
verify_replay passes where a strategy is exact, raises StrategyError naming the op and
module where a replay rule is broken, and leaves the model as it found it."""

import copy

import pytest
import torch
from helpers import ParallelChain, quiet_apply
from torch import nn

import memprop.checkpoint.forms.remat as remat
from memprop.checkpoint import verify_replay
from memprop.checkpoint.forms.verify import discarding_grads
from memprop.checkpoint.planning.timing import time_strategies
from memprop.errors import StrategyError
from memprop.models import model_config
from memprop.workload import build_workload

FORMS = ["full", "sqrt", "every:2", "selective", "nested:0-2[0-1]", "ops:addmm",
         "ops:0-1=addmm#0,2", "forward:-", "forward:addmm#0-3", "remat:-",
         "remat:addmm#0-3"]


@pytest.mark.parametrize("form", FORMS)
def test_exact_forms_verify_and_leave_the_model_as_it_was(form):
    cfg = model_config("transformer", depth=3, d_model=16, heads=2, seq_len=8, vocab=30,
                       dropout=0.2)
    model, batch = build_workload(cfg, 4)
    quiet_apply(model, form)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    rng = torch.get_rng_state()
    verify_replay(model, batch)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_checked_and_timed_steps_never_hold_the_models_gradients():
    """Planning runs steps only to check or time them: each parameter's gradient is
    dropped as backward accumulates it (what planning a model of large weights holds:
    one parameter's gradient, not all), and the gradients held before are put back."""
    cfg = model_config("mlp", depth=4, width=32, d_in=32)
    model, batch = build_workload(cfg, 8)
    held = {p: torch.full_like(p, 3.0) for p in model.parameters()}
    for p, g in held.items():
        p.grad = g
    seen = []   # at each parameter's accumulation: how many gradients are held
    hooks = [p.register_post_accumulate_grad_hook(
        lambda _: seen.append(sum(q.grad is not None for q in model.parameters())))
        for p in model.parameters()]
    with discarding_grads(model):
        assert all(p.grad is None for p in model.parameters())
        cfg.loss(model, batch).backward()
        assert all(p.grad is None for p in model.parameters())
    for h in hooks:
        h.remove()
    assert len(seen) == len(held) and max(seen) <= 1
    assert all(p.grad is held[p] for p in model.parameters())
    times = time_strategies(model, batch, cfg.loss, {"none": "none", "full": "full"},
                            rounds=1)
    assert set(times) == {"none", "full"}
    assert all(p.grad is held[p] for p in model.parameters())


def test_batchnorm_statistics_are_put_back():
    cfg = model_config("convnet", depth=3, channels=4, image_size=8)
    model, batch = build_workload(cfg, 4)
    quiet_apply(model, "remat:-")
    before = {n: b.clone() for n, b in model.named_buffers()}
    verify_replay(model, batch)
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())


def test_a_broken_remat_rule_is_caught_naming_op_and_module(monkeypatch):
    # the rule Falcon needed: a replayed in-place write must not reach a held matmul
    # output through a view. Break it (writes go through) and remat is silently wrong
    # on a Falcon-like block; verification names the write and the block
    monkeypatch.setattr(remat, "_copy_written", lambda func, args, kwargs, held: (args, kwargs))
    torch.manual_seed(0)
    model, x = ParallelChain(), torch.randn(2, 8, 16)
    loss_fn = lambda m, batch: m(batch).square().mean()   # noqa: E731
    plain = copy.deepcopy(model)
    loss_fn(plain, x).backward()
    quiet_apply(model, "remat:-")
    loss_fn(model, x).backward()
    assert not all(torch.equal(p.grad, q.grad) for p, q in
                   zip(plain.parameters(), model.parameters()))   # silently wrong
    model.zero_grad(set_to_none=True)
    # the first rebuild found wrong: the head's input, rebuilt through every block
    with pytest.raises(StrategyError, match=r"remat replayed view in head and got a "
                                            r"different tensor \(256 of 256 values"):
        verify_replay(model, x, loss_fn=loss_fn)


class _Counting(nn.Module):
    """A block whose forward reads Python state it changes: a recompute sees another
    value. torch's checkpoint checks shapes, not values; the gradients would differ."""

    def __init__(self, d=8):
        super().__init__()
        self.lin, self.calls = nn.Linear(d, d), 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(self.lin(x) * self.calls)


def test_a_recompute_that_differs_is_caught_for_checkpointed_segments():
    torch.manual_seed(0)
    model = nn.Sequential(*(_Counting() for _ in range(3)))
    x = torch.randn(4, 8)
    loss_fn = lambda m, batch: m(batch).sum()             # noqa: E731
    quiet_apply(model, "full")
    with pytest.raises(StrategyError, match=r"checkpoint of block \d \(_Counting\) "
                                            r"replayed \w+ in \d and got a different"):
        verify_replay(model, x, loss_fn=loss_fn)


class _FilledEmpty(nn.Module):
    """Fills an empty tensor slice by slice (LongCat-Flash's key_states): the slices are
    uninitialised memory when taken, different in the recompute, and mean nothing."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        out = h.new_empty(h.shape[0], 16)
        out[:, :8].copy_(h)
        out[:, 8:].copy_(torch.tanh(h))
        return out[:, ::2] * out[:, 1::2]


def test_views_of_uninitialised_memory_are_not_compared_but_their_writes_are():
    torch.manual_seed(0)
    model = nn.Sequential(*(_FilledEmpty() for _ in range(3)))
    x = torch.randn(4, 8)
    loss_fn = lambda m, batch: m(batch).sum()             # noqa: E731
    quiet_apply(model, "full")
    verify_replay(model, x, loss_fn=loss_fn)
    calls = {"n": 0}
    real_tanh = torch.tanh

    def drifting(t):                    # the recompute's fill differs: still caught
        calls["n"] += 1
        return real_tanh(t) + (calls["n"] > 3)
    torch.tanh = drifting
    try:
        with pytest.raises(StrategyError, match=r"block 2 \(_FilledEmpty\) replayed add in 2 "
                                                r"and got a different"):
            verify_replay(model, x, loss_fn=loss_fn)
    finally:
        torch.tanh = real_tanh


def test_default_loss_is_measure_steps():
    # no loss_fn: the batch and loss read as measure_step reads them, a zoo model's
    # (inputs, targets) with its objective, or a bare tensor with the synthetic objective
    model, batch = build_workload(model_config("mlp", depth=4, width=32, d_in=16), 8)
    quiet_apply(model, "remat:-")
    verify_replay(model, batch)
    torch.manual_seed(0)
    own = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)])
    quiet_apply(own, "remat:-")
    verify_replay(own, torch.randn(8, 16))
    assert all(p.grad is None for p in own.parameters())      # as before the check


def test_the_planner_leaves_out_a_remat_plan_whose_replay_is_not_exact(monkeypatch):
    import dataclasses

    import memprop.checkpoint.planning.planner as planner
    from memprop.checkpoint import Remat, plan
    torch.manual_seed(0)
    model, x = ParallelChain(d=64, depth=6), torch.randn(8, 64, 64)
    loss_fn = lambda m, batch: m(batch).square().mean()   # noqa: E731
    chain_plan = planner._plan

    def remat_first(*args, whole, **kwargs):               # as if remat:- were cheapest
        found = chain_plan(*args, whole=whole, **kwargs)
        return dataclasses.replace(found, chosen=Remat()) if whole else found
    monkeypatch.setattr(planner, "_plan", remat_first)
    budget = planner.simulate(model, x, [], loss_fn=loss_fn).peak_bytes * 95 // 100
    assert plan(model, x, budget, loss_fn=loss_fn).spec == "remat:-"     # exact: kept
    monkeypatch.setattr(remat, "_copy_written", lambda func, args, kwargs, held: (args, kwargs))
    found = plan(model, x, budget, loss_fn=loss_fn)
    assert not found.spec.startswith("remat:") and found.verified
    assert "remat: left out, its replay is not exact on this model" in found.describe()
    assert "forward" not in model.__dict__                 # verification left no patch


class _SwapsOnFirstCall(nn.Module):
    """Replaces a submodule on its first call, drawing from the global RNG as it goes
    (as transformers' BigBird switches its attention when the sequence is short)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.3))
                                    for _ in range(2))
        self.switched = False

    def forward(self, x):
        if not self.switched:
            self.switched = True
            nn.Linear(16, 16)                        # an initialisation: draws from the RNG
            self.blocks[1][1] = nn.Dropout(0.3)      # a new module
        for block in self.blocks:
            x = block(x)
        return x


def test_a_model_that_changes_itself_inside_a_checkpoint_is_refused_then_exact():
    # NOTE [ A model that changes itself inside a checkpoint ]: forward:- replayed the
    # first step of such a model with other dropout masks (hf:big_bird: 58 of 60
    # gradients wrong); it refuses that step, and the next one is the plain step's
    torch.manual_seed(0)
    plain, x = _SwapsOnFirstCall(), torch.randn(8, 16)
    model = copy.deepcopy(plain)
    quiet_apply(model, "forward:-")
    with pytest.raises(StrategyError, match="replaced its own modules during a checkpointed"):
        model(x).sum().backward()
    plain(x)                                         # the plain model changes itself too
    for m in (plain, model):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        m(x).square().mean().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(),
                                                           model.parameters()))


def test_batchnorm_blocks_verify_their_replay():
    # a recompute repeats BatchNorm's num_batches_tracked += 1 on the forward's value,
    # and the chain puts the buffers back: not a difference (it was reported as one)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                                          nn.ReLU()) for _ in range(3)])
    batch = torch.randn(2, 4, 8, 8)
    before = copy.deepcopy(model.state_dict())
    for form in ("full", "ops:convolution", "remat:-"):
        checked = copy.deepcopy(model)
        quiet_apply(checked, form)
        verify_replay(checked, batch)
        assert all(torch.equal(before[k], v) for k, v in checked.state_dict().items()), form


def test_planning_changes_neither_the_model_nor_the_rng():
    # plan() runs the model (timed block forwards, a verified replay); BatchNorm's
    # statistics and the global RNG moved on before (found by a new-user trial)
    from memprop.checkpoint import plan
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                                          nn.ReLU(), nn.Dropout(0.1)) for _ in range(4)])
    batch = torch.randn(8, 4, 8, 8)
    before, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
    p = plan(model, batch, 120_000)
    assert p.spec != "none"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


class _PerLayerInputs(nn.Module):
    """Each block gets its own extra input (as gemma4's per_layer_input): a segment of
    several blocks cannot replay the loop, one block per checkpoint can."""

    def __init__(self, n=8, d=64):
        super().__init__()
        self.blocks = nn.ModuleList(_Extra(d) for _ in range(n))
        self.extras = nn.Parameter(torch.randn(n, d) * 0.1)

    def forward(self, x):
        for block, extra in zip(self.blocks, self.extras):
            x = block(x, extra)
        return x


class _Extra(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, extra):
        return x + self.down(torch.tanh(self.up(x + extra)))


def test_the_planner_leaves_out_segments_the_models_loop_cannot_replay():
    # planning simulated a multi-block segment, which refused (SegmentRefused), and the
    # whole plan() raised (hf:gemma4_text); such segments are now left out, said why
    from memprop.checkpoint import plan
    from memprop.errors import BudgetError
    from memprop.measure import measure_step
    torch.manual_seed(0)
    model, x = _PerLayerInputs(), torch.randn(256, 64)
    full = copy.deepcopy(model)
    quiet_apply(full, "full")
    full_peak = measure_step(full, x, repeats=1).peak_bytes
    # below full's peak only segments of several blocks could go: none can run here
    with pytest.raises(BudgetError) as info:
        plan(model, x, full_peak - 1, whole=False)
    smallest = info.value.smallest_feasible_bytes
    assert smallest == full_peak
    p = plan(model, x, smallest, whole=False)
    assert p.segments and all(a == b for a, b in p.segments)
    checked = copy.deepcopy(model)
    p.apply(checked)
    assert measure_step(checked, x, repeats=1).peak_bytes == p.predicted_peak_bytes


class _ScalesItsMatmul(nn.Module):
    """A block that changes its Linear's output in place (as convbert and funnel do)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        y.mul_(2)
        return torch.tanh(y)


class _AddsIntoItsAttention(nn.Module):
    """A 4-d matmul (bmm under an ``_unsafe_view``, which shares no version counter with
    it) written into in place, as hf:nystromformer's ``context += conv(v)``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        q = self.lin(x).view(1, 2, 2, 8)
        context = torch.matmul(q, q.transpose(-1, -2))
        context += torch.tanh(q).sum(-1, keepdim=True)
        return torch.tanh(context).reshape(4, 2).repeat(1, 4)


@pytest.mark.parametrize("block,form", [(_ScalesItsMatmul, "selective"),
                                        (_ScalesItsMatmul, "ops:addmm"),
                                        (_AddsIntoItsAttention, "selective"),
                                        (_AddsIntoItsAttention, "ops:bmm")])
def test_a_write_into_a_kept_output_replays_exactly(block, form):
    """NOTE [ A kept output written through an alias ]: before the forward writes into
    an output a selective checkpoint keeps, the cache gets a copy, so the recompute reads
    what the forward read. A write through an alias that shares no version counter
    (matmul's _unsafe_view: nystromformer's context += conv(v)) gave other gradients
    silently before (max difference 21 here); a direct write (convbert, funnel) met
    torch's RuntimeError, then memprop's refusal. Now both are bitwise the plain step,
    step after step, and the replay verifies."""
    x = torch.randn(4, 8)
    plain = nn.Sequential(*(block() for _ in range(2)))
    model = copy.deepcopy(plain)
    quiet_apply(model, form)
    for _ in range(2):
        for m in (plain, model):
            m.zero_grad(set_to_none=True)
            m(x).sum().backward()
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(),
                                                              model.parameters()))
    verify_replay(model, x, loss_fn=lambda m, b: m(b).sum())


class _CountsItsCalls(nn.Module):
    """A forward that reads state it changes (a call counter; ibert's quantisation
    ranges do the same): a recompute does not replay the forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        y = self.lin(x)
        if int(self.calls.item()) % 2 == 0:
            y = y * 2
        return torch.tanh(y * 3)


class _TracksItsRange(nn.Module):
    """A forward that reads a buffer, then replaces it by a new tensor (``self.top =
    ...``), as ibert's QuantAct replaces its range buffers."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("top", torch.ones(()))

    def forward(self, x):
        y = self.lin(x)
        out = torch.tanh(y / self.top)
        self.top = torch.maximum(self.top * 0.9, y.detach().abs().max())
        return out


@pytest.mark.parametrize("module", [_CountsItsCalls, _TracksItsRange])
@pytest.mark.parametrize("form", ["full", "blocks:0-1", "selective", "ops:addmm",
                                  "nested:0-1", "nested:0-1[0]"])
def test_a_forward_that_reads_state_it_changes_replays_exactly(form, module):
    """A checkpoint recomputes with the buffers as its forward saw them (NOTE [ Buffers
    a forward changes ]): gradients and buffers bitwise those of the plain model, step
    after step, and its replay verifies (before, a plain checkpoint recomputed the other
    branch silently, and selective ones met torch's RuntimeError)."""
    x = torch.randn(4, 8)
    plain = nn.Sequential(module(), module())
    model = copy.deepcopy(plain)
    quiet_apply(model, form)
    for _ in range(3):                 # the counter's parity flips the branch
        for m in (plain, model):
            m.zero_grad(set_to_none=True)
            m(x).sum().backward()
        assert all(torch.equal(a.grad, b.grad)
                   for a, b in zip(plain.parameters(), model.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(plain.buffers(), model.buffers()))
    verify_replay(model, x, loss_fn=lambda m, b: m(b).sum())
    twin = copy.deepcopy(model)          # what it learnt travels with the model
    twin(x).sum().backward()


def test_a_buffer_changed_for_the_first_time_after_the_first_step_is_refused():
    class Sometimes(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x, bump=False):
            if bump:
                self.seen += 1
            return self.lin(x) * (1 + self.seen)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Sometimes()])

        def forward(self, x, bump=False):
            for layer in self.layers:
                x = layer(x, bump=bump)
            return x

    model = Net()
    quiet_apply(model, "full", blocks="Sometimes")
    x = torch.randn(4, 8)
    model(x).sum().backward()
    with pytest.raises(StrategyError, match="changed its buffer 'seen' in place"):
        model(x, bump=True).sum().backward()
    model.zero_grad(set_to_none=True)
    model(x, bump=True).sum().backward()      # kept from now on: exact
    verify_replay(model, x, loss_fn=lambda m, b: m(b, bump=True).sum())
