"""The device mesh of a sharded step, and its FSDP2 and tensor-parallel parts.

    mesh = rank_mesh(FSDPConfig(world_size=4, replicate=2))   # (replicate=2, shard=2)
    dp_mesh(mesh)        # what fully_shard takes: ("replicate", "shard"), 2-D: HSDP
    tp_mesh(mesh)        # what parallelize_module takes: ("tp",), or None

Inside an initialized process group (gloo, or the fake one of a prediction); the
dimensions and the rank order are NOTE [ The rank mesh ], memprop.sharded.config.
NOTE [ Meshes are real under fake tensors ]
  A mesh's rank table is a real int tensor, bookkeeping of the process group, not a
  tensor of the step; an op on it under ``FakeTensorMode`` fails (a real input). So a
  mesh is sliced outside the mode (``unset_fake_temporarily``), and while a model is
  sharded ``meshes_stay_real()`` does the same for ``DeviceMesh._concatenate``, which
  FSDP2 calls to join its data-parallel mesh to a parameter's tensor-parallel one.
"""

from __future__ import annotations

import contextlib

from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from memprop.sharded.config import FSDPConfig

__all__ = ["rank_mesh", "dp_mesh", "tp_mesh", "meshes_stay_real"]


def rank_mesh(config: FSDPConfig) -> DeviceMesh:
    """The CPU mesh of every rank, its dimensions named (NOTE [ The rank mesh ])."""
    names, sizes = zip(*config.mesh_dims())
    return init_device_mesh("cpu", tuple(sizes), mesh_dim_names=tuple(names))


def _names(mesh: DeviceMesh) -> tuple[str, ...]:
    return tuple(mesh.mesh_dim_names or ())


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
    """The data-parallel part: ``shard`` (FSDP2) or ``(replicate, shard)`` (HSDP); None
    when FSDP2 is off. A mesh without names is one FSDP2 dimension."""
    names = _names(mesh)
    if not names:
        return mesh
    dims = tuple(n for n in ("replicate", "shard") if n in names)
    if "shard" not in dims:
        return None
    if dims == names:
        return mesh
    with unset_fake_temporarily():
        return mesh[dims]


def tp_mesh(mesh: DeviceMesh) -> DeviceMesh | None:
    """The tensor-parallel part ``("tp",)``, or None."""
    names = _names(mesh)
    if "tp" not in names:
        return None
    if names == ("tp",):
        return mesh
    with unset_fake_temporarily():
        return mesh["tp"]


@contextlib.contextmanager
def meshes_stay_real():
    """Inside: ``DeviceMesh._concatenate`` runs outside ``FakeTensorMode`` (NOTE [ Meshes
    are real under fake tensors ]); the original is put back on exit."""
    original = DeviceMesh.__dict__["_concatenate"]          # a staticmethod

    def concatenate(meshes):
        with unset_fake_temporarily():
            return original.__func__(meshes)

    DeviceMesh._concatenate = staticmethod(concatenate)      # type: ignore[method-assign]
    try:
        yield
    finally:
        DeviceMesh._concatenate = original                   # type: ignore[method-assign]
