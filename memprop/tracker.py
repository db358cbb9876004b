"""Track every tensor storage alive during a training step, by category and phase.

    tracker = LiveMemoryTracker(model, optimizer=opt, inputs=(x, y))
    with tracker:
        tracker.phase = "forward";   loss = model.objective(model(x), y)
        tracker.phase = "backward";  loss.backward()
        tracker.phase = "optimizer"; opt.step(); opt.zero_grad(set_to_none=True)
    tracker.peak_bytes, tracker.timeline(), tracker.peak_by_category()

NOTE [ What counts as live memory ]
  * Live memory is the sum of ``untyped_storage().nbytes()`` over distinct storages that
    are alive (on the tracker's ``device``, when one is given): the model's parameters
    and buffers, the batch, gradients and optimizer state present at the start, plus
    every storage an op creates while the tracker is active (seen by a
    ``TorchDispatchMode``, so it works on CPU, CUDA and fake tensors).
  * A storage stops counting the moment it is freed: a weakref callback on the storage
    object fires when its StorageImpl dies (PyTorch keeps one Python object per live
    storage), so each allocation and free costs O(1) - no scan of ``gc``.
  * Category: parameter, buffer, input (the batch), gradient (a parameter's ``.grad``,
    tagged by a post-accumulate-grad hook), optimizer (storages in ``optimizer.state``
    after the step), activation (saved by autograd for backward, tagged by a
    ``saved_tensors_hooks`` pack hook; released to temporary when backward ends),
    temporary (everything else: outputs not saved, gradients in flight, workspaces).
  * One timeline row per op, taken right after the op's outputs are counted; frees
    between ops show in the next row, and so does the activation tag of an op's outputs
    (autograd packs them after the op returns; the total is unaffected). The
    tensor-level peak is the maximum row total: the CPU analogue of
    ``torch.cuda.max_memory_allocated``, without allocator rounding, caching or kernel
    workspaces that never surface as tensors.
  * A DTensor (FSDP2's sharded parameters, their gradients and optimizer state) counts
    as its local shard: its ops are left to DTensor, which runs them as ops on local
    tensors, and those are counted (as torch's FSDPMemTracker does). A storage resized
    in place (FSDP2 frees and refills its all-gathered parameters with
    ``UntypedStorage.resize_``) counts at its new size from the moment someone reports
    the resize (``observe_resize``; memprop.sharded reports every resize while it
    measures).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Iterable, cast

import pandas as pd
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memprop._module_scope import ModuleScope
from memprop.allocation_log import AllocationLog
from memprop.budget import TensorBudgetExceeded
from memprop.saved import _STORE_OBSERVERS, batch_tensors

if TYPE_CHECKING:         # torch.distributed may be absent; _is_dtensor_type tells by name
    from torch.distributed.tensor import DTensor

__all__ = ["LiveMemoryTracker", "CATEGORIES", "PHASES"]

CATEGORIES = ("parameter", "buffer", "input", "gradient", "optimizer", "activation",
              "temporary")
PHASES = ("forward", "backward", "optimizer", "inference")
_CAT = {c: i for i, c in enumerate(CATEGORIES)}
_IGNORED_OPS = {"profiler._record_function_enter_new", "profiler._record_function_exit"}


class _DispatchHook(TorchDispatchMode):
    def __init__(self, tracker: "LiveMemoryTracker"):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(_is_dtensor_type(t) for t in types):
            return NotImplemented         # DTensor runs it as local ops, counted (NOTE)
        out = func(*args, **(kwargs or {}))
        self.tracker._on_op(func, out)
        return out


def _is_dtensor_type(cls: type) -> bool:
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


class _CompiledDispatchHook(_DispatchHook):
    """Steps aside while torch.compile traces and sees the compiled graph's ops as they
    run (``LiveMemoryTracker(compiled=True)``)."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True


class LiveMemoryTracker:
    """Context manager tracking live storages by category; see NOTE above.

    Set ``tracker.phase`` to ``forward`` / ``backward`` / ``optimizer`` (or
    ``inference``) as the step proceeds; rows carry the phase in force.

    ``limit_bytes``: a tensor budget (NOTE [ What a tensor budget means ],
    memprop.budget): the op whose new storages take live bytes above it raises
    ``TensorBudgetExceeded``.

    ``compiled``: under a dispatch mode torch.compile normally falls back to eager, so
    by default a compiled model is measured as its eager twin. With ``compiled=True``
    the tracker steps aside while dynamo traces and counts the compiled graph's ops as
    they run: exact for backends whose graphs run aten ops (``aot_eager``,
    ``aot_eager_decomp_partition``: what compile's partitioner decided to save and
    recompute); Inductor allocates its buffers outside the dispatcher, where no
    dispatch mode can see them - do not use it there.

    ``log``: an ``AllocationLog`` (memprop.allocation_log) to which every storage counted
    and freed is reported, in order; it changes nothing the tracker counts."""

    def __init__(self, model: nn.Module | None = None, *, optimizer=None,
                 inputs: Iterable = (), device=None, limit_bytes: int | None = None,
                 compiled: bool = False, log: AllocationLog | None = None):
        self.limit_bytes = limit_bytes
        self._log = log
        self._where = ("", "(live before the step)")   # (module, op) being counted
        self.model, self.optimizer = model, optimizer
        # count only storages on this device (None: all), so that on CUDA host copies
        # (offloaded activations, pinned buffers) do not count as device memory
        self.device = torch.device(device) if device is not None else None
        self._phase = "forward"
        # any structure: a (inputs, targets) tuple, a dict of tensors, a BatchEncoding ...
        if not isinstance(inputs, (torch.Tensor, tuple, list, Mapping)):
            inputs = list(inputs)
        self._inputs = batch_tensors(inputs)
        self._live: dict[int, list] = {}     # storage key -> [category index, nbytes, weakref]
        self._totals = [0] * len(CATEGORIES)
        self._rows: list[tuple] = []
        self._scope = ModuleScope(model)
        self._handles: list | None = None   # not None while tracking
        self._mode = (_CompiledDispatchHook if compiled else _DispatchHook)(self)
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        """Setting the phase writes a boundary row (op ``[phase]``) while tracking."""
        self._phase = value
        if self._handles is not None:
            self._snapshot(f"[{value}]")

    def _snapshot(self, label: str) -> None:
        totals = self._totals
        self._rows.append((len(self._rows), self._phase, "", label, *totals, sum(totals)))

    # -- bookkeeping ----------------------------------------------------------------
    def _add(self, t: torch.Tensor, category: str, *, retag: bool = False) -> None:
        if self.device is not None and t.device.type != self.device.type:
            return
        if _is_dtensor_type(type(t)):
            t = cast("DTensor", t)._local_tensor   # a DTensor counts as its local shard (NOTE)
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._live.get(key)
        if entry is not None:
            if retag and entry[0] != _CAT[category]:
                self._totals[entry[0]] -= entry[1]
                entry[0] = _CAT[category]
                self._totals[entry[0]] += entry[1]
            return
        nbytes = storage.nbytes()
        cat = _CAT[category]
        ref = weakref.ref(storage, self._make_release(key))
        self._live[key] = [cat, nbytes, ref]
        self._totals[cat] += nbytes
        if self._log is not None:
            self._log.allocated(storage, phase=self._phase, module=self._where[0],
                                op=self._where[1], category=category)

    def _make_release(self, key: int):
        def release(_ref, key=key, live=self._live, totals=self._totals):
            entry = live.get(key)
            if entry is not None and entry[2] is _ref:
                del live[key]
                totals[entry[0]] -= entry[1]
        return release

    def observe_resize(self, storage: torch.UntypedStorage) -> None:
        """``storage`` was resized in place: count it at its new size (NOTE); one not
        yet counted that now holds bytes counts as temporary. (A fake tensor's storage
        is on ``meta`` whatever the tensor's device.)"""
        if self.device is not None and storage.device.type not in (self.device.type, "meta"):
            return
        if self._log is not None:
            self._log.resized(storage, phase=self._phase)
        key = storage._cdata
        entry = self._live.get(key)
        if entry is None:
            if storage.nbytes():
                self._live[key] = [_CAT["temporary"], storage.nbytes(),
                                   weakref.ref(storage, self._make_release(key))]
                self._totals[_CAT["temporary"]] += storage.nbytes()
            return
        delta = storage.nbytes() - entry[1]
        entry[1] += delta
        self._totals[entry[0]] += delta

    def _on_op(self, func, out) -> None:
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if name in _IGNORED_OPS:
            return
        totals = self._totals
        before = sum(totals)
        node = torch._C._current_autograd_node() if self.phase == "backward" else None
        where = node.name() if node is not None else self._scope.current
        op = name.replace("aten.", "")
        self._where = (where, op)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t, "temporary")
        live = sum(totals)
        if self.limit_bytes is not None and live > self.limit_bytes:
            raise TensorBudgetExceeded(budget_bytes=self.limit_bytes, live_bytes=live,
                                       requested_bytes=live - before, op=op, where=where,
                                       phase=self.phase)
        self._rows.append((len(self._rows), self.phase, where, op, *totals, live))

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        entry = self._live.get(key)
        if entry is None or entry[0] == _CAT["temporary"]:
            self._add(t, "activation", retag=True)
        return t

    def observe_stored(self, t: torch.Tensor, op: str) -> None:
        self._pack(t)

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def _on_grad(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self._add(param.grad, "gradient", retag=True)

    def _tag_existing(self) -> None:
        if self.model is not None:
            for p in self.model.parameters():
                self._add(p, "parameter")
                if p.grad is not None:
                    self._add(p.grad, "gradient")
            for b in self.model.buffers():
                self._add(b, "buffer")
        for t in self._inputs:
            self._add(t, "input")
        self.tag_optimizer_state()

    def tag_optimizer_state(self) -> None:
        """Count (or retag) every tensor in ``optimizer.state`` as optimizer state."""
        if self.optimizer is None:
            return
        for state in self.optimizer.state.values():
            for t in tree_flatten(state)[0]:
                if isinstance(t, torch.Tensor):
                    self._add(t, "optimizer", retag=True)

    def end_backward(self) -> None:
        """Storages still tagged activation after backward are no longer held for it."""
        self._snapshot("[end backward]")
        for entry in self._live.values():
            if entry[0] == _CAT["activation"]:
                self._totals[entry[0]] -= entry[1]
                entry[0] = _CAT["temporary"]
                self._totals[entry[0]] += entry[1]

    # -- context --------------------------------------------------------------------
    def __enter__(self) -> "LiveMemoryTracker":
        if self._log is not None:
            self._log.phase_of = lambda: self._phase
        self._where = ("", "(live before the step)")
        self._tag_existing()
        live = self.live_bytes
        if self.limit_bytes is not None and live > self.limit_bytes:
            raise TensorBudgetExceeded(budget_bytes=self.limit_bytes, live_bytes=live,
                                       requested_bytes=0, op="(already live)", where="",
                                       phase=self._phase)
        if self.model is not None:
            self._handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                             for p in self.model.parameters() if p.requires_grad]
        else:
            self._handles = []
        self._scope.__enter__()
        _STORE_OBSERVERS.append(self)
        self._saved_hooks.__enter__()
        self._mode.__enter__()
        self._snapshot(f"[{self._phase}]")
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._saved_hooks.__exit__(*exc)
        _STORE_OBSERVERS.remove(self)
        self._scope.__exit__(*exc)
        self._snapshot("[end]")
        assert self._handles is not None, "__exit__ without __enter__"   # set on entering
        for h in self._handles:
            h.remove()
        self._handles = None

    # -- results --------------------------------------------------------------------
    @property
    def live_bytes(self) -> int:
        """Bytes alive now."""
        return sum(self._totals)

    def live_by_category(self) -> dict[str, int]:
        return dict(zip(CATEGORIES, self._totals))

    def timeline(self) -> pd.DataFrame:
        """One row per op: op_index, phase, module (forward) or autograd node (backward),
        op, then live bytes per category and ``total_bytes``."""
        cols = ["op_index", "phase", "module", "op", *(f"{c}_bytes" for c in CATEGORIES),
                "total_bytes"]
        return pd.DataFrame(self._rows, columns=cols)

    @property
    def peak_bytes(self) -> int:
        """Tensor-level peak: the largest row total (see NOTE)."""
        return max((r[-1] for r in self._rows), default=self.live_bytes)

    def peak_by_phase(self) -> dict[str, int]:
        peaks: dict[str, int] = {}
        for r in self._rows:
            peaks[r[1]] = max(peaks.get(r[1], 0), r[-1])
        return peaks

    def peak_by_category(self) -> dict[str, int]:
        """Per category, the largest bytes it held at any row (maxima need not coincide)."""
        return {c: max((r[4 + i] for r in self._rows), default=self._totals[i])
                for i, c in enumerate(CATEGORIES)}
