"""Measure a sharded step for real: one process per rank, a gloo process group.

    s = measure_ranks(model_config("mlp"), 8, world_size=2)
    s.rank_peak_bytes, s.peak_bytes                  # bytes, measured on each rank

Each rank is a fresh ``python -m memprop.sharded.spawn`` process (rank, world size and
a free local port on its command line; the jobs and results as pickle files in a
temporary folder), which joins ``init_process_group("gloo")``, builds the job's CPU mesh
(memprop.sharded.mesh) and runs ``rank_step`` for each job (NOTE [ One rank, two passes ],
memprop.sharded.step): several jobs share one start-up. Torch runs one thread per
rank, so N ranks do not fight over the cores. A rank that fails fails the run with its
own error text, and the others are killed at once; a rank whose starting process is
gone (a sweep killed by SIGKILL) ends itself within half a second.
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

PARENT_ENV = "MEMPROP_RANKS_PARENT"   # the pid each rank outlives by at most half a second


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
               "OMP_NUM_THREADS": "1", PARENT_ENV: str(os.getpid())}
        logs = [open(Path(tmp) / f"rank{r}.log", "wb") for r in range(n)]
        try:
            procs = [subprocess.Popen([sys.executable, "-m", "memprop.sharded.spawn",
                                       "--rank", str(r), "--world-size", str(n),
                                       "--jobs", str(jobs_file), "--out", f"{tmp}/rank{r}.pkl"],
                                      env=env, stdout=logs[r], stderr=subprocess.STDOUT)
                     for r in range(n)]
            ended: list[int] = []          # ranks in the order they were seen to end
            timed_out = _wait(procs, timeout_s, ended)
        finally:
            for f in logs:
                f.close()
        outputs = [(Path(tmp) / f"rank{r}.log").read_bytes().decode(errors="replace")
                   for r in range(n)]
        if timed_out:
            raise RankRunError(f"memprop.sharded: the {n} ranks did not end within "
                               f"{timeout_s:g} s and were killed; rank 0 said:\n"
                               f"{outputs[0][-2000:]}")
        # the rank that failed first, not one whose collective then lost its peer, in
        # full; the others' last lines after it
        order = sorted(range(n), key=lambda r: (procs[r].returncode in (0, -9, None),
                                                "by peer" in outputs[r],
                                                ended.index(r) if r in ended else n))
        failed = [r for r in order if procs[r].returncode != 0
                  or not (Path(tmp) / f"rank{r}.pkl").exists()]
        if failed:
            first, *rest = failed
            raise RankRunError(
                f"memprop.sharded: rank {first} of {n} failed (exit {procs[first].returncode}):"
                f"\n{outputs[first][-4000:]}" + "".join(
                    f"\n-- rank {r} also failed (exit {procs[r].returncode}), ending:\n"
                    f"{outputs[r][-800:]}" for r in rest))
        per_rank = [pickle.loads((Path(tmp) / f"rank{r}.pkl").read_bytes()) for r in range(n)]
    return per_rank


def _wait(procs: list, timeout_s: float, ended: list[int]) -> bool:
    """Until every rank has ended; when one fails, or ``timeout_s`` passes, the others
    are killed (a rank whose peer died would wait in its collective for gloo's own
    timeout, 30 minutes). ``ended`` gets the ranks in the order they ended. True when
    the time ran out."""
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            ended += [r for r, p in enumerate(procs) if p.returncode is not None
                      and r not in ended]
            if any(p.returncode not in (None, 0) for p in procs):
                return False
            if time.monotonic() > deadline:
                return True
            time.sleep(0.05)
        return False
    finally:                    # also on KeyboardInterrupt: no rank outlives the run
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()


def _exit_with_parent(parent: int) -> None:
    """A daemon thread ending this rank when the process that started it is gone (a
    sweep killed by SIGKILL cannot kill its ranks; they would wait in gloo for 30
    minutes). Polls: portable, and unlike ``PR_SET_PDEATHSIG`` not tied to the thread
    that spawned the rank."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)
    threading.Thread(target=watch, daemon=True, name="memprop-parent-watch").start()


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
    if os.environ.get(PARENT_ENV, "").isdigit():
        _exit_with_parent(int(os.environ[PARENT_ENV]))
    try:
        _run_rank(args.rank, args.world_size, args.jobs, args.out)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    # the results are written; leave without the interpreter's finalisation, where a
    # thread the process group left behind can abort the rank ("terminate called
    # without an active exception", exit -6, seen once in a 2-rank tensor-parallel run)
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
