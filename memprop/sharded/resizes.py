"""Report in-place storage resizes to the live-memory trackers (NOTE [ What counts as
live memory ], memprop.tracker).

FSDP2 frees each all-gathered parameter after use with ``untyped_storage().resize_(0)``
and refills the same storage before the next use (``free_storage`` / ``alloc_storage``,
torch/distributed/fsdp/_fully_shard/_fsdp_param.py). A storage resize is not an op the
dispatcher sees, so while ``resizes_reported()`` is active ``UntypedStorage.resize_``
tells every active tracker (as torch's FSDPMemTracker patches it, ``_track_resize``).
The original method is put back on exit.
"""

from __future__ import annotations

import contextlib

import torch

from memprop.saved import _STORE_OBSERVERS

__all__ = ["resizes_reported"]


@contextlib.contextmanager
def resizes_reported():
    original = torch.UntypedStorage.resize_

    def resize_(storage, size):
        out = original(storage, size)
        for observer in list(_STORE_OBSERVERS):
            report = getattr(observer, "observe_resize", None)
            if report is not None:
                report(storage)
        return out

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original
