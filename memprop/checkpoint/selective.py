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

from memprop.saved import report_stored

__all__ = ["SAVED_OPS", "selective_context_fn", "draws_random"]

_aten = torch.ops.aten
SAVED_OPS = {
    op for name in ("mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution",
                    "_scaled_dot_product_flash_attention",
                    "_scaled_dot_product_flash_attention_for_cpu",
                    "_scaled_dot_product_efficient_attention",
                    "_scaled_dot_product_cudnn_attention")
    if (op := getattr(_aten, name, None)) is not None
}


def draws_random(func, args=(), kwargs=None) -> bool:
    """Whether a call draws from the RNG: a seeded op (dropout, rand) or attention with
    ``dropout_p > 0``. A selective-checkpoint cache must not keep its outputs: the
    recompute would skip the draw, and every random op after it would draw other
    numbers than the forward did (other dropout masks: other gradients)."""
    if torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()):
        return False
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            return bool(args[i] if i < len(args) else (kwargs or {}).get("dropout_p", 0.0))
    return True


def _policy(ctx, op, *args, **kwargs):
    if getattr(op, "overloadpacket", None) in SAVED_OPS and not draws_random(op, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class _ReportSaved(TorchDispatchMode):
    """Reports the outputs of ``SAVED_OPS`` as stored for backward (forward pass only)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in SAVED_OPS and not draws_random(func, args, kwargs):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    report_stored(t, f"selective:{func.overloadpacket.__name__}")
        return out


class _Both:
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


def selective_context_fn():
    """``context_fn`` for ``checkpoint``: (forward context, recompute context)."""
    forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(_policy)
    return _Both(forward_ctx, _ReportSaved()), recompute_ctx
