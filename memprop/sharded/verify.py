"""Checkpointing under sharding: a strategy applied before ``fully_shard`` must give the
gradients the same sharded run gives without it, bit for bit, on every rank. And a
parallelized model is the same network: its loss is the unsharded model's
(``parallel_losses``).

    checkpoint_matches(model_config("transformer"), 4, world_size=2, strategy="full")
    # -> [{"rank": 0, "equal": True, "params": 12, ...}, {"rank": 1, ...}]

Each rank builds the model twice (same seed), applies the strategy to one, shards both
(``parallelize``: FSDP2, HSDP, tensor parallelism), runs one forward and backward of
its batch on each, and compares its gradient shards (the DTensors' local tensors) with
``torch.equal``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.distributed.tensor import DTensor

from memprop.checkpoint import parse_strategy
from memprop.sharded.apply import parallelize
from memprop.sharded.config import FSDPConfig
from memprop.sharded.gloo import use_gloo_collectives
from memprop.sharded.spawn import run_on_ranks
from memprop.sharded.step import RankJob
from memprop.workload import build_workload

__all__ = ["checkpoint_matches", "rank_checkpoint_match", "parallel_losses", "rank_loss"]


def _local_gradients(job: RankJob, mesh, strategy: str) -> tuple[float, dict]:
    model, batch = build_workload(job.config, job.batch_size, dtype=job.dtype,
                                  strategy=parse_strategy(strategy), seed=job.seed)
    parallelize(model, mesh, job.fsdp)
    if job.fsdp.fsdp:
        use_gloo_collectives(model)
    loss = job.config.loss(model, batch)
    loss.backward()
    # DTensor gradients (FSDP2's shards, tensor-parallel weights) compared by their local
    # tensors; a parameter tensor parallelism leaves whole has a plain gradient
    return loss.item(), {n: (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
                         .clone() for n, p in model.named_parameters()}


def rank_checkpoint_match(job: RankJob, mesh) -> dict:
    """On this rank: are the gradient shards with ``job.strategy`` bitwise those without?"""
    want_loss, want = _local_gradients(job, mesh, "none")
    got_loss, got = _local_gradients(job, mesh, job.strategy)
    diffs = {n: (got[n].double() - want[n].double()).abs().max().item() if want[n].numel()
             else 0.0 for n in want}
    return {"rank": mesh.get_rank(), "equal": got.keys() == want.keys() and all(
                torch.equal(got[n], want[n]) for n in want) and got_loss == want_loss,
            "params": len(want), "loss": got_loss, "max_abs_diff": max(diffs.values())}


def checkpoint_matches(config, batch_size: int, *, world_size: int, strategy: str,
                       fsdp: FSDPConfig | None = None, seed: int = 0) -> list[dict]:
    """``rank_checkpoint_match`` on every rank of a real run of ``world_size`` processes."""
    fsdp = fsdp or FSDPConfig(world_size=world_size)
    job = RankJob(config=config, batch_size=batch_size, fsdp=dataclasses.replace(
        fsdp, world_size=world_size), strategy=strategy, seed=seed)
    return [rank[0] for rank in run_on_ranks(rank_checkpoint_match, [job])]


def rank_loss(job: RankJob, mesh) -> tuple[float, float]:
    """On this rank: (loss of the parallelized model, loss of the same model unsharded)
    on this rank's batch (every rank's is the same: one seed)."""
    whole, batch = build_workload(job.config, job.batch_size, dtype=job.dtype, seed=job.seed)
    want = job.config.loss(whole, batch).item()
    model, batch = build_workload(job.config, job.batch_size, dtype=job.dtype, seed=job.seed)
    parallelize(model, mesh, job.fsdp)
    if job.fsdp.fsdp:
        use_gloo_collectives(model)
    return job.config.loss(model, batch).item(), want


def parallel_losses(config, batch_size: int, *, fsdp: FSDPConfig,
                    seed: int = 0) -> list[tuple[float, float]]:
    """``rank_loss`` on every rank of a real run: the sharded and the unsharded loss.
    Tensor parallelism sums partial products in another order (rowwise layers
    all-reduce), so the two agree to rounding, not bitwise."""
    job = RankJob(config=config, batch_size=batch_size, fsdp=fsdp, seed=seed)
    return [rank[0] for rank in run_on_ranks(rank_loss, [job])]
