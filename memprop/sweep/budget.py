"""The process-level memory budget (``budget_mode = "process"``): the operating system's
limit on a trial's address space, and how an out-of-memory failure is recognised.

The default budget is on live tensor bytes (NOTE [ What a tensor budget means ],
memprop.budget) and needs nothing from this module but ``is_out_of_memory``.

NOTE [ How a process budget is enforced ]
  The trial's process gets an address-space limit (``RLIMIT_AS``): past it, ``mmap``
  fails and PyTorch's CPU allocator raises "can't allocate memory". A Python + torch
  process already maps ~0.7 GiB before its first tensor (libraries, thread stacks,
  arenas), so the limit is that baseline - measured after a dry run of the same step at
  batch 1 has loaded every module and kernel and started the thread pool - plus the
  budget, plus ``MARGIN_BYTES`` for what never surfaces as a tensor (allocator rounding,
  small tensors in the heap, the instruments' own records): bisecting the smallest
  budget that fits measured 1.9 MiB of it for an MLP step and 2.7 MiB for a transformer
  step (with every instrument on), so with a 3 MiB margin a step fits when its
  tensor-level peak is within about 1 MiB of the budget. The executor also fixes glibc's
  mmap threshold and caps its arenas (``CHILD_ENV``) so that a freed tensor gives its
  address space back and a new thread arena cannot reserve 64 MiB at once: address space
  then follows live tensor bytes - mostly. This mode counts everything the process maps:
  shared libraries loaded late, BLAS memory pools (MKL maps ~16 MiB per thread on its
  first large matmul, which a batch-1 dry run need not trigger), thread stacks and
  allocator arenas. So where its boundary falls depends on the BLAS build, the CPU, the
  thread count and glibc: use it when you want the operating system to say no, and read
  each trial's measured ``process_margin_bytes`` (address-space peak - baseline - tensor
  peak). The baseline can also hold mappings freed later: with MKL_DISABLE_FAST_MM=1 a
  step at batch 16384 mapped 17 MiB less than its baseline plus its tensors (margin
  -16.8 MB), so its boundary moved by that much. Tests of this mode assert only what
  holds on any machine (a step five times the budget runs out).
"""

from __future__ import annotations

import resource

import torch

__all__ = ["MARGIN_BYTES", "CHILD_ENV", "apply_process_budget", "is_out_of_memory",
           "address_space_bytes", "peak_address_space_bytes", "tune_malloc"]

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


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"memprop.sweep: /proc/self/status has no {field}")


def address_space_bytes() -> int:
    """This process's mapped address space now (VmSize), bytes."""
    return _status_bytes("VmSize")


def peak_address_space_bytes() -> int:
    """The most address space this process has mapped (VmPeak), bytes."""
    return _status_bytes("VmPeak")


def apply_process_budget(budget_bytes: int) -> dict:
    """Limit this process's address space to its baseline + ``budget_bytes`` +
    ``MARGIN_BYTES`` (see NOTE). Returns what was set, for the result row."""
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
