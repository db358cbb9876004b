"""Each rank's memory under FSDP2 at any world size, on one CPU, allocating nothing.

    s = predict(model_config("transformer"), 8, world_size=64)
    s.rank_peak_bytes, s.peak_bytes                     # bytes, predicted

A predicted rank is the real rank's step (NOTE [ One rank, two passes ],
memprop.sharded.step) under ``FakeTensorMode`` with a fake process group
(``init_process_group("fake", store=FakeStore(), rank=r, world_size=N)``, whose
collectives move nothing), as torch's FSDPMemTracker runs, but measured by memprop's
own tracker: equal to the byte to a real gloo run of the same ranks
(tests/test_sharded.py).

NOTE [ Which ranks are predicted ]
  What a rank allocates depends on the sizes of the shards it holds, not on its index:
  FSDP2 gives rank r rows [r*c, (r+1)*c) of each parameter's dim 0, c = ceil(rows / N)
  (``torch.chunk``), and pads every rank's storage to c rows; the gradient shard, the
  reduce-scatter output and the all-gather buffers are padded alike, while optimizer
  state (``zeros_like`` of the unpadded shard) follows the rank's own rows. So the ranks
  fall into classes by their layout (``shard_layout``: the rows each parameter gives
  the rank), at most a few per model (full chunks; the last partial one; empty ones
  when a dimension is smaller than N), and one rank per class is predicted: the first.
  The others carry its figures (``ShardedMeasurement.same_as``). On a mesh (NOTE [ The
  rank mesh ], memprop.sharded.config) N is the ``shard`` degree and r the rank's shard
  index; replicas (HSDP) hold the same shards, so they share a class; under tensor
  parallelism the layout is that of the tensor-parallel rank's local shapes
  (``tp_local_shapes``: even splits, the same on every tensor-parallel rank).

NOTE [ One process group per predicted rank ]
  Each predicted rank gets its own fake process group and mesh, one after the other in
  this process. DTensor caches sharding decisions by their specs, and a spec's mesh
  hashes by its shape and names, not by its process groups: the second predicted rank
  of a tensor-parallel model was handed the first rank's mesh from that cache, whose
  groups were gone ("Could not resolve the process group registered under the name
  3", FSDP 2 x TP 2 predicting ranks 0 and 2). So after each predicted rank
  ``_forget_meshes`` clears DTensor's caches (sharding propagation, in C++ and Python,
  tensor metadata, redistribution plans): a prediction of one rank never sees
  another's meshes.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor, _redistribute
from torch.testing._internal.distributed.fake_pg import FakeStore

from memprop.errors import ConfigError
from memprop.fake import KernelStorages
from memprop.sharded.apply import shard_layout
from memprop.sharded.config import FSDPConfig
from memprop.sharded.layers import (
    DEPTHS,
    NotLinear,
    extrapolate_rank,
    layer_count,
    uniform_strategy,
    with_layers,
)
from memprop.sharded.mesh import rank_mesh
from memprop.sharded.result import ShardedMeasurement
from memprop.sharded.step import RankJob, rank_step
from memprop.sharded.tensor_parallel import tp_local_shapes

__all__ = ["predict", "predict_job", "rank_classes", "LAYERS"]

LAYERS = ("all", "extrapolate")     # how a prediction treats a deep model's layers


def rank_classes(config, fsdp: FSDPConfig, *, dtype=torch.float32) -> list[int]:
    """For each rank, the first rank with its shard layout (NOTE [ Which ranks are
    predicted ]); the shapes come from a fake build of the model."""
    with FakeTensorMode():
        shapes = tp_local_shapes(config.build(dtype=dtype), fsdp.tp)
    first: dict[tuple, int] = {}
    return [first.setdefault(shard_layout(shapes, fsdp.shard, fsdp.coordinates(r)[1]), r)
            for r in range(fsdp.world_size)]


def _predict_rank(job: RankJob, rank: int):
    n = job.fsdp.world_size
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=n)
    try:
        mesh = rank_mesh(job.fsdp)
        with FakeTensorMode(allow_non_fake_inputs=False), KernelStorages():
            return rank_step(job, mesh, predicted=True)
    finally:
        dist.destroy_process_group()
        _forget_meshes()


def _forget_meshes() -> None:
    """Clear DTensor's caches that hold meshes (NOTE [ One process group per predicted
    rank ])."""
    torch._C._clear_DTensor_sharding_propagator_cache()         # the C++ fast path's
    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.propagate_op_sharding.cache_clear()
    propagator._propagate_tensor_meta_cached.cache_clear()
    _redistribute._gen_transform_infos.cache_clear()


def predict_job(job: RankJob, *, layers: str = "all") -> ShardedMeasurement:
    """Every rank's predicted step of ``job``: one fake rank per shard layout.
    ``layers="extrapolate"``: a deep model from its predictions at 2, 3 and 4 layers
    where its figures are linear in depth (NOTE [ Predicting a deep model from three
    shallow ones ], memprop.sharded.layers), else whole; ``"all"``: always whole."""
    if layers not in LAYERS:
        raise ConfigError(f"memprop.sharded: layers {layers!r} is not allowed; choose one "
                          f"of: {', '.join(LAYERS)}")
    if dist.is_initialized():
        raise ConfigError("memprop.sharded: a process group is already initialized in this "
                          "process; a prediction runs its own fake process group, so call "
                          "it outside torch.distributed (or destroy_process_group() first)")
    start = time.perf_counter()
    refused = None
    if layers == "extrapolate":
        found = _extrapolated(job)
        if isinstance(found, ShardedMeasurement):
            found.seconds = time.perf_counter() - start
            return found
        refused = found
    same_as = rank_classes(job.config, job.fsdp, dtype=job.dtype)
    ranks = {r: _predict_rank(job, r) for r in sorted(set(same_as))}
    return ShardedMeasurement(fsdp=job.fsdp, predicted=True, ranks=ranks, same_as=same_as,
                              seconds=time.perf_counter() - start,
                              extrapolation_refused=refused)


def _extrapolated(job: RankJob) -> ShardedMeasurement | str | None:
    """``job`` predicted from its shallow twins, or why not (None: 12 layers or fewer, which
    cost no more to predict whole than the three shallow models do)."""
    counted = layer_count(job.config)
    if counted is None:
        return "its layers are not one stack of a depth field memprop can set"
    field, depth = counted
    if depth <= sum(DEPTHS):                 # the shallow models cost as many layers
        return None
    if not uniform_strategy(job.strategy):
        return (f"strategy {job.strategy!r} does not treat every layer alike (only "
                "none, full and selective do)")
    shallow = [predict_job(dataclasses.replace(job, config=with_layers(job.config, field, d)))
               for d in DEPTHS]
    same_as = shallow[-1].same_as
    if any(s.same_as != same_as for s in shallow):
        return "its ranks fall into other shard layouts at another depth"
    try:
        ranks = {r: extrapolate_rank([s.ranks[r] for s in shallow], depth)
                 for r in sorted(set(same_as))}
    except NotLinear as exc:
        return str(exc)
    return ShardedMeasurement(fsdp=job.fsdp, predicted=True, ranks=ranks, same_as=same_as,
                              extrapolated_from=DEPTHS)


def predict(config, batch_size: int, *, world_size: int | None = None,
            fsdp: FSDPConfig | None = None, optimizer: str = "sgd", strategy: str = "none",
            dtype=torch.float32, seed: int = 0, layers: str = "all") -> ShardedMeasurement:
    """Each rank's predicted training step of ``config`` at ``batch_size`` examples per
    rank under FSDP2: pass ``world_size`` (defaults for the rest) or an ``FSDPConfig``.
    ``strategy`` (a checkpointing strategy) is applied before sharding. ``layers``:
    ``"all"`` predicts every layer; ``"extrapolate"`` predicts a deep model from 2, 3 and
    4 layers where that is exact (NOTE [ Predicting a deep model from three shallow
    ones ], memprop.sharded.layers)."""
    fsdp = FSDPConfig.of(world_size, fsdp, "predict")
    return predict_job(RankJob(config=config, batch_size=batch_size, fsdp=fsdp,
                               optimizer=optimizer, strategy=strategy, dtype=dtype,
                               seed=seed), layers=layers)
