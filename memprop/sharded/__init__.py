"""Sharded training: each rank's memory under FSDP2, HSDP and tensor parallelism,
measured and predicted.

    s = measure_ranks(model_config("mlp"), 8, world_size=2)     # real: 2 gloo processes
    p = predict(model_config("mlp"), 8, world_size=2)           # fake process group
    s.rank_peak_bytes == p.rank_peak_bytes                      # equal to the byte
    predict(cfg, 8, fsdp=FSDPConfig(world_size=1024, reshard_after_forward=False))
    predict(cfg, 8, fsdp=FSDPConfig(world_size=64, replicate=2, tp=4))   # HSDP x TP

Modules, in the order a step goes through them:
  config     ``FSDPConfig``: world size, replicas, TP degree, FSDP2's knobs, backend
  mesh       the rank mesh (replicate, shard, tp) and its FSDP2 and TP parts
  tensor_parallel  colwise/rowwise plans (zoo transformer, hf Llama family)
  apply      ``parallelize``: TP, then fully_shard on every block, then the root
  step       ``rank_step``: one rank's step, the body real and predicted ranks share
  resizes    FSDP2's in-place storage resizes reported to the tracker
  gloo       what gloo's reduce-scatter and all-reduces allocate, real and predicted
  spawn      real runs: one process per rank (``measure_ranks``)
  prediction predictions: a fake process group under fake tensors (``predict``)
  verify     checkpointing under sharding: gradients bitwise equal; TP's loss, on real ranks
  result     ``ShardedMeasurement``: every rank's figures, the largest
  render     a ShardedMeasurement as text (``memprop profile --fsdp N --tp M``)
  row        a ShardedMeasurement as one flat result row (what a sharded sweep stores)

and what is chosen from predictions:
  predictions  one workload predicted at several micro-batches and strategies, each once
  plan       ``plan_rank``: a checkpointing plan whose per-rank peak fits a per-rank budget
  fit        ``fit_cluster``: the largest micro-batch per rank per world size (``memprop fit``)
  closed_forms  ZeRO's model states and Megatron's activations by formula, shown beside
"""

from memprop.sharded.apply import apply_fsdp, parallelize, shard_layout
from memprop.sharded.closed_forms import closed_forms
from memprop.sharded.config import FSDPConfig
from memprop.sharded.fit import fit_cluster
from memprop.sharded.plan import RankPlan, plan_rank
from memprop.sharded.prediction import predict, predict_job
from memprop.sharded.result import ShardedMeasurement
from memprop.sharded.spawn import measure_jobs, measure_ranks
from memprop.sharded.step import RankJob, rank_step

__all__ = ["FSDPConfig", "parallelize", "apply_fsdp", "shard_layout", "RankJob", "rank_step",
           "predict", "predict_job", "measure_ranks", "measure_jobs", "ShardedMeasurement",
           "plan_rank", "RankPlan", "fit_cluster", "closed_forms"]
