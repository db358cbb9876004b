"""Op-level checkpointing: inside each checkpointed block, which op outputs are kept and
which are recomputed, as torch's selective checkpointing and compile's partitioner
decide per op.

    apply_strategy(model, "ops:addmm+sdpa")               # every block: keep these
    apply_strategy(model, "ops:0-3=addmm#0+sdpa,4-5")     # blocks 0..3 each with a policy
    Ops.parse("0-3=addmm#0+sdpa,4-5").apply(model)        # 4-5: one plain segment

NOTE [ Op keys ]
  An op key names calls of one aten op (its overload packet, e.g. ``addmm``,
  ``_scaled_dot_product_flash_attention_for_cpu``; ``sdpa`` is short for every
  scaled-dot-product attention kernel) inside one block's forward: ``addmm`` matches
  every call, ``addmm#2`` the third. A block checkpointed with keys K runs in one
  non-reentrant checkpoint (RNG preserved) whose selective-checkpoint policy
  (``torch.utils.checkpoint.create_selective_checkpoint_contexts``) is MUST_SAVE for the
  outputs of ops matching K and PREFER_RECOMPUTE for every other op: what backward needs
  from the kept ops comes from the cache, the rest is recomputed. Those cached outputs
  are reported to memprop's instruments as stored (``memprop.saved.report_stored``), as
  for ``selective``. Gradients are bitwise those of the plain step on CPU.

NOTE [ Compact op-level specs ]
  A plan keeps per block a set of op keys; a 7B chain writes the same set for dozens of
  blocks. The spec is written short, and ``Ops`` holds it in that form, so that each
  spelling of one strategy parses to one value (``==``, round trip): an op's calls in
  runs of indices become ranges (``mm#0+mm#1+mm#2`` -> ``mm#0-2``; a bare name covers
  them all), and consecutive blocks with the same keys one range of blocks
  (``0=mm#0-4,1=mm#0-4`` -> ``0-1=mm#0-4``). A keyed range checkpoints each of its
  blocks apart with that policy, so merging it changes nothing; a plain range
  (``4-5``, no keys) is one segment, and plain ranges are never merged. The long forms
  still parse.

NOTE [ Op-level options of a block ]
  From one traced forward (``trace_blocks``: every op of every block, its output bytes
  and FLOPs), a block checkpointed with keys K stores its input, plus the outputs of the
  ops in K, and recomputes the FLOPs of the other ops (``block_options``). The options
  are every subset of the block's FLOP-carrying calls (matmuls, attention,
  convolutions) up to ``max_calls`` of them; cheap pointwise ops are always recomputed.
  The planner's stored-bytes DP (``memprop.checkpoint.rotor.stored_fronts``) weighs
  them against storing the block and against plain segments; each plan is then checked
  by simulating the step.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import re
from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from memprop.checkpoint.chain import CheckpointedChain, find_blocks
from memprop.checkpoint.multilevel import claim_blocks, fake_target
from memprop.checkpoint.patch import Applied
from memprop.checkpoint.selective import SAVED_OPS, _Both, draws_random
from memprop.checkpoint.strategies import Strategy, register_form
from memprop.errors import StrategyError
from memprop.flops import FlopCounter
from memprop.models import training_loss
from memprop.saved import report_stored

__all__ = ["Ops", "trace_blocks", "block_options", "OpCall", "canonical_keys"]

_SDPA = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
_KEY = re.compile(r"[a-z_][a-z0-9_]*(#\d+(-\d+)?)?")


def _name(func) -> str:
    name = func.overloadpacket.__name__
    return "sdpa" if name in _SDPA else name


def split_key(key: str) -> tuple[str, int | None, int | None]:
    """(op name, first call, last call) of an op key (NOTE [ Op keys ]); a bare name
    (every call): (name, None, None)."""
    name, _, calls = key.partition("#")
    if not calls:
        return name, None, None
    first, _, last = calls.partition("-")
    return name, int(first), int(last or first)


class _Matcher:
    """Counts op calls of one run; ``kept(func)`` says whether this call's output is
    kept (NOTE [ Op keys ])."""

    def __init__(self, keys: frozenset):
        self.seen: Counter[str] = Counter()     # name -> calls made so far
        self.every: set = set()                 # names: every call kept
        self.ranges: dict = {}                  # name -> [(first, last), ...] call indices
        for key in keys:
            name, first, last = split_key(key)
            if first is None or last is None:   # both or neither (split_key)
                self.every.add(name)
            else:
                self.ranges.setdefault(name, []).append((first, last))

    def kept(self, func) -> bool:
        name = _name(func)
        index = self.seen[name]
        self.seen[name] += 1
        return name in self.every or any(a <= index <= b for a, b in self.ranges.get(name, ()))

    def unmatched(self, names_too: bool) -> list[str]:
        """Keys naming calls this run did not make: a call index past the op's count,
        and (``names_too``) an op name never called."""
        out = [f"{name}#{a}" + (f"-{b}" if b != a else "")
               for name, spans in self.ranges.items() for a, b in spans if b >= self.seen[name]]
        if names_too:
            out += [name for name in self.every if not self.seen[name]]
        return sorted(out)


# op names of the matmul, convolution and attention kernels (as keys name them)
_HEAVY = {"sdpa" if op.__name__ in _SDPA else op.__name__ for op in SAVED_OPS}


def refuse_unmatched(matcher: _Matcher, where: str = "block") -> None:
    """A ``StrategyError`` for keys that named calls the run did not make (never keep
    less than asked, silently): in a block's run, call indices (an op name may be absent
    from a block); in the whole forward's run (``where="forward"``), op names as well."""
    missing = matcher.unmatched(names_too=where == "forward")
    if missing:
        calls = ", ".join(f"{name}#0-{n - 1}" if n > 1 else f"{name}#0"
                          for name, n in sorted(matcher.seen.items())
                          if name in _HEAVY) or "none"
        raise StrategyError(
            f"memprop.checkpoint: op key(s) {missing} name calls "
            f"{'the model' if where == 'forward' else 'a block'}'s forward does "
            f"not make, so nothing would be kept for them; its matmul, convolution and "
            f"attention calls: {calls}")


class _Report(TorchDispatchMode):
    """Reports kept outputs as stored for backward (the forward pass only); on leaving,
    refuses keys that named calls the run did not make (``refuse_unmatched``)."""

    def __init__(self, matcher: _Matcher, where: str = "block"):
        super().__init__()
        self.matcher, self.where = matcher, where

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if exc[0] is None:
            refuse_unmatched(self.matcher, self.where)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.matcher.kept(func) and not draws_random(func, args, kwargs):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    report_stored(t, f"ops:{_name(func)}")
        return out


def op_context(keys: frozenset, where: str = "block"):
    """The (forward, recompute) contexts of a checkpoint keeping the outputs of the calls
    ``keys`` names (numbered within each ``where``: a block, or the forward)."""
    runs = {False: _Matcher(keys), True: _Matcher(keys)}   # forward, recompute

    def policy(ctx, op, *args, **kwargs):
        if runs[ctx.is_recompute].kept(op) and not draws_random(op, args, kwargs):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(policy)
    return _Both(forward_ctx, _Report(_Matcher(keys), where)), recompute_ctx


def op_context_fn(keys, where: str = "block") -> functools.partial:
    """``context_fn`` for ``checkpoint``: ``op_context`` over ``keys``. A partial of a
    module-level function, not a closure: it pickles and deep-copies with the patch that
    holds it (NOTE [ A strategy travels with the model ], memprop.checkpoint.patch), and
    torch.compile traces it (dynamo takes a function or a partial as ``context_fn``)."""
    return functools.partial(op_context, frozenset(keys), where)


def canonical_keys(keys) -> tuple[str, ...]:
    """The shortest keys that name the same calls, in spec order (NOTE [ Compact op-level
    specs ]): bare names first, then each op's runs of call indices as ranges
    (``mm#0+mm#1+mm#2`` -> ``mm#0-2``); a bare name covers its op's ranges."""
    every: set[str] = set()
    calls: dict[str, set[int]] = {}
    for key in keys:
        name, first, last = split_key(key)
        if first is None or last is None:       # both or neither (split_key)
            every.add(name)
        else:
            calls.setdefault(name, set()).update(range(first, last + 1))
    out = sorted(every)
    for name in sorted(set(calls) - every):
        indices = sorted(calls[name])
        for _, group in itertools.groupby(enumerate(indices), key=lambda iv: iv[1] - iv[0]):
            run = [i for _, i in group]
            out.append(f"{name}#{run[0]}" + (f"-{run[-1]}" if len(run) > 1 else ""))
    return tuple(out)


def _reversed(key: str) -> bool:
    """A call range i-j with j < i (it would match nothing)."""
    _, first, last = split_key(key)
    return first is not None and last is not None and last < first


def _parse_keys(text: str, spec: str, form: str = "ops") -> frozenset:
    keys = frozenset(k for k in text.split("+") if k)
    bad = sorted(k for k in keys if not _KEY.fullmatch(k))
    where = "block" if form == "ops" else "forward"
    backwards = sorted(k for k in keys if k not in bad and _reversed(k))
    if backwards:
        raise StrategyError(f"memprop.checkpoint: {form}:{spec} has call range(s) "
                            f"{backwards} that run backwards and match nothing; write the "
                            "first call first (addmm#2-9)")
    if bad:
        raise StrategyError(f"memprop.checkpoint: {form}:{spec} has bad op key(s) {bad}; an "
                            f"op key is an aten op name, optionally #i for its i-th call in "
                            f"the {where}, or #i-j for calls i..j (addmm, addmm#0, sdpa, "
                            "mm#2-5)")
    unknown = sorted({split_key(k)[0] for k in keys} - {"sdpa"}
                     - {n for n in {split_key(k)[0] for k in keys} if hasattr(torch.ops.aten, n)})
    if unknown:          # a typo would keep nothing, silently, in every block
        close = difflib.get_close_matches(unknown[0], sorted(_HEAVY), n=1)
        raise StrategyError(f"memprop.checkpoint: {form}:{spec} names {unknown}, no aten op; "
                            "an op key names an aten op as the model calls it (addmm, mm, "
                            "bmm, convolution, sdpa, ...)"
                            + (f"; did you mean {close[0]!r}?" if close else ""))
    return keys


@dataclasses.dataclass(frozen=True)
class Ops(Strategy):
    """Segments ``(first, last, keys)``: ``keys`` empty = a plain checkpointed segment;
    else each block of the range checkpointed with that op-level policy. ``every``:
    keys applied to every block (the form ``ops:addmm+sdpa``)."""

    parts: tuple = ()
    every: frozenset | None = None

    def __post_init__(self):
        # NOTE [ Compact op-level specs ]: keys in their shortest form, and keyed blocks
        # in runs, so that every spelling of one strategy is one value
        parts = tuple((int(a), int(b), frozenset(canonical_keys(k))) for a, b, k in self.parts)
        if self.every is not None:
            object.__setattr__(self, "every", frozenset(canonical_keys(self.every)))
        ends = [i for a, b, _ in parts for i in (a, b)]
        if any(a > b for a, b, _ in parts) or ends != sorted(ends) or len(set(ends)) != len(
                ends) - sum(a == b for a, b, _ in parts):
            object.__setattr__(self, "parts", parts)
            raise StrategyError(f"memprop.checkpoint: {self.spec} needs ordered, disjoint "
                                "ranges, e.g. ops:0-3=addmm+sdpa,4-5")
        runs: list = []
        for a, b, keys in parts:
            if runs and keys and runs[-1][2] == keys and runs[-1][1] + 1 == a:
                runs[-1] = (runs[-1][0], b, keys)    # the next block, the same policy
            else:
                runs.append((a, b, keys))
        object.__setattr__(self, "parts", tuple(runs))

    @classmethod
    def parse(cls, text: str) -> "Ops":
        if re.fullmatch(r"[a-z_][a-z0-9_#+-]*", text):
            return cls(every=_parse_keys(text, text))
        parts = []
        for part in text.split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?(?:=([a-z0-9_#+-]+))?", part)
            if not m:
                raise StrategyError(
                    f"memprop.checkpoint: bad op-level strategy ops:{text} at {part!r}; write "
                    "ops:KEYS (every block) or ops:RANGE[=KEYS],... e.g. ops:addmm+sdpa, "
                    "ops:0-3=addmm#0+sdpa,4-5")
            a = int(m.group(1))
            parts.append((a, int(m.group(2) or a), _parse_keys(m.group(3) or "", text)))
        return cls(tuple(parts))

    @property
    def spec(self) -> str:
        """The compact form (NOTE [ Compact op-level specs ]): ``ops:0-22=mm#0-4,23``."""
        if self.every is not None:
            return "ops:" + "+".join(canonical_keys(self.every))
        out = []
        for a, b, keys in self.parts:
            text = str(a) if a == b else f"{a}-{b}"
            out.append(text + ("=" + "+".join(canonical_keys(keys)) if keys else ""))
        return "ops:" + ",".join(out)

    def segments(self, n):
        """The checkpointed segments: a plain range is one, a keyed range one per block."""
        if self.every is not None:
            return [(k, k) for k in range(n)]
        return [seg for a, b, keys in self.parts
                for seg in ([(k, k) for k in range(a, b + 1)] if keys else [(a, b)])]

    def groups(self, n: int) -> dict:
        """keys -> segments checkpointed with them (empty keys: plain segments)."""
        if self.every is not None:
            return {self.every: [(k, k) for k in range(n)]}
        out: dict = {}
        for a, b, keys in self.parts:
            if b >= n:
                raise StrategyError(f"memprop.checkpoint: {self.spec} names block {b} but "
                                    f"the chain has blocks 0..{n - 1}")
            out.setdefault(keys, []).extend([(a, b)] if not keys else
                                             [(k, k) for k in range(a, b + 1)])
        return out

    def apply(self, model: nn.Module, *, blocks_attr: str | None = None,
              example_batch=None, **select) -> nn.Module:
        blocks = claim_blocks(model, blocks_attr, select)
        patches = [patch for keys, segs in self.groups(len(blocks)).items()
                   for patch in CheckpointedChain(blocks, segs, context_fn=op_context_fn(keys)
                                                  if keys else None).apply().patches]
        return Applied.record(model, self, patches)


register_form("ops", Ops.parse)


# -- what each block's ops cost: one traced forward -----------------------------------

@dataclasses.dataclass(frozen=True)
class OpCall:
    key: str              # name#i within its block
    out_bytes: int        # bytes of output storages not seen before in the block
    flops: int
    # an output is changed in place later in the step (a selective-checkpoint cache
    # refuses it: torch raises in backward), or the call draws random numbers (keeping it
    # would shift every later draw of the recompute: selective.draws_random): never
    # offered as kept
    mutated: bool = False


class _Trace(TorchDispatchMode):
    def __init__(self, counter: FlopCounter):
        super().__init__()
        self.counter = counter
        self.block: int | None = None           # the block whose forward runs, if any
        # block -> (its op calls, storages seen, calls per op name)
        self.calls: dict[int, tuple[list[OpCall], set[int], Counter[str]]] = {}
        self.held: list = []      # outputs kept alive: no storage address is reused
        self.versions: dict = {}  # block -> per call, its outputs and their versions

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.counter.total
        out = func(*args, **(kwargs or {}))
        if self.block is not None:
            calls, seen, names = self.calls[self.block]
            name = _name(func)
            fresh, outs = 0, []
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    outs.append((t, t._version))
                    key = t.untyped_storage()._cdata
                    if key not in seen:
                        seen.add(key)
                        self.held.append(t)
                        fresh += t.untyped_storage().nbytes()
            flops = self.counter.total - before
            calls.append(OpCall(f"{name}#{names[name]}", fresh, flops,
                                mutated=draws_random(func, args, kwargs)))
            self.versions.setdefault(self.block, []).append(outs)
            names[name] += 1
        return out


def traced_modules(target, blocks_attr=None, *, blocks=None, check_fn=None,
                   whole: bool = False) -> list:
    """The modules a trace reports on: the chain of blocks, or (``whole``) the model
    itself, as one block (NOTE [ One checkpoint around the forward ],
    memprop.checkpoint.whole)."""
    if whole:
        return [target]
    return find_blocks(target, blocks_attr, blocks=blocks, check_fn=check_fn)


def trace_blocks(model, batch, *, blocks_attr=None, loss_fn=training_loss, blocks=None,
                 check_fn=None, whole: bool = False) -> list:
    """Per block, its forward's op calls (``OpCall``), on fake tensors; ``whole``: one
    list, the model's whole forward."""
    mode, target, target_batch = fake_target(model, batch)
    blocks = traced_modules(target, blocks_attr, blocks=blocks, check_fn=check_fn,
                            whole=whole)
    index = {id(b): k for k, b in enumerate(blocks)}
    counter = FlopCounter()
    trace = _Trace(counter)

    entered: Counter[int] = Counter()

    def pre(module, args):
        if whole and not torch.is_grad_enabled():   # no checkpoint runs: not traced
            return
        trace.block = index[id(module)]
        trace.calls[trace.block] = ([], set(), Counter())
        entered[trace.block] += 1

    def post(module, args, output):
        trace.block = None

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre),
                                           b.register_forward_hook(post))]
    try:
        with mode, counter, trace:
            loss = loss_fn(target, target_batch)
            del loss
    finally:
        for h in handles:
            h.remove()
    if whole and entered[0] != 1:
        raise StrategyError(
            f"memprop.checkpoint: the loss calls {type(target).__name__} {entered[0]} times "
            "with gradients on; forward:KEYS numbers op calls within one call of the model, "
            "so its costs are traced for a loss that calls the model once")
    return [[dataclasses.replace(c, mutated=c.mutated or any(t._version != v for t, v in outs))
             for c, outs in zip(trace.calls[k][0], trace.versions.get(k, []))]
            for k in range(len(blocks))]


def block_options(calls: list, *, early: float = 0.0, max_calls: int = 6) -> list:
    """(keys, kept bytes, recompute FLOPs) of each op-level policy of one block (NOTE
    [ Op-level options of a block ]), the Pareto set of (kept bytes, recompute FLOPs);
    the block's input is not included. The calls in
    the last ``early`` FLOPs (after the block's last saved tensor) are never recomputed
    (NOTE [ Early stop ], memprop.checkpoint.rotor) and never worth keeping."""
    total = sum(c.flops for c in calls)
    starts = list(itertools.accumulate((c.flops for c in calls), initial=0))
    needed = [c for c, start in zip(calls, starts) if c.flops > 0 and start < total - early]
    heavy = [c for c in needed if not c.mutated][:max_calls]
    recompute = sum(c.flops for c in needed)
    options = []
    for r in range(1, len(heavy) + 1):
        for subset in itertools.combinations(heavy, r):
            options.append((frozenset(c.key for c in subset),
                            sum(c.out_bytes for c in subset),
                            float(recompute - sum(c.flops for c in subset))))
    # an option keeping more bytes for no fewer FLOPs than another is never better on
    # either metric: keep the Pareto set (fewest keys first among equals)
    options.sort(key=lambda o: (o[1], o[2], len(o[0])))
    front, best = [], float("inf")
    for option in options:
        if option[2] < best:
            front.append(option)
            best = option[2]
    return front
