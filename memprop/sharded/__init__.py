"""Sharded training: each rank's memory under FSDP2, measured and predicted.

    s = measure_ranks(model_config("mlp"), 8, world_size=2)     # real: 2 gloo processes
    p = predict(model_config("mlp"), 8, world_size=2)           # fake process group
    s.rank_peak_bytes == p.rank_peak_bytes                      # equal to the byte
    predict(cfg, 8, fsdp=FSDPConfig(world_size=1024, reshard_after_forward=False))

Modules, in the order a step goes through them:
  config     ``FSDPConfig``: world size, reshard after forward, mixed precision, backend
  apply      ``apply_fsdp``: fully_shard on every block, then the root; shard layouts
  step       ``rank_step``: one rank's step, the body real and predicted ranks share
  resizes    FSDP2's in-place storage resizes reported to the tracker
  gloo       what gloo's reduce-scatter allocates, for predictions of gloo runs
  spawn      real runs: one process per rank (``measure_ranks``)
  prediction predictions: a fake process group under fake tensors (``predict``)
  verify     checkpointing under sharding: gradients bitwise equal, on real ranks
  result     ``ShardedMeasurement``: every rank's figures, the largest
  render     a ShardedMeasurement as text (``memprop profile --fsdp N``)
"""

from memprop.sharded.apply import apply_fsdp, shard_layout
from memprop.sharded.config import FSDPConfig
from memprop.sharded.prediction import predict, predict_job
from memprop.sharded.result import ShardedMeasurement
from memprop.sharded.spawn import measure_jobs, measure_ranks
from memprop.sharded.step import RankJob, rank_step

__all__ = ["FSDPConfig", "apply_fsdp", "shard_layout", "RankJob", "rank_step", "predict",
           "predict_job", "measure_ranks", "measure_jobs", "ShardedMeasurement"]
