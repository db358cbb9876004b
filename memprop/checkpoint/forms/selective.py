"""Selective (op-level) activation checkpointing: keep the outputs of expensive ops
(matmul, convolution, attention), recompute the cheap pointwise ops around them.

Built on ``torch.utils.checkpoint.create_selective_checkpoint_contexts``. Its cache of
saved outputs lives outside autograd's pack hooks, so a small dispatch mode reports each
saved output to memprop's instruments (``memprop.saved.report_stored``): stored bytes
stay measured, not missing, under this strategy.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from memprop.checkpoint.forms.opkeys import SAVED_OPS, draws_random
from memprop.errors import StrategyError
from memprop.saved import report_stored, storage_key

__all__ = ["selective_context_fn", "Both", "RefuseMutated", "WatchKept"]

def _policy(ctx, op, *args, **kwargs):
    if getattr(op, "overloadpacket", None) in SAVED_OPS and not draws_random(op, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# NOTE [ A kept output written through an alias ]
#   A selective checkpoint keeps an op's output for backward and hands the recompute
#   that very tensor. If the forward then writes into its storage, the recompute reads
#   the written value and writes again. torch checks the kept tensor's version counter
#   ("has been mutated", RefuseMutated), but a write through an alias that does not
#   share it escapes: matmul of 4-d tensors returns ``_unsafe_view`` of a bmm output, and
#   ``context += conv(v)`` (hf:nystromformer) wrote into the kept bmm output unseen;
#   selective then gave gradients off by 2e-4, silently. So the forward's dispatch mode
#   notes each kept output's storage, and before an op writes into one (any argument its
#   schema marks written) it hands the selective cache a copy of the output as it is
#   then: the recompute reads what the forward read, and the write goes ahead on the
#   model's tensor. The copy is an allocation of the step like any other (the tracker
#   sees it) and is reported stored. Without the cache to hand it to, the step is
#   refused.

def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors ``func`` writes into (arguments its schema marks ``(a!)``)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(a.name)
        out += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return out


class WatchKept(TorchDispatchMode):
    """Base of the forward modes that report kept outputs: ``keep(out, label)`` reports
    them as stored and notes their storages; before a later op writes into one, the
    selective cache (``cache``: torch's caching dispatch mode) gets a copy (NOTE above).
    ``form``: the strategy's name in a refusal."""

    form = "selective"

    def __init__(self, cache=None):
        super().__init__()
        self.cache = cache
        self._kept: dict[int, str] = {}          # storage key -> the op that made it

    def _cached(self, key: int) -> list:
        """The selective cache's entries (torch's version wrappers) of storage ``key``."""
        found = []
        for entries in getattr(self.cache, "storage", {}).values():
            trees = entries.values() if isinstance(entries, dict) else entries
            for tree in trees:
                found += [w for w in tree_flatten(tree)[0]
                          if isinstance(getattr(w, "val", None), torch.Tensor)
                          and storage_key(w.val) == key]
        return found

    def copy_before_writes(self, func, args, kwargs) -> None:
        if not self._kept:
            return
        for t in _written(func, args, kwargs):
            key = storage_key(t)
            op = self._kept.pop(key, None)
            if op is None:
                continue
            entries = self._cached(key)
            if not entries:
                raise StrategyError(
                    f"memprop.checkpoint: {self.form} keeps the output of {op}, which the "
                    f"model then changes in place ({func} writes into its storage: NOTE [ A "
                    "kept output written through an alias ]), so its recompute cannot read "
                    "what the forward read; use full, blocks:... or ops: keys that leave that "
                    "op out")
            for w in entries:
                w.val = w.val.clone()
                w.version = w.val._version
                report_stored(w.val, f"{self.form.partition(':')[0]}:{op}")

    def keep(self, out, label: str) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                report_stored(t, label)
                self._kept[storage_key(t)] = label.partition(":")[2]


class _ReportSaved(WatchKept):
    """Reports the outputs of ``SAVED_OPS`` as stored for backward (forward pass only)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.copy_before_writes(func, args, kwargs)
        out = func(*args, **kwargs)
        if func.overloadpacket in SAVED_OPS and not draws_random(func, args, kwargs):
            self.keep(out, f"selective:{func.overloadpacket.__name__}")
        return out


class Both:
    """Enter two context managers in order, leave them in reverse."""

    def __init__(self, outer, inner):
        self.outer, self.inner = outer, inner

    def __enter__(self):
        self.outer.__enter__()
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self.inner.__exit__(*exc)
        finally:
            self.outer.__exit__(*exc)


class RefuseMutated:
    """A selective checkpoint's recompute context that turns torch's errors for a
    recompute that cannot read what the forward cached into memprop's refusal, naming
    the form and what to use instead: a kept output changed in place after the forward
    cached it, or a recompute that makes other op calls than the forward made (a
    forward that reads state it changes: ibert's quantisation ranges, a call counter)."""

    def __init__(self, inner, form: str):
        self.inner, self.form = inner, form

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, kind, exc, tb):
        handled = self.inner.__exit__(kind, exc, tb)
        text = str(exc) if isinstance(exc, RuntimeError) else ""
        if "has been mutated" in text:
            why = ("keeps an op output that the model then changes in place (torch: 'Tensor "
                   "cached during selective activation checkpoint has been mutated'), so its "
                   "recompute cannot read what the forward read")
        elif "encountered during backward but not found in storage" in text:
            why = ("recomputed other op calls than the forward made (torch: '"
                   + text.split(". ")[0] + "'): the model's forward depends on state it "
                   "changes, so a recompute does not replay it")
        else:
            return handled
        raise StrategyError(f"memprop.checkpoint: {self.form} {why}; use full, blocks:... "
                            "or ops: keys that leave that op out, and verify_replay(model, "
                            "batch) to check the replay") from exc


def selective_context_fn():
    """``context_fn`` for ``checkpoint``: (forward context, recompute context)."""
    forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(_policy)
    return (Both(forward_ctx, _ReportSaved(forward_ctx)),
            RefuseMutated(recompute_ctx, "selective"))
