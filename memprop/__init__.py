"""memprop: where training memory goes, and what activation checkpointing buys.

The public surface is listed in ``__all__``; everything else is private.
"""

import importlib
import sys
import types

from memprop._version import __version__

# name -> module that defines it. Imported on first use (PEP 562), so that `import
# memprop.cli` and `memprop --help` do not load torch; `from memprop import measure`
# and `memprop.measure(...)` work as before.
_PUBLIC = {name: module for module, names in {
    "memprop.checkpoint": ["apply_strategy", "parse_strategy", "remove_strategy"],
    "memprop.checkpoint.planning.planner": ["Plan", "plan"],
    "memprop.errors": ["BudgetError", "ConfigError", "MemPropError", "StrategyError"],
    "memprop.estimate": ["estimate"],
    "memprop.measure": ["Measurement", "measure_step"],
    "memprop.models.user": ["Criterion"],
    "memprop.workload": ["measure"],
    "memprop.models": ["MODELS", "model_config", "training_loss"],
    "memprop.predict": ["predict_saved_bytes"],
    "memprop.saved": ["SavedRecord", "SavedTensorRecorder"],
    "memprop.sharded": ["FSDPConfig", "ShardedMeasurement", "measure_ranks"],
    "memprop.sweep": ["load_results", "load_spec", "run_sweep"],
    "memprop.tracker": ["CATEGORIES", "PHASES", "LiveMemoryTracker"],
    "memprop.training_loop": ["track", "TrainingLoopTracker"],
    "memprop.units": ["format_bytes", "parse_size"],
}.items() for name in names}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):         # a subpackage: `import memprop; memprop.sweep`
        try:
            return importlib.import_module(f"memprop.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"memprop.{name}":
                raise
    raise AttributeError(f"module 'memprop' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """``memprop.measure`` and ``memprop.estimate`` name the functions, as they did when
    this file imported them eagerly, even after the submodules of the same names are
    imported (the import system would otherwise bind the submodule to the name)."""

    def __setattr__(self, name, value):
        if name in ("measure", "estimate") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "__version__",
    # models
    "MODELS", "model_config", "training_loss",
    # measurement
    "SavedTensorRecorder", "SavedRecord", "LiveMemoryTracker", "CATEGORIES", "PHASES",
    "measure_step", "measure", "Measurement", "track", "TrainingLoopTracker", "Criterion",
    # prediction
    "estimate", "predict_saved_bytes",
    # sharded training (FSDP2): memprop.sharded.predict predicts every rank
    "FSDPConfig", "ShardedMeasurement", "measure_ranks",
    # checkpointing
    "apply_strategy", "remove_strategy", "parse_strategy", "plan", "Plan",
    # experiments
    "load_spec", "run_sweep", "load_results",
    # units and errors
    "parse_size", "format_bytes",
    "MemPropError", "ConfigError", "StrategyError", "BudgetError",
]
