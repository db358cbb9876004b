"""A sharded trial (a point of a spec's ``[parallel]`` table) in the worker's process:
every rank's figures as one result row (memprop.sharded.row).

A predicted trial runs every rank's step on a fake process group here, in the worker
(``predict_job``). A real trial starts ``world_size`` gloo processes from here
(``measure_jobs``, memprop.sharded.spawn), one thread each, and waits for them; with
``[run] estimate`` it also predicts the same ranks first (``predicted_*`` fields), as a
single-device trial does. The worker's own threads are idle meanwhile.

NOTE [ A sharded trial's ranks and its timeout ]
  The ranks are children of the worker, in its process group: the local executor
  kills a trial's whole group (``_Child.kill``, memprop.sweep.executor), so a trial past
  its timeout, or stopped by Ctrl-C, takes its ranks with it (without that, both ranks
  of a 2-rank trial killed at 5 s ran on to the end of their step). The worker also
  gives the ranks nine tenths of the trial's timeout itself (``measure_jobs`` kills them
  past it and the row is an ``error``). A sweep killed with SIGKILL takes its workers
  (NOTE [ No trial outlives its sweep ]) but not their ranks, which end with their step.
"""

from __future__ import annotations

import os
import sys

import pandas as pd

from memprop.dtypes import parse_dtype
from memprop.sharded import RankJob, measure_jobs, predict_job
from memprop.sharded.row import sharded_row
from memprop.sweep.trial import Trial

__all__ = ["run_sharded"]

RANKS_TIMEOUT_SHARE = 0.9   # of the trial's timeout (NOTE [ A sharded trial's ranks ...])


def run_sharded(trial: Trial, config) -> tuple[dict, pd.DataFrame | None]:
    """(result fields, the largest rank's timeline) of sharded ``trial``."""
    assert trial.parallel is not None, "run_sharded takes a [parallel] trial"
    job = RankJob(config=config, batch_size=trial.batch, fsdp=trial.parallel.fsdp(),
                  optimizer=trial.optimizer, strategy=trial.strategy,
                  dtype=parse_dtype(trial.dtype), seed=trial.seed)
    if trial.parallel.predicted:
        s = predict_job(job)
        return sharded_row(s), s.rank(s.largest_rank).timeline
    row: dict = {}
    if trial.estimate:
        p = predict_job(job)
        row.update(predicted_peak_bytes=p.peak_bytes, predicted_rank_peak_bytes=p.rank_peak_bytes,
                   predicted_saved_bytes=p.rank(p.largest_rank).saved_bytes)
    # the ranks import the model (a user factory too) as this worker does
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    s = measure_jobs([job], timeout_s=RANKS_TIMEOUT_SHARE * trial.timeout_s)[0]
    return {**sharded_row(s), **row}, s.rank(s.largest_rank).timeline
