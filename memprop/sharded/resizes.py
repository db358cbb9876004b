"""Report in-place storage resizes to the live-memory trackers (NOTE [ What counts as
live memory ], memprop.tracker), and log them: FSDP2's gathered parameters.

FSDP2 frees each all-gathered parameter after use with ``untyped_storage().resize_(0)``
and refills the same storage before the next use (``free_storage`` / ``alloc_storage``,
torch/distributed/fsdp/_fully_shard/_fsdp_param.py). A storage resize is not an op the
dispatcher sees, so while ``resizes_reported()`` is active ``UntypedStorage.resize_``
tells every active tracker (as torch's FSDPMemTracker patches it, ``_track_resize``).
The original method is put back on exit.

NOTE [ Gathered parameters ]
  The tracker's categories do not change under FSDP2: a rank's sharded parameters are
  ``parameter``, its sharded gradients ``gradient``, and the all-gathered (unsharded)
  parameters are the storages FSDP2 refills and frees with ``resize_``: ``temporary``,
  or ``activation`` while autograd holds them for backward. ``ResizeLog`` records, for
  each tracker, every resize with the row it shows in and the bytes it adds or frees, so
  the gathered bytes of any row are their running sum (``gathered_bytes``): FSDP2 frees
  every gathered parameter after backward, so a step starts with none. A sharded
  measurement reports them at the peak and at their own maximum
  (``gathered_bytes_at_peak``, ``gathered_peak_bytes``, memprop.sharded.step).
"""

from __future__ import annotations

import contextlib

import torch

from memprop.saved import _STORE_OBSERVERS

__all__ = ["resizes_reported", "ResizeLog"]


class ResizeLog:
    """Per tracker, in the order they first saw a resize: (row, bytes added) events."""

    def __init__(self):
        self.trackers: list = []
        self.events: dict[int, list[tuple[int, int]]] = {}

    def record(self, tracker, storage: torch.UntypedStorage, before: int) -> None:
        if id(tracker) not in self.events:
            self.trackers.append(tracker)
            self.events[id(tracker)] = []
        entry = tracker._live.get(storage._cdata)
        after = entry[1] if entry is not None else 0
        if after != before:
            self.events[id(tracker)].append((len(tracker._rows), after - before))

    def gathered_bytes(self, tracker) -> list[int]:
        """Bytes of resized storages live at each of ``tracker``'s rows (NOTE)."""
        deltas = [0] * (len(tracker._rows) + 1)
        for row, delta in self.events.get(id(tracker), []):
            deltas[row] += delta
        out, total = [], 0
        for d in deltas[:-1]:
            total += d
            out.append(total)
        return out


@contextlib.contextmanager
def resizes_reported():
    """Inside: every ``UntypedStorage.resize_`` is reported to the active trackers and
    logged; yields the ``ResizeLog``."""
    original = torch.UntypedStorage.resize_
    log = ResizeLog()

    def resize_(storage, size):
        trackers = [o for o in _STORE_OBSERVERS if hasattr(o, "observe_resize")]
        before = [(t, t._live[storage._cdata][1] if storage._cdata in t._live else 0)
                  for t in trackers]
        out = original(storage, size)
        for tracker, old in before:
            tracker.observe_resize(storage)
            log.record(tracker, storage, old)
        return out

    torch.UntypedStorage.resize_ = resize_
    try:
        yield log
    finally:
        torch.UntypedStorage.resize_ = original
