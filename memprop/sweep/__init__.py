"""Experiment sweeps: specs, isolated trials, real out-of-memory budgets, a resumable
results store and the OOM frontier."""

from memprop.sweep.executor import Executor, LocalProcessExecutor
from memprop.sweep.ray_executor import RayExecutor, make_executor
from memprop.sweep.runner import SweepSummary, run_sweep
from memprop.sweep.spec import SpecError, SweepSpec, load_spec, parse_spec
from memprop.sweep.store import ResultsStore, default_db_path, load_results
from memprop.sweep.trial import Trial

__all__ = ["SpecError", "SweepSpec", "Trial", "load_spec", "parse_spec", "run_sweep",
           "SweepSummary", "Executor", "LocalProcessExecutor",
           "RayExecutor", "make_executor", "ResultsStore",
           "load_results", "default_db_path"]
