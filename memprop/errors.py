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
    """No checkpointing plan fits the requested memory budget. The planner's error says
    the smallest feasible budget it found (``smallest_feasible_bytes``, bytes) and
    carries the plan that reaches it (``plan``, a ``memprop.checkpoint.Plan`` for that
    budget, the strategy the message names; its replay checked as a returned plan's is,
    else None), not priced in seconds (``predicted_step_ms`` None) nor given levers.
    Planning at the figure searches again and may find a faster plan; ``plan`` saves
    that search where a plan that fits is enough."""

    def __init__(self, message: str, *, smallest_feasible_bytes: int | None = None,
                 plan=None):
        super().__init__(message)
        self.smallest_feasible_bytes = smallest_feasible_bytes
        self.plan = plan
