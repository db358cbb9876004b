"""The block chain of a model, and checkpointed segments of it.

NOTE [ How a segment is checkpointed without changing the model ]
  A strategy decides which *segments* (runs of consecutive blocks ``i..j``) to
  recompute in backward. memprop applies a segment by patching instance ``forward``
  attributes, never by wrapping modules, so ``state_dict()`` keys do not change (a
  checkpointed model loads a plain checkpoint and vice versa) and the model's own
  ``forward`` loop still drives execution:
    * block ``i``'s forward runs blocks ``i..j`` inside one non-reentrant
      ``torch.utils.checkpoint.checkpoint`` (RNG state preserved, so dropout replays);
    * blocks ``i+1..j`` hand back the segment's result when the loop calls them;
    * while a segment runs (first time or recompute) each block runs its own forward,
      through ``__call__``, so module hooks still fire.
  Inside a segment, block ``k+1`` receives block ``k``'s output and the keyword
  arguments the segment was called with: a segment of several blocks needs blocks that
  return one tensor (anything else raises ``StrategyError`` rather than silently losing
  outputs). Single-block segments work with any signature, kwargs and non-tensor outputs.
  A recompute re-runs BatchNorm in training mode, which would update its running
  statistics a second time; they are snapshot before and restored after the recompute,
  so one checkpointed step leaves them exactly as one plain step does.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import checkpoint

from memprop.errors import StrategyError

__all__ = ["find_blocks", "CheckpointedChain"]

_state = threading.local()   # .depth > 0 while a segment's blocks run


def _inside_segment() -> bool:
    return getattr(_state, "depth", 0) > 0


def find_blocks(model: nn.Module, attr: str | None = None) -> list[nn.Module]:
    """The chain of blocks checkpointing segments: ``model.<attr>`` if given, else
    ``model.blocks_attr`` / ``model.blocks`` (the zoo), else the model itself if it is an
    ``nn.Sequential``."""
    attr = attr or getattr(model, "blocks_attr", None) or (
        "blocks" if isinstance(getattr(model, "blocks", None), (nn.ModuleList, nn.Sequential))
        else None)
    if attr:
        target = model
        for part in attr.split("."):
            target = getattr(target, part, None)
        if not isinstance(target, (nn.ModuleList, nn.Sequential)) or len(target) == 0:
            raise StrategyError(f"memprop.checkpoint: {type(model).__name__}.{attr} is not a "
                                "non-empty nn.ModuleList or nn.Sequential of blocks; name the "
                                "attribute that holds the chain")
        return list(target)
    if isinstance(model, nn.Sequential):
        return list(model)
    raise StrategyError(
        f"memprop.checkpoint: cannot find the block chain of {type(model).__name__}; it has no "
        "'blocks' ModuleList and is not an nn.Sequential. Name the attribute holding its "
        "ModuleList of blocks: blocks_attr='layers' in Python, --blocks-attr layers on the "
        "command line, blocks_attr = \"layers\" in a spec's [model]")


def _running(bn) -> list[torch.Tensor]:
    return [t for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
            if t is not None]


def _check_chainable(output, seg) -> None:
    if len(seg) > 1 and not isinstance(output, torch.Tensor):
        raise StrategyError(
            f"memprop.checkpoint: a segment of {len(seg)} blocks needs blocks that return "
            f"one tensor (the next block's input), but a {type(seg[0]).__name__} block "
            f"returned {type(output).__name__}; use a per-block strategy (full, every:K, "
            "blocks:i,j) for this model")


class CheckpointedChain:
    """Checkpointed segments applied to a chain of blocks (see NOTE above).

    ``segments``: inclusive ``(first, last)`` block indices, disjoint and ordered.
    ``context_fn``: passed to ``checkpoint`` (selective checkpointing uses it)."""

    def __init__(self, blocks: list[nn.Module], segments: list[tuple[int, int]], *,
                 context_fn: Callable | None = None):
        self.blocks, self.segments, self.context_fn = blocks, segments, context_fn
        self._patched: list[nn.Module] = []

    def apply(self) -> "CheckpointedChain":
        for first, last in self.segments:
            seg = self.blocks[first:last + 1]
            box: dict = {}  # the segment's latest output, handed back by blocks first+1..last
            self._patch(seg[0], self._segment_forward(seg, box))
            for block in seg[1:]:
                self._patch(block, self._pass_through(block, box, last=block is seg[-1]))
        return self

    def remove(self) -> None:
        for block in self._patched:
            orig = block.__dict__.pop("_memprop_forward")
            if orig is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = orig
        self._patched = []

    def _patch(self, block: nn.Module, forward) -> None:
        if "_memprop_forward" in block.__dict__:
            raise StrategyError("memprop.checkpoint: a block is already checkpointed; "
                                "remove the strategy first (memprop.checkpoint.remove_strategy)")
        block.__dict__["_memprop_forward"] = block.__dict__.get("forward")
        block.forward = forward
        self._patched.append(block)

    @staticmethod
    def _original(block: nn.Module):
        orig = block.__dict__.get("_memprop_forward")
        return orig if orig is not None else type(block).forward.__get__(block)

    def _segment_forward(self, seg: list[nn.Module], box: dict):
        context_fn = self.context_fn
        first_original = self._original(seg[0])
        norms = [m for b in seg for m in b.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

        def run(*args, recompute: bool, **kwargs):
            # a recompute must not update BatchNorm's running statistics a second time:
            # snapshot them and put them back (the kernel path, and so the saved tensors
            # checkpoint compares, stay exactly those of the first pass)
            # (outside any dispatch mode: it is bookkeeping, not part of the model)
            with _disable_current_modes():
                snapshot = [(bn, [t.clone() for t in _running(bn)]) for bn in norms
                            if bn.training] if recompute else []
            _state.depth = getattr(_state, "depth", 0) + 1
            try:
                out = seg[0](*args, **kwargs)
                for block in seg[1:]:
                    _check_chainable(out, seg)
                    out = block(out, **kwargs)
                _check_chainable(out, seg)
                return out
            finally:
                _state.depth -= 1
                with torch.no_grad(), _disable_current_modes():
                    for bn, saved in snapshot:
                        for t, value in zip(_running(bn), saved):
                            t.copy_(value)

        def forward(*args, **kwargs):
            if _inside_segment():            # called from inside a running segment
                return first_original(*args, **kwargs)
            if not torch.is_grad_enabled():  # inference: nothing to save or recompute
                out = run(*args, recompute=False, **kwargs)
            else:
                calls = [0]                  # 1st call: the forward pass; later: recomputes

                def segment(*a, **kw):
                    calls[0] += 1
                    return run(*a, recompute=calls[0] > 1, **kw)

                options = dict(use_reentrant=False, preserve_rng_state=True)
                if context_fn is not None:
                    options["context_fn"] = context_fn
                out = checkpoint(segment, *args, **options, **kwargs)
            if len(seg) > 1:
                box["out"] = out
            return out
        return forward

    def _pass_through(self, block: nn.Module, box: dict, *, last: bool):
        original = self._original(block)

        def forward(*args, **kwargs):
            if _inside_segment():
                return original(*args, **kwargs)
            return box.pop("out") if last else box["out"]
        return forward
