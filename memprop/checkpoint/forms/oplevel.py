"""Op-level checkpointing: inside each checkpointed block, which op outputs are kept and
which are recomputed, as torch's selective checkpointing and compile's partitioner
decide per op.

    apply_strategy(model, "ops:addmm+sdpa")               # every block: keep these
    apply_strategy(model, "ops:0-3=addmm#0+sdpa,4-5")     # blocks 0..3 each with a policy
    Ops.parse("0-3=addmm#0+sdpa,4-5").apply(model)        # 4-5: one plain segment

NOTE [ One block, one op-level policy ]
  A block checkpointed with op keys K (NOTE [ Op keys ], memprop.checkpoint.forms.opkeys)
  runs in one non-reentrant checkpoint (RNG preserved) whose selective-checkpoint policy
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

NOTE [ Checkpointing a part of a block ]
  A block's entry may name child modules instead of op keys: ``ops:0-1,2-3=@mlp``
  checkpoints blocks 0-1 as one plain segment and, in each of blocks 2 and 3, only its
  ``mlp`` (a path below the block, ``@attention.self`` for a nested one): the block
  stores what it saves outside that child, the child stores its inputs and recomputes
  the rest in backward. The child runs in a plain checkpoint (``SegmentForward``, as a
  one-block segment: RNG preserved, its output held), so no selective policy sees the
  block's calls: on a device where per-call Python costs dominate (a CPU, small
  tensors) it frees a part of a block's activations for the time of that part's
  forward, where ``ops:`` keys pay a policy call per op of the block (tiny Llama at 60 %
  of its peak: blocks:0,1,2 measured 1.34x the plain step, blocks 0,1 and two MLPs
  less; NOTE [ Pricing a plan in seconds ], memprop.checkpoint.planning.timing). An
  entry names children or op keys, not both. A name the block lacks is refused at
  ``apply``.

NOTE [ A part of a block under torch.compile ]
  Dynamo cannot trace a checkpoint's bookkeeping (the objects it rewinds, the checks
  that its modules and buffers are unchanged, a snapshot of the buffers its forward
  changes where there are any), so it splits the graph at each checkpointed child
  and runs that checkpoint eagerly between two compiled graphs, as it does for a whole
  checkpointed block (and for transformers' own gradient checkpointing, whose hub
  kernels it cannot trace inside a checkpoint either). Cutting a block there leaves a
  gradient summed across the split: the residual stream is read by the norm in one
  graph and by the residual add in the next, and autograd adds the two in another
  order than one compiled graph does. So a compiled model with a checkpointed child
  gives the loss of the compiled plain model and gradients within rounding of it, not
  bitwise (tiny Llama, ``ops:@self_attn``: at most 5e-9 at 2 layers, 2.2e-8 at 4, and
  the planner's ``@input_layernorm+@mlp+@post_attention_layernorm`` 1.9e-8 at 4; ``@mlp``
  and whole blocks measured bitwise). Eager, every child is bitwise.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from memprop.checkpoint.forms.chain import CheckpointedChain, SegmentForward
from memprop.checkpoint.forms.multilevel import claim_blocks
from memprop.checkpoint.forms.opkeys import (
    KeyMatcher,
    canonical_keys,
    draws_random,
    op_name,
    parse_keys,
    refuse_unmatched,
)
from memprop.checkpoint.forms.patch import Applied
from memprop.checkpoint.forms.selective import Both, RefuseMutated, WatchKept
from memprop.checkpoint.forms.strategies import Strategy
from memprop.errors import StrategyError

__all__ = ["Ops", "op_context", "op_context_fn", "is_child", "child_paths", "CHILD_KEY"]


class _Report(WatchKept):
    """Reports kept outputs as stored for backward (the forward pass only), copying one
    for the recompute before the forward writes into it (NOTE [ A kept output written
    through an alias ], forms.selective);
    on leaving, refuses keys that named calls the run did not make
    (``refuse_unmatched``)."""

    def __init__(self, matcher: KeyMatcher, where: str = "block", cache=None):
        super().__init__(cache)
        self.matcher, self.where = matcher, where
        self.form = "ops:KEYS" if where == "block" else "forward:KEYS"

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if exc[0] is None:
            refuse_unmatched(self.matcher, self.where)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.copy_before_writes(func, args, kwargs)
        out = func(*args, **kwargs)
        if self.matcher.kept(func) and not draws_random(func, args, kwargs):
            self.keep(out, f"ops:{op_name(func)}")
        return out


def op_context(keys: frozenset, where: str = "block"):
    """The (forward, recompute) contexts of a checkpoint keeping the outputs of the calls
    ``keys`` names (numbered within each ``where``: a block, or the forward)."""
    runs = {False: KeyMatcher(keys), True: KeyMatcher(keys)}   # forward, recompute

    def policy(ctx, op, *args, **kwargs):
        if runs[ctx.is_recompute].kept(op) and not draws_random(op, args, kwargs):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(policy)
    return (Both(forward_ctx, _Report(KeyMatcher(keys), where, forward_ctx)),
            RefuseMutated(recompute_ctx, "ops:KEYS" if where == "block" else "forward:KEYS"))


def op_context_fn(keys, where: str = "block") -> functools.partial:
    """``context_fn`` for ``checkpoint``: ``op_context`` over ``keys``. A partial of a
    module-level function, not a closure: it pickles and deep-copies with the patch that
    holds it (NOTE [ A strategy travels with the model ], memprop.checkpoint.forms.patch), and
    torch.compile traces it (dynamo takes a function or a partial as ``context_fn``)."""
    return functools.partial(op_context, frozenset(keys), where)


@dataclasses.dataclass(frozen=True)
class Ops(Strategy):
    """Segments ``(first, last, keys)``: ``keys`` empty = a plain checkpointed segment;
    else each block of the range checkpointed with that op-level policy. ``every``:
    keys applied to every block (the form ``ops:addmm+sdpa``)."""

    syntax = "ops:OPS"
    parts: tuple = ()
    every: frozenset | None = None

    def __post_init__(self):
        # NOTE [ Compact op-level specs ]: keys in their shortest form, and keyed blocks
        # in runs, so that every spelling of one strategy is one value
        parts = tuple((int(a), int(b), frozenset(canonical_keys(k))) for a, b, k in self.parts)
        mixed = [keys for _, _, keys in parts + ((0, 0, self.every),) * (self.every is not None)
                 if len({is_child(k) for k in keys}) > 1]
        if mixed:
            object.__setattr__(self, "parts", parts)
            raise StrategyError(f"memprop.checkpoint: {self.spec} names child modules and op "
                                "keys for one block; an entry checkpoints either its "
                                "children (=@mlp) or the block with kept ops (=addmm)")
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
            return cls(every=parse_keys(text, text))
        if text.startswith("@"):                       # every block's children
            return cls(every=_entry(text, text))
        parts = []
        for part in text.split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?(?:=([a-z0-9_#+@.-]+))?", part)
            if not m:
                raise StrategyError(
                    f"memprop.checkpoint: bad op-level strategy ops:{text} at {part!r}; write "
                    "ops:KEYS (every block) or ops:RANGE[=KEYS],... e.g. ops:addmm+sdpa, "
                    "ops:0-3=addmm#0+sdpa,4-5, ops:0-1,2-3=@mlp (a child module)")
            a = int(m.group(1))
            parts.append((a, int(m.group(2) or a), _entry(m.group(3) or "", text)))
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
        """The checkpointed segments: a plain range is one, a keyed range one per block;
        blocks that checkpoint children only (``=@mlp``) are not among them."""
        if self.every is not None:
            return [] if child_paths(self.every) else [(k, k) for k in range(n)]
        return [seg for a, b, keys in self.parts if not child_paths(keys)
                for seg in ([(k, k) for k in range(a, b + 1)] if keys else [(a, b)])]

    @property
    def runs_policy(self) -> bool:
        """Whether some block runs under a selective policy (op keys; not children)."""
        entries = [self.every] if self.every is not None else [k for _, _, k in self.parts]
        return any(keys and not child_paths(keys) for keys in entries)

    def children(self, n: int) -> list[tuple[int, tuple[str, ...]]]:
        """(block, child paths) of each block that checkpoints children only (NOTE
        [ Checkpointing a part of a block ]), of a chain of ``n`` blocks."""
        if self.every is not None:
            return [(k, child_paths(self.every)) for k in range(n) if child_paths(self.every)]
        return [(k, child_paths(keys)) for a, b, keys in self.parts if child_paths(keys)
                for k in range(a, b + 1)]

    def groups(self, n: int) -> dict:
        """keys -> segments checkpointed with them (empty keys: plain segments); entries
        naming children are not among them (``children``)."""
        if self.every is not None:
            return {} if child_paths(self.every) else {self.every: [(k, k) for k in range(n)]}
        out: dict = {}
        for a, b, keys in self.parts:
            if b >= n:
                raise StrategyError(f"memprop.checkpoint: {self.spec} names block {b} but "
                                    f"the chain has blocks 0..{n - 1}")
            if not child_paths(keys):
                out.setdefault(keys, []).extend([(a, b)] if not keys else
                                                 [(k, k) for k in range(a, b + 1)])
        return out

    def apply(self, model: nn.Module, *, blocks_attr: str | None = None,
              example_batch=None, **select) -> nn.Module:
        blocks = claim_blocks(model, blocks_attr, select)
        groups = self.groups(len(blocks))           # refuses a block past the chain
        parts = [(child, f"block {k}'s {path} ({type(child).__name__})")
                 for k, paths in self.children(len(blocks))
                 for path, child in _resolved(blocks, k, paths, self.spec)]
        patches = [patch for keys, segs in groups.items()
                   for patch in CheckpointedChain(blocks, segs, context_fn=op_context_fn(keys)
                                                  if keys else None).apply().patches]
        # NOTE [ Checkpointing a part of a block ]: each child a one-module segment
        patches += [SegmentForward([child], [name], {}, None).install()
                    for child, name in parts]
        return Applied.record(model, self, patches)


# a child entry: @ and the module's path below the block (attribute names, or indices of
# a Sequential), as a spec writes it (parse_strategy reads specs in lower case)
CHILD_KEY = re.compile(r"@[a-z0-9_]+(\.[a-z0-9_]+)*")


def is_child(key: str) -> bool:
    """Whether an entry's key names a child module (``@mlp``), not an op."""
    return key.startswith("@")


def child_paths(keys) -> tuple[str, ...]:
    """The child module paths an entry names (``@mlp`` -> ``mlp``); () for op keys."""
    return tuple(sorted(k[1:] for k in keys if is_child(k)))


def _entry(text: str, spec: str) -> frozenset:
    """An entry's keys: child modules (``@mlp+@self_attn``) or op keys (``parse_keys``)."""
    keys = [k for k in text.split("+") if k]
    if not any(map(is_child, keys)):
        return parse_keys(text, spec)
    bad = sorted(k for k in keys if not CHILD_KEY.fullmatch(k))
    if bad:
        raise StrategyError(f"memprop.checkpoint: ops:{spec} has bad entry key(s) {bad}; a "
                            "child module is @ and its path below the block (@mlp, "
                            "@attention.self), and an entry names children or op keys, "
                            "not both")
    return frozenset(keys)


def _resolved(blocks: list, k: int, paths: tuple[str, ...], spec: str) -> list:
    """(path, submodule) of each of ``paths`` in block ``k``, or a ``StrategyError``
    naming its children (a typo would checkpoint nothing, silently), or naming the other
    block that shares the submodule (its checkpoint would cover that block's call too)."""
    block, out = blocks[k], list[tuple[str, nn.Module]]()
    for path in paths:
        try:
            child = block.get_submodule(path)
        except AttributeError:
            names = ", ".join("@" + name for name, _ in block.named_children()) or "none"
            raise StrategyError(
                f"memprop.checkpoint: {spec} names @{path} in block {k} "
                f"({type(block).__name__}), which has no such submodule; its children: "
                f"{names}") from None
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or any(
                child is other for _, other in out):
            raise StrategyError(
                f"memprop.checkpoint: {spec} names @{path} in block {k}, "
                + ("a container that is never called: name the modules in it (@"
                   f"{path}.0)" if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else
                   "a module the entry names twice under two paths"))
        shared = next((j for j, other in enumerate(blocks) if j != k and any(
            m is child for m in other.modules())), None)
        if shared is not None:
            raise StrategyError(
                f"memprop.checkpoint: {spec} names @{path} in block {k}, a module block "
                f"{shared} shares: a checkpoint of it would cover every block's call; "
                "checkpoint the blocks themselves")
        out.append((path, child))
    return out
