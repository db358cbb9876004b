"""Replays that check themselves: one real step in which every tensor a strategy
rebuilds is compared, bitwise, with the one the forward made.

    verify_replay(model, batch, loss_fn=cfg.loss)   # raises StrategyError on a mismatch

NOTE [ Verifying a replay ]
  A strategy is exact only as far as its replay reproduces the forward: a checkpoint
  re-runs a segment's ops, ``remat:`` re-runs recorded aten calls one saved tensor at a
  time. Both rest on rules (RNG restored, BatchNorm statistics restored, in-place writes
  refused or copied) that a model never seen before can break. Inside ``verifying()``
  the patches a strategy installed (NOTE [ A strategy travels with the model ],
  memprop.checkpoint.forms.patch) hold the originals for that step only and compare:
    * checkpointed segments (every chain form, ``selective``, ``ops:``, ``forward:``,
      ``nested:``): the forward records, in order, a copy of every op call's tensor
      outputs; the recompute compares each call's outputs with the recorded ones, in
      the same order (torch may stop a recompute early: a prefix is compared). Calls
      whose output is uninitialised memory (``empty``, and views of its storage) are
      not compared. While
      verifying, a plain segment recomputes its last block in full (NOTE [ A segment's
      output needs no recompute ], memprop.checkpoint.forms.tail, is off).
    * ``remat:``: each saved tensor is packed with a copy of the original; when backward
      unpacks its rebuild, the two must be equal.
  The first difference raises ``StrategyError`` naming the op, the module that ran it
  and how far apart the values are. Equal means ``torch.equal`` with NaNs equal where
  both have them. The step's gradients are dropped as they arrive (``discarding_grads``);
  the gradients, buffers and RNG state held before are put back afterwards: verifying
  leaves the model as it found it. It costs the memory of the plain step's
  saved tensors once more: run it on a small batch.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import noop_context_fn

from memprop.checkpoint.forms.selective import Both
from memprop.errors import StrategyError
from memprop.models.user import step_loss as one_step_loss

__all__ = ["verify_replay", "verifying", "is_verifying", "VerifyingContext",
           "check_rebuilt", "where_now", "discarding_grads"]

_state = threading.local()   # .on: inside verifying(); .stack: module names running

# outputs that are uninitialised memory: a replay's differ and mean nothing
_UNINITIALISED = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
# outputs (by position) that are a kernel's scratch space, not values: oneDNN's and
# cuDNN's RNN workspaces hold padding a kernel leaves as it finds it (a CPU LSTM's
# replay differed in 16838 of 90112 workspace values while the layer's outputs and
# every gradient were bitwise equal, measured); the values are compared, not these
_SCRATCH = {"mkldnn_rnn_layer": {3}, "_cudnn_rnn": {3}, "miopen_rnn": {3}}
# not compared, nor counted: the recompute's saved-tensor hook detaches what it saves
# (torch.utils.checkpoint), which the forward never does; a detach computes nothing
_IGNORED = {"detach"}


def _updates_buffer(name: str, args) -> bool:
    """An in-place op on a module buffer (BatchNorm's ``num_batches_tracked += 1``): a
    recompute repeats it on the value the forward left, and the chain puts the buffers
    back afterwards (NOTE [ How a segment is checkpointed without changing the model ],
    memprop.checkpoint.forms.chain), so it is neither compared nor counted."""
    buffers: set[int] = getattr(_state, "buffers", None) or set()
    return name.endswith("_") and bool(args) and isinstance(args[0], torch.Tensor) and (
        args[0].untyped_storage().data_ptr() in buffers)


def is_verifying() -> bool:
    return getattr(_state, "on", False)


def where_now() -> str:
    """The module running now (its qualified name), while ``verify_replay`` runs."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else "(the model)"


@contextlib.contextmanager
def verifying():
    """Replays inside check themselves (NOTE above); the previous setting after."""
    before = is_verifying()
    _state.on = True
    try:
        yield
    finally:
        _state.on = before


@contextlib.contextmanager
def _module_names(model: nn.Module):
    """Keep ``where_now()`` current: forward hooks on every module of ``model``."""
    names = {id(m): name or type(model).__name__ for name, m in model.named_modules()}
    before = getattr(_state, "stack", None)
    _state.stack = []

    def enter(module, args):
        if id(module) in names:
            _state.stack.append(names[id(module)])

    def leave(module, args, output):
        if id(module) in names and _state.stack:
            _state.stack.pop()
    handles = [nn.modules.module.register_module_forward_pre_hook(enter),
               nn.modules.module.register_module_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        _state.stack = before


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return False


def _difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{tuple(b.shape)} {b.dtype} where the forward made {tuple(a.shape)} {a.dtype}"
    if a.is_floating_point():
        gap = (a.double() - b.double()).abs().nan_to_num(float("inf"))
        return (f"{int((gap > 0).sum())} of {a.numel()} values differ, by up to "
                f"{gap.max().item():.3g}")
    return f"{int((a != b).sum())} of {a.numel()} values differ"


def check_rebuilt(original: torch.Tensor, rebuilt: torch.Tensor, op: str, where: str,
                  form: str) -> None:
    """``StrategyError`` unless ``rebuilt`` equals ``original`` (NOTE above)."""
    with _disable_current_modes(), torch.no_grad():
        if _equal(original, rebuilt):
            return
        detail = _difference(original, rebuilt)
    raise StrategyError(
        f"memprop.checkpoint: {form} replayed {op} in {where} and got a different tensor "
        f"({detail}): it cannot replay this model exactly; use another strategy "
        "(full, sqrt, blocks:...) or report the model")


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


class _Originals(TorchDispatchMode):
    """The forward of a checkpoint: a copy of each call's tensor outputs, in order."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls
        self.unset: set[int] = set()     # storages an empty op made (data pointers)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _IGNORED or _updates_buffer(name, args):
            return out
        outs = _tensors(out)
        # a view of an empty op's storage (a slice about to be filled: LongCat-Flash's
        # key_states) shows uninitialised memory too; a view computes nothing, and the
        # writes that fill it are compared
        unset = name in _UNINITIALISED or func.is_view and any(
            t.untyped_storage().data_ptr() in self.unset for t in outs)
        if name in _UNINITIALISED:
            self.unset.update(t.untyped_storage().data_ptr() for t in outs)
        with _disable_current_modes(), torch.no_grad():
            copies = None if unset else [t.clone() for t in outs]
        self.calls.append((name, where_now(), copies))
        return out


class _Compare(TorchDispatchMode):
    """The recompute of a checkpoint: each call's outputs against the forward's."""

    def __init__(self, calls: list, form: str):
        super().__init__()
        self.calls, self.form, self.next = calls, form, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _IGNORED or _updates_buffer(name, args):
            return out
        if self.next >= len(self.calls):
            raise StrategyError(f"memprop.checkpoint: {self.form} recomputed more op calls "
                                f"than the forward made (an extra {name}); the model does "
                                "not run the same ops twice")
        want, where, originals = self.calls[self.next]
        self.next += 1
        if want != name:
            raise StrategyError(f"memprop.checkpoint: {self.form} recomputed {name} in "
                                f"{where_now()} where the forward ran {want} in {where}: the "
                                "model does not run the same ops twice")
        if originals is not None:
            rebuilt = _tensors(out)
            if len(rebuilt) != len(originals):
                raise StrategyError(f"memprop.checkpoint: {self.form} recomputed {name} in "
                                    f"{where} with {len(rebuilt)} outputs, not "
                                    f"{len(originals)}")
            scratch = _SCRATCH.get(name, ())
            for i, (original, again) in enumerate(zip(originals, rebuilt)):
                if i not in scratch:
                    check_rebuilt(original, again, name, where, self.form)
        return out


class VerifyingContext:
    """``context_fn`` of a checkpoint that checks its recompute (NOTE above), on top of
    ``inner`` (the strategy's own ``context_fn``, or none)."""

    def __init__(self, inner, form: str):
        self.inner, self.form = inner or noop_context_fn, form

    def __call__(self):
        forward_ctx, recompute_ctx = self.inner()
        calls: list = []
        return (Both(forward_ctx, _Originals(calls)),
                Both(recompute_ctx, _Compare(calls, self.form)))


@contextlib.contextmanager
def discarding_grads(model: nn.Module):
    """Inside, each parameter's gradient is dropped as soon as backward has accumulated
    it (a post-accumulate-grad hook sets ``.grad = None``), so a step run only to be
    checked or timed never holds the model's gradients: planning a model whose
    gradients are hundreds of MiB holds one parameter's at a time. The gradients
    ``.grad`` held before are put back after."""
    params = [p for p in model.parameters() if p.requires_grad]
    held = [p.grad for p in params]
    handles = []

    def drop(p: torch.Tensor) -> None:
        p.grad = None
    try:
        for p in params:
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(drop))
        yield
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for p, g in zip(params, held):
                p.grad = g


def verify_replay(model: nn.Module, batch, *, loss_fn=None) -> None:
    """One real forward and backward of ``model`` (a strategy applied) in which every
    replayed tensor is checked against the original (NOTE [ Verifying a replay ]);
    ``StrategyError`` on the first difference. Gradients, buffers and the RNG state are
    as before afterwards."""
    loss_fn = one_step_loss(loss_fn)      # as measure_step reads it (memprop.models.user)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index for p in model.parameters()
                      if p.device.type == "cuda"} - {None})
    before = getattr(_state, "buffers", None)
    _state.buffers = {b.untyped_storage().data_ptr() for b in model.buffers()}
    try:
        with torch.random.fork_rng(devices=devices), verifying(), _module_names(model), \
                torch.enable_grad(), discarding_grads(model):
            loss = loss_fn(model, batch)
            loss.backward()
    finally:
        _state.buffers = before
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
