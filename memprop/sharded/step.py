"""One rank's training step under FSDP2: the body a real rank and a predicted rank run.

    m = rank_step(job, mesh, predicted=False)     # inside an initialized process group

NOTE [ One rank, two passes ]
  A real rank (memprop.sharded.spawn: its own process, a gloo process group) and a
  predicted rank (memprop.sharded.prediction: a fake process group under FakeTensorMode)
  run this same function: build the model (same seed on every rank, as FSDP2 requires)
  and the rank's batch, apply the checkpointing strategy, shard (``parallelize``), and
  ``measure_step`` it (the first step, then the measured step, then the stored pass; no
  timing, FLOPs or inference pass) with storage resizes reported to the tracker
  (memprop.sharded.resizes). Both run FSDP2's collectives and tensor parallelism's
  all-reduces through memprop.sharded.gloo (NOTE [ gloo reduce-scatters through a full
  copy ], NOTE [ gloo's worker thread frees late ], NOTE [ Tensor parallelism's
  all-reduces ]). So a measured and a predicted rank differ in nothing but whether
  tensors hold data and collectives move it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.distributed.device_mesh import DeviceMesh

from memprop.checkpoint import parse_strategy
from memprop.measure import Measurement, measure_step
from memprop.models.base import ModelConfig
from memprop.sharded.apply import parallelize
from memprop.sharded.config import FSDPConfig
from memprop.sharded.gloo import all_reduces_released, use_gloo_collectives
from memprop.sharded.resizes import resizes_reported
from memprop.workload import build_workload

__all__ = ["RankJob", "rank_step"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankJob:
    """One sharded step to run on every rank: a model config at a per-rank batch size."""

    config: ModelConfig                 # a zoo, hf: or factory config (memprop.models)
    batch_size: int                     # examples per rank (each rank its own batch)
    fsdp: FSDPConfig
    optimizer: str = "sgd"
    strategy: str = "none"
    dtype: torch.dtype = torch.float32
    seed: int = 0


def rank_step(job: RankJob, mesh: DeviceMesh, *, predicted: bool) -> Measurement:
    """This rank's step of ``job`` (NOTE [ One rank, two passes ])."""
    strat = parse_strategy(job.strategy)
    model, batch = build_workload(job.config, job.batch_size, dtype=job.dtype,
                                  strategy=strat, seed=job.seed)
    parallelize(model, mesh, job.fsdp)
    if job.fsdp.backend == "gloo":
        use_gloo_collectives(model)
    with resizes_reported() as log, all_reduces_released():
        result = measure_step(model, batch, optimizer=job.optimizer, strategy=strat.spec,
                              loss_fn=job.config.loss, forward_fn=job.config.forward,
                              timing=False, flops=False, inference=False,
                              predicted=predicted)
    result.meta.update(_gathered(log, result))
    result.meta.update(job.config.row_fields())
    result.meta.update(rank=mesh.get_rank(), world_size=job.fsdp.world_size,
                       replicate=job.fsdp.replicate, tp=job.fsdp.tp, fsdp=job.fsdp.fsdp,
                       reshard_after_forward=job.fsdp.reshard_after_forward,
                       mixed_precision=job.fsdp.mixed_precision, offload=job.fsdp.offload)
    return result


def _gathered(log, result: Measurement) -> dict[str, int]:
    """The all-gathered parameter bytes of the measured step at its peak row and at
    their own maximum (NOTE [ Gathered parameters ], memprop.sharded.resizes). The
    measured step's tracker is the last to see a resize (no inference pass runs after
    it); its rows must be the measurement's timeline."""
    if not log.trackers:                  # nothing gathered (a model FSDP2 left whole)
        return {"gathered_bytes_at_peak": 0, "gathered_peak_bytes": 0}
    tracker = log.trackers[-1]
    totals = result.timeline["total_bytes"].tolist()
    assert [r[-1] for r in tracker._rows] == totals, "resize log of another tracker"
    gathered = log.gathered_bytes(tracker)
    return {"gathered_bytes_at_peak": gathered[totals.index(max(totals))],
            "gathered_peak_bytes": max(gathered)}
