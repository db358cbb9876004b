"""Measure a sharded step for real: one process per rank, a gloo process group.

    s = measure_ranks(model_config("mlp"), 8, world_size=2)
    s.rank_peak_bytes, s.peak_bytes                  # bytes, measured on each rank

Each rank is a fresh ``python -m memprop.sharded.spawn`` process (rank, world size and
a free local port on its command line; the jobs and results as pickle files in a
temporary folder), which joins ``init_process_group("gloo")``, builds the job's CPU mesh
(memprop.sharded.mesh) and runs ``rank_step`` for each job (NOTE [ One rank, two passes ],
memprop.sharded.step): several jobs share one start-up. Torch runs one thread per
rank, so N ranks do not fight over the cores. A rank that fails fails the run with its
own error text.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from memprop.errors import MemPropError
from memprop.sharded.config import FSDPConfig
from memprop.sharded.mesh import rank_mesh
from memprop.sharded.result import ShardedMeasurement
from memprop.sharded.step import RankJob, rank_step

__all__ = ["measure_ranks", "measure_jobs", "run_on_ranks", "RankRunError"]


class RankRunError(MemPropError):
    """A rank of a real sharded run failed (its error text is in the message)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ranks(fn, jobs: list[RankJob], *, timeout_s: float = 600) -> list[list]:
    """``fn(job, mesh)`` for every job on every rank, in one set of ``world_size``
    processes (every job must have the same world size): ``[rank][job]`` results.
    ``fn`` is a module-level function (the ranks import it by name); its results must
    pickle."""
    sizes = {job.fsdp.world_size for job in jobs}
    if len(sizes) != 1:
        raise MemPropError(f"memprop.sharded: jobs of one run share a world size; got "
                           f"{sorted(sizes)}")
    n = sizes.pop()
    with tempfile.TemporaryDirectory(prefix="memprop-ranks-") as tmp:
        jobs_file = Path(tmp) / "jobs.pkl"
        jobs_file.write_bytes(pickle.dumps((f"{fn.__module__}:{fn.__qualname__}", jobs)))
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-m", "memprop.sharded.spawn",
                                   "--rank", str(r), "--world-size", str(n),
                                   "--jobs", str(jobs_file), "--out", f"{tmp}/rank{r}.pkl"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for r in range(n)]
        try:
            outputs = [p.communicate(timeout=timeout_s)[0].decode(errors="replace")
                       for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        per_rank = []
        for r, (p, text) in enumerate(zip(procs, outputs)):
            out = Path(tmp) / f"rank{r}.pkl"
            if p.returncode != 0 or not out.exists():
                raise RankRunError(f"memprop.sharded: rank {r} of {n} failed (exit "
                                   f"{p.returncode}):\n{text[-4000:]}")
            per_rank.append(pickle.loads(out.read_bytes()))
    return per_rank


def measured_step(job: RankJob, mesh) -> object:
    """A real rank's step (``rank_step`` with ``predicted=False``)."""
    return rank_step(job, mesh, predicted=False)


def measure_jobs(jobs: list[RankJob], *, timeout_s: float = 600) -> list[ShardedMeasurement]:
    """Every job measured on every rank, all in one set of ``world_size`` processes
    (every job must have the same world size)."""
    start = time.perf_counter()
    per_rank = run_on_ranks(measured_step, jobs, timeout_s=timeout_s)
    seconds = time.perf_counter() - start
    n = len(per_rank)
    return [ShardedMeasurement(fsdp=job.fsdp, predicted=False,
                               ranks={r: per_rank[r][i] for r in range(n)},
                               same_as=list(range(n)), seconds=seconds)
            for i, job in enumerate(jobs)]


def measure_ranks(config, batch_size: int, *, world_size: int | None = None,
                  fsdp: FSDPConfig | None = None, optimizer: str = "sgd",
                  strategy: str = "none", dtype=torch.float32,
                  seed: int = 0) -> ShardedMeasurement:
    """Each rank's measured training step of ``config`` at ``batch_size`` examples per
    rank under FSDP2, in ``world_size`` real processes (gloo, CPU)."""
    fsdp = FSDPConfig.of(world_size, fsdp, "measure_ranks")
    return measure_jobs([RankJob(config=config, batch_size=batch_size, fsdp=fsdp,
                                 optimizer=optimizer, strategy=strategy, dtype=dtype,
                                 seed=seed)])[0]


def _run_rank(rank: int, world_size: int, jobs_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        name, jobs = pickle.loads(Path(jobs_file).read_bytes())
        module, _, qualname = name.partition(":")
        fn = getattr(importlib.import_module(module), qualname)
        meshes: dict = {}              # one mesh per layout (NOTE [ The rank mesh ])
        results = []
        for job in jobs:
            dims = tuple(job.fsdp.mesh_dims())
            if dims not in meshes:         # every rank reaches this in the same order
                meshes[dims] = rank_mesh(job.fsdp)
            results.append(fn(job, meshes[dims]))
        Path(out_file).write_bytes(pickle.dumps(results))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="one rank of memprop's sharded run")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--jobs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        _run_rank(args.rank, args.world_size, args.jobs, args.out)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
