"""What a segment's recompute can skip: the ops that only produce its output.

NOTE [ A segment's output needs no recompute ]
  A checkpointed segment i..j hands block j's output on, and in most chains that tensor
  is kept anyway: the next block saves its input (a Linear does), a following
  checkpoint saves it as its input, or the head keeps it. Yet torch's recompute brings
  back everything block j saved, and when block j ends with an op that saves its own
  result (ReLU, sigmoid, tanh, exp), that result *is* the segment's output: to get it
  back the recompute also runs the op producing its input - block j's matmul - one
  block's forward for a tensor that is already held. torch.compile's partitioner sees
  the aliasing in its graph; a checkpoint does not. So memprop's plain segments hold the
  output (a detached alias: no copy) from the forward until their recompute and, if it
  is unchanged (same version), recompute block j under ``TailElision``:
    p  the op whose result is the block's output, if its autograd node saves only its
       result, it has one tensor input and one output, and it is neither random nor
       mutating: the recompute hands back the held output instead of running it;
    d  the op producing p's input, if nothing else in the block reads its output, it
       was freed when the block returned (no attribute or hook kept it), it has one
       output, its node does not save its result, and it is neither random nor
       mutating: the recompute hands back a stride-0 placeholder of its shape.
  Everything autograd saves is what the forward computed (p's result is the forward's
  own tensor; d's inputs are recomputed as usual), so gradients are bitwise those of the
  plain step. A block that fails any condition, an output changed in place, a second
  recompute, or a recompute calling other ops than the forward did: the block is
  recomputed in full.
  Memory: the consumer of the output (the next block's Linear, a LayerNorm, the head)
  usually saves it, and then the hold costs nothing but a little lifetime in backward
  (from the consumer's backward to the segment's recompute, which follow each other).
  When nothing else saves it, the hold costs its bytes for the step (one activation,
  for one block's forward less recompute); the held output is reported as stored
  (``report_stored``), so memprop's instruments count it either way, and the planner
  credits the skipped FLOPs only where the output is kept anyway
  (``memprop.checkpoint.planning.searches.segment_stops``).
  ``TailRecord.skipped_flops`` measures what this skips per block, for the planner.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memprop.flops import METADATA_QUERIES, FlopCounter
from memprop.saved import report_stored

__all__ = ["TailRecord", "TailElision", "hold"]


# not the block's own ops: the recompute's saving detaches, fake tensors query metadata
_BOOKKEEPING = {torch.ops.aten.detach.default, torch.ops.prim.device.default,
                *METADATA_QUERIES}


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in an op's arguments or outputs, in ``tree_flatten``'s order: aten
    calls nest only tuples, lists and dicts, and a walk of those takes a third of the
    time pytree does (it runs for every op of every recorded block forward)."""
    found, stack = [], [value]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (tuple, list)):
            stack.extend(reversed(x))
        elif isinstance(x, dict):
            stack.extend(reversed(list(x.values())))
    return found


def _plain_op(func) -> bool:
    """Neither random nor mutating: replaying it changes nothing but its output."""
    return (not func._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()))


def _saved_names(node) -> set[str]:
    return {a for a in dir(node) if a.startswith("_raw_saved_")}


@dataclasses.dataclass
class _Call:
    func: object
    ins: tuple          # storage ids of tensor inputs
    outs: tuple         # storage ids of tensor outputs
    meta: tuple         # (shape, dtype, device) of each output
    flops: int = 0


class TailRecord(TorchDispatchMode):
    """Records the op calls of one block's forward (storages in and out), then decides
    which two calls its recompute may skip (``plan``, NOTE above).

    A storage is named by an id given when it is first seen and kept while it lives (a
    weak reference to its Python object, which lives as long as the storage): a freed
    storage's address taken by a new one gets a new id, and nothing is kept alive."""

    def __init__(self, counter: FlopCounter | None = None):
        super().__init__()
        self.calls: list[_Call] = []
        self.counter = counter
        self._ids: dict = {}            # storage address -> (id, weakref to the storage)
        self._count = 0
        self.structural = False         # set by plan()

    def _id(self, t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        entry = self._ids.get(storage._cdata)
        if entry is None or entry[1]() is not storage:
            self._count += 1
            entry = (self._count, weakref.ref(storage))
            self._ids[storage._cdata] = entry
        return entry[0]

    def alive(self, sid: int) -> bool:
        """Whether the storage with id ``sid`` still lives."""
        return any(i == sid and ref() is not None for i, ref in self._ids.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _BOOKKEEPING:
            return func(*args, **(kwargs or {}))
        before = self.counter.total if self.counter is not None else 0
        out = func(*args, **(kwargs or {}))
        outs = _tensors(out)
        self.calls.append(_Call(
            func, tuple(self._id(t) for t in _tensors((args, kwargs))),
            tuple(self._id(t) for t in outs),
            tuple((tuple(t.shape), t.dtype, t.device) for t in outs),
            (self.counter.total - before) if self.counter is not None else 0))
        return out

    def plan(self, output) -> tuple[int, int] | None:
        """(index of d, index of p) in the block's calls, or None (NOTE above). Called
        when the block has returned: d's output must be freed by then (no module
        attribute or hook kept it, so nothing but the recompute can see the
        placeholder). After a None, ``structural`` says whether the block's code
        refused (what its output is, the ops ending it: so every forward of it would)
        or this forward did (no graph, its input handed back, d's output still held)."""
        self.structural = False
        if not isinstance(output, torch.Tensor):
            self.structural = True
            return None
        if output.grad_fn is None:
            return None
        key = self._id(output)
        p = max((i for i, c in enumerate(self.calls) if key in c.outs), default=None)
        if p is None:
            return None
        self.structural = True
        pc = self.calls[p]
        node = output.grad_fn
        if (len(pc.outs) != 1 or len(pc.ins) != 1 or not _plain_op(pc.func)
                or pc.meta[0][0] != tuple(output.shape)
                or not _saved_names(node) <= {"_raw_saved_result"}):
            return None
        d = max((i for i in range(p) if pc.ins[0] in self.calls[i].outs), default=None)
        if d is None:
            return None
        dc = self.calls[d]
        read_elsewhere = any(dc.outs[0] in c.ins for i, c in enumerate(self.calls)
                             if i not in (d, p))
        inputs = [n for n, _ in node.next_functions if n is not None]
        if (len(dc.outs) != 1 or read_elsewhere or not _plain_op(dc.func)
                or dc.outs[0] == key or len(inputs) != 1
                or any(name.startswith("_raw_saved_result") for name in
                       _saved_names(inputs[0]))):
            return None
        self.structural = False
        if self.alive(dc.outs[0]):
            return None
        return d, p

    def skipped_flops(self, output) -> float:
        """FLOPs a recompute of this block skips when ``output`` is held (0 if none):
        what ``plan`` lets it skip, for the planner's cost model."""
        found = self.plan(output)
        return 0.0 if found is None else float(self.calls[found[0]].flops)


class TailElision(TorchDispatchMode):
    """Runs one block's recompute, handing back a placeholder for call ``d`` and the
    held forward output for call ``p`` (NOTE above); every other call runs. If the
    recompute's calls differ from the forward's, nothing is skipped."""

    def __init__(self, calls: list[_Call], d: int, p: int, held: torch.Tensor):
        super().__init__()
        self.calls, self.d, self.p, self.held = calls, d, p, held
        self.index, self.diverged = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _BOOKKEEPING:
            return func(*args, **(kwargs or {}))
        i = self.index
        self.index += 1
        if not self.diverged and (i >= len(self.calls) or self.calls[i].func is not func):
            self.diverged = True
        if not self.diverged and i == self.d:
            shape, dtype, device = self.calls[i].meta[0]
            return torch.empty((), dtype=dtype, device=device).expand(shape)
        if not self.diverged and i == self.p:
            return self.held.detach()
        return func(*args, **(kwargs or {}))


def hold(output: torch.Tensor) -> torch.Tensor:
    """The alias a segment keeps of its output until its recompute, reported stored."""
    held = output.detach()
    report_stored(held, "checkpoint:output")
    return held
