"""A memory budget the runtime really enforces, inside a trial's own process.

NOTE [ How a CPU budget is enforced ]
  The trial's process gets an address-space limit (``RLIMIT_AS``): past it, ``mmap``
  fails and PyTorch's CPU allocator raises "can't allocate memory". A Python + torch
  process already maps ~0.7 GiB before its first tensor (libraries, thread stacks,
  arenas), so the limit is that baseline - measured after a dry run of the same step at
  batch 1 has loaded every module and kernel and started the thread pool - plus the
  budget, plus ``MARGIN_BYTES`` for what never surfaces as a tensor
  (allocator rounding, small tensors in the heap, the instruments' own records):
  bisecting the smallest budget that fits measured 1.9 MiB of it for an MLP step and
  2.7 MiB for a transformer step (with every instrument on), so with a 3 MiB margin a
  step fits when its tensor-level peak is within about 1 MiB of the budget. The executor also fixes glibc's
  mmap threshold and caps its arenas (``CHILD_ENV``) so that a freed tensor gives its
  address space back and a new thread arena cannot reserve 64 MiB at once: address space
  then follows live tensor bytes. A budget therefore means tensor memory: a step whose
  tensor-level peak is below the budget fits, one above budget + margin fails.
  On CUDA, ``torch.cuda.set_per_process_memory_fraction(budget / total)`` makes the
  caching allocator raise ``torch.OutOfMemoryError`` past the budget.
"""

from __future__ import annotations

import resource

import torch

__all__ = ["MARGIN_BYTES", "CHILD_ENV", "apply_budget", "is_out_of_memory",
           "address_space_bytes", "tune_malloc"]

MARGIN_BYTES = 3 * 2**20
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2",
             "MALLOC_TRIM_THRESHOLD_": "131072"}


def tune_malloc() -> None:
    """Apply ``CHILD_ENV``'s glibc settings in a running process (a forked trial) with
    ``mallopt``: fixed mmap and trim thresholds, at most two arenas."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:   # not glibc: nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
    libc.mallopt(M_MMAP_THRESHOLD, 131072)
    libc.mallopt(M_TRIM_THRESHOLD, 131072)
    libc.mallopt(M_ARENA_MAX, 2)


def address_space_bytes() -> int:
    """This process's mapped address space (VmSize), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("memprop.sweep: /proc/self/status has no VmSize")


def apply_budget(budget_bytes: int, device: str) -> dict:
    """Limit this process to ``budget_bytes`` of tensor memory (see NOTE). Returns what
    was set, for the result row."""
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        fraction = min(1.0, budget_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, torch.device(device))
        return {"budget_kind": "cuda_memory_fraction", "budget_fraction": fraction}
    warm = torch.randn(64, 64)
    (warm @ warm).sum()            # start the thread pool before measuring the baseline
    baseline = address_space_bytes()
    limit = baseline + budget_bytes + MARGIN_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return {"budget_kind": "rlimit_as", "baseline_address_space_bytes": baseline,
            "address_space_limit_bytes": limit, "budget_margin_bytes": MARGIN_BYTES}


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocator failure: CUDA OOM, CPU allocator or Python MemoryError."""
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "can't allocate memory", "out of memory", "not enough memory",
        "cannot allocate memory", "failed to allocate"))
