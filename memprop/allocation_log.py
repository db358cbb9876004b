"""The order in which a step creates and frees tensor storages: the input of the
allocator simulation (memprop.allocator).

    log = AllocationLog()
    with LiveMemoryTracker(model, inputs=batch, log=log) as t:
        ...                                   # the step
    log.close()
    log.frame()     # one row per alloc / free, in the order they happened

``measure_step`` keeps one log over the first step and the measured step and returns
it as ``Measurement.allocations``, for a measurement and for an estimate (fake tensors)
alike.

NOTE [ What the allocation log records ]
  * One ``alloc`` row when a tracker that holds the log first counts a storage (NOTE
    [ What counts as live memory ], memprop.tracker): the storages live when the
    tracker starts (module ``(live before the step)``), then each storage an op
    creates, right after the op returns. ``size_bytes`` is the storage's ``nbytes()``:
    what the CUDA caching allocator is asked for (before its rounding).
  * One ``free`` row when that storage dies: a weakref on the storage object fires when
    its StorageImpl is released, so frees are in the true order relative to allocations,
    also between ops. Frees are recorded until ``close()``, also between two trackers
    (the first step's leftovers dying before the measured step).
  * A storage already live in the log (seen by an earlier tracker) is not allocated
    again. A storage resized in place (``observe_resize``: FSDP2's all-gather buffers)
    is a new allocation of the new size followed by the free of the old one, as
    ``resize_`` does (a resize to 0 bytes is a free only).
  * ``storage_id`` numbers allocations 0, 1, 2, ... in order: ids are never reused.
    Storages of 0 bytes are logged; the allocator model ignores them, as CUDA's does.
  * What is not in the log, because it never surfaces as a tensor storage: kernel
    workspaces (cuBLAS, cuDNN, SDPA), and allocations libraries make behind the
    dispatcher (Inductor's buffers). Streams are not recorded (one stream is assumed).
"""

from __future__ import annotations

import weakref
from typing import Callable

import pandas as pd
import torch

__all__ = ["AllocationLog", "ALLOCATION_COLUMNS"]

ALLOCATION_COLUMNS = ("event", "action", "storage_id", "size_bytes", "phase", "module",
                      "op", "category")


class AllocationLog:
    """Records storage allocations and frees in order (NOTE above). Trackers given the
    log (``LiveMemoryTracker(log=...)``) report to it; ``phase_of`` says the phase a
    free happens in (the active tracker's, set by the tracker)."""

    def __init__(self) -> None:
        self._rows: list[tuple] = []
        self._live: dict[int, list] = {}       # storage key -> [storage_id, nbytes, weakref]
        self._next_id = 0
        self._open = True
        self.phase_of: Callable[[], str] = lambda: "between steps"

    def allocated(self, storage: torch.UntypedStorage, *, phase: str, module: str, op: str,
                  category: str) -> None:
        """``storage`` was counted for the first time (by some tracker)."""
        if not self._open or storage._cdata in self._live:
            return
        self._alloc(storage, storage.nbytes(), phase, module, op, category)

    def resized(self, storage: torch.UntypedStorage, *, phase: str) -> None:
        """``storage`` now holds ``storage.nbytes()``: alloc the new size, free the old."""
        if not self._open:
            return
        entry = self._live.get(storage._cdata)
        new = storage.nbytes()
        if entry is not None and entry[1] == new:
            return
        if new:
            self._alloc(storage, new, phase, "", "resize_", "temporary")
        elif entry is not None:
            del self._live[storage._cdata]
        if entry is not None:
            self._row("free", entry[0], entry[1], phase, "", "resize_", "")

    def close(self) -> None:
        """Stop recording (frees after this are not the step's)."""
        self._open = False

    def frame(self) -> pd.DataFrame:
        """One row per event: ``event`` (order), ``action`` (alloc / free),
        ``storage_id``, ``size_bytes`` (bytes requested), ``phase``, ``module``, ``op``
        (which created it; empty for frees) and ``category`` (its category when created)."""
        return pd.DataFrame(self._rows, columns=list(ALLOCATION_COLUMNS))

    # -- internals ------------------------------------------------------------------
    def _alloc(self, storage, nbytes: int, phase: str, module: str, op: str,
               category: str) -> None:
        key, sid = storage._cdata, self._next_id
        self._next_id += 1
        ref = weakref.ref(storage, self._make_release(key))
        self._live[key] = [sid, nbytes, ref]
        self._row("alloc", sid, nbytes, phase, module, op, category)

    def _make_release(self, key: int):
        def release(_ref, key=key, log=self):
            entry = log._live.get(key)
            if entry is not None and entry[2] is _ref:
                del log._live[key]
                if log._open:
                    log._row("free", entry[0], entry[1], log.phase_of(), "", "", "")
        return release

    def _row(self, action: str, sid: int, nbytes: int, phase: str, module: str, op: str,
             category: str) -> None:
        self._rows.append((len(self._rows), action, sid, nbytes, phase, module, op, category))
