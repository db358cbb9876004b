"""Activation checkpointing utilities: strategies to import, and a budget planner.

    from memprop.checkpoint import apply_strategy, remove_strategy, plan
    apply_strategy(model, "sqrt")                     # or Sqrt().apply(model)
    apply_strategy(model, "full", blocks="LlamaDecoderLayer")   # blocks by class
    p = plan(model, batch, budget="1.5GiB"); p.apply(model)
    verify_replay(model, batch)    # one real step: every replayed tensor checked bitwise

A checkpointed model stays an ordinary module: it deep-copies, pickles, compiles and
wraps in DDP (NOTE [ A strategy travels with the model ], memprop.checkpoint.forms.patch).

The package has two rooms; mechanisms never import planning.

  forms/      how a strategy changes a model (what a user applies)
    strategies  the base ``Strategy``, the registry of string forms, the block-level
                forms (none, full, every:K, segments:N, sqrt, blocks:, selective, offload)
    patch       ``PatchedForward``: the one way a form replaces a forward (picklable)
    blocks      finding the chain of blocks;  chain  one checkpoint per segment
    opkeys      the op-key grammar (``addmm#0-11+sdpa``) every op-level form shares
    oplevel ``ops:``, whole ``forward:``, remat ``remat:``, multilevel ``nested:``,
    selective, tail (a segment's held output), cache (KV caches), verify (replays)
  planning/   what to choose (``plan``)
    profile     what the planner knows of a model: per-block bytes and FLOPs, op calls
    simulate    one simulated step of a strategy on fake tensors (every check uses it)
    fronts      Pareto fronts;  dp  single-level placements;  rotor  multi-level and
                stored-bytes DPs;  searches  the searches beyond one level and the peak
    levers      what else lowers the peak;  planner  ``plan``, ``Plan``, ``budget:SIZE``

A new strategy: a frozen dataclass subclassing ``Strategy`` in its own module under
forms/, with ``syntax = "name:ARG"`` and a ``parse(arg)`` classmethod (it registers
itself), and ``apply`` built on ``CheckpointedChain`` or a ``PatchedForward``; import it
below. A new planner search: a function in planning/searches.py taking the profile
(``ChainCosts``, op calls) and a budget and returning candidate strategies; ``plan``
checks each with ``simulate`` and keeps the cheapest that fits.
"""

from memprop.checkpoint.forms.chain import CheckpointedChain, find_blocks, find_chains
from memprop.checkpoint.forms.multilevel import Nested
from memprop.checkpoint.forms.oplevel import Ops
from memprop.checkpoint.forms.remat import Remat
from memprop.checkpoint.forms.strategies import (
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
    strategy_forms,
)
from memprop.checkpoint.forms.verify import verify_replay
from memprop.checkpoint.forms.whole import Forward
from memprop.checkpoint.planning.planner import Budget, Plan, plan

# every string form, in the order the forms are defined (NOTE [ The registry of string
# forms ], memprop.checkpoint.forms.strategies)
STRATEGY_FORMS = strategy_forms()

__all__ = ["Strategy", "NoCheckpoint", "Full", "EveryK", "Segments", "Sqrt", "Blocks",
           "Selective", "Offload", "Budget", "Nested", "Ops", "Forward", "Remat",
           "parse_strategy", "strategy_forms",
           "apply_strategy", "remove_strategy", "applied_strategy", "find_blocks",
           "find_chains", "CheckpointedChain", "STRATEGY_FORMS", "plan", "Plan",
           "verify_replay"]
