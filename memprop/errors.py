"""The exceptions memprop raises for users.

Every message names the subsystem, the bad value, what is allowed and, where there is
one, the fix, as torch.utils.checkpoint's messages do. ``assert`` is kept for internal invariants.
"""

__all__ = ["MemPropError", "ConfigError", "StrategyError", "BudgetError"]


class MemPropError(Exception):
    """Base class of every error memprop raises on purpose."""


class ConfigError(MemPropError, ValueError):
    """A model, trial or spec configuration holds a value that is not allowed."""


class StrategyError(MemPropError, ValueError):
    """A checkpointing strategy string or object cannot be parsed or applied."""


class BudgetError(MemPropError):
    """No checkpointing plan fits the requested memory budget."""

    def __init__(self, message: str, *, smallest_feasible_bytes: int | None = None):
        super().__init__(message)
        self.smallest_feasible_bytes = smallest_feasible_bytes
