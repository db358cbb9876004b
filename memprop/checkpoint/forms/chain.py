"""Checkpointed segments of a chain of blocks.

NOTE [ How a segment is checkpointed without changing the model ]
  A strategy decides which *segments* (runs of consecutive blocks ``i..j``) to
  recompute in backward. memprop applies a segment by patching instance ``forward``
  attributes, never by wrapping modules, so ``state_dict()`` keys do not change (a
  checkpointed model loads a plain checkpoint and vice versa) and the model's own
  ``forward`` loop still drives execution. The patches are objects the blocks hold
  (``SegmentForward``; ``SpanFirst``, ``SpanNext``), so they deep-copy and pickle with
  the model (NOTE [ A strategy travels with the model ], memprop.checkpoint.forms.patch):
    * a segment of one block runs it inside one non-reentrant
      ``torch.utils.checkpoint.checkpoint`` (RNG state preserved, so dropout replays);
      it makes no assumption and works with any signature, arguments and outputs;
    * a segment of several blocks is one checkpoint that spans the loop's calls of its
      blocks: each block runs when the loop calls it, with the arguments the loop gives
      it, and the recompute replays them in order (NOTE [ A segment that spans the
      loop's calls ], memprop.checkpoint.forms.span);
    * while a segment runs (first time or recompute) each block runs its own forward,
      through ``__call__``, so module hooks still fire.
  Without gradients (``no_grad`` inference) nothing is saved or recomputed: every block
  runs as the loop calls it.
  Every tensor argument, positional, keyword or nested (a mask, rotary cos/sin), is
  handed to ``checkpoint`` positionally, so the checkpoint saves it through autograd's
  saved-tensor hooks and memprop's recorder counts what the checkpoint keeps alive
  (NOTE [ What counts as a stored intermediate ], memprop.saved).
  A plain segment (no selective policy) holds its output from the forward until its
  recompute, which then skips the ops that only produce it (NOTE [ A segment's output
  needs no recompute ], memprop.checkpoint.forms.tail).
  A recompute re-runs BatchNorm in training mode, which would update its running
  statistics a second time; they are snapshot before and restored after the recompute,
  so one checkpointed step leaves them exactly as one plain step does.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from memprop.checkpoint.forms.blocks import find_blocks, find_chains
from memprop.checkpoint.forms.patch import PatchedForward, refuse_sharded
from memprop.checkpoint.forms.tail import TailElision, TailRecord, hold
from memprop.checkpoint.forms.verify import VerifyingContext, is_verifying
from memprop.errors import StrategyError

__all__ = ["find_blocks", "find_chains", "CheckpointedChain", "SegmentForward", "KeptBuffers",
           "as_forward_saw", "SegmentRefused"]

_state = threading.local()   # .depth > 0 while a segment's blocks run


def _inside_segment() -> bool:
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def running_segment():
    """Marks a segment's blocks as running (forward or recompute): their patches then
    run the block itself."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def _running(bn) -> list[torch.Tensor]:
    return [t for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
            if t is not None]


def _per_block_hint(name: str) -> str:
    return (f"checkpoint {name} with a per-block strategy instead (full, every:K, "
            "blocks:i,j, selective)")


class SegmentRefused(StrategyError):
    """A segment of several blocks cannot replay what the model computes (its loop
    calls the blocks out of order; a nested segment's blocks are not called with one
    tensor). One block per checkpoint still works: the planner leaves such segments
    out."""


# block -> the training modes (``block.training``) in which a recorded forward of it had
# nothing to skip (_run_tail); weak: a module's entry goes with it
_UNTAILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _run_tail(block: nn.Module, args, kwargs, tail: dict, recompute: bool):
    """The last block of a plain segment: recorded in the forward; in the first
    recompute, the ops that only produce the held output are skipped (NOTE [ A
    segment's output needs no recompute ], memprop.checkpoint.forms.tail).
    Recording runs every op of the forward through a Python dispatch mode: a tiny
    Llama's (hidden 128) block forward took 2 ms longer recorded, and its 4-block
    ``full`` step 1.56x the plain step against 1.41x unrecorded. So a block whose
    recorded forward had nothing to skip because of what its code ends with (a
    residual add, a tuple: ``TailRecord.structural``) is not recorded again in that
    training mode, whatever strategy wraps it later: it runs as it is and its recompute
    in full. A forward that had nothing to skip for its own reasons (no graph: frozen
    parameters and an input needing no gradient; its input handed back; an op output
    a hook kept) marks nothing. Skipping is never needed for a correct gradient, only
    cheaper: a mark can cost speed, never exactness."""
    if not recompute:
        modes = _UNTAILED.setdefault(block, set())
        if block.training in modes:
            return block(*args, **kwargs)
        record = TailRecord()
        with record:
            out = block(*args, **kwargs)
        found = record.plan(out)
        if found is None and record.structural:
            modes.add(block.training)
        elif found is not None:
            tail.update(calls=record.calls, found=found, held=hold(out),
                        version=out._version)
        return out
    held = tail.pop("held", None)
    if held is None or held._version != tail["version"]:
        # nothing to skip, a second recompute, or an output changed in place since the
        # forward (a plain step's saved-tensor check would refuse it): run it in full
        return block(*args, **kwargs)
    d, p = tail.pop("found")
    elision = TailElision(tail.pop("calls"), d, p, held)
    with elision:
        return block(*args, **kwargs)


class CheckpointedChain:
    """Checkpointed segments applied to a chain of blocks (see NOTE above).

    ``segments``: inclusive ``(first, last)`` block indices, disjoint and ordered.
    ``context_fn``: passed to ``checkpoint`` (selective checkpointing uses it); a
    picklable callable (NOTE [ A strategy travels with the model ],
    memprop.checkpoint.forms.patch). ``apply()`` installs one ``SegmentForward`` on each
    segment's first block and a ``PassThrough`` on the others; ``patches`` lists them."""

    def __init__(self, blocks: list[nn.Module], segments: list[tuple[int, int]], *,
                 context_fn: Callable | None = None):
        self.blocks, self.segments, self.context_fn = blocks, segments, context_fn
        self.patches: list[PatchedForward] = []

    def apply(self) -> "CheckpointedChain":
        from memprop.checkpoint.forms.span import Span, SpanFirst, SpanNext
        for first, last in self.segments:
            seg = self.blocks[first:last + 1]
            names = [f"block {k} ({type(b).__name__})" for k, b in
                     zip(range(first, last + 1), seg)]
            if len(seg) == 1:
                self.patches.append(SegmentForward(seg, names, {}, self.context_fn).install())
                continue
            # NOTE [ A segment that spans the loop's calls ], memprop.checkpoint.forms.span
            span = Span(seg, names, self.context_fn)
            self.patches.append(SpanFirst(span).install())
            self.patches += [SpanNext(span, p).install() for p in range(1, len(seg))]
        return self

    def remove(self) -> None:
        for patch in reversed(self.patches):
            patch.uninstall()
        self.patches = []


@contextlib.contextmanager
def norms_kept(blocks: list[nn.Module]):
    """BatchNorm running statistics of ``blocks`` (those training) as they were on entry,
    put back on exit: a recompute must not update them a second time. Snapshot and
    restore run outside any dispatch mode (bookkeeping, not part of the model)."""
    training = [bn for bn in _norms(blocks) if bn.training]
    if not training:                  # nothing to keep: no dispatch modes to leave
        yield
        return
    with _disable_current_modes():
        snapshot = [(bn, [t.clone() for t in _running(bn)]) for bn in training]
    try:
        yield
    finally:
        with torch.no_grad(), _disable_current_modes():
            for bn, saved in snapshot:
                for t, value in zip(_running(bn), saved):
                    t.copy_(value)


def _norms(blocks: list[nn.Module], modules: list | None = None) -> list[nn.Module]:
    """The BatchNorms of ``blocks`` that track running statistics (``modules``: the
    blocks' ``_modules`` walk, if taken already)."""
    return [m for _, m in (modules if modules is not None else _modules(blocks))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _modules(seg: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """Every module of the segment by name (``block:path``), walked once: what a
    checkpoint's bookkeeping reads before and after its forward (its modules, buffers,
    norms, sharded modules), instead of one walk each (a tiny Llama block: 85 us a
    checkpoint in walks, now 40 us)."""
    return [(f"{i}:{n}", m) for i, block in enumerate(seg) for n, m in block.named_modules()]


# NOTE [ A model that changes itself inside a checkpoint ]
#   Some models rebuild part of themselves on a call: transformers' BigBird switches
#   from block-sparse to full attention when the sequence is short, creating the new
#   attention modules inside its forward (their initialisation draws from the global
#   RNG). Inside a checkpointed region that breaks the replay: backward restores the RNG
#   state of the region's start and recomputes with the modules as they are now, so
#   dropout draws other masks than the forward did (measured: hf:big_bird, seq_len 32,
#   forward:-, 58 of 60 gradients wrong by up to 0.073, loss equal). So every
#   checkpointed segment compares its modules before and after its forward, and
#   refuses the step if they changed. The model has changed itself by
#   then; the next step replays exactly (the change happens once).

def _tree(seg: list[nn.Module], modules: list | None = None) -> dict[str, int]:
    """The ids of the segment's modules, by name: what a replay needs to find unchanged.
    Not its parameters: FSDP2 swaps sharded and unsharded parameters around each call,
    and that replays exactly. ``modules``: the segment's ``_modules`` walk, if taken."""
    return {name: id(m) for name, m in (modules if modules is not None else _modules(seg))}


def _refuse_changed(before: dict[str, int], after: dict[str, int], first: str) -> None:
    """StrategyError when a segment's forward changed its modules (NOTE above)."""
    if before == after:
        return
    changed = sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)})
    what = changed[0].partition(":")[2] or "the module itself"
    raise StrategyError(
        f"memprop.checkpoint: {first} replaced its own modules during a "
        f"checkpointed forward ({len(changed)} changed, first {what!r}), so the recompute "
        "in backward would not replay it (NOTE [ A model that changes itself inside a "
        "checkpoint ]); this step is refused. The model has now changed itself: run the "
        "step again, or call the model once before applying the strategy")


# NOTE [ Buffers a forward changes ]
#   A forward may read a buffer it also changes in place (a call counter; ibert's
#   quantisation ranges, found by the architectures run): the recompute in backward
#   would read the changed value and compute something else, silently (a plain
#   checkpoint compares nothing). So a segment's recompute runs with the segment's
#   buffers as its forward saw them: the forward keeps a copy of each buffer it changes,
#   the recompute puts those values in, runs, and puts the changed values back, so the
#   step leaves the buffers as one plain step does. Which buffers a forward changes is
#   learnt from their version counters: the segment's first forward with gradients
#   keeps a copy of every buffer of its blocks, and after it, only those whose version
#   moved (names in ``KeptBuffers.changes``); later forwards copy only those.
#   A buffer the forward replaces by a new tensor (``self.x_min = ...``: ibert's
#   QuantAct) needs no copy: the recompute gets the tensor the forward read, by name,
#   and the new one back after. BatchNorm's running statistics are left to
#   ``norms_kept`` (written, never read, in training). A forward that changes a buffer
#   in place that its earlier forwards left alone cannot be replayed (no copy was
#   kept): that step is refused, and the next keeps it. The copies are
#   bookkeeping, made outside any dispatch mode as ``norms_kept``'s are: the tracker
#   does not count them (the first step's copies of unchanged buffers live until its
#   forward ends; later steps copy only the buffers that change, usually none).
#   Checkpoints nested by ``nested:`` (memprop.checkpoint.forms.multilevel) keep them
#   per checkpoint, each level as its own forward saw them (``KeptBuffers``).

def _buffers(seg: list[nn.Module], modules: list | None = None
             ) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """The segment's buffers by name (``block:name``): (the module holding it, its
    attribute, the tensor), BatchNorm's running statistics apart (``norms_kept``).
    ``modules``: the segment's ``_modules`` walk, if taken."""
    modules = modules if modules is not None else _modules(seg)
    norms = {id(t) for bn in _norms(seg, modules) for t in _running(bn)}
    out = {}
    for name, module in modules:
        dot = "." if name.partition(":")[2] else ""     # a block itself: "i:attr"
        for attr, b in module._buffers.items():
            if b is not None and id(b) not in norms:
                out[f"{name}{dot}{attr}"] = (module, attr, b)
    return out


@contextlib.contextmanager
def as_forward_saw(kept: list, swapped: list):
    """Inside, the buffers of ``kept`` ((buffer, its value when the forward ran) pairs)
    hold that value, and the modules of ``swapped`` ((module, attribute, the tensor the
    forward read) triples: buffers the forward replaced) hold the tensor the forward
    read; after, both as they were (NOTE [ Buffers a forward changes ])."""
    now: list = []
    if kept:                          # (most checkpoints keep none: no modes to leave)
        with torch.no_grad(), _disable_current_modes():
            now = [(b, b.clone()) for b, _ in kept]
            for b, value in kept:
                b.copy_(value)
    current = [(module, attr, module._buffers[attr]) for module, attr, _ in swapped]
    for module, attr, old in swapped:
        module._buffers[attr] = old
    try:
        yield
    finally:
        if now:
            with torch.no_grad(), _disable_current_modes():
                for b, value in now:
                    b.copy_(value)
        for module, attr, tensor in current:
            module._buffers[attr] = tensor


class KeptBuffers:
    """One checkpoint's bookkeeping of the buffers its forward changes (NOTE [ Buffers a
    forward changes ]). ``changes``: the names of those it changes in place, learnt on
    its first forward with gradients (None before). ``before(seg)`` ahead of each forward
    returns what ``after`` completes and the recompute reads (``seen``, the two lists
    ``as_forward_saw`` takes)."""

    def __init__(self):
        self.changes: set[str] | None = None

    def before(self, seg: list[nn.Module], modules: list | None = None) -> tuple:
        buffers = _buffers(seg, modules)
        versions = {n: b._version for n, (_, _, b) in buffers.items()}
        wanted = [b for n, (_, _, b) in buffers.items()
                  if self.changes is None or n in self.changes]
        copies = []
        if wanted:                    # (no dispatch modes to leave for none)
            with torch.no_grad(), _disable_current_modes():
                copies = [(b, b.clone()) for b in wanted]
        return buffers, versions, (copies, [])

    def after(self, seg: list[nn.Module], state: tuple, first: str,
              modules: list | None = None) -> None:
        """Completes ``seen`` once the forward ran (``modules``: the segment's
        ``_modules`` walk after it, if taken); StrategyError for a buffer changed in
        place that earlier forwards left alone."""
        buffers, versions, (copies, swapped) = state
        after = _buffers(seg, modules)
        # a buffer the forward replaced: the recompute reads the tensor it read
        swapped += [(m, attr, b) for n, (m, attr, b) in buffers.items()
                    if n in after and after[n][2] is not b]
        changed = {n for n, (_, _, b) in buffers.items()
                   if (n not in after or after[n][2] is b) and b._version != versions[n]}
        if self.changes is None:                 # learnt: keep only what changed
            self.changes = changed
            copies[:] = [(b, v) for b, v in copies
                         if any(b is buffers[n][2] for n in changed)]
        elif not changed <= self.changes:
            self.changes |= changed
            raise StrategyError(
                f"memprop.checkpoint: {first} changed its buffer "
                f"{sorted(changed)[0].partition(':')[2]!r} in place during a checkpointed "
                "forward, which its earlier forwards did not: the recompute in backward "
                "would read the changed value (NOTE [ Buffers a forward changes ]); this "
                "step is refused. From the next step its value is kept for the recompute")


# NOTE [ An object a block changes ]
#   A block may be handed an object it changes: flaubert and xlm create a KV cache on
#   every forward, whatever ``use_cache`` says, and each attention appends its keys and
#   values to it; gemma4 hands every layer a dict in which a layer leaves its keys and
#   values for later layers. The recompute in backward runs after the whole forward, so
#   it would find the object as the last block left it: appending again and reading
#   twice as many keys (a shape error at best), or a block that reads every entry
#   present reading later blocks' entries, silently. So a checkpointed forward takes,
#   before each block runs, the contents of every container reachable from each object
#   argument (not a tensor, module or plain value): each dict's and list's items and
#   each object's attributes, shallow, three levels down (``ObjectState``). The
#   recompute of that block runs with every container put back as it was then, and
#   afterwards as it was when the recompute began: it sees what the forward saw, and
#   what it writes is dropped (the forward's writes are the ones later blocks read,
#   with the same values). What a shallow rewind cannot undo is refused in one line:
#   a tensor in the object changed in place (its version moved), between the block's
#   forward and its recompute. Containers handed directly (a dict or list argument)
#   are flattened by pytree: the forward runs on the caller's own containers and the
#   recompute on containers rebuilt from the items they held when the block was called.
#   Forms that replay recorded calls (``forward:``, ``remat:``) never rerun the block's
#   Python and need none of this.

_PLAIN = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device,
          torch.Size, torch.memory_format, torch.layout)


class ObjectState:
    """The contents of every container reachable from ``objects`` (dicts, lists, an
    object's attributes; ``depth`` levels down) as they are now, shallow, and the
    version of each tensor in them (NOTE [ An object a block changes ])."""

    def __init__(self, objects: list, depth: int = 3):
        self.objects = objects
        self.held: list[tuple[Any, Any]] = []            # (container, its contents)
        self.tensors: list[tuple[str, torch.Tensor, int]] = []   # (path, tensor, version)
        stack = [(x, depth, type(x).__name__) for x in objects]
        seen: set[int] = set()
        while stack:
            x, d, path = stack.pop()
            if isinstance(x, torch.Tensor):
                self.tensors.append((path, x, x._version))
                continue
            if d < 0 or id(x) in seen or isinstance(x, (_PLAIN, nn.Module)) or callable(x):
                continue
            seen.add(id(x))
            if isinstance(x, dict):
                self.held.append((x, dict(x)))
                items = [(f"{path}[{k!r}]", v) for k, v in x.items()]
            elif isinstance(x, list):
                self.held.append((x, list(x)))
                items = [(f"{path}[{i}]", v) for i, v in enumerate(x)]
            elif isinstance(x, tuple):
                items = [(f"{path}[{i}]", v) for i, v in enumerate(x)]
            elif hasattr(x, "__dict__"):
                self.held.append((x, dict(vars(x))))
                items = [(f"{path}.{k}", v) for k, v in vars(x).items()]
            else:
                items = []
            stack.extend((v, d - 1, p) for p, v in items)

    def restore(self) -> None:
        """Every container's contents as they were when this state was taken."""
        for x, contents in self.held:
            if isinstance(x, dict):
                dict.clear(x)
                dict.update(x, contents)
            elif isinstance(x, list):
                list.__setitem__(x, slice(None), contents)
            else:
                vars(x).clear()
                vars(x).update(contents)

    def refuse_changed_in_place(self, block: str, when: str) -> None:
        """StrategyError when a tensor in the objects changed in place since."""
        for path, t, version in self.tensors:
            if t._version != version:
                raise StrategyError(
                    f"memprop.checkpoint: a tensor in the object {block} was handed "
                    f"({path}) changed in place {when}, so the recompute in backward "
                    "would not see what the forward saw (NOTE [ An object a block "
                    "changes ]); this model cannot be checkpointed by blocks: a form "
                    "replaying recorded calls (forward:-, remat:-) can")

    @contextlib.contextmanager
    def rewound(self, block: str):
        """Inside: every container as it was when this state was taken; on leaving, as
        it was on entering."""
        self.refuse_changed_in_place(block, "before its recompute")
        now = ObjectState(self.objects)
        self.restore()
        try:
            yield
        finally:
            now.restore()


def _objects(leaves: list) -> list:
    """The leaves a forward could change that are neither tensors nor plain values."""
    return [x for x in leaves if not isinstance(x, (torch.Tensor, _PLAIN, nn.Module))
            and not callable(x) and hasattr(x, "__dict__")]


class SegmentForward(PatchedForward):
    """The forward of a checkpointed block: the block in one ``checkpoint`` (NOTE [ How
    a segment is checkpointed without changing the model ]). ``kept``: the buffers its
    forward changes (NOTE [ Buffers a forward changes ]). A segment of several blocks
    is a span (memprop.checkpoint.forms.span)."""

    def __init__(self, seg: list[nn.Module], names: list[str], box: dict,
                 context_fn: Callable | None):
        super().__init__(seg[0])
        self.seg, self.names, self.context_fn = seg, names, context_fn
        self.kept = KeptBuffers()

    def _run(self, args: tuple, kwargs: dict, *, recompute: bool, tail: dict | None,
             kept: tuple) -> Any:
        # a recompute must not update BatchNorm's running statistics a second time:
        # snapshot them and put them back (the kernel path, and so the saved tensors
        # checkpoint compares, stay exactly those of the first pass); it reads the
        # buffers the forward changed as the forward saw them (NOTE [ Buffers a forward
        # changes ]) (outside any dispatch mode: it is bookkeeping, not part of the model)
        with running_segment(), norms_kept(self.seg if recompute else []), \
                as_forward_saw(*(kept if recompute else ([], []))):
            if tail is None:
                return self.module(*args, **kwargs)
            # NOTE [ A segment's output needs no recompute ]
            return _run_tail(self.module, args, kwargs, tail, recompute)

    def __call__(self, *args, **kwargs):
        names, context_fn = self.names, self.context_fn
        if _inside_segment() or not torch.is_grad_enabled():   # inside a run; inference
            return self.original(*args, **kwargs)
        walked = _modules(self.seg)
        # inside the checkpoint: a lone block's modules but itself (walked first)
        refuse_sharded(self.seg, f"the checkpoint of {names[0]}",
                       inside=[m for _, m in (walked[1:] if len(self.seg) == 1 else walked)])
        # every tensor argument goes to checkpoint positionally, so it is saved
        # through the saved-tensor hooks (NOTE above); the rest rides along
        leaves, spec = tree_flatten((args, kwargs))
        where = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        calls = [0]                      # 1st call: the forward pass; later: recomputes
        # this call's held output (plain segments; lives as long as its graph);
        # a verified replay recomputes it (NOTE [ Verifying a replay ])
        tail = {} if context_fn is None and not is_verifying() else None

        def segment(*tensors):
            calls[0] += 1
            if calls[0] == 1:            # the forward: the caller's own arguments
                return self._run(args, kwargs, recompute=False, tail=tail, kept=kept)
            filled = list(leaves)        # a recompute: the arguments as they were handed
            for i, t in zip(where, tensors):
                filled[i] = t
            a, kw = tree_unflatten(filled, spec)
            with objects.rewound(names[0]):   # NOTE [ An object a block changes ]
                return self._run(a, kw, recompute=True, tail=tail, kept=kept)

        options: dict[str, Any] = dict(use_reentrant=False, preserve_rng_state=True)
        if is_verifying():               # NOTE [ Verifying a replay ]
            context_fn = VerifyingContext(context_fn, f"the checkpoint of {names[0]}")
        if context_fn is not None:
            options["context_fn"] = context_fn
        before = _tree(self.seg, walked)
        state = self.kept.before(self.seg, walked)   # NOTE [ Buffers a forward changes ]
        kept = state[2]                          # read by the recompute (segment)
        objects = ObjectState(_objects(leaves))  # NOTE [ An object a block changes ]
        out = checkpoint(segment, *(leaves[i] for i in where), **options)
        walked = _modules(self.seg)
        _refuse_changed(before, _tree(self.seg, walked), names[0])
        objects.refuse_changed_in_place(names[0], "during its forward")
        self.kept.after(self.seg, state, names[0], walked)
        return out
