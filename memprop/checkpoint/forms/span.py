"""A multi-block segment whose checkpoint spans the model loop's calls of its blocks.

NOTE [ A segment that spans the loop's calls ]
  A segment of blocks ``i..j`` (``sqrt``, ``segments:N``, ``blocks:i-j``) stores only
  what its blocks are handed from outside the segment and recomputes the rest in
  backward. Its blocks run when the model's own loop calls them, each with the
  arguments the loop gives it, so a loop that hands each block its own mask (Gemma2's
  and gpt-oss's sliding-window and full-attention layers), per-layer inputs or a value
  an earlier block returned (T5's position bias) is replayed as it ran:
    * one checkpoint frame (torch's non-reentrant ``_CheckpointFrame``) covers the
      segment; its saved-tensor hook is entered around each block's call only, so what
      the loop computes between blocks is stored as usual, never recomputed;
    * a tensor a block is handed that an earlier block of the segment returned (the
      hidden state, by identity) is not stored: the recompute hands it the recomputed
      value; every other tensor argument is stored (as a checkpoint stores its inputs,
      through the saved-tensor hooks, so memprop's recorder counts it once per storage);
    * the recompute replays the blocks in order, each with its own arguments, the RNG
      state it started with (dropout, and RNG the loop drew between blocks) and the
      autocast state of the segment's start, under the selective policy's recompute
      context when there is one;
    * a block called out of order is refused (``SegmentRefused``); a loop that stops
      before the segment's last block (LayerDrop, an early exit) replays the blocks
      it ran.
  What a single-block checkpoint does around its forward applies to the whole segment:
  BatchNorm statistics kept (``norms_kept``), buffers the forwards change kept for the
  recompute (``KeptBuffers``), modules replaced during the forward and objects a block
  changes refused, sharded (FSDP2) blocks refused, and the last block's held output
  spared from recompute (NOTE [ A segment's output needs no recompute ]).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import (
    _DEFAULT_DETERMINISM_MODE,
    _allowed_determinism_checks_to_fns,
    _checkpoint_hook,
    _CheckpointFrame,
    _get_autocast_kwargs,
    _get_device_module,
    _infer_device_type,
    get_device_states,
    set_device_states,
)

from memprop.checkpoint.forms.chain import (
    KeptBuffers,
    ObjectState,
    SegmentForward,
    SegmentRefused,
    _inside_segment,
    _modules,
    _objects,
    _per_block_hint,
    _refuse_changed,
    _run_tail,
    _tree,
    as_forward_saw,
    norms_kept,
    running_segment,
)
from memprop.checkpoint.forms.patch import PatchedForward, refuse_sharded
from memprop.checkpoint.forms.verify import VerifyingContext, is_verifying

__all__ = ["SpanFirst", "SpanNext", "Span"]

_SavedTensor: Any = torch._C._autograd.SavedTensor
_make_saved_tensor = torch._C._autograd._make_saved_tensor


class _Run:
    """One forward of the segment: its frame, and for each block run so far its
    arguments (``spec`` and ``leaves``: a stored tensor, an earlier block's output
    leaf ``("out", q, k)``, or a plain value) and the RNG state it started with."""

    def __init__(self, span: "Span", contexts, device_type: str, tail: dict | None,
                 modules: list):
        self.span, self.contexts, self.device_type, self.tail = span, contexts, device_type, tail
        self.autocast = _get_autocast_kwargs(device_type=device_type)
        self.tree = _tree(span.seg, modules)          # modules, to refuse a change
        # NOTE [ Buffers a forward changes ]
        self.kept_state = span.kept.before(span.seg, modules)
        self.kept = self.kept_state[2]
        # (spec, leaves, cpu rng, device rng, the objects it was handed as they were)
        self.calls: list[tuple] = []
        # id(output leaf) -> (block, leaf index, a weak reference: ids are reused)
        self.made: dict[int, tuple[int, int, Any]] = {}
        self.stored: dict[int, Any] = {}     # id(tensor) -> its saved tensor

    def record(self, p: int, args: tuple, kwargs: dict) -> ObjectState:
        """Notes block ``p``'s call; returns the objects it was handed, as they are."""
        leaves, spec = tree_flatten((args, kwargs))
        kept: list = []
        for x in leaves:
            made = self.made.get(id(x)) if isinstance(x, torch.Tensor) else None
            if made is not None and made[2]() is x:
                kept.append(("out", made[0], made[1]))
            elif isinstance(x, torch.Tensor):    # once per tensor: every block's mask
                if id(x) not in self.stored:     # (the saved tensor keeps x, and its id)
                    self.stored[id(x)] = _make_saved_tensor(x, is_output=False)
                kept.append(self.stored[id(x)])
            else:
                kept.append(x)
        devices = ((get_device_states(*[x for x in leaves if isinstance(x, torch.Tensor)]))
                   if self.span.had_device else None)
        objects = ObjectState(_objects(leaves))    # NOTE [ An object a block changes ]
        self.calls.append((spec, kept, torch.get_rng_state(), devices, objects))
        return objects

    def returned(self, p: int, out) -> None:
        for k, leaf in enumerate(tree_flatten(out)[0]):
            if isinstance(leaf, torch.Tensor):
                self.made[id(leaf)] = (p, k, weakref.ref(leaf))

    def recompute(self, *_inputs) -> None:
        """The frame's recompute: every block run so far, in order, as it ran."""
        span = self.span
        outs: list[list] = []                # each block's recomputed output, flattened
        recompute_ctx = self.contexts[1] if self.contexts is not None else \
            contextlib.nullcontext()
        devices = self.calls[0][3][0] if self.calls and self.calls[0][3] else []
        with running_segment(), \
                torch.random.fork_rng(devices=devices, device_type=self.device_type), \
                norms_kept(span.seg), as_forward_saw(*self.kept), \
                torch.amp.autocast(self.device_type, **self.autocast[0]) \
                if torch.amp.is_autocast_available(self.device_type) \
                else contextlib.nullcontext(), \
                torch.amp.autocast("cpu", **self.autocast[1]), recompute_ctx:
            for p, (spec, leaves, rng, device_rng, objects) in enumerate(self.calls):
                values = [outs[x[1]][x[2]] if isinstance(x, tuple) and x[:1] == ("out",)
                          else x.unpack() if isinstance(x, _SavedTensor) else x
                          for x in leaves]
                args, kwargs = tree_unflatten(values, spec)
                torch.set_rng_state(rng)
                if device_rng is not None:
                    set_device_states(*device_rng, device_type=self.device_type)
                block = span.seg[p]
                with objects.rewound(span.names[p]):
                    if self.tail is not None and p == len(span.seg) - 1:
                        out = _run_tail(block, args, kwargs, self.tail, True)
                    else:
                        out = block(*args, **kwargs)
                outs.append(tree_flatten(out)[0])


class Span:
    """The state the patches of one multi-block segment share: its blocks, names, the
    selective policy's ``context_fn``, what its forwards change (``kept``) and the run
    of the forward in progress (``run``; None between forwards)."""

    def __init__(self, seg: list[nn.Module], names: list[str], context_fn: Callable | None):
        self.seg, self.names, self.context_fn = seg, names, context_fn
        self.kept = KeptBuffers()
        self.run: _Run | None = None
        self.frame: Any = None                # the run's checkpoint frame
        self.next = 0
        self.had_device = False

    def __getstate__(self):                  # a copy or a pickle holds no step in progress
        return {**self.__dict__, "run": None, "next": 0, "frame": None}

    # -- the forward: each block when the loop calls it ------------------------------------

    def start(self, args: tuple, kwargs: dict) -> None:
        seg, names = self.seg, self.names
        walked = _modules(seg)
        refuse_sharded(seg, f"the checkpoint of {names[0]} .. {names[-1]}",
                       inside=[m for _, m in walked])
        leaves = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        device_type = _infer_device_type(*leaves)
        module = _get_device_module(device_type)
        self.had_device = bool(getattr(module, "_initialized", False)) and device_type != "cpu"
        context_fn = self.context_fn
        if is_verifying():                   # NOTE [ Verifying a replay ]
            context_fn = VerifyingContext(context_fn, f"the checkpoint of {names[0]}")
        contexts = context_fn() if context_fn is not None else None
        # plain segments hold their output until the recompute (forms.tail); a verified
        # replay recomputes it (NOTE [ Verifying a replay ])
        tail: dict | None = {} if self.context_fn is None and not is_verifying() else None
        self.run, self.next = _Run(self, contexts, device_type, tail, walked), 0
        # the frame holds the run (its recompute), the run never the frame: no cycle, so
        # the stored inputs go when backward drops the frame, not at the next gc
        self.frame = _CheckpointFrame(
            self.run.recompute, True, None,
            _allowed_determinism_checks_to_fns[_DEFAULT_DETERMINISM_MODE])

    def call(self, p: int, original, args: tuple, kwargs: dict):
        """Block ``p``'s forward inside the segment's frame."""
        run, names = self.run, self.names
        if p == 0:
            self.start(args, kwargs)
            run = self.run
        elif run is None or p != self.next:
            expected = names[self.next] if run is not None else names[0]
            self.run, self.next, self.frame = None, 0, None
            raise SegmentRefused(
                f"memprop.checkpoint: the model called {names[p]} out of the order of its "
                f"checkpointed segment ({names[0]} .. {names[-1]}; {expected} was next); "
                f"{_per_block_hint(names[0])}")
        assert run is not None
        objects = run.record(p, args, kwargs)
        forward_ctx = run.contexts[0] if run.contexts is not None else \
            contextlib.nullcontext()
        last = p == len(self.seg) - 1
        with running_segment(), _checkpoint_hook(self.frame), forward_ctx:
            if last and run.tail is not None:
                out = _run_tail(self.seg[p], args, kwargs, run.tail, False)
            else:
                out = original(*args, **kwargs)
        objects.refuse_changed_in_place(names[p], "during its forward")
        run.returned(p, out)
        self.next = p + 1
        if last:
            self.finish()
        return out

    def finish(self) -> None:
        run = self.run
        assert run is not None
        self.frame.forward_completed = True
        self.run, self.next, self.frame = None, 0, None
        walked = _modules(self.seg)
        _refuse_changed(run.tree, _tree(self.seg, walked), self.names[0])
        self.kept.after(self.seg, run.kept_state, self.names[0], walked)


# NOTE [ A span under torch.compile ]
#   Dynamo traces torch's ``checkpoint`` as a higher-order op and partitions what it
#   saves, but not a checkpoint frame held open across calls: the compiled forward
#   would pack other tensors than the eager recompute makes (torch's CheckpointError).
#   So while Dynamo traces, each block of a span is checkpointed on its own, as
#   ``full`` does (``SegmentForward``): exact, and storing each block's inputs.


class _SpanPatch(PatchedForward):
    """The forward of block ``p`` of a segment (NOTE above)."""

    def __init__(self, span: Span, p: int):
        super().__init__(span.seg[p])
        self.span, self.p = span, p
        self.alone: SegmentForward | None = None   # NOTE [ A span under torch.compile ]

    def __call__(self, *args, **kwargs):
        span = self.span
        if _inside_segment() or (not torch.is_grad_enabled()
                                               and (self.p == 0 or span.run is None)):
            return self.original(*args, **kwargs)     # inside a run; inference
        if torch.compiler.is_compiling():
            if self.alone is None:
                self.alone = SegmentForward([self.module], [span.names[self.p]], {},
                                            span.context_fn)
            self.alone.previous = self.previous
            return self.alone(*args, **kwargs)
        return span.call(self.p, self.original, args, kwargs)


class SpanFirst(_SpanPatch):
    """The forward of a segment's first block (NOTE above)."""

    def __init__(self, span: Span):
        super().__init__(span, 0)


class SpanNext(_SpanPatch):
    """The forward of block ``p`` > 0 of a segment (NOTE above)."""
