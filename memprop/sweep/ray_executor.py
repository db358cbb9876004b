"""Trials as Ray tasks: a sweep on a cluster, with the local store, budgets and resume
unchanged (issue #12).

    run_sweep(spec, executor=RayExecutor("head-node:6379"))
    memprop sweep SPEC --executor ray --ray-address head-node:6379

NOTE [ A Ray trial means what a local trial means ]
  Each trial is one Ray task in a fresh worker process (``max_calls=1``), and that task
  runs the trial exactly as the local executor does: ``LocalProcessExecutor(1,
  start="subprocess")`` starts ``python -m memprop.sweep.worker`` as the task's child. So
  the memory budget (an address-space limit on that child, or the CUDA memory fraction),
  the timeout, the statuses ``ok`` / ``oom`` / ``error`` / ``crashed`` / ``timeout`` and
  the phase of an OOM are the local executor's own, not a copy of them. The task asks
  Ray for the trial's threads as ``num_cpus`` (default 1) and, for a CUDA trial,
  ``num_gpus=1``, so Ray never packs two trials onto one GPU nor more threads than a
  node has cores. The row comes home to the driver, which alone writes the SQLite store
  (``on_result`` as each task ends, via ``ray.wait``); it also says where it ran
  (``node_*`` fields: host, CPU, GPU, torch). A worker or node that dies mid-trial is
  retried ``retries`` times (the row's ``ray_attempts`` says how many tries it took) and
  then stored as ``crashed``: no trial is lost.

NOTE [ A sharded trial on Ray ]
  A real sharded trial of N ranks (a spec's ``[parallel]``, memprop.sweep.parallel) asks
  Ray for one placement group of N bundles of one CPU, ``STRICT_PACK``: all N on one
  node or none, so it never starts with part of its ranks, and no other task takes the
  CPUs its ranks run on. Its task runs in the first bundle and runs the trial as the
  local executor does; the worker starts the N gloo processes itself
  (``measure_jobs``, memprop.sharded.spawn), on the node's loopback. Ray could instead
  place N actors that join one gloo group, but then each rank would be measured inside
  a Ray worker (Ray's threads and imports beside the step), no longer the process a
  local trial measures. The group is removed when the task ends, however it ends. A
  predicted sharded trial is one ordinary task (one process, fake ranks).

Ray is an optional extra (``pip install 'memprop[ray]'``): it is imported when a
``RayExecutor`` is built, so memprop itself never needs it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import socket
import subprocess
import sys

import torch

from memprop.errors import ConfigError
from memprop.sweep.executor import Executor, LocalProcessExecutor, OnResult
from memprop.sweep.trial import Trial

__all__ = ["EXECUTORS", "RayExecutor", "make_executor"]

EXECUTORS = ("local", "ray")
# a cluster started for one sweep: no dashboard, a small object store (rows are KiB)
_LOCAL_CLUSTER = {"include_dashboard": False, "object_store_memory": 128 * 2**20}


def make_executor(name: str = "local", *, workers: int = 1,
                  ray_address: str | None = None) -> Executor:
    """The executor a spec's ``[run] executor`` or ``--executor`` names. ``workers`` is
    the local pool's size; on Ray the cluster's CPUs and GPUs decide what runs at once."""
    if name == "local":
        if ray_address:
            raise ConfigError(f"memprop.sweep: a Ray address ({ray_address}) was given but "
                              "the executor is local; add --executor ray (or executor = "
                              "\"ray\" in the spec's [run] table)")
        return LocalProcessExecutor(workers)
    if name == "ray":
        return RayExecutor(ray_address)
    raise ConfigError(f"memprop.sweep: unknown executor {name!r}; choose one of: "
                      f"{', '.join(EXECUTORS)}")


def _import_ray(*, local_cluster: bool):
    if local_cluster:
        # a cluster for one sweep on this machine listens on loopback only; Ray reads
        # this when it is first imported (ray_constants.ENABLE_RAY_CLUSTER)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError("memprop.sweep: the ray executor needs Ray, which is not "
                          "installed; pip install 'memprop[ray]', or use the local "
                          "executor") from None
    return ray


def _threads(trial: Trial) -> int:
    """The CPUs a trial's task asks Ray for, and its torch threads: the spec's
    ``threads``, else 1 (locally, 0 means the executor's share of one machine's cores;
    on a cluster the share is what Ray grants)."""
    return trial.threads or 1


def _uses_gpu(trial: Trial) -> bool:
    return trial.device.startswith("cuda")


def _ranks(trial: Trial) -> int:
    """The processes a trial runs at once beside its task: a real sharded trial's ranks
    (NOTE [ A sharded trial on Ray ]), else 0."""
    p = trial.parallel
    return p.world_size if p is not None and not p.predicted else 0


class RayExecutor:
    """Run each trial as a Ray task on a cluster (see NOTE at the top of the module).

    ``address``: the cluster (``host:port`` or ``ray://...``); default ``$RAY_ADDRESS``,
    else a local cluster on loopback, started at the first ``run`` and stopped by
    ``close()`` (or when the driver exits). A driver already connected (``ray.init``
    done) keeps its connection."""

    def __init__(self, address: str | None = None, *, retries: int = 1,
                 init_kwargs: dict | None = None):
        if retries < 0:
            raise ValueError(f"memprop.sweep: retries must be >= 0, got {retries}")
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.retries, self.init_kwargs = retries, dict(init_kwargs or {})
        self._ray = _import_ray(local_cluster=self.address is None)
        self._started = False          # True when close() must stop our local cluster

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False

    def _connect(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            return
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
        if self.address:
            ray.init(address=self.address, **{**quiet, **self.init_kwargs})
        else:
            ray.init(address="local", **{**quiet, **_LOCAL_CLUSTER, **self.init_kwargs})
            self._started = True

    def _check_resources(self, trials: list[Trial]) -> None:
        """Fail before any trial runs if no node could ever take one (Ray would wait)."""
        nodes = [n["Resources"] for n in self._ray.nodes() if n["Alive"]]
        where = self.address or "started for this sweep"
        cpus = max((r.get("CPU", 0) for r in nodes), default=0)
        gpus = max((r.get("GPU", 0) for r in nodes), default=0)
        threads = max(_threads(t) for t in trials)
        if threads > cpus:
            raise ConfigError(f"memprop.sweep: a trial asks Ray for {threads} CPUs (its "
                              f"threads) but the largest node of the cluster ({where}) has "
                              f"{cpus:g}; lower the threads or add a larger node")
        ranks = max(_ranks(t) for t in trials)
        if ranks > cpus:
            raise ConfigError(f"memprop.sweep: a sharded trial of {ranks} ranks asks Ray for "
                              f"{ranks} CPUs on one node but the largest node of the cluster "
                              f"({where}) has {cpus:g}; lower [parallel] world_size, add "
                              "estimate = true, or add a larger node")
        if any(_uses_gpu(t) for t in trials) and gpus < 1:
            raise ConfigError(f"memprop.sweep: trials on device 'cuda' need a GPU but no "
                              f"node of the Ray cluster ({where}) has one; start nodes with "
                              "`ray start ... --num-gpus N`, or set [run] device = \"cpu\"")

    def run(self, trials: list[Trial], on_result: OnResult) -> None:
        if not trials:
            return
        ray = self._ray
        self._connect()
        self._check_resources(trials)
        from ray.util import placement_group, remove_placement_group  # Ray: optional
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        task = ray.remote(max_calls=1, max_retries=0)(_ray_trial)   # a fresh worker each
        cwd = os.getcwd()
        path = [os.path.abspath(p) if p else cwd for p in sys.path]   # "" is the cwd
        in_flight = {}                 # ObjectRef -> (trial, why earlier tries died)
        groups = {}                    # ObjectRef -> its placement group (sharded trials)

        def submit(trial: Trial, died: list[str]) -> None:
            options: dict = {"num_cpus": _threads(trial), "num_gpus": int(_uses_gpu(trial))}
            group = None
            if _ranks(trial):          # NOTE [ A sharded trial on Ray ]
                group = placement_group([{"CPU": 1}] * _ranks(trial), strategy="STRICT_PACK")
                options = {"num_cpus": 1, "scheduling_strategy":
                           PlacementGroupSchedulingStrategy(group, 0)}
            ref = task.options(**options, name=f"memprop {trial.label()}"
                               ).remote(trial, path, cwd, len(died) + 1)
            in_flight[ref] = (trial, died)
            if group is not None:
                groups[ref] = group

        for trial in trials:
            submit(trial, [])
        try:
            while in_flight:
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                trial, died = in_flight.pop(ref)
                if ref in groups:
                    remove_placement_group(groups.pop(ref))
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:    # the task's own code raised
                    result = {"status": "crashed", "ray_attempts": len(died) + 1,
                              "error": f"the Ray task running the trial raised: {exc}"[:2000]}
                except ray.exceptions.RayError as exc:        # its worker or node died
                    died = died + [f"{type(exc).__name__}: {str(exc)[:1000]}"]
                    if len(died) <= self.retries:
                        submit(trial, died)
                        continue
                    result = {"status": "crashed", "ray_attempts": len(died), "error":
                              f"the Ray worker running the trial died on each of {len(died)} "
                              f"tries; last: {died[-1]}"}
                if died:
                    result["ray_retried_after"] = died
                on_result(trial, result)
        finally:
            for ref in in_flight:      # interrupted: a KeyboardInterrupt in each task,
                ray.cancel(ref)        # whose local executor then kills its trial
            for group in groups.values():
                remove_placement_group(group)


def _ray_trial(trial: Trial, driver_path: list[str], driver_cwd: str, attempt: int) -> dict:
    """Body of one Ray task, in a fresh worker on some node: the trial as the local
    executor runs it, plus where it ran."""
    import ray

    # user factories import as on the driver, where the same folders exist on this node
    sys.path[:0] = [p for p in driver_path if p not in sys.path and os.path.isdir(p)]
    if os.path.isdir(driver_cwd):
        os.chdir(driver_cwd)
    box: dict = {}
    local = dataclasses.replace(trial, threads=_threads(trial))   # the CPUs Ray granted
    LocalProcessExecutor(1, start="subprocess").run([local], lambda _, r: box.update(r))
    group = ray.get_runtime_context().get_placement_group_id()
    box.update(executor="ray", ray_attempts=attempt, node_host=socket.gethostname(),
               ray_placement_group=group,       # NOTE [ A sharded trial on Ray ], or None
               node_ip=ray.util.get_node_ip_address(),
               node_id=ray.get_runtime_context().get_node_id(),
               node_cpu_model=_cpu_model(), node_cpu_count=os.cpu_count(),
               node_gpu=_gpu_name([str(g) for g in ray.get_gpu_ids()]),
               node_torch_version=torch.__version__,
               node_python_version=platform.python_version())
    return box


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name(gpu_ids: list[str]) -> str:
    """The GPU Ray gave this task, named by nvidia-smi: the task itself must not create
    a CUDA context on the GPU its trial is about to measure."""
    if not gpu_ids:
        return "none"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader", "-i", ",".join(gpu_ids)],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().replace("\n", "; ") or f"GPU {','.join(gpu_ids)}"
    except (OSError, subprocess.SubprocessError):
        return f"GPU {','.join(gpu_ids)} (nvidia-smi unavailable)"
