"""Checkpointed segments of a chain of blocks.

NOTE [ How a segment is checkpointed without changing the model ]
  A strategy decides which *segments* (runs of consecutive blocks ``i..j``) to
  recompute in backward. memprop applies a segment by patching instance ``forward``
  attributes, never by wrapping modules, so ``state_dict()`` keys do not change (a
  checkpointed model loads a plain checkpoint and vice versa) and the model's own
  ``forward`` loop still drives execution. The patches are objects the blocks hold
  (``SegmentForward``, ``PassThrough``), so they deep-copy and pickle with the model
  (NOTE [ A strategy travels with the model ], memprop.checkpoint.forms.patch):
    * block ``i``'s forward runs blocks ``i..j`` inside one non-reentrant
      ``torch.utils.checkpoint.checkpoint`` (RNG state preserved, so dropout replays)
      and returns block ``i``'s output;
    * blocks ``i+1..j`` hand back their own outputs from that run when the loop calls
      them;
    * while a segment runs (first time or recompute) each block runs its own forward,
      through ``__call__``, so module hooks still fire.
  Inside a segment block ``k+1`` is called with every positional and keyword argument
  block ``i`` got, the first (the hidden state; by keyword if block ``i`` got it so)
  replaced by block ``k``'s *hidden output*: the output itself if a tensor, else its
  first element (a tuple, or a transformers ``ModelOutput``). That is an assumption
  about the model's loop, so it is verified when the loop calls block ``k+1``: the
  hidden state must be the very tensor object (identity) the segment passed on, every
  other tensor argument the same object, every other argument equal, and the blocks
  called in order. Anything else (the loop transforms the hidden state between blocks,
  passes other arguments, skips a block) raises ``StrategyError`` naming the block;
  nothing is ever silently computed from other inputs. A block that raises when the
  segment runs it with those arguments (a per-layer mask of another shape: hf:lfm3,
  minimax) is refused the same way, before the loop could call it. Single-block
  segments make no assumption and work with any signature, arguments and outputs.
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
import inspect
import threading
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

__all__ = ["find_blocks", "find_chains", "CheckpointedChain", "SegmentForward", "PassThrough",
           "KeptBuffers", "as_forward_saw"]

_state = threading.local()   # .depth > 0 while a segment's blocks run


def _inside_segment() -> bool:
    return getattr(_state, "depth", 0) > 0


def _running(bn) -> list[torch.Tensor]:
    return [t for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
            if t is not None]


def _per_block_hint(name: str) -> str:
    return (f"checkpoint {name} with a per-block strategy instead (full, every:K, "
            "blocks:i,j, selective)")


def _hidden(output, name: str) -> torch.Tensor:
    """The tensor a block's output hands the next block (NOTE above)."""
    if isinstance(output, torch.Tensor):
        return output
    first = None
    if isinstance(output, (tuple, list)) and output:
        first = output[0]
    elif hasattr(output, "to_tuple") and len(output):    # transformers ModelOutput
        first = output[0]
    if isinstance(first, torch.Tensor):
        return first
    raise StrategyError(
        f"memprop.checkpoint: a multi-block segment passes each block's output to the next "
        f"block, but {name} returned {type(output).__name__}, which has no hidden-state "
        f"tensor first; {_per_block_hint('this model')}")


def _same(a, b) -> bool:
    """Tensors: the same object. Anything else: equal (NOTE above)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:   # noqa: BLE001 - an __eq__ that cannot answer counts as different
        return False


class SegmentRefused(StrategyError):
    """A segment of several blocks cannot replay what the model computes (its loop
    passes the blocks other arguments, transforms the hand-over, or calls them out of
    order). One block per checkpoint still works: the planner leaves such segments out."""


class _Call:
    """One call's arguments, with the hidden state's place: index 0, or a keyword."""

    def __init__(self, args: tuple, kwargs: dict, slot, params: tuple = ()):
        self.args, self.kwargs, self.slot, self.params = args, kwargs, slot, params

    @classmethod
    def of(cls, forward, args, kwargs, name: str) -> "_Call":
        try:
            params = tuple(inspect.signature(forward).parameters)
        except (TypeError, ValueError):   # no signature to read: positions stay unnamed
            params = ()
        if args:
            return cls(args, kwargs, 0, params)
        if params and params[0] in kwargs:
            return cls(args, kwargs, params[0], params)
        raise SegmentRefused(f"memprop.checkpoint: {name} was called without a hidden-state "
                            f"argument a segment could chain; {_per_block_hint(name)}")

    def with_hidden(self, hidden) -> tuple[tuple, dict]:
        if self.slot == 0:
            return (hidden, *self.args[1:]), self.kwargs
        return self.args, {**self.kwargs, self.slot: hidden}

    def mismatch(self, args, kwargs, hidden) -> str | None:
        """What differs between this call with ``hidden`` and the loop's actual call."""
        want_args, want_kwargs = self.with_hidden(hidden)
        if len(args) != len(want_args) or set(kwargs) != set(want_kwargs):
            return (f"its arguments differ ({len(args)} positional, keywords "
                    f"{sorted(kwargs)}; expected {len(want_args)} positional, keywords "
                    f"{sorted(want_kwargs)})")
        named = [*((f"argument {i}" + (f" ({self.params[i]})" if i < len(self.params) else ""),
                    a, b) for i, (a, b) in enumerate(zip(args, want_args))),
                 *((f"keyword {k!r}", kwargs[k], want_kwargs[k]) for k in kwargs)]
        for label, got, want in named:
            got_leaves, got_spec = tree_flatten(got)
            want_leaves, want_spec = tree_flatten(want)
            if got_spec != want_spec or not all(map(_same, got_leaves, want_leaves)):
                hidden_slot = label.startswith("argument 0") if self.slot == 0 else (
                    label == f"keyword {self.slot!r}")
                return ("the model's loop transformed the previous block's output before "
                        "passing it on" if hidden_slot else
                        f"its {label} is not the one the segment's first block received")
        return None


def _run_tail(block: nn.Module, args, kwargs, tail: dict, recompute: bool):
    """The last block of a plain segment: recorded in the forward; in the first
    recompute, the ops that only produce the held output are skipped (NOTE [ A
    segment's output needs no recompute ], memprop.checkpoint.forms.tail)."""
    if not recompute:
        record = TailRecord()
        with record:
            out = block(*args, **kwargs)
        found = record.plan(out)
        if found is not None:
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
        for first, last in self.segments:
            seg = self.blocks[first:last + 1]
            names = [f"block {k} ({type(b).__name__})" for k, b in
                     zip(range(first, last + 1), seg)]
            box: dict = {}  # the segment's outputs and call, for blocks first+1..last
            self.patches.append(SegmentForward(seg, names, box, self.context_fn).install())
            for p in range(1, len(seg)):
                self.patches.append(PassThrough(seg[p], p, names, box).install())
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
    with _disable_current_modes():
        snapshot = [(bn, [t.clone() for t in _running(bn)]) for bn in _norms(blocks)
                    if bn.training]
    try:
        yield
    finally:
        with torch.no_grad(), _disable_current_modes():
            for bn, saved in snapshot:
                for t, value in zip(_running(bn), saved):
                    t.copy_(value)


def _norms(blocks: list[nn.Module]) -> list[nn.Module]:
    return [m for b in blocks for m in b.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


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

def _tree(seg: list[nn.Module]) -> dict[str, int]:
    """The ids of the segment's modules, by name: what a replay needs to find unchanged.
    Not its parameters: FSDP2 swaps sharded and unsharded parameters around each call,
    and that replays exactly."""
    return {f"{i}:{n}": id(m) for i, block in enumerate(seg) for n, m in block.named_modules()}


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

def _buffers(seg: list[nn.Module]) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """The segment's buffers by name (``block:name``): (the module holding it, its
    attribute, the tensor), BatchNorm's running statistics apart (``norms_kept``)."""
    norms = {id(t) for bn in _norms(seg) for t in _running(bn)}
    out = {}
    for i, block in enumerate(seg):
        for path, module in block.named_modules():
            for attr, b in module._buffers.items():
                if b is not None and id(b) not in norms:
                    out[f"{i}:{path + '.' if path else ''}{attr}"] = (module, attr, b)
    return out


@contextlib.contextmanager
def as_forward_saw(kept: list, swapped: list):
    """Inside, the buffers of ``kept`` ((buffer, its value when the forward ran) pairs)
    hold that value, and the modules of ``swapped`` ((module, attribute, the tensor the
    forward read) triples: buffers the forward replaced) hold the tensor the forward
    read; after, both as they were (NOTE [ Buffers a forward changes ])."""
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

    def before(self, seg: list[nn.Module]) -> tuple:
        buffers = _buffers(seg)
        versions = {n: b._version for n, (_, _, b) in buffers.items()}
        with torch.no_grad(), _disable_current_modes():
            copies = [(b, b.clone()) for n, (_, _, b) in buffers.items()
                      if self.changes is None or n in self.changes]
        return buffers, versions, (copies, [])

    def after(self, seg: list[nn.Module], state: tuple, first: str) -> None:
        """Completes ``seen`` once the forward ran; StrategyError for a buffer changed in
        place that earlier forwards left alone."""
        buffers, versions, (copies, swapped) = state
        after = _buffers(seg)
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
#   values to it. The recompute in backward would append again and read twice as many
#   keys (a shape error at best). So a checkpointed forward notes the tensors reachable
#   from each object argument (not a tensor, module or plain value) before and after it
#   runs, and refuses the step if they changed, naming the object's type. Forms that
#   replay recorded calls (``forward:``, ``remat:``) never rerun the block's Python and
#   are unaffected.

_PLAIN = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device,
          torch.Size, torch.memory_format, torch.layout)


def _tensors_of(obj, depth: int = 3) -> list[tuple[int, tuple, int]]:
    """(id, shape, version) of the tensors reachable from ``obj``'s attributes, lists,
    tuples and dicts, ``depth`` levels down: what a forward changing it would change."""
    found: list = []
    stack, seen = [(obj, depth)], set()
    while stack:
        x, d = stack.pop()
        if isinstance(x, torch.Tensor):
            found.append((id(x), tuple(x.shape), x._version))
            continue
        if d < 0 or id(x) in seen or isinstance(x, (_PLAIN, nn.Module)) or callable(x):
            continue
        seen.add(id(x))
        items = (x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple))
                 else vars(x).values() if hasattr(x, "__dict__") else ())
        stack.extend((v, d - 1) for v in items)
    return found


def _objects(leaves: list) -> list:
    """The leaves a forward could change that are neither tensors nor plain values."""
    return [x for x in leaves if not isinstance(x, (torch.Tensor, _PLAIN, nn.Module))
            and not callable(x) and hasattr(x, "__dict__")]


def _refuse_object_changed(objects: list, before: list, first: str) -> None:
    """StrategyError when a checkpointed forward changed an object it was handed (NOTE
    above)."""
    for obj, was in zip(objects, before):
        if _tensors_of(obj) != was:
            raise StrategyError(
                f"memprop.checkpoint: {first} changed the {type(obj).__name__} object it "
                "was handed during a checkpointed forward (a KV cache it appends to, say), "
                "so the recompute in backward would not see what the forward saw (NOTE [ An "
                "object a block changes ]); this model cannot be checkpointed by blocks: a "
                "form replaying recorded calls (forward:-, remat:-) can")


class SegmentForward(PatchedForward):
    """The forward of a segment's first block: blocks ``seg`` in one checkpoint (NOTE
    [ How a segment is checkpointed without changing the model ]). ``box`` hands the
    other blocks' outputs to their ``PassThrough``; ``kept``: the buffers its forward
    changes (NOTE [ Buffers a forward changes ])."""

    def __init__(self, seg: list[nn.Module], names: list[str], box: dict,
                 context_fn: Callable | None):
        super().__init__(seg[0])
        self.seg, self.names, self.box, self.context_fn = seg, names, box, context_fn
        self.kept = KeptBuffers()

    def _run(self, call: _Call, *, recompute: bool, tail: dict | None = None,
             kept: tuple | None = None) -> tuple:
        seg, names = self.seg, self.names
        # a recompute must not update BatchNorm's running statistics a second time:
        # snapshot them and put them back (the kernel path, and so the saved tensors
        # checkpoint compares, stay exactly those of the first pass); it reads the
        # buffers the forward changed as the forward saw them (NOTE [ Buffers a forward
        # changes ]) (outside any dispatch mode: it is bookkeeping, not part of the model)
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            with norms_kept(seg if recompute else []), \
                    as_forward_saw(*(kept if recompute and kept is not None else ([], []))):
                outs: list = []
                for p, block in enumerate(seg):
                    args, kwargs = (call.args, call.kwargs) if p == 0 else call.with_hidden(
                        _hidden(outs[-1], names[p - 1]))
                    try:
                        if tail is None or p < len(seg) - 1:
                            outs.append(block(*args, **kwargs))
                        else:                # NOTE [ A segment's output needs no recompute ]
                            outs.append(_run_tail(block, args, kwargs, tail, recompute))
                    except StrategyError:
                        raise
                    except Exception as exc:
                        if p == 0 or recompute:
                            raise
                        # run with block first's arguments, not those the loop gives it
                        raise SegmentRefused(
                            f"memprop.checkpoint: {names[p]} raised {type(exc).__name__} "
                            f"({' '.join(str(exc).split())[:120]}) when its segment ran "
                            f"it with the arguments of {names[0]} and "
                            f"the hidden output of {names[p - 1]} (NOTE [ How a segment is "
                            f"checkpointed without changing the model ]): the model's loop "
                            f"probably passes it other arguments; "
                            f"{_per_block_hint(names[0] + ' .. ' + names[-1])}") from exc
                return tuple(outs)
        finally:
            _state.depth -= 1

    def __call__(self, *args, **kwargs):
        seg, names, box, context_fn = self.seg, self.names, self.box, self.context_fn
        if _inside_segment():                # called from inside a running segment
            return self.original(*args, **kwargs)
        if box.get("next") is not None:
            raise SegmentRefused(
                f"memprop.checkpoint: the model's loop did not call {names[box['next']]} "
                f"after {names[box['next'] - 1]} (a checkpointed segment runs them "
                f"together); {_per_block_hint(names[0])}")
        if not torch.is_grad_enabled():      # inference: nothing to save or recompute,
            return self.original(*args, **kwargs)   # each block as the loop calls it
        call = _Call.of(self.original_signature(), args, kwargs, names[0]) if len(seg) > 1 \
            else _Call(args, kwargs, 0)
        refuse_sharded(seg, f"the checkpoint of {names[0]}" + (
            f" .. {names[-1]}" if len(seg) > 1 else ""))
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
            filled = list(leaves)
            for i, t in zip(where, tensors):
                filled[i] = t
            a, kw = tree_unflatten(filled, spec)
            return self._run(_Call(a, kw, call.slot, call.params),
                             recompute=calls[0] > 1, tail=tail, kept=kept)

        options: dict[str, Any] = dict(use_reentrant=False, preserve_rng_state=True)
        if is_verifying():               # NOTE [ Verifying a replay ]
            context_fn = VerifyingContext(context_fn, f"the checkpoint of {names[0]}")
        if context_fn is not None:
            options["context_fn"] = context_fn
        before = _tree(seg)
        state = self.kept.before(seg)            # NOTE [ Buffers a forward changes ]
        kept = state[2]                          # read by the recompute (segment)
        objects = _objects(leaves)
        states = [_tensors_of(x) for x in objects]
        outs = checkpoint(segment, *(leaves[i] for i in where), **options)
        _refuse_changed(before, _tree(seg), names[0])
        _refuse_object_changed(objects, states, names[0])
        self.kept.after(seg, state, names[0])
        if len(seg) > 1:
            box.update(outs=outs, next=1, call=call)
        return outs[0]

    def original_signature(self):
        """What ``inspect.signature`` reads for the first block's argument names."""
        return self.previous if self.previous is not None else type(self.module).forward.__get__(
            self.module)


class PassThrough(PatchedForward):
    """The forward of block ``p`` of a multi-block segment: hands back its output from
    the segment's run, after checking the loop called it as the segment did (NOTE
    above)."""

    def __init__(self, block: nn.Module, p: int, names: list[str], box: dict):
        super().__init__(block)
        self.p, self.names, self.box = p, names, box

    def __call__(self, *args, **kwargs):
        p, names, box = self.p, self.names, self.box
        if _inside_segment() or (not torch.is_grad_enabled() and box.get("next") is None):
            return self.original(*args, **kwargs)        # inside the segment; inference
        if box.get("next") != p:
            raise SegmentRefused(
                f"memprop.checkpoint: the model called {names[p]} out of the order of "
                f"its checkpointed segment ({names[0]} .. {names[-1]}); "
                f"{_per_block_hint(names[0])}")
        problem = box["call"].mismatch(args, kwargs, _hidden(box["outs"][p - 1], names[p - 1]))
        if problem:
            box.clear()
            raise SegmentRefused(
                f"memprop.checkpoint: {names[p]} is in a segment with {names[p - 1]}, but "
                f"when the model called it {problem}: the segment cannot replay what the "
                f"model computes; {_per_block_hint(names[0] + ' .. ' + names[-1])}")
        out = box["outs"][p]
        if p == len(names) - 1:
            box.clear()
        else:
            box["next"] = p + 1
        return out
