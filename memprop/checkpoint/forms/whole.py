"""One checkpoint around the model's whole forward, decided op by op: what
torch.compile's min-cut partitioner does under ``activation_memory_budget``, in eager.

    apply_strategy(model, "forward:addmm#0-11+sdpa")    # keep these op outputs
    plan(model, batch, "40MiB", metric="stored")       # may choose this form

NOTE [ One checkpoint around the forward ]
  ``forward:KEYS`` runs the model's forward inside one non-reentrant checkpoint (RNG
  preserved, so dropout replays) whose selective policy keeps the outputs of the op calls
  KEYS names and recomputes every other op in backward. Op keys are those of NOTE [ Op
  keys ] (memprop.checkpoint.forms.oplevel), with calls numbered over the whole forward:
  ``addmm#12`` is the forward's 13th addmm, ``addmm#0-11`` its first twelve, ``sdpa``
  every attention call. The forward then stores the model's inputs (the batch), the kept
  outputs, and what the loss saves outside the model, nothing else: block inputs, the
  residual stream, the embedding, norms and dropout masks are rebuilt in backward from
  the kept outputs by the pointwise ops that made them, as compile's partitioner rebuilds
  them. A recompute re-runs every op that is not kept, up to the last tensor backward
  needs (early stop, NOTE [ Early stop ] in memprop.checkpoint.planning.rotor), so its FLOPs are
  those of the FLOP-carrying calls (matmuls, attention, convolutions) before that point
  that are not kept: for a budget of stored bytes, the cheapest KEYS solve a 0/1
  knapsack over those calls (``memprop.checkpoint.planning.fronts.forward_front``,
  exact). The whole forward is recomputed
  in one burst when backward begins, as the partitioner's is, so the form serves
  ``plan(metric="stored")``; for the step's peak, segments recomputed one at a time do
  better (the planner's peak plans). Gradients are bitwise those of the plain step on
  CPU, as for every checkpoint memprop applies.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from memprop.checkpoint.forms.chain import CheckpointedChain
from memprop.checkpoint.forms.opkeys import canonical_keys, parse_keys
from memprop.checkpoint.forms.oplevel import op_context_fn
from memprop.checkpoint.forms.patch import Applied
from memprop.checkpoint.forms.strategies import Strategy, refuse_applied

__all__ = ["Forward", "KeyedForward"]


@dataclasses.dataclass(frozen=True)
class KeyedForward(Strategy):
    """Base of the forms over the whole forward that keep the outputs of the op calls
    ``keys`` names, numbered over the forward (``FORM:KEYS``; ``FORM:-``: none kept)."""

    keys: frozenset = frozenset()
    form = ""                              # the string form's name (a class attribute)

    def __post_init__(self):
        object.__setattr__(self, "keys", frozenset(self.keys))

    @classmethod
    def parse(cls, text: str) -> "KeyedForward":
        return cls(parse_keys(text, text, cls.form) if text not in ("", "-") else frozenset())

    @property
    def spec(self) -> str:
        return f"{self.form}:" + ("+".join(canonical_keys(self.keys)) or "-")


@dataclasses.dataclass(frozen=True)
class Forward(KeyedForward):
    """``forward:KEYS``: the model's forward in one checkpoint keeping the outputs of the
    op calls ``keys`` names (NOTE above); no keys: everything recomputed."""

    form = "forward"
    syntax = "forward:OPS"

    def apply(self, model: nn.Module, *, blocks_attr=None, blocks=None, check_fn=None,
              example_batch=None, loss_fn=None) -> nn.Module:
        refuse_applied(model)
        chain = CheckpointedChain([model], [(0, 0)],
                                  context_fn=op_context_fn(self.keys, "forward")).apply()
        return Applied.record(model, self, chain.patches)
