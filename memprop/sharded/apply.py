"""Shard a model as torchtitan does: tensor parallelism first, then FSDP2 on every
block, then the root.

    parallelize(model, rank_mesh(config), config)    # TP (if tp > 1), then FSDP2
    apply_fsdp(model, mesh, FSDPConfig(world_size=2))

The blocks are the chains memprop's checkpointing segments (NOTE [ How blocks are
found ], memprop.checkpoint): each block of each chain gets its own
``fully_shard`` (one all-gather and one reduce-scatter per block), the root gets the
rest (embeddings, head, norms). A checkpointing strategy is applied before sharding
(it stays inside one block). With ``replicate > 1`` the mesh FSDP2 takes is 2-D
(replicate, shard): HSDP.

NOTE [ Offload on CPU ranks ]
  ``offload=True`` passes ``CPUOffloadPolicy(pin_memory=False)`` (pinned memory needs an
  accelerator). FSDP2 then keeps the sharded parameters and gradients on the host and
  copies them to the device to all-gather and after reduce-scatter (``.to(device)``,
  ``.to("cpu")``). On CPU ranks the device is the host: those copies are no-ops, so
  every rank's bytes are those of the run without offload (tests/test_sharded_parallel.py
  checks this, real and predicted). What offload saves on a GPU (the sharded
  parameters, gradients and optimizer state leave device memory) is not measured here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.fsdp._fully_shard import _fsdp_param

from memprop.checkpoint import find_chains
from memprop.sharded.config import MIXED_PRECISION, FSDPConfig
from memprop.sharded.mesh import dp_mesh, meshes_stay_real, tp_mesh
from memprop.sharded.tensor_parallel import apply_tp

__all__ = ["parallelize", "apply_fsdp", "shard_layout"]


def parallelize(model: nn.Module, mesh: DeviceMesh, config: FSDPConfig) -> nn.Module:
    """Tensor parallelism over the mesh's ``tp`` dimension (if any), then FSDP2 over its
    ``(replicate,) shard`` dimensions (if ``config.fsdp``); returns ``model``."""
    tp = tp_mesh(mesh)
    if tp is not None:
        apply_tp(model, tp)
    if config.fsdp:
        apply_fsdp(model, mesh, config)
    return model


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, fsdp: FSDPConfig) -> nn.Module:
    """``fully_shard`` on every block of every chain of ``model``, then on ``model``,
    over the data-parallel part of ``mesh`` (memprop.sharded.mesh.dp_mesh: 2-D for
    HSDP); returns ``model`` (now an ``FSDPModule``)."""
    policy = MixedPrecisionPolicy()                     # fully_shard's default
    if fsdp.mixed_precision is not None:
        param_dtype, reduce_dtype = MIXED_PRECISION[fsdp.mixed_precision]
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # NOTE [ Offload on CPU ranks ]
    offload = CPUOffloadPolicy(pin_memory=False) if fsdp.offload else OffloadPolicy()
    shard_mesh = dp_mesh(mesh)
    assert shard_mesh is not None, "apply_fsdp on a mesh without a shard dimension"
    with _chunks_on_demand(), meshes_stay_real():
        for chain in find_chains(model):
            for block in chain:
                fully_shard(block, mesh=shard_mesh, mp_policy=policy, offload_policy=offload,
                            reshard_after_forward=fsdp.reshard_after_forward)
        fully_shard(model, mesh=shard_mesh, mp_policy=policy, offload_policy=offload,
                    reshard_after_forward=fsdp.reshard_after_forward)
    return model


class _Chunks(Sequence):
    """``torch.chunk(tensor, n, dim)`` padded with empty tensors to ``n`` entries, as
    FSDP2's ``_chunk_with_empty`` returns it, but each chunk made when it is read: the
    same view (``narrow``: same sizes, strides and storage offset as ``chunk``'s)."""

    def __init__(self, tensor: torch.Tensor, num_chunks: int, dim: int):
        self.tensor, self.n, self.dim = tensor, num_chunks, dim
        self.size = -(-tensor.size(dim) // num_chunks)         # rows per chunk

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        start = i * self.size
        rows = self.tensor.size(self.dim)
        if start >= rows:
            return self.tensor.new_empty(0)
        return self.tensor.narrow(self.dim, start, min(self.size, rows - start))


@contextlib.contextmanager
def _chunks_on_demand():
    """While sharding: FSDP2 splits each parameter into world_size chunks
    (``_chunk_with_empty``: ``torch.chunk``, then one ``new_empty(0)`` per rank past the
    rows) and reads two of them, its own rank's and the first (the padded size). At 1024
    ranks on fake tensors that was 720,000 views and 83 of a prediction's 110 s (the
    8-block transformer of the README). Here the chunks are made when read (``_Chunks``):
    the same two views, no others. Nothing is allocated either way (views and 0-byte
    tensors, before any step), real or predicted."""
    original = _fsdp_param._chunk_with_empty
    _fsdp_param._chunk_with_empty = _Chunks
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = original


def shard_layout(shapes, world_size: int, rank: int) -> tuple[int, ...]:
    """The rows of each parameter (shapes in registration order) that ``rank`` holds:
    FSDP2 chunks dim 0 as ``torch.chunk`` does, ``ceil(rows / world_size)`` rows per
    rank, the last ranks fewer or none (each rank's storage is padded to the full chunk
    either way). Two ranks with one layout run the same step (NOTE [ Which ranks are
    predicted ], memprop.sharded.prediction)."""
    layout = []
    for shape in shapes:
        rows = shape[0] if len(shape) else 1
        chunk = -(-rows // world_size)
        layout.append(max(0, min(chunk, rows - rank * chunk)))
    return tuple(layout)
