"""memprop: where training memory goes, and what activation checkpointing buys.

The public surface is listed in ``__all__``; everything else is private.
"""

from memprop._version import __version__
from memprop.checkpoint import apply_strategy, parse_strategy, remove_strategy
from memprop.checkpoint.planner import Plan, plan
from memprop.errors import BudgetError, ConfigError, MemPropError, StrategyError
from memprop.estimate import estimate
from memprop.measure import Measurement, measure_step
from memprop.workload import measure
from memprop.models import MODELS, model_config, training_loss
from memprop.predict import predict_saved_bytes
from memprop.saved import SavedRecord, SavedTensorRecorder
from memprop.sweep import load_results, load_spec, run_sweep
from memprop.track import TrainingLoopTracker, track
from memprop.tracker import CATEGORIES, PHASES, LiveMemoryTracker
from memprop.units import format_bytes, parse_size

__all__ = [
    "__version__",
    # models
    "MODELS", "model_config", "training_loss",
    # measurement
    "SavedTensorRecorder", "SavedRecord", "LiveMemoryTracker", "CATEGORIES", "PHASES",
    "measure_step", "measure", "Measurement", "track", "TrainingLoopTracker",
    # prediction
    "estimate", "predict_saved_bytes",
    # checkpointing
    "apply_strategy", "remove_strategy", "parse_strategy", "plan", "Plan",
    # experiments
    "load_spec", "run_sweep", "load_results",
    # units and errors
    "parse_size", "format_bytes",
    "MemPropError", "ConfigError", "StrategyError", "BudgetError",
]
