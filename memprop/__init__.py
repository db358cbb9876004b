"""memprop: where training memory goes, and what activation checkpointing buys.

The public surface is listed in ``__all__``; everything else is private.
"""

from memprop._version import __version__
from memprop.errors import BudgetError, ConfigError, MemPropError, StrategyError
from memprop.models import MODELS, model_config, training_loss
from memprop.saved import SavedRecord, SavedTensorRecorder
from memprop.units import format_bytes, parse_size

__all__ = [
    "__version__",
    # models
    "MODELS", "model_config", "training_loss",
    # measurement
    "SavedTensorRecorder", "SavedRecord",
    # units and errors
    "parse_size", "format_bytes",
    "MemPropError", "ConfigError", "StrategyError", "BudgetError",
]
