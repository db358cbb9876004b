"""Activation checkpointing utilities: strategies to import, and a budget planner.

    from memprop.checkpoint import apply_strategy, remove_strategy, plan
    apply_strategy(model, "sqrt")                     # or Sqrt().apply(model)
    apply_strategy(model, "full", blocks="LlamaDecoderLayer")   # blocks by class
    p = plan(model, batch, budget="1.5GiB"); p.apply(model)
    verify_replay(model, batch)    # one real step: every replayed tensor checked bitwise

A checkpointed model stays an ordinary module: it deep-copies, pickles, compiles and
wraps in DDP (NOTE [ A strategy travels with the model ], memprop.checkpoint.patch).
"""

from memprop.checkpoint.chain import CheckpointedChain, find_blocks, find_chains
from memprop.checkpoint.multilevel import Nested
from memprop.checkpoint.oplevel import Ops
from memprop.checkpoint.planner import Budget, Plan, plan
from memprop.checkpoint.remat import Remat
from memprop.checkpoint.strategies import (
    STRATEGY_FORMS,
    Blocks,
    EveryK,
    Full,
    NoCheckpoint,
    Offload,
    Segments,
    Selective,
    Sqrt,
    Strategy,
    applied_strategy,
    apply_strategy,
    parse_strategy,
    remove_strategy,
)
from memprop.checkpoint.verify import verify_replay
from memprop.checkpoint.whole import Forward

__all__ = ["Strategy", "NoCheckpoint", "Full", "EveryK", "Segments", "Sqrt", "Blocks",
           "Selective", "Offload", "Budget", "Nested", "Ops", "Forward", "Remat",
           "parse_strategy",
           "apply_strategy", "remove_strategy", "applied_strategy", "find_blocks",
           "find_chains", "CheckpointedChain", "STRATEGY_FORMS", "plan", "Plan",
           "verify_replay"]
