"""Shard a model with FSDP2 as torchtitan does: every block, then the root.

    apply_fsdp(model, mesh, FSDPConfig(world_size=2))

The blocks are the chains memprop's checkpointing segments (NOTE [ How blocks are
found ], memprop.checkpoint.blocks): each block of each chain gets its own
``fully_shard`` (one all-gather and one reduce-scatter per block), the root gets the
rest (embeddings, head, norms). A checkpointing strategy is applied before sharding
(it stays inside one block, memprop.checkpoint.patch).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from memprop.checkpoint.blocks import find_chains
from memprop.sharded.config import MIXED_PRECISION, FSDPConfig

__all__ = ["apply_fsdp", "shard_layout"]


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, fsdp: FSDPConfig) -> nn.Module:
    """``fully_shard`` on every block of every chain of ``model``, then on ``model``;
    returns ``model`` (now an ``FSDPModule``)."""
    kwargs = {"mesh": mesh, "reshard_after_forward": fsdp.reshard_after_forward}
    if fsdp.mixed_precision is not None:
        param_dtype, reduce_dtype = MIXED_PRECISION[fsdp.mixed_precision]
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype,
                                                   reduce_dtype=reduce_dtype)
    for chain in find_chains(model):
        for block in chain:
            fully_shard(block, **kwargs)
    return fully_shard(model, **kwargs)


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
