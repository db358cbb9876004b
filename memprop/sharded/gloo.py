"""FSDP2's collectives on gloo, run so that a real rank's memory is deterministic and a
predicted rank allocates exactly what the real one does.

NOTE [ gloo reduce-scatters through a full copy ]
  gloo has no reduce-scatter of its own. ``ProcessGroupGloo::_reduce_scatter_base``
  (``reduce_scatter_tensor_coalesced``, torch/csrc/distributed/c10d/ProcessGroupGloo.cpp)
  clones the whole input (``buffer = input.clone()``: world_size x shard bytes, the
  padded unsharded gradients of one FSDP2 group), all-reduces the clone, and at
  ``wait()`` copies its rank's chunk into the output
  (``output.copy_(buffer.chunk(world_size)[rank])``). The clone is made inside the
  collective, which a dispatch mode sees as one op, so a tracker first counts it at
  the ``split`` that ``chunk`` runs at ``wait()``; a fake process group allocates nothing
  of the kind (nor would NCCL, which reduce-scatters in place). Measured, with gloo's
  own reduce-scatter: a 3-block MLP of width 20 on 2 ranks without reshard-after-forward
  peaked 80 bytes above the fake process group's prediction, in exactly those rows.
  So every rank, real or predicted, reduce-scatters with ``GlooReduceScatter``: gloo's
  three steps written out (clone, all-reduce the clone, copy this rank's chunk), so the
  clone is counted from the moment it is allocated, and the fake process group runs the
  same ops (its all-reduce moves nothing).

NOTE [ gloo's worker thread frees late ]
  gloo runs each collective on a worker thread that holds the work, and with it the
  tensors handed to it (the all-gather output's chunks, the all-reduced clone), until
  it returns to its queue - which can be after ``wait()`` has returned in the caller. A
  storage whose last reference the worker drops is freed then, a few ops later in the
  step, or not: measured before this rule, 6 of 20 rank steps (a 3-block MLP of width
  21, 2 ranks) had a row above the same step's others, by a late all-gather input or
  reduce-scatter clone (up to 1764 bytes at the peak). So on a real rank each
  collective hands gloo views of its own (a tensor gloo alone holds), and returns only
  once the storages' use counts (``torch._C._storage_Use_Count``) are back where they
  were before the call: gloo has let go. The step's memory is then the same in every
  run, and each storage is freed when the step itself drops it, as in a prediction.

NOTE [ Tensor parallelism's all-reduces ]
  A tensor-parallel layer all-reduces with torch's functional collective
  (``funcol.all_reduce``: ``_c10d_functional.all_reduce`` clones its input, contiguous,
  and all-reduces the clone in place). Eagerly torch wraps the result in an
  ``AsyncCollectiveTensor`` (``_wrap_tensor_autograd``) that waits on first use; under
  ``FakeTensorMode`` it calls ``wait_tensor`` at once, a fake op that returns a new
  tensor. And gloo's worker holds the clone itself (no view of its own), so its late
  release (NOTE [ gloo's worker thread frees late ]) does not show in a storage's use
  count. Measured before this rule, on 4 gloo ranks (the zoo transformer, FSDP 2 x TP
  2, B=4, T=16, C=32): the real forward peak 8192 bytes (one (B, T, C) float tensor)
  above the prediction and 4 rows more in the timeline; with the eager wait alone, the
  peaks agreed and rows still differed by a late free. So while a step runs,
  ``all_reduces_released()`` makes ``funcol.all_reduce`` (what DTensor's
  ``Partial`` -> ``Replicate`` calls, forward and backward) these three steps on every
  rank, real or predicted: clone as the op does, ``dist.all_reduce`` a view of the
  clone, wait until gloo lets go. HSDP's all-reduce of each reduce-scatter output over
  the replicas (``dist.all_reduce`` in FSDP2's ``foreach_reduce``) is held by gloo's
  worker too: measured before this rule, 1 of 8 ranks of HSDP 2 x 2 (the zoo
  transformer) ended its step 7552 bytes above the prediction. So inside the same
  context every ``dist.all_reduce`` of a real tensor hands gloo a view and returns once
  gloo has let go (``_all_reduce_released``).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
    DefaultAllGather,
    DefaultReduceScatter,
)

from memprop.errors import MemPropError

__all__ = ["GlooAllGather", "GlooReduceScatter", "use_gloo_collectives",
           "all_reduces_released"]

_RELEASE_TIMEOUT_S = 60.0


def _use_counts(*tensors: torch.Tensor) -> dict[int, int] | None:
    """Storage -> use count of ``tensors``' storages; None for fake tensors (a fake
    process group has no worker thread)."""
    if any(isinstance(t, FakeTensor) for t in tensors):
        return None
    return {t.untyped_storage()._cdata: torch._C._storage_Use_Count(
        t.untyped_storage()._cdata) for t in tensors}


def _await_release(before: dict[int, int] | None) -> None:
    """Return once gloo's worker holds none of these storages (NOTE [ gloo's worker
    thread frees late ])."""
    if before is None:
        return
    deadline = time.monotonic() + _RELEASE_TIMEOUT_S
    while any(torch._C._storage_Use_Count(key) > count for key, count in before.items()):
        if time.monotonic() > deadline:
            raise MemPropError("memprop.sharded: gloo's worker thread still holds a "
                               f"collective's tensors {_RELEASE_TIMEOUT_S:.0f} s after the "
                               "collective finished; the step's memory cannot be measured "
                               "deterministically (NOTE [ gloo's worker thread frees late ])")
        time.sleep(0)                     # let the worker thread take the GIL and let go


class GlooAllGather(DefaultAllGather):
    """FSDP2's all-gather, returning once gloo has let go of its tensors."""

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        before = _use_counts(output_tensor, input_tensor)
        # views of its own for gloo to hold: their release shows in the use counts
        dist.all_gather_single(output_tensor.view(output_tensor.shape),
                               input_tensor.view(input_tensor.shape), group=group)
        _await_release(before)
        return None                       # done: FSDP2 waits on no work


class GlooReduceScatter(DefaultReduceScatter):
    """FSDP2's reduce-scatter as gloo runs it (NOTE [ gloo reduce-scatters through a full
    copy ]), returning once gloo has let go of its tensors."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        buffer = input_tensor.clone()                       # (world_size * shard,)
        before = _use_counts(buffer)
        dist.all_reduce(buffer.view(buffer.shape), op=op, group=group)
        _await_release(before)
        output_tensor.copy_(_chunk(buffer, dist.get_world_size(group), dist.get_rank(group)))
        return None


def _chunk(buffer: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """``buffer.chunk(world)[rank]``, a view, without making the other ``world - 1``
    views (at 512 ranks, a quarter of a predicted step's time went to them)."""
    rows = buffer.shape[0]
    if rows % world:
        return buffer.chunk(world)[rank]
    return buffer.narrow(0, rank * (rows // world), rows // world)


def use_gloo_collectives(model: torch.nn.Module) -> None:
    """Every FSDP2 module of ``model`` all-gathers with ``GlooAllGather`` and
    reduce-scatters with ``GlooReduceScatter``."""
    gather, scatter = GlooAllGather(), GlooReduceScatter()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(gather)
            module.set_custom_reduce_scatter(scatter)


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG,
               "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _all_reduce(self: torch.Tensor, reduceOp: str, group, tag: str = "") -> torch.Tensor:
    """``funcol.all_reduce`` as gloo runs it (NOTE [ Tensor parallelism's all-reduces ])."""
    pg = funcol._resolve_group(group, tag)
    if isinstance(pg, str):
        pg = _resolve_process_group(pg)
    out = self.clone(memory_format=torch.contiguous_format)     # the op's output
    dist.all_reduce(out, op=_REDUCE_OPS[reduceOp.lower()], group=pg)
    return out


@contextlib.contextmanager
def all_reduces_released():
    """Inside: ``funcol.all_reduce`` is ``_all_reduce``, and ``dist.all_reduce`` returns
    once gloo has let go of its tensor (NOTE [ Tensor parallelism's all-reduces ]); the
    originals are put back on exit."""
    original, original_dist = funcol.all_reduce, dist.all_reduce

    def _all_reduce_released(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        before = _use_counts(tensor)
        work = original_dist(tensor.view(tensor.shape), op=op, group=group, async_op=async_op)
        if work is not None:
            work.wait()
        _await_release(before)
        return None

    funcol.all_reduce = _all_reduce
    dist.all_reduce = _all_reduce_released
    try:
        yield
    finally:
        funcol.all_reduce, dist.all_reduce = original, original_dist
