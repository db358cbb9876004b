"""A memory budget on live tensor bytes, enforced at allocation.

NOTE [ What a tensor budget means ]
  A budget of B bytes means: the step fails with ``torch.OutOfMemoryError`` (as
  ``TensorBudgetExceeded``) the moment its live tensor bytes - the sum the
  ``LiveMemoryTracker`` keeps, NOTE [ What counts as live memory ] - would exceed B, and a
  step that succeeds never held more than B. It is checked at every op, right after the
  op's new storages are counted and before any later op runs, so it is the same check
  ``torch.cuda.set_per_process_memory_fraction`` makes in the CUDA caching allocator,
  without allocator rounding or caching. Because it counts tensor storages only, the
  result depends on the model, the batch and the strategy, never on the BLAS library,
  glibc's arenas, thread stacks, the CPU or the thread count; and because fake tensors
  create and free the same storages, a fake-tensor estimate predicts it exactly.
  The process-level alternative (``budget_mode = "process"``, memprop.sweep.budget) is
  the operating system's address-space limit and counts everything the process maps.
"""

from __future__ import annotations

import torch

__all__ = ["TensorBudgetExceeded", "BUDGET_MODES"]

BUDGET_MODES = ("tensor", "process")


class TensorBudgetExceeded(torch.OutOfMemoryError):
    """Live tensor bytes would exceed a tensor budget (see NOTE).

    Attributes: ``budget_bytes``, ``live_bytes`` (what would have been live),
    ``requested_bytes`` (the new storages of the failing op), ``op``, ``where`` (module
    or autograd node) and ``phase``."""

    def __init__(self, *, budget_bytes: int, live_bytes: int, requested_bytes: int,
                 op: str, where: str, phase: str):
        super().__init__(
            f"memprop: tensor budget of {budget_bytes} bytes exceeded in {phase}: {op}"
            f"{f' ({where})' if where else ''} requested {requested_bytes} bytes with "
            f"{live_bytes - requested_bytes} live")
        self.budget_bytes, self.live_bytes = budget_bytes, live_bytes
        self.requested_bytes, self.op, self.where = requested_bytes, op, where
        self.memprop_phase = phase
