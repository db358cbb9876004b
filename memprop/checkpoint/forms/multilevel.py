"""Multi-level recompute applied to a model: nested non-reentrant checkpoints, which
reach budgets below the single-level floor (the planner finds them: rotor's DP,
memprop.checkpoint.planning.rotor, checked by simulation).

    apply_strategy(model, "nested:0-40[0-20[0-9]],41-62")
    Nested.parse("0-31[0-15],32-47").apply(model)
    p = plan(model, batch, "37MiB")                 # may return a Nested schedule

NOTE [ How a multi-level schedule is applied ]
  A schedule (NOTE [ Multi-level schedules ], memprop.checkpoint.planning.rotor) is a
  tree of checkpointed segments: ``0-40[0-20[0-9]]`` checkpoints blocks 0..40; when
  backward recomputes them, blocks 0..20 run inside a checkpoint of their own (and, when
  those are recomputed, blocks 0..9 again), the other blocks of the range are stored.
  Each segment is one ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False,
  preserve_rng_state=True)``; torch's nested checkpoints respect an inner checkpoint met
  during a recompute (NOTE [ Nestable Checkpoint ], torch/utils/checkpoint.py), so the
  tree runs as the DP scheduled it. Top-level segments are applied as in NOTE [ How a
  segment is checkpointed without changing the model ] (memprop.checkpoint.forms.chain):
  instance ``forward`` patches, ``state_dict`` keys unchanged, blocks called through
  ``__call__``. Inside a segment block k + 1 receives block k's output, so the first
  block of every top-level segment (one block or several) must be called with one
  tensor, and every block but a segment's last must return one; anything else raises
  ``SegmentRefused`` (a ``StrategyError``). BatchNorm running statistics are snapshot
  before the outermost recompute that runs a block and restored after it: one step
  leaves them as a plain step does. The RNG state is replayed by every level, so dropout
  matches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memprop.checkpoint.forms.chain import (
    KeptBuffers,
    SegmentRefused,
    as_forward_saw,
    find_blocks,
    norms_kept,
)
from memprop.checkpoint.forms.patch import Applied, PatchedForward
from memprop.checkpoint.forms.strategies import Strategy, refuse_applied
from memprop.checkpoint.forms.verify import VerifyingContext, is_verifying
from memprop.errors import StrategyError

__all__ = ["Nested", "NestedChain", "claim_blocks", "format_schedule", "parse_schedule"]

_state = threading.local()   # .depth: segments running; .recomputing: recomputes running


def _get(name: str) -> int:
    return getattr(_state, name, 0)


class NestedChain:
    """A tree of checkpointed segments applied to a chain of blocks (NOTE above).
    ``tree``: ``[(first, last, children), ...]`` with inclusive block indices."""

    def __init__(self, blocks: list[nn.Module], tree):
        self.blocks, self.tree = blocks, tree
        self.patches: list[PatchedForward] = []
        self.kept: dict[tuple[int, int], KeptBuffers] = {}   # per checkpointed segment

    def apply(self) -> "NestedChain":
        for first, last, children in self.tree:
            box: dict = {}
            self.patches.append(_NestedTop(self, first, last, children, box).install())
            for k in range(first + 1, last + 1):
                self.patches.append(_NestedPassThrough(self.blocks[k], box,
                                                       last=k == last).install())
        return self

    def _run(self, first: int, last: int, children, x, *, recompute: bool):
        """Blocks first..last on ``x``, children checkpointed; a recompute that is the
        outermost one puts BatchNorm statistics back afterwards."""
        outermost = recompute and _get("recomputing") == 0
        _state.depth = _get("depth") + 1
        _state.recomputing = _get("recomputing") + int(recompute)
        try:
            with norms_kept(self.blocks[first:last + 1] if outermost else []):
                return self._blocks(first, last, children, x)
        finally:
            _state.depth -= 1
            _state.recomputing -= int(recompute)

    def _blocks(self, first: int, last: int, children, x):
        """Blocks first..last on ``x``, each child segment in its own checkpoint."""
        starts = {c[0]: c for c in children}
        out, k = x, first
        while k <= last:
            if k in starts:
                a, b, grand = starts[k]
                out = self._checkpointed(a, b, grand, out)
                k = b + 1
            else:
                out = self.blocks[k](out)
                k += 1
            if k <= last and not isinstance(out, torch.Tensor):
                raise SegmentRefused(
                    f"memprop.checkpoint: a nested segment needs blocks that return one "
                    f"tensor, but block {k - 1} ({type(self.blocks[k - 1]).__name__}) "
                    f"returned {type(out).__name__}; use a single-level strategy")
        return out

    def _checkpointed(self, first: int, last: int, children, x):
        calls = [0]                     # 1st call: a forward; later: recomputes
        # its recompute reads the buffers its forward changed as that forward saw them,
        # each level its own (NOTE [ Buffers a forward changes ], forms.chain)
        seg = self.blocks[first:last + 1]
        keeper = self.kept.setdefault((first, last), KeptBuffers())
        state = keeper.before(seg)

        def segment(inp):
            calls[0] += 1
            with as_forward_saw(*state[2]) if calls[0] > 1 else contextlib.nullcontext():
                return self._run(first, last, children, inp,
                                 recompute=calls[0] > 1 or _get("recomputing") > 0)
        options: dict[str, Any] = dict(context_fn=VerifyingContext(
            None, f"the nested checkpoint of blocks {first}-{last}")) if is_verifying() else {}
        out = checkpoint(segment, x, use_reentrant=False, preserve_rng_state=True, **options)
        keeper.after(seg, state, f"the nested checkpoint of blocks {first}-{last}")
        return out



class _NestedTop(PatchedForward):
    """The forward of a top-level segment's first block: the segment's tree of
    checkpoints (NOTE above)."""

    def __init__(self, chain: NestedChain, first: int, last: int, children, box: dict):
        super().__init__(chain.blocks[first])
        self.chain, self.first, self.last, self.children, self.box = (
            chain, first, last, children, box)

    def __call__(self, *args, **kwargs):
        first, last = self.first, self.last
        if _get("depth") > 0:                  # run by a segment: the block itself
            return self.original(*args, **kwargs)
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise SegmentRefused(
                f"memprop.checkpoint: nested segments need blocks called with one "
                f"tensor; block {first} ({type(self.module).__name__}) got "
                f"{len(args)} positional and {sorted(kwargs)} keyword arguments; use a "
                "single-level strategy (blocks:..., budget:SIZE) for this model")
        if not torch.is_grad_enabled():        # inference: nothing to recompute
            out = self.chain._run(first, last, [], args[0], recompute=False)
        else:
            out = self.chain._checkpointed(first, last, self.children, args[0])
        if last > first:
            self.box["out"] = out
        return out


class _NestedPassThrough(PatchedForward):
    """The forward of a later block of a top-level segment: its output from the run."""

    def __init__(self, block: nn.Module, box: dict, *, last: bool):
        super().__init__(block)
        self.box, self.last = box, last

    def __call__(self, *args, **kwargs):
        if _get("depth") > 0:
            return self.original(*args, **kwargs)
        return self.box.pop("out") if self.last else self.box["out"]


# -- string form: nested:0-18[0-9[0-3]],26-42 ----------------------------------------

def format_schedule(schedule) -> str:
    """The checkpointed items only (stored blocks are implicit): ``i-j[inner]``."""
    parts = []
    for item in schedule:
        if isinstance(item, int):
            continue
        i, j, inner = item
        text = str(i) if i == j else f"{i}-{j}"
        sub = format_schedule(inner)
        parts.append(text + (f"[{sub}]" if sub else ""))
    return ",".join(parts)


def parse_schedule(text: str, n: int | None = None) -> list:
    """Segments tree from ``format_schedule`` text: [(i, j, [children]), ...]."""
    pos = 0

    def parse_list(lo, hi):
        nonlocal pos
        out = []
        while pos < len(text) and text[pos] not in "]":
            m = re.match(r"(\d+)(?:-(\d+))?", text[pos:])
            if not m:
                raise StrategyError(f"memprop.checkpoint: bad nested schedule {text!r} at "
                                    f"character {pos}; write segments as i-j[inner,...], "
                                    "e.g. nested:0-18[0-9[0-3]],26-42")
            pos += m.end()
            i = int(m.group(1))
            j = int(m.group(2)) if m.group(2) else i
            children = []
            if pos < len(text) and text[pos] == "[":
                pos += 1
                children = parse_list(i, j)
                if pos >= len(text) or text[pos] != "]":
                    raise StrategyError(f"memprop.checkpoint: unclosed '[' in {text!r}")
                pos += 1
            if i > j or i < lo or j > hi or (out and i <= out[-1][1]) or (
                    children and children[0][0] == i and children[-1][1] == j
                    and len(children) == 1):
                raise StrategyError(
                    f"memprop.checkpoint: nested schedule {text!r}: segment {i}-{j} must "
                    f"lie inside {lo}-{hi}, after its left neighbour, and not repeat its "
                    "parent")
            out.append((i, j, children))
            if pos < len(text) and text[pos] == ",":
                pos += 1
        return out

    tree = parse_list(0, (n - 1) if n else 10 ** 9)
    if pos != len(text):
        raise StrategyError(f"memprop.checkpoint: bad nested schedule {text!r}: unmatched "
                            "']'")
    return tree


def claim_blocks(model: nn.Module, blocks_attr, select: dict) -> list[nn.Module]:
    """The chain a new strategy will patch; refuses a model that has one applied.
    ``select``: ``blocks=`` / ``check_fn=`` where ``find_blocks`` takes them."""
    refuse_applied(model)
    select = {k: v for k, v in select.items() if v is not None and k != "loss_fn"}
    return find_blocks(model, blocks_attr, **select)


def _freeze(tree) -> tuple:
    return tuple((int(i), int(j), _freeze(children)) for i, j, children in tree)


@dataclasses.dataclass(frozen=True)
class Nested(Strategy):
    """A multi-level schedule: ``Nested.parse("0-40[0-20[0-9]],41-62")`` or a tree
    ``((first, last, children), ...)``; string form ``nested:...`` (NOTE above)."""

    syntax = "nested:i-j[k-l],..."
    tree: tuple = ()

    def __post_init__(self):
        tree = _freeze(self.tree)
        object.__setattr__(self, "tree", tree)
        parse_schedule(format_schedule(_schedule_of(tree)))   # validates the nesting

    @classmethod
    def parse(cls, text: str) -> "Nested":
        return cls(_freeze(parse_schedule(text)))

    @property
    def spec(self) -> str:
        return "nested:" + format_schedule(_schedule_of(self.tree))

    def segments(self, n):
        return [(i, j) for i, j, _ in self.tree]

    def apply(self, model: nn.Module, *, blocks_attr: str | None = None,
              example_batch=None, **select) -> nn.Module:
        # select: blocks= / check_fn= where find_blocks takes them; loss_fn unused
        blocks = claim_blocks(model, blocks_attr, select) if self.tree else []
        if self.tree and self.tree[-1][1] >= len(blocks):
            raise StrategyError(f"memprop.checkpoint: {self.spec} names block "
                                f"{self.tree[-1][1]} but the chain has blocks "
                                f"0..{len(blocks) - 1}")
        chain = NestedChain(blocks, self.tree).apply()
        return Applied.record(model, self, chain.patches)


def _schedule_of(tree) -> tuple:
    """The rotor schedule items of a tree (stored blocks left implicit)."""
    return tuple((i, j, _schedule_of(children)) for i, j, children in tree)
