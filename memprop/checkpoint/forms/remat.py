"""Each saved tensor rebuilt on its own, just before backward needs it: the recompute
schedule of torch.compile's partitioner, in eager.

    apply_strategy(model, "remat:addmm#0-11+sdpa")     # keep these op outputs
    plan(model, batch, "40MiB")                        # may choose this form

NOTE [ Rebuilding each saved tensor when backward needs it ]
  ``remat:KEYS`` keeps what ``forward:KEYS`` keeps (NOTE [ One checkpoint around the
  forward ], memprop.checkpoint.forms.whole: the outputs of the op calls KEYS names, numbered
  over the whole forward, and the tensors the forward did not make: the batch,
  parameters, buffers) and recomputes the rest, but not in one burst. While the forward
  runs, a dispatch mode records each aten call: the op, its arguments (earlier calls'
  outputs by reference, other tensors as they are), and for a random op the RNG state
  before it. For each tensor autograd saves, the pack hook hands autograd a *recipe*
  (the call that made it) instead of the tensor, which the forward then frees. When
  backward unpacks it, exactly the calls that rebuild it are re-run, in forward order,
  from kept outputs and leaves, each intermediate freed after its last use in that
  rebuild. So at any moment backward holds the kept outputs plus what one backward op
  needs, where ``forward:`` holds the whole forward's saved set once backward begins.

  Cost. An output of a FLOP-carrying call (matmul, attention, convolution) that is not
  kept is rebuilt once, when a recipe first needs it, and held until the last recipe
  needing it is unpacked; its FLOPs count once, as for ``forward:``. Cheap ops are
  re-run once per saved tensor needing them: no FLOPs, but time (a chain of n blocks
  rebuilds the residual stream from the embedding, O(n^2) additions in all).

  Exactness. The same aten ops on the same inputs, RNG states restored: gradients are
  bitwise those of the plain step on CPU (tests). Refused with ``StrategyError``,
  never replayed wrongly: an op writing in place into a kept output or a leaf during
  the forward (a recipe reading it would see the new values), and a leaf changed in
  place after the forward (found when backward unpacks a recipe reading it). A call
  writing into a tensor the forward did not make (BatchNorm's running statistics)
  replays into a copy of it taken before the call, held for backward: a replay never
  updates the model's state, and reads what the call read. RNG
  states (5 KiB per random CPU op) are held outside the tensor accounting, as
  ``torch.utils.checkpoint`` holds its own. Values written outside aten (a kernel or
  numpy filling ``torch.empty``) are not recorded: an ``empty()`` output no recorded
  call writes into is kept as it is, not rebuilt; a write into a tensor made by a
  recorded call, outside aten, is not seen (use ``forward:KEYS`` for such models).

  Stored bytes (``Measurement.saved_bytes``): the kept outputs and leaves some recipe
  reaches, reported to memprop's instruments when the forward ends.

NOTE [ Smaller stand-ins for leaves ]
  A recipe may read a tensor of the batch only through cheap calls that read nothing
  else, whose outputs are smaller: an int64 attention mask read only by ``.bool()``.
  When every call rebuilds run that reads such a leaf is of that kind, their outputs
  (held from the call until the forward ends) are kept instead of the leaf, and the
  recipes stop there: ``remat:`` then stores 1 byte per mask element, not 8, as
  compile's partitioner does. Parameters and buffers are never replaced (they exist
  anyway), nor outputs changed in place after the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Any, NamedTuple

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten

from memprop.checkpoint.forms.opkeys import HEAVY_OPS, KeyMatcher, op_name, refuse_unmatched
from memprop.checkpoint.forms.patch import Applied, PatchedForward, refuse_sharded
from memprop.checkpoint.forms.strategies import refuse_applied
from memprop.checkpoint.forms.verify import check_rebuilt, is_verifying, where_now
from memprop.checkpoint.forms.whole import KeyedForward
from memprop.errors import StrategyError
from memprop.saved import report_stored, storage_key

__all__ = ["Remat"]

_aten = torch.ops.aten


# factories whose outputs hold whatever memory held: a replay gives other values
_EMPTY = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
          "empty_permuted"}

# ops that write into arguments their schema does not mark as written: BatchNorm's
# running statistics (argument positions)
_UNDECLARED_WRITES = {op.default: (3, 4) for op in (
    getattr(_aten, name, None) for name in ("native_batch_norm", "cudnn_batch_norm",
                                            "miopen_batch_norm")) if op is not None}


def _skey(t) -> int | None:
    """The storage key of a strided tensor; None for anything else (a sparse tensor has
    no storage to key: it is kept as it is, never rebuilt)."""
    if isinstance(t, torch.Tensor) and t.layout == torch.strided:
        return storage_key(t)
    return None


def _key(t: torch.Tensor) -> tuple | None:
    """A tensor's identity as a recipe input: its storage and the view of it (a
    conjugate or negative view is another tensor on the same storage)."""
    key = _skey(t)
    if key is None:
        return None
    return (key, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
            t.is_conj(), t.is_neg())


class Output(NamedTuple):
    """An input that is output number ``position`` of an earlier recorded call (rebuilt,
    or kept); also what the pack hook hands autograd for a saved tensor it rebuilds."""
    call: "RecordedCall"
    position: int


class Leaf(NamedTuple):
    """An input the forward did not make (batch, parameter, buffer), read as it is; also
    what the pack hook hands autograd for a tensor it holds as it is. ``version``: its
    version counter then (a change since is refused: ``_unchanged``)."""
    tensor: torch.Tensor
    version: int


class Snapshot(NamedTuple):
    """A copy of an input taken before the call: a leaf the call writes into, or a
    tensor written since through another view. Replays get a fresh copy of it."""
    tensor: torch.Tensor
    version: int


class Constant(NamedTuple):
    """An input that is not a tensor."""
    value: Any


Input = Output | Leaf | Snapshot | Constant


class RecordedCall:
    """One recorded aten call: ``inputs``, one ``Input`` per flattened argument;
    ``spec``, their pytree; ``rng``, the RNG state before a random op. ``kept``: its
    outputs, when kept (then ``inputs`` is emptied when the forward ends: rebuilds stop
    here)."""

    __slots__ = ("seq", "func", "spec", "inputs", "rng", "kept", "heavy", "small", "origin",
                 "versions")

    def __init__(self, seq, func, spec, inputs, rng, kept, heavy):
        self.seq, self.func, self.spec, self.inputs = seq, func, spec, inputs
        self.rng, self.kept, self.heavy = rng, kept, heavy
        self.small = None       # its outputs, held: they may stand in for its leaf (NOTE)
        self.origin = None      # storage key of the one batch leaf it derives from, or _FREE
        self.versions = None    # of the kept outputs, when kept

    def sources(self) -> list["RecordedCall"]:
        return [a.call for a in self.inputs if isinstance(a, Output)]


class Rebuilder:
    """Backward's side: rebuilds recipes; outputs of FLOP-carrying calls that are not
    kept are held from their first rebuild until their last use (NOTE above)."""

    def __init__(self):
        self.held: dict[int, list] = {}       # id(call) -> outputs, while still needed
        self.uses: dict[int, int] = {}        # id(call) -> rebuilds still to ask for it
        self.ops = 0                          # calls the rebuilds will re-run in all

    @staticmethod
    def region(target: RecordedCall) -> tuple[list, list]:
        """(calls re-run to rebuild ``target``, in forward order; FLOP-carrying calls
        not kept whose outputs it takes as they are)."""
        inner: list[RecordedCall] = []
        edge: list[RecordedCall] = []
        seen, stack = {id(target)}, [target]
        while stack:
            call = stack.pop()
            inner.append(call)
            for src in call.sources():
                if id(src) in seen or src.kept is not None:
                    continue
                seen.add(id(src))
                (edge if src.heavy else stack).append(src)
        inner.sort(key=lambda c: c.seq)
        return inner, edge

    def walk(self, packed: list, visit) -> None:
        """``visit(inner, edge)`` for each rebuild backward will run: once per recipe
        unpacked (a recipe's region is re-run at each unpack), once per FLOP-carrying
        output not kept that some rebuild takes (rebuilt once, then held: ``_heavy``)."""
        regions, walked, todo = {}, set(), list(packed)
        while todo:
            target = todo.pop()
            if target.heavy:
                if id(target) in walked:      # rebuilt once
                    continue
                walked.add(id(target))
            if id(target) not in regions:
                regions[id(target)] = self.region(target)
            inner, edge = regions[id(target)]
            visit(inner, edge)
            todo.extend(edge)

    def count(self, packed: list) -> tuple[list, list]:
        """Count how often each FLOP-carrying output not kept will be asked for (once
        per recipe unpacked that takes it as it is, once per rebuild that takes it);
        returns the (kept calls, leaves) the recipes reach: what the forward stores."""
        kept, leaves = {}, {}
        for call in packed:
            if call.heavy:                    # unpacked: asked for as it is
                self.uses[id(call)] = self.uses.get(id(call), 0) + 1

        def visit(inner, edge):
            self.ops += len(inner)
            for call in inner:
                for a in call.inputs:
                    if isinstance(a, Output) and a.call.kept is not None:
                        kept[id(a.call)] = a.call
                    elif isinstance(a, (Leaf, Snapshot)):
                        leaves[id(a.tensor)] = a.tensor
            for src in edge:
                self.uses[id(src)] = self.uses.get(id(src), 0) + 1
        self.walk(packed, visit)
        return list(kept.values()), list(leaves.values())

    def value(self, call: RecordedCall, index: int):
        if call.kept is not None:
            return _unchanged(call.kept[index], call.versions[index])
        if call.heavy:
            out = self._heavy(call)[index]
            # still held for later rebuilds: autograd gets a copy (a backward may
            # write into what it unpacks)
            return out.clone() if id(call) in self.held else out
        return self._run(call)[index]

    def _heavy(self, call: RecordedCall) -> list:
        outs = self.held.get(id(call))
        if outs is None:
            outs = self._run(call)
        left = self.uses.get(id(call), 1) - 1
        self.uses[id(call)] = left
        if left > 0:
            self.held[id(call)] = outs
        else:
            self.held.pop(id(call), None)
        return outs

    def _run(self, target: RecordedCall) -> list:
        inner, edge = self.region(target)
        edges = {id(src): self._heavy(src) for src in edge}
        # storages, not tensors: a call may write into a held output through a view of
        # it made in this rebuild (Falcon's ``mlp_output += attention_output`` writes into
        # _unsafe_view(mm(...)), a view of the held mm output)
        held = {_skey(t) for outs in edges.values() for t in outs} - {None}
        users: dict[int, int] = {}
        for call in inner:
            for src in call.sources():
                users[id(src)] = users.get(id(src), 0) + 1
        values: dict[int, list] = {}
        for call in inner:
            flat = []
            for a in call.inputs:
                if not isinstance(a, Output):
                    flat.append(_value(a))
                    continue
                src = a.call
                if src.kept is not None:
                    flat.append(_unchanged(src.kept[a.position], src.versions[a.position]))
                elif id(src) in edges:
                    flat.append(edges[id(src)][a.position])
                else:
                    flat.append(values[id(src)][a.position])
                users[id(src)] -= 1
                if users[id(src)] == 0:
                    values.pop(id(src), None)
            args, kwargs = tree_unflatten(flat, call.spec)
            del flat
            if held:                 # a held output written in place: write into a copy
                args, kwargs = _copy_written(call.func, args, kwargs, held)
            if call.rng is not None:
                outs = _replay_random(call, args, kwargs)
            else:
                outs = call.func(*args, **kwargs)
            del args, kwargs
            values[id(call)] = tree_flatten(outs)[0]
        if any(t is None for t in values[id(target)]):
            raise StrategyError(
                f"memprop.checkpoint: remat: {target.func.overloadpacket.__name__} returns "
                "None where the forward got a tensor when replayed without gradients (an "
                "output that depends on grad mode, as an RNN's workspace); use forward:KEYS")
        return values[id(target)]


def _value(a: Leaf | Snapshot | Constant):
    """What a replay passes for an input that is no recorded call's output."""
    if isinstance(a, Constant):
        return a.value
    if isinstance(a, Leaf):
        return _unchanged(a.tensor, a.version)
    return a.tensor.clone()              # a snapshot the call writes into: a fresh copy


_FREE = "free"       # origin of a call reading no tensor (arange, full): any leaf's


def _written_arguments(func) -> list:
    """(position, name) of the arguments ``func`` writes into (its schema's ``(a!)``,
    and BatchNorm's running statistics)."""
    undeclared = _UNDECLARED_WRITES.get(func, ())
    return [(i, arg.name) for i, arg in enumerate(func._schema.arguments)
            if i in undeclared or (arg.alias_info is not None and arg.alias_info.is_write)]


def _copy_written(func, args: tuple, kwargs: dict, held: set) -> tuple:
    """``args``, ``kwargs`` with each tensor ``func`` writes into that lies on the storage
    of a held output (the output itself or any view of it) replaced by the same view of a
    copy of that storage: a held output serves later rebuilds as it was made, and the
    call sees the sizes, strides and offset the forward's call saw."""
    new_args, new_kwargs = list(args), dict(kwargs)
    copies: dict = {}          # (storage key, dtype) -> a copy of the whole storage

    def private(t):
        key = _skey(t) if isinstance(t, torch.Tensor) else None
        if key not in held:
            return t
        if (key, t.dtype) not in copies:      # aten calls only: memprop's tracker sees it
            whole = t.untyped_storage().nbytes() // t.element_size()
            copies[key, t.dtype] = t.as_strided((whole,), (1,), 0).clone()
        return copies[key, t.dtype].as_strided(t.size(), t.stride(), t.storage_offset())

    def private_all(value):
        if isinstance(value, (list, tuple)):
            return type(value)(private(v) for v in value)
        return private(value)

    for i, name in _written_arguments(func):
        if i < len(new_args):
            new_args[i] = private_all(new_args[i])
        elif name in new_kwargs:
            new_kwargs[name] = private_all(new_kwargs[name])
    return tuple(new_args), new_kwargs


def _unchanged(t: torch.Tensor, version: int) -> torch.Tensor:
    """``t``, if not changed in place since the forward read, kept or saved it (as
    autograd checks what it saves), else a ``StrategyError``."""
    if t._version != version:
        raise StrategyError(
            f"memprop.checkpoint: remat: a tensor the forward used ({tuple(t.shape)}, "
            f"{t.dtype}) was changed in place after it (version {version} -> "
            f"{t._version}); backward cannot use or replay it. Do not modify the batch, "
            "parameters or outputs between forward and backward")
    return t


def _derived(call: RecordedCall):
    """The key of the batch leaf ``call`` derives from alone, else None."""
    return call.origin if call.origin is not None and call.origin is not _FREE else None


def _standins(rebuild: Rebuilder, packed: list) -> list:
    """Calls whose held outputs replace a batch leaf in every rebuild, at fewer bytes
    (NOTE [ Smaller stand-ins for leaves ]): per leaf, a minimum cut between it and
    what rebuilds read, through the calls derived from it alone."""
    graphs: dict = {}        # leaf key -> (leaf, {id(call): call}, [(source, reader)])
    targets = {id(c) for c in packed}

    def graph(key, leaf=None):
        if key not in graphs:
            graphs[key] = [leaf, {}, []]
        if leaf is not None:
            graphs[key][0] = leaf
        return graphs[key]

    def visit(inner, edge):
        for call in inner:
            mine = _derived(call)
            if mine is not None:
                graph(mine)[1][id(call)] = call
                if id(call) in targets:          # unpacked: read as it is
                    graph(mine)[2].append((call, None))
            for a in call.inputs:
                if isinstance(a, Leaf):
                    key = _skey(a.tensor)
                    if key is not None:
                        graph(key, a.tensor)[2].append((None, call if mine == key else None))
                elif (isinstance(a, Output) and a.call.kept is None
                      and _derived(a.call) is not None):
                    src = a.call
                    key = _derived(src)
                    graph(key)[1][id(src)] = src
                    graph(key)[2].append((src, call if mine == key else None))
    rebuild.walk(packed, visit)
    out = []
    for leaf, calls, pairs in graphs.values():
        if leaf is not None and calls:
            out += _min_cut(leaf, calls, pairs)
    return out


def _held_bytes(call: RecordedCall) -> float:
    """Bytes of a call's held outputs; unbounded when none are held (or one changed)."""
    if call.small is None:
        return float("inf")
    return sum({storage_key(t): t.untyped_storage().nbytes() for t in call.small}.values())


def _min_cut(leaf: torch.Tensor, calls: dict, pairs: list) -> list:
    """The calls to keep in place of ``leaf`` (empty: keep the leaf). A node per call,
    of its held bytes, and the leaf, of its bytes; ``pairs``: (source call, None for the
    leaf; reader call, None for a reader outside the leaf's calls). Edmonds-Karp max
    flow from the leaf to the outside readers; the cut is on the leaf's side."""
    big = float("inf")
    cap: dict = {}

    def add(u, v, c):
        cap.setdefault(u, {})
        cap[u][v] = cap[u].get(v, 0) + c
        cap.setdefault(v, {}).setdefault(u, 0)
    add("source", "leaf", leaf.untyped_storage().nbytes())
    for call in calls.values():
        add(("in", id(call)), ("out", id(call)), _held_bytes(call))
    for src, reader in pairs:
        add("leaf" if src is None else ("out", id(src)),
            "sink" if reader is None else ("in", id(reader)), big)
    while True:                                # shortest augmenting paths
        parent: dict = {"source": None}        # node -> the node before it on a path
        queue = ["source"]
        for u in queue:
            for v, c in cap[u].items():
                if c > 0 and v not in parent:
                    parent[v] = u
                    queue.append(v)
        if "sink" not in parent:
            break
        path, v = [], "sink"
        while parent[v] is not None:
            path.append((parent[v], v))
            v = parent[v]
        push = min(cap[u][v] for u, v in path)
        for u, v in path:
            cap[u][v] -= push
            cap[v][u] += push
    reach, queue = {"source"}, ["source"]
    for u in queue:
        for v, c in cap[u].items():
            if c > 0 and v not in reach:
                reach.add(v)
                queue.append(v)
    if "leaf" not in reach:                    # the leaf itself is the cheapest cut
        return []
    return [calls[n[1]] for n in reach if isinstance(n, tuple) and n[0] == "in"
            and ("out", n[1]) not in reach]


def _autocast_off():
    """A context with autocast off on the CPU and, where there is one, CUDA."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


def _replay_random(call: RecordedCall, args, kwargs):
    devices, states = call.rng
    saved = [_get_state(d) for d in devices]
    try:
        for d, s in zip(devices, states):
            _set_state(d, s)
        return call.func(*args, **kwargs)
    finally:
        for d, s in zip(devices, saved):
            _set_state(d, s)


def _get_state(device: torch.device):
    return torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)


def _set_state(device: torch.device, state) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


class Recorder(TorchDispatchMode):
    """The forward's side: records calls (NOTE above) and packs saved tensors."""

    def __init__(self, keys: frozenset, owned: set):
        super().__init__()
        self.matcher = KeyMatcher(keys)
        self.owned = owned                        # storage keys of parameters, buffers
        self.standins: list = []                  # calls with .small set
        self.kept_calls: list = []
        # _key -> (weak ref to the output's storage, the Output that made it)
        self.made: dict[tuple, tuple[Any, Output]] = {}
        self.views: dict[int, set] = {}           # storage key -> _keys made on it
        self.demoted: set = set()                 # storage keys written in place
        self.unwritten: set = set()               # storage keys of empty() outputs
        self.batch_leaves: dict = {}              # storage key -> a leaf of the batch
        # storage key -> what a recipe reads there (None, a sparse tensor's, popped below)
        self.guarded: dict[int | None, str] = {}
        self.rebuild = Rebuilder()
        self.packed: list = []                    # calls handed to autograd as recipes
        self.seq = 0

    def _source(self, t: torch.Tensor) -> Output | None:
        """The recorded call output ``t`` is, if any (what a recipe substitutes)."""
        key = _key(t)
        found = self.made.get(key) if key is not None else None
        if found is not None and not torch.UntypedStorage._expired(found[0]):
            return found[1]
        # not made by a recorded call (or a freed storage's twin), or changed since
        # through another view of its storage (_forget): read as it is now (a leaf)
        return None

    def _forget(self, written: list, call: RecordedCall) -> None:
        """After ``call`` wrote into ``written``: the other views of their storages no
        longer hold what the calls that made them made (autograd's version counters say
        the same, but a view's counter is set after the view passes through this mode)."""
        for t in written:
            storage = _skey(t)
            if storage is None:
                continue
            self.demoted.add(storage)
            self.unwritten.discard(storage)
            for key in list(self.views.get(storage, ())):
                entry = self.made.get(key)
                if entry is not None and entry[1].call is not call:
                    torch.UntypedStorage._free_weak_ref(entry[0])
                    del self.made[key]
                    self.views[storage].discard(key)
            for c in self.standins:
                if c.small is not None and any(_skey(o) == storage for o in c.small):
                    c.small = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        rng = self._rng(func, flat, kwargs)                  # refuses its own generator
        written = self._written(func, args, kwargs)          # refuses guarded writes
        snaps = self._hold(written, flat)
        out = func(*args, **kwargs)
        outs = tree_flatten(out)[0]
        kept = self.matcher.kept(func)
        call = self._record(func, spec, flat, snaps, rng, outs if kept else None)
        if kept:
            self.kept_calls.append(call)
        if not kept and torch.Tag.nondeterministic_seeded not in func.tags:
            self._offer_standin(call, outs)
        self._index(call, outs)
        self._forget(written, call)
        if func.overloadpacket.__name__ in _EMPTY:
            self.unwritten.update(_skey(t) for t in outs if isinstance(t, torch.Tensor))
        self._guard(call, outs if kept else [])
        return out

    # -- the jobs of one call, in the order it runs them --------------------------------

    def _rng(self, func, flat: list, kwargs: dict):
        """(devices, RNG states) before a random op (dropout, rand, ...) on real tensors;
        None for any other call. Refuses an op drawing from its own generator."""
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return None
        if kwargs.get("generator") is not None:
            raise StrategyError(
                f"memprop.checkpoint: remat: {func.overloadpacket.__name__} draws from "
                "its own generator, whose state it cannot replay; use forward:KEYS")
        if any(isinstance(a, FakeTensor) for a in flat):
            return None
        devices = sorted({a.device for a in flat if isinstance(a, torch.Tensor)}, key=str)
        if kwargs.get("device") is not None:
            devices = sorted({*devices, torch.device(kwargs["device"])}, key=str)
        devices = devices or [torch.device("cpu")]
        return devices, [_get_state(d) for d in devices]

    def _hold(self, written: list, flat: list) -> dict[int, torch.Tensor]:
        """id -> a copy taken before the call, of each input a recipe must read as it
        was: a tensor the forward did not make that the call writes into (BatchNorm's
        running statistics: replays write into a copy), and a tensor made here but
        written since through another view (read as it is now; later writes must not
        reach the recipe)."""
        snaps = {id(t): t.clone() for t in written if self._source(t) is None}
        writes = {id(t) for t in written}
        snaps.update({id(a): a.clone() for a in flat if isinstance(a, torch.Tensor)
                      and id(a) not in writes and self._outside(a)})
        return snaps

    def _record(self, func, spec, flat: list, snaps: dict, rng, kept) -> RecordedCall:
        """The call, each argument as the ``Input`` a replay reads."""
        inputs: list[Input] = []
        for a in flat:
            if isinstance(a, torch.Tensor) and id(a) in snaps:
                inputs.append(Snapshot(snaps[id(a)], snaps[id(a)]._version))
            elif isinstance(a, torch.Tensor):
                inputs.append(self._source(a) or Leaf(a, a._version))
            else:
                inputs.append(Constant(a))
        call = RecordedCall(self.seq, func, spec, inputs, rng, kept,
                            op_name(func) in HEAVY_OPS)
        self.seq += 1
        return call

    def _index(self, call: RecordedCall, outs: list) -> None:
        """Index ``call``'s outputs by view, so that later calls reading them record
        ``Output(call, i)`` (substituted in replays) rather than a leaf."""
        for i, t in enumerate(outs):
            key = _key(t) if isinstance(t, torch.Tensor) else None
            if key is not None:
                old = self.made.get(key)
                if old is not None:
                    torch.UntypedStorage._free_weak_ref(old[0])
                self.made[key] = (t.untyped_storage()._weak_ref(), Output(call, i))
                self.views.setdefault(key[0], set()).add(key)

    def _guard(self, call: RecordedCall, kept_outs: list) -> None:
        """What recipes will read as it was (the leaves ``call`` read, its kept outputs):
        a later in-place write into it is refused (``_written``)."""
        for a in call.inputs:
            if isinstance(a, Leaf):
                self.guarded[_skey(a.tensor)] = "a tensor the forward did not make"
        for t in kept_outs:
            if isinstance(t, torch.Tensor):
                self.guarded[_skey(t)] = f"the kept output of {op_name(call.func)}"
        self.guarded.pop(None, None)

    def _offer_standin(self, call: RecordedCall, outs: list) -> None:
        """Note the one leaf of the batch (no parameter or buffer) a call derives from,
        through cheap calls and constants only, and hold its outputs when they are no
        larger than that leaf: at the forward's end they may be kept in its place
        (NOTE [ Smaller stand-ins for leaves ])."""
        origins = set()
        for a in call.inputs:
            if isinstance(a, Output):
                origin = a.call.origin
            elif isinstance(a, (Leaf, Snapshot)):
                key = _skey(a.tensor)
                origin = (None if key is None or key in self.owned or isinstance(a, Snapshot)
                          else key)
                if origin is not None:
                    self.batch_leaves[key] = a.tensor
            else:
                continue
            if origin is None:
                return
            if origin is not _FREE:
                origins.add(origin)
        if len(origins) > 1 or call.heavy:
            return
        call.origin = origins.pop() if origins else _FREE
        if call.origin is _FREE or not outs or not all(isinstance(t, torch.Tensor) for t in outs):
            return
        key, leaf = call.origin, self.batch_leaves[call.origin]
        if any(_skey(t) is None for t in outs):
            return
        stores = {storage_key(t): t.untyped_storage().nbytes() for t in outs}
        if key not in stores and sum(stores.values()) <= leaf.untyped_storage().nbytes():
            call.small = list(outs)
            self.standins.append(call)

    def _written(self, func, args, kwargs) -> list:
        """The tensors ``func`` writes into; refuses a write into a kept output or a
        leaf that recipes read as it was."""
        out = []
        for i, name in _written_arguments(func):
            value = args[i] if i < len(args) else kwargs.get(name)
            for t in (value if isinstance(value, (list, tuple)) else [value]):
                if not isinstance(t, torch.Tensor):
                    continue
                what = self.guarded.get(_skey(t))
                if what is not None:
                    raise StrategyError(
                        f"memprop.checkpoint: remat: {func.overloadpacket.__name__} writes "
                        f"in place into {what}, which recipes read as it was; use "
                        "forward:KEYS, or keep fewer op outputs")
                out.append(t)
        return out

    def _outside(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s values came from outside the recorded calls: made here but
        written since through another view, or an ``empty()`` no recorded call wrote
        into (a kernel outside aten filled it). Such a tensor is read as it is now."""
        key = _skey(t)
        return key in self.unwritten or (key in self.demoted and self._source(t) is None)

    def pack(self, t: torch.Tensor):
        src = self._source(t)
        if _skey(t) in self.unwritten:
            src = None                                # its recipe would replay empty()
        if src is None or src.call.kept is not None:
            if _skey(t) is not None:                  # (a sparse tensor: not measured)
                report_stored(t, "remat:saved")       # held for backward as it is
            return Leaf(t, t._version)
        self.packed.append(src.call)
        return src

    def unpack(self, packed: Output | Leaf):
        if isinstance(packed, Leaf):
            return _unchanged(packed.tensor, packed.version)
        # the recorded calls are the casts autocast made: replay them as they are, also
        # when backward runs under autocast
        with torch.no_grad(), _autocast_off():
            return self.rebuild.value(packed.call, packed.position)

    def finish(self) -> None:
        """The forward is over: keep stand-ins for leaves, count uses, report what is
        stored, drop the index. Kept outputs' versions are read now: changed after
        this, they are refused (``_unchanged``)."""
        for call in _standins(self.rebuild, self.packed):
            call.kept = call.small
            self.kept_calls.append(call)
        for call in self.kept_calls:
            call.versions = [getattr(t, "_version", 0) for t in call.kept]
            call.inputs = []           # rebuilds stop here: hold nothing it read
        for call in self.standins:
            call.small = None
        kept, leaves = self.rebuild.count(self.packed)
        self.counts = (self.rebuild.ops, self.seq)
        for call in kept:
            for t in call.kept:
                if isinstance(t, torch.Tensor):
                    report_stored(t, f"remat:{op_name(call.func)}")
        for t in leaves:
            if _skey(t) is not None:
                report_stored(t, "remat:leaf")
        for ref, _ in self.made.values():
            torch.UntypedStorage._free_weak_ref(ref)
        self.made, self.views, self.packed, self.guarded = {}, {}, [], {}
        self.batch_leaves, self.demoted, self.unwritten = {}, set(), set()
        self.standins, self.kept_calls = [], []


@dataclasses.dataclass(frozen=True)
class Remat(KeyedForward):
    """``remat:KEYS``: keep the outputs of the op calls ``keys`` names (numbered over
    the whole forward), rebuild every other saved tensor on its own when backward
    needs it (NOTE above); no keys: everything rebuilt."""

    form = "remat"
    syntax = "remat:OPS"

    def apply(self, model: nn.Module, *, blocks_attr=None, blocks=None, check_fn=None,
              example_batch=None, loss_fn=None) -> nn.Module:
        refuse_applied(model)
        return Applied.record(model, self, [RematForward(model, self.keys).install()])


class RematForward(PatchedForward):
    """The model's forward under ``remat:KEYS`` (NOTE above). ``counts``: (op calls the
    last forward's rebuilds re-run, op calls it made)."""

    def __init__(self, model: nn.Module, keys: frozenset):
        super().__init__(model)
        self.keys, self.counts = keys, (0, 0)

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        model = self.module
        refuse_sharded([model], "remat")
        # read at each call: parameters may have been replaced since apply()
        owned = {_skey(t) for t in itertools.chain(model.parameters(), model.buffers())}
        record = Recorder(self.keys, owned)
        hooks = _checked(record) if is_verifying() else (record.pack, record.unpack)
        with torch.autograd.graph.saved_tensors_hooks(*hooks):
            with record:
                out = self.original(*args, **kwargs)
        refuse_unmatched(record.matcher, "forward")
        record.finish()
        self.counts = record.counts
        return out


def _checked(record: Recorder) -> tuple:
    """``record``'s pack and unpack hooks, each saved tensor packed with a copy of the
    original and its rebuild compared with it (NOTE [ Verifying a replay ],
    memprop.checkpoint.forms.verify)."""
    def pack(t):
        inner = record.pack(t)
        original = None
        if isinstance(inner, Output):
            with _disable_current_modes(), torch.no_grad():
                original = t.detach().clone()
        return inner, original, where_now()

    def unpack(packed):
        inner, original, where = packed
        value = record.unpack(inner)
        if isinstance(inner, Output):      # rebuilt (a tensor saved as it is was not)
            check_rebuilt(original, value, op_name(inner.call.func), where, "remat")
        return value
    return pack, unpack
