"""What the planner knows of a model before it chooses: per block of the chain, the
bytes it takes in, gives out and saves, its FLOPs and (real models) its time; per op
call, its output bytes and FLOPs; what a recompute may skip; what a replay re-runs.
Every function here runs the model's forward on fake tensors (a fake twin of a real
model: ``memprop.fake.fake_target``), except ``block_times_ms``, which times real blocks.

NOTE [ One trace ]
  ``profile`` runs the loss once on the fake twin with every collector attached: the
  chain's costs (``ChainCosts``: block inputs, outputs, what each saves, FLOPs, the
  parameters each first uses), early stops and held outputs per block, every block's op
  calls, what checkpointing each block's children alone would free (``ChildCost``), and
  the whole forward's op calls and early stop (for ``forward:`` and
  ``remat:``). Collectors share one FLOP counter and one saved-tensor hook (torch runs
  only the innermost); each keeps its own module hooks and dispatch mode. The
  functions ``profile_chain``, ``stop_flops`` and ``trace_blocks`` run one collector
  each, for callers that need one answer.

NOTE [ Op-level options of a block ]
  From one traced forward (``trace_blocks``: every op of every block, its output bytes
  and FLOPs), a block checkpointed with keys K stores its input, plus the outputs of the
  ops in K, and recomputes the FLOPs of the other ops (``block_options``). The options
  are every subset of the block's FLOP-carrying calls (matmuls, attention,
  convolutions) up to ``max_calls`` of them; cheap pointwise ops are always recomputed.
  Both of the planner's DPs weigh them (the peak DP, ``dp.solve(options=...)``, and
  the stored-bytes DP, ``rotor.stored_fronts``) against storing the block and
  against plain segments; each plan is then checked by simulating the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections import Counter

import pandas as pd
import torch
from torch import nn
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode_stack,
    _pop_mode,
)
from torch.utils._pytree import tree_flatten

from memprop.checkpoint.forms.blocks import find_blocks
from memprop.checkpoint.forms.opkeys import draws_random, op_name
from memprop.checkpoint.forms.oplevel import CHILD_KEY
from memprop.checkpoint.forms.remat import Remat
from memprop.checkpoint.forms.strategies import remove_strategy
from memprop.checkpoint.forms.tail import TailRecord
from memprop.checkpoint.planning.dp import ChainCosts
from memprop.checkpoint.planning.fronts import pareto
from memprop.errors import StrategyError
from memprop.fake import fake_target
from memprop.flops import FlopCounter
from memprop.models import training_loss
from memprop.routing import routed
from memprop.saved import storage_key, storage_keys

__all__ = ["Profile", "profile", "profile_chain", "stop_flops", "early_stop_flops",
           "block_times_ms", "OpCall", "trace_blocks", "traced_modules", "block_options",
           "rebuild_ratio", "ChildCost"]


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


class _Collector:
    """One kind of record a traced forward keeps: module hooks (``install``), an
    optional dispatch mode (``mode``) and what it does with each saved tensor
    (``pack``); ``result()`` after the forward."""

    mode: TorchDispatchMode | None = None

    def install(self) -> list:
        return []

    def pack(self, t: torch.Tensor) -> None:
        pass


def _unpack(box: list):
    if not box:
        raise StrategyError(
            "memprop.checkpoint: a backward reached a forward that plan() traced on fake "
            "tensors (the model kept a tensor of that forward); its saved tensors are "
            "gone: detach what the model keeps between calls")
    return box[0]


def _trace(target, target_batch, loss_fn, collectors: list, counter: FlopCounter,
           mode=None) -> None:
    """One forward of ``loss_fn(target, target_batch)`` with every collector attached
    (NOTE [ One trace ]); ``mode``: the fake mode the twin lives in."""
    handles = [h for c in collectors for h in c.install()]
    depth = len(_get_current_dispatch_mode_stack())

    # each saved tensor goes into a box the graph holds, emptied after the forward: a
    # saved output held by its own node is a cycle through autograd that Python's
    # collector cannot see; with the op trace's held outputs (_OpCalls.result) it kept
    # the traced graph and each plan()'s trace alive (about 17,000 objects a plan() on a
    # tiny Mistral, measured). No backward runs on a trace.
    boxes: list[list] = []

    def pack(t):
        for c in collectors:
            c.pack(t)
        boxes.append([t])
        return boxes[-1]
    try:
        with contextlib.ExitStack() as stack:
            if mode is not None:
                stack.enter_context(mode)
            stack.enter_context(routed(target))   # experts run one by one: memprop.routing
            stack.enter_context(counter)
            for c in collectors:
                if c.mode is not None:
                    stack.enter_context(c.mode)
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, _unpack))
            loss = loss_fn(target, target_batch)
            del loss
    finally:
        for box in boxes:
            box.clear()
        for h in handles:
            h.remove()
        # an exception raised inside a fake op (a forward reading a value: ibert's
        # .item()) leaves the FLOP counter and the op trace on torch's dispatch-mode
        # stack, measured; every later step of the process then ran under them
        while len(_get_current_dispatch_mode_stack()) > depth:
            _pop_mode()


class _ChainCosts(_Collector):
    """Per block what the chain cost model needs (NOTE [ The chain cost model ],
    memprop.checkpoint.planning.dp)."""

    def __init__(self, model: nn.Module, batch, blocks: list, counter: FlopCounter):
        self.model, self.batch, self.blocks, self.counter = model, batch, blocks, counter
        self.index = {id(b): k for k, b in enumerate(blocks)}
        n = self.n = len(blocks)
        self.skip = storage_keys([*model.parameters(), *model.buffers()])
        self.saves: dict = {k: {} for k in [*range(n), "pre", "post"]}
        # (storage key, bytes) of each block's input and output, once its hooks have run
        self.ins: list[tuple[int, int] | None] = [None] * n
        self.outs: list[tuple[int, int] | None] = [None] * n
        self.flops = [0] * n
        self.region: int | str = "pre"
        self.flops_at = 0
        # parameter storage -> (region of first use: block index, "pre" or "post"; param)
        self.param_region: dict[int, tuple[int | str, torch.Tensor]] = {}

    def install(self) -> list:
        def any_module(module, args):
            for p in module._parameters.values():
                if p is not None and p.requires_grad:
                    self.param_region.setdefault(storage_key(p), (self.region, p))

        def pre(module, args):
            k = self.index[id(module)]
            self.region, self.flops_at = k, self.counter.total
            t = _first_tensor(args)
            self.ins[k] = (storage_key(t), t.untyped_storage().nbytes())

        def post(module, args, output):
            k = self.index[id(module)]
            self.flops[k] = self.counter.total - self.flops_at
            t = _first_tensor(output)
            self.outs[k] = (storage_key(t), t.untyped_storage().nbytes())
            self.region = "post" if k == self.n - 1 else k
        return [h for b in self.blocks for h in (b.register_forward_pre_hook(pre),
                                                 b.register_forward_hook(post))] + [
            nn.modules.module.register_module_forward_pre_hook(any_module)]

    def pack(self, t):
        key = storage_key(t)
        if key not in self.skip:
            self.saves[self.region][key] = t.untyped_storage().nbytes()

    def result(self) -> tuple[ChainCosts, pd.DataFrame]:
        n, saves, params = self.n, self.saves, self.param_region
        block_ins = [_ran(r, k, "input") for k, r in enumerate(self.ins)]
        block_outs = [_ran(r, k, "output") for k, r in enumerate(self.outs)]
        boundary = [block_ins[0]] + block_outs     # t[0..n]
        outside = set(saves["pre"]) | set(saves["post"]) | storage_keys(
            tree_flatten(self.batch)[0])
        boundary_keys = {key for key, _ in boundary}
        costs = ChainCosts(
            t=tuple(nbytes for _, nbytes in boundary),
            inner=tuple(sum(v for key, v in saves[k].items() if key not in boundary_keys)
                        for k in range(n)),
            saves_in=tuple(block_ins[k][0] in saves[k] for k in range(n)),
            saves_out=tuple(block_outs[k][0] in saves[k] for k in range(n)),
            keep=tuple(key in outside for key, _ in boundary),
            flops=tuple(float(f) for f in self.flops),
            const=sum(v for key, v in {**saves["pre"], **saves["post"]}.items()
                      if key not in boundary_keys),
            grad=tuple(sum(p.untyped_storage().nbytes() for region, p in params.values()
                           if region == k) for k in range(n)),
            grad_post=sum(p.untyped_storage().nbytes() for region, p in params.values()
                          if region == "post"))
        table = pd.DataFrame({"block": range(n), "input_bytes": costs.t[:-1],
                              "output_bytes": costs.t[1:], "saves_input": costs.saves_in,
                              "saves_output": costs.saves_out,
                              "inner_saved_bytes": costs.inner, "param_bytes": costs.grad,
                              "forward_flops": self.flops})
        return costs, table


class _Stops(_Collector):
    """Per region (a block, or the whole forward), the FLOPs after its last saved
    tensor (early stop) and those a held output skips (``TailRecord``)."""

    def __init__(self, regions: list, counter: FlopCounter, whole: bool):
        self.regions, self.counter, self.whole = regions, counter, whole
        self.index = {id(b): k for k, b in enumerate(regions)}
        n = len(regions)
        self.current: int | None = None
        self.last_pack, self.end, self.tail = [0] * n, [0] * n, [0.0] * n
        self.record: TailRecord | None = None

    def install(self) -> list:
        def pre(module, args):
            if self.whole and not torch.is_grad_enabled():   # no checkpoint runs there
                return
            self.current = self.index[id(module)]
            self.last_pack[self.current] = self.counter.total
            self.record = TailRecord(self.counter)
            self.record.__enter__()

        def post(module, args, output):
            if self.whole and not torch.is_grad_enabled():
                return
            k = self.index[id(module)]
            assert self.record is not None
            self.record.__exit__(None, None, None)
            self.end[k], self.tail[k] = self.counter.total, self.record.skipped_flops(output)
            self.current = None
        return [h for b in self.regions for h in (b.register_forward_pre_hook(pre),
                                                  b.register_forward_hook(post))]

    def pack(self, t):
        if self.current is not None:
            self.last_pack[self.current] = self.counter.total

    def result(self) -> tuple[tuple, tuple]:
        return (tuple(float(e - p) for e, p in zip(self.end, self.last_pack)),
                tuple(self.tail))


@dataclasses.dataclass(frozen=True)
class ChildCost:
    """One child module of a block, as a checkpoint of it alone would change the block
    (NOTE [ Checkpointing a part of a block ], memprop.checkpoint.forms.oplevel)."""

    path: str             # below the block: "mlp"
    freed: int            # bytes the block would no longer store (its input, output kept)
    flops: int            # its forward FLOPs: what its recompute re-runs


class _Children(_Collector):
    """Per block, each direct child called once in its forward: the storages saved
    inside it, those the block saves outside it, and its input, output and FLOPs."""

    def __init__(self, blocks: list, counter: FlopCounter, skip: set):
        self.blocks, self.counter, self.skip = blocks, counter, skip
        self.block: int | None = None
        self.child: str | None = None
        self.flops_at = 0
        # block -> child path -> [calls, {saved key: bytes}, in key, out key, FLOPs]
        self.seen: dict[int, dict[str, list]] = {k: {} for k in range(len(blocks))}
        self.outside: dict[int, dict[int, int]] = {k: {} for k in range(len(blocks))}

    def install(self) -> list:
        handles = []
        for k, block in enumerate(self.blocks):
            def enter(module, args, k=k):
                self.block = k

            def leave(module, args, output):
                self.block = None
            handles += [block.register_forward_pre_hook(enter),
                        block.register_forward_hook(leave)]
            for path, child in block.named_children():
                def pre(module, args, kwargs, k=k, path=path):
                    if self.block != k or self.child is not None:
                        return
                    self.child, self.flops_at = path, self.counter.total
                    rec = self.seen[k].setdefault(path, [0, {}, set(), None, 0])
                    rec[0] += 1
                    # every tensor it is given (positional or keyword): the checkpoint
                    # stores them
                    rec[2] = storage_keys([t for t in tree_flatten((args, kwargs))[0]
                                           if isinstance(t, torch.Tensor)])

                def post(module, args, output, k=k, path=path):
                    if self.block != k or self.child != path:
                        return
                    rec = self.seen[k][path]
                    t = _first_tensor(output)
                    rec[3] = storage_key(t) if t is not None else None
                    rec[4] += self.counter.total - self.flops_at
                    self.child = None
                handles += [child.register_forward_pre_hook(pre, with_kwargs=True),
                            child.register_forward_hook(post)]
        return handles

    def pack(self, t):
        key = storage_key(t)
        if self.block is None or key in self.skip:
            return
        nbytes = t.untyped_storage().nbytes()
        if self.child is None:
            self.outside[self.block][key] = nbytes
        else:
            self.seen[self.block][self.child][1][key] = nbytes

    def result(self) -> list[list[ChildCost]]:
        out = []
        owners: Counter[int] = Counter(id(m) for b in self.blocks for m in b.modules())
        for k in range(len(self.blocks)):
            costs = []
            for path, (calls, saved, in_keys, out_key, flops) in self.seen[k].items():
                if calls != 1 or not saved or owners[id(self.blocks[k].get_submodule(
                        path))] > 1 or not CHILD_KEY.fullmatch("@" + path):
                    continue      # called twice, nothing saved, shared, no spec names it
                others = set(self.outside[k]) | {key for p, rec in self.seen[k].items()
                                                 if p != path for key in rec[1]}
                # the checkpoint stores the child's inputs and holds its output
                kept = others | in_keys | {out_key}
                costs.append(ChildCost(path, sum(v for key, v in saved.items()
                                                 if key not in kept), flops))
            out.append([c for c in costs if c.freed > 0])
        return out


@dataclasses.dataclass(frozen=True)
class OpCall:
    key: str              # name#i within its block
    out_bytes: int        # bytes of output storages not seen before in the block
    flops: int
    # an output is changed in place later in the step (a selective-checkpoint cache
    # refuses it: torch raises in backward), or the call draws random numbers (keeping it
    # would shift every later draw of the recompute: opkeys.draws_random): never
    # offered as kept
    mutated: bool = False


class OpTrace(TorchDispatchMode):
    def __init__(self, counter: FlopCounter):
        super().__init__()
        self.counter = counter
        self.block: int | None = None           # the block whose forward runs, if any
        # block -> (its op calls, storages seen, calls per op name)
        self.calls: dict[int, tuple[list[OpCall], set[int], Counter[str]]] = {}
        self.held: list = []      # outputs kept alive: no storage address is reused
        self.versions: dict = {}  # block -> per call, its outputs and their versions

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.counter.total
        out = func(*args, **(kwargs or {}))
        if self.block is not None:
            calls, seen, names = self.calls[self.block]
            name = op_name(func)
            fresh, outs = 0, []
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    outs.append((t, t._version))
                    key = t.untyped_storage()._cdata
                    if key not in seen:
                        seen.add(key)
                        self.held.append(t)
                        fresh += t.untyped_storage().nbytes()
            flops = self.counter.total - before
            calls.append(OpCall(f"{name}#{names[name]}", fresh, flops,
                                mutated=draws_random(func, args, kwargs)))
            self.versions.setdefault(self.block, []).append(outs)
            names[name] += 1
        return out


class _OpCalls(_Collector):
    """Per region (a block, or the whole forward), its op calls (``OpCall``)."""

    def __init__(self, regions: list, counter: FlopCounter, whole: bool):
        self.regions, self.whole = regions, whole
        self.index = {id(b): k for k, b in enumerate(regions)}
        self.mode = self.trace = OpTrace(counter)
        self.entered: Counter[int] = Counter()

    def install(self) -> list:
        trace = self.trace

        def pre(module, args):
            if self.whole and not torch.is_grad_enabled():   # no checkpoint runs there
                return
            trace.block = self.index[id(module)]
            trace.calls[trace.block] = ([], set(), Counter())
            self.entered[trace.block] += 1

        def post(module, args, output):
            trace.block = None
        return [h for b in self.regions for h in (b.register_forward_pre_hook(pre),
                                                  b.register_forward_hook(post))]

    def result(self) -> list:
        """Each region's op calls. Read once: the trace then lets go of the outputs it
        held (they hold the traced graph: ``_trace``)."""
        trace = self.trace
        try:
            return self._calls()
        finally:
            trace.held.clear()
            trace.versions.clear()

    def _calls(self) -> list:
        trace = self.trace
        if self.whole and self.entered[0] != 1:
            raise StrategyError(
                f"memprop.checkpoint: the loss calls {type(self.regions[0]).__name__} "
                f"{self.entered[0]} times with gradients on; forward:KEYS numbers op calls "
                "within one call of the model, so its costs are traced for a loss that "
                "calls the model once")
        return [[dataclasses.replace(c, mutated=c.mutated or any(
                    t._version != v for t, v in outs))
                 for c, outs in zip(trace.calls[k][0], trace.versions.get(k, []))]
                for k in range(len(self.regions))]


def traced_modules(target, blocks_attr=None, *, blocks=None, check_fn=None,
                   whole: bool = False) -> list:
    """The modules a trace reports on: the chain of blocks, or (``whole``) the model
    itself, as one block (NOTE [ One checkpoint around the forward ],
    memprop.checkpoint.forms.whole)."""
    if whole:
        return [target]
    return find_blocks(target, blocks_attr, blocks=blocks, check_fn=check_fn)


@dataclasses.dataclass
class Profile:
    """What ``plan`` reads about a model, from one forward on fake tensors (NOTE [ One
    trace ]). Bytes are storage bytes; FLOPs are forward FLOPs (memprop.flops)."""

    costs: ChainCosts | None           # the chain's cost model; None: no chain profiled
    table: pd.DataFrame                # per block: bytes in and out, saved, FLOPs
    early: tuple                       # per block: FLOPs after its last saved tensor
    tail: tuple                        # per block: FLOPs a held output skips
    block_calls: list                  # per block: its op calls (OpCall)
    # the whole forward's op calls and early stop; None when the loss calls the model
    # more than once with gradients on (forward:/remat: number calls within one call)
    forward_calls: list | None
    forward_early: float
    forwards: int = 1                  # traced forwards this profile ran
    # per block: its children a checkpoint of their own would free bytes of (ChildCost)
    block_children: list = dataclasses.field(default_factory=list)


def profile(model: nn.Module, batch, *, blocks_attr=None, blocks=None, check_fn=None,
            loss_fn=training_loss, chain: bool = True, whole: bool = True) -> Profile:
    """The ``Profile`` of ``model`` on ``batch``: one forward of ``loss_fn`` on a fake
    twin (the model itself if already fake), nothing of the step allocated. ``chain``:
    profile the chain of blocks (``blocks_attr``, ``blocks``, ``check_fn``, as
    ``find_blocks`` takes them); ``whole``: trace the whole forward too."""
    mode, target, target_batch = fake_target(model, batch)
    counter = FlopCounter()
    regions = find_blocks(target, blocks_attr, blocks=blocks,
                          check_fn=check_fn) if chain else []
    collectors: dict[str, _Collector] = {}
    if chain:
        collectors["costs"] = _ChainCosts(target, target_batch, regions, counter)
        collectors["stops"] = _Stops(regions, counter, whole=False)
        collectors["ops"] = _OpCalls(regions, counter, whole=False)
        collectors["children"] = _Children(regions, counter, storage_keys(
            [*target.parameters(), *target.buffers()]))
    if whole:
        collectors["whole_stops"] = _Stops([target], counter, whole=True)
        collectors["whole_ops"] = _OpCalls([target], counter, whole=True)
    _trace(target, target_batch, loss_fn, list(collectors.values()), counter, mode)
    costs, table, early, tail, calls, children = None, pd.DataFrame(), (), (), [], []
    if chain:
        costs, table = collectors["costs"].result()        # type: ignore[attr-defined]
        early, tail = collectors["stops"].result()         # type: ignore[attr-defined]
        calls = collectors["ops"].result()                 # type: ignore[attr-defined]
        children = collectors["children"].result()         # type: ignore[attr-defined]
    forward_calls, forward_early = None, 0.0
    if whole:
        try:
            forward_calls = collectors["whole_ops"].result()[0]   # type: ignore[attr-defined]
            forward_early = collectors["whole_stops"].result()[0][0]  # type: ignore[attr-defined]
        except StrategyError:          # the loss calls the model more than once
            forward_calls = None
    return Profile(costs, table, early, tail, calls, forward_calls, forward_early,
                   block_children=children)


def profile_chain(model: nn.Module, batch, *, blocks_attr=None, blocks=None, check_fn=None,
                  loss_fn=training_loss) -> tuple[ChainCosts, pd.DataFrame]:
    """One forward of ``model`` (on its fake twin), recording per block what the cost
    model needs. Returns the ``ChainCosts`` and a per-block table (bytes, FLOPs)."""
    return _one(model, batch, loss_fn, lambda target, target_batch, counter: _ChainCosts(
        target, target_batch, find_blocks(target, blocks_attr, blocks=blocks,
                                          check_fn=check_fn), counter))


def _one(model, batch, loss_fn, make):
    """The result of one collector, ``make(twin, twin batch, counter)``, over one traced
    forward on the fake twin (for callers that need one answer)."""
    mode, target, target_batch = fake_target(model, batch)
    counter = FlopCounter()
    collector = make(target, target_batch, counter)
    _trace(target, target_batch, loss_fn, [collector], counter, mode)
    return collector.result()


def _ran(record: tuple[int, int] | None, k: int, what: str) -> tuple[int, int]:
    """Block ``k``'s ``what`` (input or output) as ``profile_chain`` recorded it: a
    block the forward never called has none."""
    if record is None:
        raise StrategyError(f"memprop.checkpoint: block {k} of the chain recorded no "
                            f"{what} in the forward: the loss never called it, so its "
                            "costs cannot be profiled; name blocks the forward runs "
                            "(blocks_attr=..., blocks=...)")
    return record


def block_times_ms(model, batch, blocks, *, repeats=3, loss_fn=training_loss) -> list[float]:
    """Median forward time of each block (real models only), grad enabled."""
    starts: dict[int, float] = {}
    times: dict[int, list[float]] = {id(b): [] for b in blocks}

    def pre(module, args):
        starts[id(module)] = time.perf_counter()

    def post(module, args, output):
        times[id(module)].append((time.perf_counter() - starts[id(module)]) * 1e3)

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre),
                                           b.register_forward_hook(post))]
    try:
        for _ in range(repeats):
            loss = loss_fn(model, batch)
            del loss
    finally:
        for h in handles:
            h.remove()
    return [sorted(times[id(b)])[len(times[id(b)]) // 2] for b in blocks]


def early_stop_flops(model, batch, *, blocks_attr=None, loss_fn=training_loss,
                     **select) -> tuple:
    """Per block, the forward FLOPs after its last saved tensor: what a recompute ending
    with that block skips (NOTE [ Early stop ], memprop.checkpoint.planning.rotor)."""
    return stop_flops(model, batch, blocks_attr=blocks_attr, loss_fn=loss_fn, **select)[0]


def stop_flops(model, batch, *, blocks_attr=None, loss_fn=training_loss, blocks=None,
               check_fn=None, whole: bool = False) -> tuple:
    """(early, tail): per block, the forward FLOPs a recompute ending with it skips by
    early stop, and those a plain segment ending with it also skips when its output is
    held (NOTE [ A segment's output needs no recompute ], memprop.checkpoint.forms.tail).
    One forward on fake tensors; ``blocks``, ``check_fn``: the chain, as ``find_blocks``
    takes them; ``whole``: the model's forward as one block."""
    return _one(model, batch, loss_fn, lambda target, _, counter: _Stops(traced_modules(
        target, blocks_attr, blocks=blocks, check_fn=check_fn, whole=whole), counter, whole))


def trace_blocks(model, batch, *, blocks_attr=None, loss_fn=training_loss, blocks=None,
                 check_fn=None, whole: bool = False) -> list:
    """Per block, its forward's op calls (``OpCall``), on fake tensors; ``whole``: one
    list, the model's whole forward."""
    return _one(model, batch, loss_fn, lambda target, _, counter: _OpCalls(traced_modules(
        target, blocks_attr, blocks=blocks, check_fn=check_fn, whole=whole), counter, whole))


def block_options(calls: list, *, early: float = 0.0, max_calls: int = 6) -> list:
    """(keys, kept bytes, recompute FLOPs) of each op-level policy of one block (NOTE
    [ Op-level options of a block ]), the Pareto set of (kept bytes, recompute FLOPs);
    the block's input is not included. The calls in
    the last ``early`` FLOPs (after the block's last saved tensor) are never recomputed
    (NOTE [ Early stop ], memprop.checkpoint.planning.rotor) and never worth keeping."""
    total = sum(c.flops for c in calls)
    starts = list(itertools.accumulate((c.flops for c in calls), initial=0))
    needed = [c for c, start in zip(calls, starts) if c.flops > 0 and start < total - early]
    heavy = [c for c in needed if not c.mutated][:max_calls]
    recompute = sum(c.flops for c in needed)
    options = []
    for r in range(1, len(heavy) + 1):
        for subset in itertools.combinations(heavy, r):
            options.append((frozenset(c.key for c in subset),
                            sum(c.out_bytes for c in subset),
                            float(recompute - sum(c.flops for c in subset))))
    # an option keeping more bytes for no fewer FLOPs than another is never better on
    # either metric: keep the Pareto set (fewest keys first among equals)
    return pareto(options, need=lambda o: o[1], cost=lambda o: o[2],
                  tie=lambda o: len(o[0]))


def rebuild_ratio(model: nn.Module, batch, keys=frozenset(), *,
                  loss_fn=training_loss) -> float:
    """Op calls the rebuilds of one step with ``remat:KEYS`` re-run, per op call of the
    forward: its time overhead in ops, FLOPs apart (NOTE above). One forward on fake
    tensors, no backward."""
    mode, target, target_batch = fake_target(model, batch)
    with mode, routed(target):
        Remat(keys).apply(target)
        try:
            loss = loss_fn(target, target_batch)
            del loss
            rebuilt, made = target.forward.counts
        finally:
            remove_strategy(target)
    return rebuilt / max(made, 1)
