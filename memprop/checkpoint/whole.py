"""One checkpoint around the model's whole forward, decided op by op: what
torch.compile's min-cut partitioner does under ``activation_memory_budget``, in eager.

    apply_strategy(model, "forward:addmm#0-11+sdpa")    # keep these op outputs
    plan(model, batch, "40MiB", metric="stored")       # may choose this form

NOTE [ One checkpoint around the forward ]
  ``forward:KEYS`` runs the model's forward inside one non-reentrant checkpoint (RNG
  preserved, so dropout replays) whose selective policy keeps the outputs of the op calls
  KEYS names and recomputes every other op in backward. Op keys are those of NOTE [ Op
  keys ] (memprop.checkpoint.oplevel), with calls numbered over the whole forward:
  ``addmm#12`` is the forward's 13th addmm, ``addmm#0-11`` its first twelve, ``sdpa``
  every attention call. The forward then stores the model's inputs (the batch), the kept
  outputs, and what the loss saves outside the model, nothing else: block inputs, the
  residual stream, the embedding, norms and dropout masks are rebuilt in backward from
  the kept outputs by the pointwise ops that made them, as compile's partitioner rebuilds
  them. A recompute re-runs every op that is not kept, up to the last tensor backward
  needs (early stop, NOTE [ Early stop ] in memprop.checkpoint.rotor), so its FLOPs are
  those of the FLOP-carrying calls (matmuls, attention, convolutions) before that point
  that are not kept: for a budget of stored bytes, the cheapest KEYS solve a 0/1
  knapsack over those calls (``forward_front``, exact). The whole forward is recomputed
  in one burst when backward begins, as the partitioner's is, so the form serves
  ``plan(metric="stored")``; for the step's peak, segments recomputed one at a time do
  better (the planner's peak plans). Gradients are bitwise those of the plain step on
  CPU, as for every checkpoint memprop applies.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import defaultdict

import numpy as np
from torch import nn

from memprop.checkpoint.chain import CheckpointedChain
from memprop.checkpoint.dp import _front
from memprop.checkpoint.oplevel import OpCall, _parse_keys, op_context_fn, split_key
from memprop.checkpoint.patch import Applied
from memprop.checkpoint.strategies import Strategy, refuse_applied, register_form

__all__ = ["Forward", "forward_front", "compress_keys"]


def compress_keys(keys) -> str:
    """``+``-joined op keys, runs of call indices as ranges: addmm#0-11+mm#3+sdpa."""
    every: set[str] = set()
    calls: defaultdict[str, list[int]] = defaultdict(list)
    for key in keys:
        name, first, last = split_key(key)
        if first is None or last is None:      # a bare name: both None (every call)
            every.add(name)
        else:
            calls[name].extend(range(first, last + 1))
    out = sorted(every)
    for name in sorted(calls):
        if name in every:
            continue
        indices = sorted(set(calls[name]))
        for _, group in itertools.groupby(enumerate(indices), key=lambda iv: iv[1] - iv[0]):
            run = [i for _, i in group]
            out.append(f"{name}#{run[0]}" + (f"-{run[-1]}" if len(run) > 1 else ""))
    return "+".join(out)


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
        return cls(_parse_keys(text, text, cls.form) if text not in ("", "-") else frozenset())

    @property
    def spec(self) -> str:
        return f"{self.form}:" + (compress_keys(self.keys) or "-")


@dataclasses.dataclass(frozen=True)
class Forward(KeyedForward):
    """``forward:KEYS``: the model's forward in one checkpoint keeping the outputs of the
    op calls ``keys`` names (NOTE above); no keys: everything recomputed."""

    form = "forward"

    def apply(self, model: nn.Module, *, blocks_attr=None, blocks=None, check_fn=None,
              example_batch=None, loss_fn=None) -> nn.Module:
        refuse_applied(model)
        chain = CheckpointedChain([model], [(0, 0)],
                                  context_fn=op_context_fn(self.keys, "forward")).apply()
        return Applied.record(model, self, chain.patches)


register_form("forward", Forward.parse)


def forward_front(calls: list[OpCall], *, early: float = 0.0) -> list[tuple]:
    """(kept bytes, recompute FLOPs, keys) of the cheapest ``Forward`` keys for each
    amount of kept bytes, the Pareto front over every subset of the forward's
    FLOP-carrying calls before its last ``early`` FLOPs (NOTE above): a 0/1 knapsack,
    exact. Kept bytes exclude what the forward stores with no keys (the batch, the
    loss's tensors)."""
    total = sum(c.flops for c in calls)
    starts = itertools.accumulate((c.flops for c in calls), initial=0)
    needed = [c for c, start in zip(calls, starts) if c.flops > 0 and start < total - early]
    m = np.zeros(1, dtype=np.int64)
    cost = np.array([float(sum(c.flops for c in needed))])
    chosen = np.empty(1, dtype=object)
    chosen[0] = ()                       # keys as a cons list: (key, rest)
    for call in needed:
        if call.mutated:                 # cannot be cached (OpCall): always recomputed
            continue
        taken = np.empty(len(chosen), dtype=object)
        taken[:] = [(call.key, rest) for rest in chosen]
        m, cost, chosen = _front(np.concatenate([m, m + call.out_bytes]),
                                 np.concatenate([cost, cost - call.flops]),
                                 np.concatenate([chosen, taken]))
    out = []
    for bytes_, flops, cons in zip(m.tolist(), cost.tolist(), chosen):
        keys = []
        while cons:
            key, cons = cons
            keys.append(key)
        out.append((int(bytes_), float(flops), frozenset(keys)))
    return out
