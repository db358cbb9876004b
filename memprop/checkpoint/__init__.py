"""Activation checkpointing utilities: strategies to import, and a budget planner.

    from memprop.checkpoint import apply_strategy, remove_strategy, plan
    apply_strategy(model, "sqrt")                     # or Sqrt().apply(model)
    p = plan(model, batch, budget="1.5GiB"); p.apply(model)
"""

from memprop.checkpoint.chain import CheckpointedChain, find_blocks
from memprop.checkpoint.strategies import (
    STRATEGY_FORMS, Blocks, Budget, EveryK, Full, NoCheckpoint, Offload, Segments,
    Selective, Sqrt, Strategy, applied_strategy, apply_strategy, parse_strategy,
    remove_strategy)
from memprop.checkpoint.multilevel import Nested
from memprop.checkpoint.oplevel import Ops

__all__ = ["Strategy", "NoCheckpoint", "Full", "EveryK", "Segments", "Sqrt", "Blocks",
           "Selective", "Offload", "Budget", "parse_strategy", "apply_strategy",
           "remove_strategy", "applied_strategy", "find_blocks", "CheckpointedChain",
           "STRATEGY_FORMS", "Nested", "Ops"]
