"""Checkpointing strategies: gradients identical to the plain run, recompute FLOPs
counted by hand, state_dict unchanged, and clear errors."""

import copy
import types
import warnings

import pytest
import torch
from torch import nn

from memprop.checkpoint import (
    STRATEGY_FORMS,
    Blocks,
    EveryK,
    Full,
    Segments,
    Sqrt,
    apply_strategy,
    parse_strategy,
    remove_strategy,
)
from memprop.errors import StrategyError
from memprop.models import model_config, training_loss
from memprop.workload import build_workload, measure

ZOO = {
    "d2l_mlp": dict(d=20, h=12, q=5),
    "mlp": dict(depth=5, width=24, d_in=16, d_out=6, phi="gelu"),
    "transformer": dict(depth=3, d_model=16, heads=2, seq_len=8, vocab=30, dropout=0.2),
    "convnet": dict(depth=3, channels=4, image_size=8),
}
STRATEGIES = ["full", "every:2", "segments:2", "sqrt", "blocks:0-1", "blocks:1",
              "selective", "offload"]


def one_step(name, strategy):
    """Loss, gradients and buffers after one forward + backward; dropout's RNG is
    seeded identically, so any difference comes from the strategy."""
    return one_step_of(model_config(name, **ZOO[name]), strategy)


def one_step_of(cfg, strategy):
    model, batch = build_workload(cfg, 4)
    keys = list(model.state_dict())
    if strategy != "none":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_strategy(model, strategy)
    assert list(model.state_dict()) == keys      # applying keeps the state_dict keys
    torch.manual_seed(123)
    loss = training_loss(model, batch)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loss_gradients_and_buffers_bitwise_equal_to_plain(name, strategy):
    # CPU float32 kernels are deterministic and a recompute replays the same ops on the
    # same inputs (RNG state restored for dropout), so equality is exact, not approximate
    loss0, grads0, bufs0 = one_step(name, "none")
    loss1, grads1, bufs1 = one_step(name, strategy)
    assert torch.equal(loss0, loss1)
    for key in grads0:
        assert torch.equal(grads0[key], grads1[key]), key
    # BatchNorm running statistics: one update, not two (recompute restores them)
    for key in bufs0:
        assert torch.equal(bufs0[key], bufs1[key]), key


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_relu_mlp_with_held_segment_outputs_is_bitwise_equal_to_plain(strategy):
    # ReLU blocks: segments skip their last matmul (NOTE [ A segment's output needs no
    # recompute ]); the gradients must not notice
    cfg = model_config("mlp", depth=5, width=24, d_in=16, d_out=6, phi="relu")
    loss0, grads0, _ = one_step_of(cfg, "none")
    loss1, grads1, _ = one_step_of(cfg, strategy)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(grads0[k], grads1[k]) for k in grads0)


def test_batchnorm_stats_after_checkpointed_step_equal_plain_after_optimizer_step():
    cfg = model_config("convnet", depth=2, channels=3, image_size=6)
    runs = []
    for strategy in ("none", "full"):
        model, batch = build_workload(cfg, 5)
        apply_strategy(model, strategy)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        training_loss(model, batch).backward()
        opt.step()
        runs.append(model.state_dict())
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key
    assert runs[1]["blocks.0.bn.num_batches_tracked"].item() == 1


def _mlp_flops(strategy, depth, phi, B=8, w=32):
    # d_in = width, so every block's forward costs the same: 2·B·w·w FLOPs (one addmm)
    cfg = model_config("mlp", depth=depth, width=w, d_in=w, d_out=4, phi=phi)
    m = measure(cfg, B, strategy=strategy, repeats=1, inference=False)
    return m, 2 * B * w * w


@pytest.mark.parametrize("strategy,depth,gelu,relu", [
    # GELU saves its input (the block's matmul output): a recompute runs every block of
    # its segment. ReLU saves its output, which is the segment's output, kept anyway by
    # the next Linear or the head: the last block's matmul is skipped (NOTE [ A
    # segment's output needs no recompute ]), so single-block segments cost nothing
    ("full", 8, 8, 0),          # every block recomputed once
    ("every:2", 8, 4, 0),       # blocks 1, 3, 5, 7
    ("every:3", 8, 2, 0),       # blocks 2, 5
    ("segments:4", 8, 6, 3),    # 4 segments of 2, the last not checkpointed
    ("sqrt", 16, 12, 9),        # ceil(sqrt 16) = 4 segments of 4, the last not checkpointed
    ("sqrt", 10, 8, 5),         # segments (0-2), (3-5), (6-7); (8-9) runs plainly
    ("blocks:0-2,5", 8, 4, 2),
    ("selective", 8, 0, 0),     # recomputes pointwise ops only; FlopCounter counts matmuls
    ("none", 8, 0, 0),
])
@pytest.mark.parametrize("phi", ["gelu", "relu"])
def test_backward_flops_in_units_of_one_layer_forward(strategy, depth, gelu, relu, phi):
    plain, layer = _mlp_flops("none", depth, phi)
    m, _ = _mlp_flops(strategy, depth, phi)
    assert m.forward_flops == plain.forward_flops
    assert m.backward_flops - plain.backward_flops == {"gelu": gelu, "relu": relu}[phi] * layer


def test_held_segment_output_is_exact_and_costs_no_bytes():
    """ReLU MLP: segment 2-5 recomputes blocks 2-4 only (block 5's output is held: the
    next Linear saves it anyway), stores what it stored before, predicts exactly, and
    leaves loss and gradients bitwise; the tracker sees no extra bytes."""
    from memprop.checkpoint.planning.profile import stop_flops
    from memprop.checkpoint.planning.simulate import simulate as simulate_strategy
    cfg = model_config("mlp", depth=8, width=32, d_in=32, d_out=4)
    model, data = build_workload(cfg, 8)
    layer = 2 * 8 * 32 * 32
    plain = measure(cfg, 8, repeats=1, inference=False)
    m = measure(cfg, 8, strategy="blocks:2-5", repeats=1, inference=False)
    fake = simulate_strategy(model, data, parse_strategy("blocks:2-5"))
    assert m.backward_flops - plain.backward_flops == 3 * layer
    # the planner's cost model credits the same skip: one layer per block
    assert stop_flops(model, data) == ((0.0,) * 8, (float(layer),) * 8)
    assert (fake.backward_flops, fake.saved_bytes, fake.peak_bytes) == (
        m.backward_flops, m.saved_bytes, m.peak_bytes)
    # the outputs of blocks 2, 3, 4 (B×w floats each) are no longer stored
    assert plain.saved_bytes - m.saved_bytes == 3 * 8 * 32 * 4
    loss0, grads0, _ = one_step_of(cfg, "none")
    loss1, grads1, _ = one_step_of(cfg, "blocks:2-5")
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(grads0[k], grads1[k]) for k in grads0)


def test_a_block_with_nothing_to_skip_is_recorded_once_per_mode(monkeypatch):
    """Recording a block's forward for the skip costs a Python dispatch per op (NOTE [ A
    segment's output needs no recompute ]). A GELU block's output is GELU's, which saves
    its input: nothing to skip, so its forward is recorded once per training mode,
    whatever strategy wraps it later. A ReLU block's is recorded every time (its
    recompute skips the matmul), and a forward with nothing to skip for a passing
    reason (no graph: every parameter frozen) marks nothing. Gradients stay bitwise."""
    from memprop.checkpoint.forms import tail
    ops: list = []
    original = tail.TailRecord.__torch_dispatch__

    def counting(self, func, types, args=(), kwargs=None):
        ops.append(func)
        return original(self, func, types, args, kwargs)
    monkeypatch.setattr(tail.TailRecord, "__torch_dispatch__", counting)

    def recorded(model, batch, strategy, *, train=True, step=True) -> bool:
        apply_strategy(model, strategy)
        model.train(train)
        model.zero_grad(set_to_none=True)
        before = len(ops)
        try:
            loss = training_loss(model, batch)
            if step:
                loss.backward()
                assert all(torch.equal(a, p.grad) for a, p in zip(plain, model.parameters()))
        finally:
            remove_strategy(model)
        return len(ops) > before

    def mlp(phi):
        return build_workload(model_config("mlp", depth=4, width=16, d_in=16, d_out=3,
                                           phi=phi), 4)
    plain: list = []
    for phi in ("gelu", "relu"):
        model, batch = mlp(phi)
        training_loss(model, batch).backward()
        plain = [p.grad.clone() for p in model.parameters()]
        if phi == "gelu":
            assert [recorded(model, batch, s) for s in ("full", "full", "segments:2")] == [
                True, False, False]
            # eval mode is another mode: recorded once in it too
            assert [recorded(model, batch, "full", train=False, step=False)
                    for _ in range(2)] == [True, False]
    model.requires_grad_(False)                    # a frozen warm-up: no graph
    assert recorded(model, batch, "full", step=False)
    model.requires_grad_(True)
    assert [recorded(model, batch, s) for s in ("full", "full", "segments:2")] == [
        True, True, True]


def test_full_checkpointing_stores_only_block_inputs():
    # gelu MLP: each block saves its input (Linear) and z (gelu's input); checkpointing
    # every block keeps only the block inputs: x, then depth-1 block outputs
    B, w, depth = 6, 20, 4
    cfg = model_config("mlp", depth=depth, width=w, d_in=w, d_out=3, phi="gelu")
    plain = measure(cfg, B, repeats=1, inference=False)
    full = measure(cfg, B, strategy="full", repeats=1, inference=False)
    tail = B * 3 * 4 + 4 + B * 8            # log-softmax, NLL total weight, int64 targets
    assert plain.saved_bytes == B * w * 4 * (1 + 2 * depth) + tail
    assert full.saved_bytes == B * w * 4 * (1 + depth) + tail   # + last block output (head input)


def test_selective_reports_the_op_outputs_it_keeps():
    B, w, depth = 6, 20, 3
    cfg = model_config("mlp", depth=depth, width=w, d_in=w, d_out=3, phi="relu")
    m = measure(cfg, B, strategy="selective", repeats=1, inference=False)
    frame = m.saved
    kept = frame[frame.op == "selective:addmm"]
    assert len(kept) == depth and (kept.saved_bytes == B * w * 4).all()   # each block's z


@pytest.mark.parametrize("text,expected", [
    ("none", "none"), ("FULL", "full"), ("every:3", "every:3"), ("segments:4", "segments:4"),
    ("sqrt", "sqrt"), ("blocks:0,2", "blocks:0,2"), ("blocks:0-3,5", "blocks:0-3,5"),
    ("selective", "selective"), ("offload", "offload"), ("budget:1.5GiB", "budget:1.5GiB")])
def test_parse_round_trips(text, expected):
    assert parse_strategy(text).spec == expected


@pytest.mark.parametrize("text,message", [
    ("sqrtn", "unknown strategy 'sqrtn'; choose one of: " + ", ".join(STRATEGY_FORMS)),
    ("every:0", "every:K needs an integer K >= 1"),
    ("every:x", "unknown strategy 'every:x'"),
    ("blocks:3,1", "needs ordered, disjoint blocks"),
    ("budget:lots", "cannot read 'lots' as a size"),
])
def test_bad_strategies_list_valid_forms(text, message):
    with pytest.raises(StrategyError) as info:
        parse_strategy(text)
    assert message in str(info.value)


def test_bad_block_index_and_double_apply():
    model, _ = build_workload(model_config("mlp", depth=3, width=8, d_in=8), 2)
    with pytest.raises(StrategyError, match="names block 7 but the chain has blocks 0..2"):
        apply_strategy(model, "blocks:7")
    apply_strategy(model, "full")
    with pytest.raises(StrategyError, match="already has strategy full applied"):
        apply_strategy(model, "sqrt")
    remove_strategy(model)
    apply_strategy(model, "sqrt")


def test_remove_strategy_restores_plain_run_and_state_dicts_interchange():
    cfg = model_config("mlp", depth=4, width=8, d_in=8)
    model, batch = build_workload(cfg, 3)
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    saves = []                                   # tensors stored: plain, full, removed
    with SavedCount() as counter:
        training_loss(model, batch)
    saves.append(counter.n)
    Full().apply(model)
    model.load_state_dict(plain_state)           # a plain checkpoint loads
    other, _ = build_workload(cfg, 3, seed=1)
    other.load_state_dict(model.state_dict())    # and vice versa
    with SavedCount() as counter:
        training_loss(model, batch)
    saves.append(counter.n)
    remove_strategy(model)
    with SavedCount() as counter:
        training_loss(model, batch)
    saves.append(counter.n)
    # plain again: every layer saves what it saved before (full saves fewer: block inputs)
    assert saves[2] == saves[0] > saves[1], saves
    assert not any("forward" in b.__dict__ for b in model.blocks)


class SavedCount:
    def __enter__(self):
        self.n = 0
        self._h = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._h.__enter__()
        return self

    def _pack(self, t):
        self.n += 1
        return t

    def __exit__(self, *exc):
        self._h.__exit__(*exc)


class KwargBlock(nn.Module):
    """A block with a keyword argument and a tuple output (hidden state, auxiliary)."""

    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(w, w)

    def forward(self, x, *, scale=1.0):
        y = torch.tanh(self.lin(x)) * scale
        return y, y.mean()


class UserNet(nn.Module):
    def __init__(self, w=8, n=4):
        super().__init__()
        self.layers = nn.ModuleList(KwargBlock(w) for _ in range(n))

    def forward(self, x):
        aux = 0
        for layer in self.layers:
            x, a = layer(x, scale=0.5)
            aux = aux + a
        return x.sum() + aux


@pytest.mark.parametrize("strategy", [Full(), EveryK(2), Blocks((0, 3)), Segments(2), Sqrt(),
                                      Blocks(((1, 3),))])
def test_user_model_with_kwargs_and_tuple_outputs(strategy):
    x = torch.randn(5, 8)
    results = []
    for strat in (None, strategy):
        torch.manual_seed(0)
        net = UserNet()
        if strat is not None:
            strat.apply(net, blocks_attr="layers")
        out = net(x)
        out.backward()
        results.append((out.detach(), [p.grad for p in net.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


class LoopWorkNet(UserNet):
    """A loop that does work between blocks: the next block's input is not the previous
    block's output, so a multi-block segment cannot replay it."""

    def forward(self, x):
        for layer in self.layers:
            x, _ = layer(x, scale=0.5)
            x = x * 2
        return x.sum()


class ExtraArgNet(UserNet):
    """A loop passing each block a different keyword argument."""

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, scale=0.5 + i)
        return x.sum()


class MaskBlock(nn.Module):
    """A block adding a mask of its own width (hf:lfm3, minimax: per-layer masks)."""

    def __init__(self, w, k):
        super().__init__()
        self.lin, self.k = nn.Linear(w, w), k

    def forward(self, x, mask):
        return torch.tanh(self.lin(x)) + mask.reshape(x.shape[0], self.k).sum(-1, keepdim=True)


class PerLayerMaskNet(nn.Module):
    def __init__(self, w=8, n=4):
        super().__init__()
        self.layers = nn.ModuleList(MaskBlock(w, (3, 6)[i % 2]) for i in range(n))

    def forward(self, x):
        masks = [torch.ones(x.shape[0], 3), torch.ones(x.shape[0], 3, 2)]
        for i, layer in enumerate(self.layers):
            x = layer(x, masks[i % 2])
        return x.sum()


def _step(net, x):
    with SavedCount() as counter:
        out = net(x)
    out.backward()
    return out.detach(), [p.grad for p in net.parameters()], counter


@pytest.mark.parametrize("net_cls", [UserNet, LoopWorkNet, ExtraArgNet, PerLayerMaskNet])
@pytest.mark.parametrize("strategy", [Segments(2), Sqrt(), Blocks(((1, 3),))])
def test_a_multi_block_segment_replays_whatever_the_loop_hands_each_block(net_cls, strategy):
    """NOTE [ A segment that spans the loop's calls ]: each block runs when the loop calls
    it and is replayed with its own arguments (a keyword that changes per block, a mask
    of another shape per block, work the loop does between blocks): bitwise the plain
    step. Before, all three were refused (the segment ran block k + 1 with block k's
    arguments); a per-layer mask of another shape raised."""
    x = torch.randn(5, 8)
    torch.manual_seed(0)
    plain = net_cls()
    net = copy.deepcopy(plain)
    strategy.apply(net, blocks_attr="layers")
    want, got = _step(plain, x), _step(net, x)
    assert torch.equal(want[0], got[0])
    assert all(map(torch.equal, want[1], got[1]))
    with torch.no_grad():                          # inference: the blocks as the loop calls
        assert torch.equal(net(x), plain(x))


def test_a_span_stores_what_the_loop_hands_in_and_not_what_its_blocks_made():
    # the hidden state a block returns is recomputed, not stored; an input the loop
    # makes between blocks (LoopWorkNet's x * 2) is stored, as a checkpoint stores its
    # inputs: the plain chain stores least, then the loop with work between blocks,
    # then one checkpoint per block
    x = torch.randn(5, 8)
    stored = {}
    for name, net_cls, spec in (("chain", UserNet, "blocks:0-3"),
                                ("work", LoopWorkNet, "blocks:0-3"),
                                ("full", UserNet, "full")):
        torch.manual_seed(0)
        net = net_cls()
        apply_strategy(net, spec, blocks_attr="layers")
        stored[name] = _step(net, x)[2].n
    assert stored["chain"] < stored["work"] <= stored["full"], stored


@pytest.mark.parametrize("spec", ["sqrt", "blocks:0-3,4-7"])
def test_nothing_a_span_stored_outlives_backward(spec):
    # the frame holds the run, never the other way round: what a span stored goes when
    # backward drops its graph, so the optimizer step's peak is the plain step's (with a
    # cycle, sqrt's optimizer peak on this MLP was 2 MiB higher, its backward 1.25 MiB)
    cfg = model_config("mlp", depth=16, width=256, d_in=256)
    plain = measure(cfg, 1024, timing=False, flops=False, inference=False)
    m = measure(cfg, 1024, strategy=spec, timing=False, flops=False, inference=False)
    assert m.peak_by_phase["optimizer"] == plain.peak_by_phase["optimizer"]


def test_a_block_called_out_of_the_segments_order_is_refused():
    class SkipsOne(UserNet):
        def forward(self, x):
            for layer in (self.layers[0], self.layers[2], self.layers[3]):
                x, _ = layer(x, scale=0.5)
            return x.sum()
    net = SkipsOne()
    apply_strategy(net, "blocks:0-3", blocks_attr="layers")
    with pytest.raises(StrategyError, match=r"called block 2 \(KwargBlock\) out of the "
                                            r"order.*block 1 \(KwargBlock\) was next"):
        net(torch.randn(5, 8))


class CacheAppendingBlock(nn.Module):
    """A block appending to a cache object it is handed (flaubert and xlm create one
    on every forward, whatever use_cache says)."""

    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(w, w)

    def forward(self, x, cache):
        keys = cache.update(self.lin(x))
        return torch.tanh(keys.sum(0) + self.lin(x))


class _Cache:
    """transformers' Cache interface, in small: ``update`` appends and returns all."""

    def __init__(self):
        self.keys: list = []

    def update(self, k):
        self.keys.append(k)
        return torch.stack(self.keys)

    def get_seq_length(self):
        return len(self.keys)


class SharingBlock(nn.Module):
    """Leaves its output in a dict for later blocks, reads what earlier ones left (gemma4's
    shared keys and values)."""

    def __init__(self, w, i):
        super().__init__()
        self.lin, self.i = nn.Linear(w, w), i

    def forward(self, x, shared):
        y = torch.tanh(self.lin(x) + sum(shared.values(), torch.zeros(())))
        shared[self.i] = y
        return y


class SharingNet(nn.Module):
    def __init__(self, w=8, n=4):
        super().__init__()
        self.layers = nn.ModuleList(SharingBlock(w, i) for i in range(n))

    def forward(self, x):
        shared: dict = {}
        for layer in self.layers:
            x = layer(x, _Shared(shared))
        return x.sum()


class _Shared:
    """A dict-like object that blocks only add entries to."""

    def __init__(self, entries):
        self.entries = entries

    def values(self):
        return self.entries.values()

    def __setitem__(self, k, v):
        self.entries[k] = v


class CacheNet(nn.Module):
    """Hands every block one cache it appends to (flaubert's and xlm's forward)."""

    def __init__(self, w=8, n=4):
        super().__init__()
        self.layers = nn.ModuleList(CacheAppendingBlock(w) for _ in range(n))

    def forward(self, x):
        cache = _Cache()
        for layer in self.layers:
            x = layer(x, cache)
        return x.sum()


class PlainDictNet(SharingNet):
    """Hands every block the same plain dict (flattened by pytree, not an object)."""

    def forward(self, x):
        shared: dict = {}
        for layer in self.layers:
            x = layer(x, shared)
        return x.sum()


class InPlaceBlock(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(w, w)

    def forward(self, x, state):
        y = torch.tanh(self.lin(x) * state.scale)
        state.scale.mul_(2)                     # a tensor of the object, changed in place
        return y


class InPlaceNet(nn.Module):
    def __init__(self, w=8, n=4):
        super().__init__()
        self.layers = nn.ModuleList(InPlaceBlock(w) for _ in range(n))

    def forward(self, x):
        state = types.SimpleNamespace(scale=torch.ones(()))
        for layer in self.layers:
            x = layer(x, state)
        return x.sum()


@pytest.mark.parametrize("net_cls", [SharingNet, CacheNet, PlainDictNet])
@pytest.mark.parametrize("spec", ["full", "blocks:1-3", "sqrt", "selective"])
def test_an_object_a_block_changes_is_rewound_for_its_recompute(net_cls, spec):
    # gemma4's layers leave keys and values in a dict for later layers, flaubert's
    # append to a cache: the recompute in backward would find the object as the last
    # block left it (a block reading every entry read later blocks' entries: the
    # gradients differed, the loss did not). Each block's recompute now sees the object
    # as its forward did (NOTE [ An object a block changes ]): bitwise the plain step
    x = torch.randn(2, 8)
    torch.manual_seed(0)
    plain = net_cls()
    net = copy.deepcopy(plain)
    apply_strategy(net, spec, blocks_attr="layers")
    want, got = _step(plain, x), _step(net, x)
    assert torch.equal(want[0], got[0]) and all(map(torch.equal, want[1], got[1]))
    assert got[2].n < want[2].n                        # and it stores less


@pytest.mark.parametrize("spec", ["full", "blocks:1-3"])
def test_a_tensor_of_an_object_changed_in_place_is_refused(spec):
    # a shallow rewind cannot undo an in-place write: refused, naming the path
    net = InPlaceNet()
    apply_strategy(net, spec, blocks_attr="layers")
    with pytest.raises(StrategyError, match=r"a tensor in the object block \d \(InPlaceBlock\) "
                                            r"was handed \(SimpleNamespace.scale\) changed in "
                                            r"place during its forward"):
        _step(net, torch.randn(2, 8))


def test_sequential_and_missing_chain():
    # an nn.Sequential is its own chain: segments:2 checkpoints its children 0-1 (the
    # last segment runs plainly), bitwise, and the forward stores less than plainly
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    plain, x = copy.deepcopy(seq), torch.randn(2, 4)
    assert apply_strategy(seq, "segments:2").segments(len(seq)) == [(0, 1)]
    runs = []
    for model in (plain, seq):
        with SavedCount() as counter:
            loss = model(x).sum()
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters()], counter.n))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(map(torch.equal, runs[0][1], runs[1][1]))
    # plain: Linear 0's input, ReLU 1's output, Linear 2's input and weight, ReLU 3's
    # output; checkpointed, children 0-1 keep their input only
    assert [saves for _, _, saves in runs] == [5, 4]
    with pytest.raises(StrategyError, match="cannot find the block chain of Linear"):
        apply_strategy(nn.Linear(3, 3), "full")
    with pytest.raises(StrategyError, match="UserNet.nope is not a non-empty"):
        apply_strategy(UserNet(), "full", blocks_attr="nope")


def test_offload_on_cpu_says_it_moves_nothing():
    model, _ = build_workload(model_config("mlp", depth=2, width=8, d_in=8), 2)
    with pytest.warns(UserWarning, match="offload on a CPU model moves nothing"):
        apply_strategy(model, "offload")


class EncDec(nn.Module):
    """Two chains of blocks (an encoder of 3, a decoder of 2) and a loop-free head."""

    def __init__(self, w=8):
        super().__init__()
        self.encoder = nn.ModuleList(nn.Sequential(nn.Linear(w, w), nn.Tanh()) for _ in range(3))
        self.decoder = nn.ModuleList(KwargBlock(w) for _ in range(2))
        self.head = nn.Linear(w, 1)

    def forward(self, x):
        for block in self.encoder:
            x = block(x)
        for block in self.decoder:
            x, _ = block(x, scale=2.0)
        return self.head(x).sum()


def test_every_chain_is_found_and_checkpointed():
    from memprop.checkpoint import find_blocks, find_chains
    net = EncDec()
    assert find_chains(net) == [list(net.encoder), list(net.decoder)]
    assert find_chains(net, blocks="KwargBlock") == [list(net.decoder)]
    assert find_chains(net, blocks=KwargBlock) == [list(net.decoder)]
    assert find_chains(net, check_fn=lambda m: m is net.encoder[1]) == [[net.encoder[1]]]
    with pytest.raises(StrategyError, match=r"2 block chains \(encoder \(3 x Sequential\), "
                                            r"decoder \(2 x KwargBlock\)\).*blocks_attr"):
        find_blocks(net)
    with pytest.raises(StrategyError, match="no module of EncDec matches blocks='Nope'"):
        find_chains(net, blocks="Nope")
    x = torch.randn(4, 8)
    runs = []
    for strategy in ("none", "full", "sqrt"):
        torch.manual_seed(0)
        model = EncDec()
        apply_strategy(model, strategy)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            out = model(x)
        out.backward()
        runs.append((out.detach(), [p.grad for p in model.parameters()], len(saved)))
    for out, grads, _ in runs[1:]:
        assert torch.equal(runs[0][0], out)
        assert all(torch.equal(a, b) for a, b in zip(runs[0][1], grads))
    # tensors reaching an outer hook. none: 3 per block (Linear's input and weight, tanh's
    # output; the first Linear keeps no weight, its input needs no gradient) + the head's
    # input and weight = 5·3 - 1 + 2. full: each of the 5 blocks of both
    # chains keeps its input only, + 2. sqrt: encoder segment 0-1 keeps 1, block 2 plain
    # 3; decoder block 0 checkpointed 1, block 1 plain 3; + 2
    assert [saves for _, _, saves in runs] == [16, 7, 10]


class _Chain(nn.Module):
    """Blocks in a ModuleList, then ``tail`` (a module or None) and a sum of squares."""

    def __init__(self, blocks, tail=None):
        super().__init__()
        self.blocks, self.tail = nn.ModuleList(blocks), tail

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.tail is None else self.tail(x)


class _LinearTanh(nn.Module):
    def __init__(self, keep=False):
        super().__init__()
        self.linear, self.keep = nn.Linear(8, 8), keep

    def forward(self, x):
        h = self.linear(x)
        if self.keep:
            self.kept = h                       # the matmul's output outlives the block
        return torch.tanh(h)


class _Scale(nn.Module):
    def __init__(self, in_place):
        super().__init__()
        self.in_place = in_place

    def forward(self, x):
        return x.mul_(-1.5) if self.in_place else x * -1.5


def _grads(model, strategy, x, *, backwards=1):
    if strategy != "none":
        apply_strategy(model, strategy)
    loss = (model(x) ** 2).sum()
    for k in range(backwards):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=k < backwards - 1)
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("case", ["output changed in place", "matmul output kept",
                                  "second backward"])
def test_segment_output_is_not_reused_where_that_would_be_wrong(case):
    # NOTE [ A segment's output needs no recompute ]: an output changed in place after
    # the forward, an intermediate someone kept (it would see the placeholder) or a
    # second recompute: the block is recomputed in full, gradients exact
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    make = {"output changed in place": lambda: _Chain([_LinearTanh() for _ in range(3)],
                                                      _Scale(True)),
            "matmul output kept": lambda: _Chain([_LinearTanh(), _LinearTanh(keep=True),
                                                  _LinearTanh()]),
            "second backward": lambda: _Chain([_LinearTanh() for _ in range(3)])}[case]
    torch.manual_seed(1)
    reference = make()
    if case == "output changed in place":
        reference.tail = _Scale(False)          # the plain step refuses the in-place one
    backwards = 2 if case == "second backward" else 1
    expected = _grads(reference, "none", x, backwards=backwards)
    torch.manual_seed(1)
    got = _grads(make(), "blocks:0-1,2", x, backwards=backwards)
    assert all(map(torch.equal, expected, got))


def test_which_ops_a_recompute_skips_does_not_depend_on_reused_addresses():
    """Storages freed inside a block (a dropout mask, a first ReLU) leave their address
    to later ones; the decision must not read them as the same tensor: six runs, one
    answer, equal to the prediction."""
    from memprop.checkpoint.planning.simulate import simulate as simulate_strategy
    from memprop.measure import measure_step

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return torch.relu(self.l2(torch.relu(self.l1(x))))

    torch.manual_seed(0)
    model = _Chain([Block() for _ in range(3)], nn.Linear(16, 1))
    batch = ((torch.randn(64, 16),), torch.randn(64, 1))
    loss = lambda m, b: ((m(*b[0]) - b[1]) ** 2).mean()  # noqa: E731
    strategy = parse_strategy("blocks:0-1")
    runs = {(m.saved_bytes, m.peak_bytes, m.backward_flops) for m in (
        measure_step(model, batch, loss_fn=loss, strategy=strategy, repeats=1,
                     inference=False, timing=False) for _ in range(6))}
    fake = simulate_strategy(model, batch, strategy, loss_fn=loss)
    assert runs == {(fake.saved_bytes, fake.peak_bytes, fake.backward_flops)}
    plain = measure_step(model, batch, loss_fn=loss, repeats=1, inference=False,
                         timing=False)
    # blocks 0-1 recompute block 0 and block 1's first Linear; its second is skipped
    assert fake.backward_flops - plain.backward_flops == 2 * 64 * (16 * 32 + 16 * 32 + 16 * 32)
