"""Checkpointing strategies: small policy objects with one verb, ``apply(model)``.

    from memprop.checkpoint import Sqrt, parse_strategy
    Sqrt().apply(model)                         # or: parse_strategy("sqrt").apply(model)
    remove_strategy(model)                      # back to the plain model

String forms (CLI and experiment specs):

    none            nothing recomputed
    full            every block checkpointed on its own: stores only block inputs
    every:K         every K-th block checkpointed (blocks K-1, 2K-1, ...), as torchtitan's
                    selective layer checkpointing
    segments:N      N equal segments; all but the last checkpointed, as
                    torch.utils.checkpoint.checkpoint_sequential (the last segment's
                    activations are needed first in backward, so recomputing it saves nothing)
    sqrt            segments:ceil(sqrt(n)) for n blocks (Chen et al. 2016, arXiv:1604.06174)
    blocks:i,j,...  exactly these blocks checkpointed, each on its own; i-j is one
                    segment of blocks i..j (blocks:0-3,5)
    selective       every block, op-level: keep matmul/conv/attention outputs, recompute
                    pointwise ops (memprop.checkpoint.forms.selective)
    offload         keep saved tensors in host memory (torch.autograd.graph.save_on_cpu);
                    on a CPU run it moves nothing and says so
    budget:SIZE     the planner's cheapest plan whose predicted peak fits SIZE (e.g. 2GiB)
    nested:0-40[0-20[0-9]],41-62
                    a multi-level schedule: segments checkpointed again inside recomputed
                    segments (memprop.checkpoint.forms.multilevel)
    ops:mm,sdpa     every block, op-level: keep the outputs of these ops, recompute the
                    rest (memprop.checkpoint.forms.oplevel)
    forward:addmm#0-11+sdpa
                    the whole forward in one checkpoint, keeping the outputs of these op
                    calls (numbered over the forward) and rebuilding everything else in
                    backward, as torch.compile's partitioner (memprop.checkpoint.forms.whole)
    remat:addmm#0-11+sdpa
                    keep the same outputs as forward:, and rebuild each other saved tensor
                    on its own just before backward needs it, as torch.compile's
                    partitioner schedules its recompute (memprop.checkpoint.forms.remat)

All strategies but remat use non-reentrant checkpointing and preserve RNG state; see
NOTE [ How a segment is checkpointed without changing the model ] in
memprop.checkpoint.forms.chain (remat replays recorded op calls, RNG states included: NOTE
[ Rebuilding each saved tensor when backward needs it ] in memprop.checkpoint.forms.remat). Blocks
are found automatically, or named by class or predicate (NOTE [ How blocks are found ] in
memprop.checkpoint.forms.blocks); a strategy applies to each chain, and turns a model's KV cache
off while applied (NOTE [ Checkpointing and KV caches ] in memprop.checkpoint.forms.cache).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import warnings
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from memprop.checkpoint.forms.chain import CheckpointedChain, find_chains
from memprop.checkpoint.forms.patch import APPLIED, Applied, PatchedForward
from memprop.checkpoint.forms.selective import selective_context_fn
from memprop.errors import StrategyError

__all__ = ["Strategy", "NoCheckpoint", "Full", "EveryK", "Segments", "Sqrt", "Blocks",
           "Selective", "Offload", "parse_strategy", "apply_strategy",
           "remove_strategy", "applied_strategy", "strategy_forms"]

# NOTE [ The registry of string forms ]
#   A strategy class with a ``syntax`` (``"every:K"``, ``"full"``) is a string form: the
#   class registers itself when defined (``Strategy.__init_subclass__``), ``syntax`` names
#   it in the list of forms, and ``parse_strategy`` builds it: ``cls()`` for a form without
#   an argument, else ``cls.parse(text after the colon)``. ``strategy_forms()`` lists the
#   forms in the order their modules define them.
_FORMS: dict[str, type[Strategy]] = {}   # name before the colon -> class


def strategy_forms() -> tuple[str, ...]:
    """Every registered string form's syntax (``none``, ``every:K``, ``ops:OPS``, ...)."""
    return tuple(cls.syntax for cls in _FORMS.values())


def refuse_applied(model: nn.Module) -> None:
    """A ``StrategyError`` if ``model`` runs a strategy already (one at a time)."""
    if APPLIED in model.__dict__:
        raise StrategyError(f"memprop.checkpoint: {type(model).__name__} already has "
                            f"strategy {model.__dict__[APPLIED].strategy} applied; call "
                            "remove_strategy(model) first")


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Base: subclasses choose ``segments(n)`` (inclusive block ranges to recompute)."""

    # the string form (NOTE [ The registry of string forms ]); empty: not a string form
    syntax: ClassVar[str] = ""
    # parse() reads the argument as written (sizes: 1.5GiB), not lower-cased
    keeps_case: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("syntax"):
            _FORMS[cls.syntax.partition(":")[0]] = cls

    @classmethod
    def parse(cls, text: str) -> "Strategy":
        """The strategy of the text after ``name:`` in its string form."""
        raise StrategyError(f"memprop.checkpoint: {cls.syntax} takes no argument")

    def segments(self, n_blocks: int) -> list[tuple[int, int]]:
        return []

    # torch.utils.checkpoint's context_fn for every segment (None: save nothing inside)
    context_fn: ClassVar[Callable[[], Any] | None] = None

    @property
    def spec(self) -> str:
        """The strategy as text (``every:2``); each subclass sets it (a class attribute
        or a property)."""
        raise AttributeError(f"{type(self).__name__} sets no spec")

    def apply(self, model: nn.Module, *, blocks_attr: str | None = None, blocks=None,
              check_fn=None, example_batch=None, loss_fn=None) -> nn.Module:
        """Checkpoint ``model`` in place (``state_dict`` keys unchanged); returns it.

        Blocks: NOTE [ How blocks are found ] (memprop.checkpoint.forms.blocks); the strategy
        applies to each chain. ``example_batch`` and ``loss_fn`` serve ``budget:SIZE``."""
        refuse_applied(model)
        select = dict(blocks=blocks, check_fn=check_fn)
        chains = find_chains(model, blocks_attr, **select) if type(
            self).segments is not Strategy.segments else []
        applied = []
        for chain in chains:
            segments = self.segments(len(chain))
            if segments:                      # the class's context_fn, unbound
                chained = CheckpointedChain(chain, segments, context_fn=type(self).context_fn)
                applied.extend(chained.apply().patches)
        return Applied.record(model, self, applied)

    def remove(self, model: nn.Module) -> nn.Module:
        """Undo ``apply``: the model runs plainly again."""
        return remove_strategy(model)

    def __str__(self) -> str:
        return self.spec


@dataclasses.dataclass(frozen=True)
class NoCheckpoint(Strategy):
    syntax = "none"
    spec = "none"


@dataclasses.dataclass(frozen=True)
class Full(Strategy):
    syntax = "full"
    spec = "full"

    def segments(self, n):
        return [(i, i) for i in range(n)]


def _count(text: str, form: str) -> int:
    """The integer argument of ``every:K`` / ``segments:N``."""
    if not re.fullmatch(r"\d+", text):
        raise ValueError(f"{form} needs an integer, got {text!r}")
    return int(text)


def _check_count(value, form: str, letter: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StrategyError(f"memprop.checkpoint: {form} needs an integer {letter} >= 1, "
                            f"got {value!r}")


@dataclasses.dataclass(frozen=True)
class EveryK(Strategy):
    syntax = "every:K"
    k: int = 2

    @classmethod
    def parse(cls, text):
        return cls(_count(text, cls.syntax))

    def __post_init__(self):
        _check_count(self.k, "every:K", "K")

    @property
    def spec(self):
        return f"every:{self.k}"

    def segments(self, n):
        return [(i, i) for i in range(self.k - 1, n, self.k)]


def _equal_segments(n: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous ranges covering 0..n-1, sizes differing by at most one."""
    count = max(1, min(count, n))
    base, extra = divmod(n, count)
    bounds, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        bounds.append((start, start + size - 1))
        start += size
    return bounds


@dataclasses.dataclass(frozen=True)
class Segments(Strategy):
    syntax = "segments:N"
    n: int = 2

    @classmethod
    def parse(cls, text):
        return cls(_count(text, cls.syntax))

    def __post_init__(self):
        _check_count(self.n, "segments:N", "N")

    @property
    def spec(self):
        return f"segments:{self.n}"

    def segments(self, n):
        return _equal_segments(n, self.n)[:-1]   # the last segment runs plainly


@dataclasses.dataclass(frozen=True)
class Sqrt(Strategy):
    syntax = "sqrt"
    spec = "sqrt"

    def segments(self, n):
        return _equal_segments(n, math.ceil(math.sqrt(n)))[:-1]


@dataclasses.dataclass(frozen=True)
class Blocks(Strategy):
    """Explicit segments: ``blocks:0,3`` checkpoints blocks 0 and 3 each on its own,
    ``blocks:0-3,5`` blocks 0..3 as one segment and block 5 (what a ``Plan`` applies)."""

    syntax = "blocks:i,j-k,..."
    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, text):
        if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
            raise ValueError(f"blocks:{text} is not a list of blocks i or ranges i-j")
        return cls(tuple(_block_range(part) for part in text.split(",")))

    def __post_init__(self):
        ranges = tuple((r, r) if isinstance(r, int) else tuple(r) for r in self.ranges)
        object.__setattr__(self, "ranges", ranges)
        ends = [i for r in ranges for i in r]
        covered = {i for a, b in ranges for i in range(a, b + 1)}
        if any(a > b for a, b in ranges) or ends != sorted(ends) or len(covered) != sum(
                b - a + 1 for a, b in ranges):
            raise StrategyError(f"memprop.checkpoint: {self.spec} needs ordered, disjoint "
                                "blocks or ranges, e.g. blocks:0-3,5")

    @property
    def spec(self):
        return "blocks:" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ranges)

    def segments(self, n):
        bad = [b for _, b in self.ranges if b >= n]
        if bad:
            raise StrategyError(f"memprop.checkpoint: {self.spec} names block {max(bad)} but "
                                f"the chain has blocks 0..{n - 1}")
        return list(self.ranges)


@dataclasses.dataclass(frozen=True)
class Selective(Strategy):
    syntax = "selective"
    spec = "selective"
    context_fn = staticmethod(selective_context_fn)

    def segments(self, n):
        return [(i, i) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Offload(Strategy):
    syntax = "offload"
    spec = "offload"

    def apply(self, model, *, blocks_attr=None, blocks=None, check_fn=None,
              example_batch=None, loss_fn=None):
        refuse_applied(model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "cpu":
            warnings.warn("memprop.checkpoint: offload on a CPU model moves nothing: saved "
                          "tensors already live in host memory; the step runs as 'none'",
                          stacklevel=2)
            return Applied.record(model, self, [])
        return Applied.record(model, self, [OffloadForward(model).install()], cache=False)


class OffloadForward(PatchedForward):
    """The model's forward with every saved tensor kept in (pinned) host memory."""

    def __call__(self, *args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            return self.original(*args, **kwargs)


def remove_strategy(model: nn.Module) -> nn.Module:
    """Undo ``apply``: the model runs plainly again."""
    entry = model.__dict__.pop(APPLIED, None)
    if entry is not None:
        entry.remove()
    return model


def applied_strategy(model: nn.Module) -> Strategy | None:
    entry = model.__dict__.get(APPLIED)
    return entry.strategy if entry else None


def parse_strategy(text: str | Strategy | None) -> Strategy:
    """A ``Strategy`` from its string form (NOTE [ The registry of string forms ]); an
    error listing the valid forms otherwise."""
    if isinstance(text, Strategy):
        return text
    if text is None:
        return NoCheckpoint()
    spec = str(text).strip().lower()
    name, colon, arg = spec.partition(":")
    cls = _FORMS.get(name)
    takes_arg = cls is not None and ":" in cls.syntax
    if cls is not None and takes_arg == bool(colon) and (arg or not takes_arg):
        try:
            if cls.keeps_case:
                arg = str(text).strip().partition(":")[2]
            return cls.parse(arg) if takes_arg else cls()
        except StrategyError:
            raise
        except ValueError as exc:
            if name not in ("every", "segments", "blocks"):   # their messages: below
                raise StrategyError(f"memprop.checkpoint: bad strategy {text!r}: "
                                    f"{str(exc).removeprefix('memprop.units: ')}") from None
    guess = _close_form(spec)
    raise StrategyError(f"memprop.checkpoint: unknown strategy {text!r}; choose one of: "
                        f"{', '.join(strategy_forms())} (e.g. every:2, segments:4, "
                        "blocks:0,3, budget:1.5GiB)" + (f"; did you mean {guess!r}?" if guess
                                                        else ""))


def _block_range(part: str) -> tuple[int, int]:
    """``"0-3"`` -> ``(0, 3)``, ``"5"`` -> ``(5, 5)``: one range of ``blocks:``."""
    first, _, last = part.partition("-")
    return int(first), int(last or first)


def _close_form(spec: str) -> str | None:
    """The strategy ``spec`` was likely meant to be (difflib, as for model names), or
    None: ``sqr`` -> ``sqrt``, ``segment:4`` -> ``segments:4``, ``every:x`` -> ``every:K``."""
    name, _, arg = spec.partition(":")
    forms = {form.partition(":")[0]: form for form in strategy_forms()}   # every -> every:K
    close = difflib.get_close_matches(name, forms, n=1)
    if not close:
        return None
    form = forms[close[0]]
    if ":" not in form:                     # takes no argument
        guess = close[0]
    elif arg and close[0] != name:          # a misspelt name: keep the user's argument
        guess = f"{close[0]}:{arg}"
    else:                                   # the right name, a bad or missing argument
        guess = form
    return guess


def apply_strategy(model: nn.Module, strategy, *, blocks_attr: str | None = None,
                   blocks=None, check_fn=None, example_batch=None, loss_fn=None) -> Strategy:
    """Parse (if a string) and apply ``strategy`` to ``model``; returns the Strategy.

    ``blocks`` (a class or class name) or ``check_fn`` (a predicate) name the blocks;
    by default they are found (NOTE [ How blocks are found ], memprop.checkpoint.forms.blocks).
    ``budget:SIZE`` profiles one step: ``example_batch`` and its ``loss_fn(model, batch)``
    (default: the zoo's ``(inputs, targets)`` and ``model.objective``)."""
    strat = parse_strategy(strategy)
    strat.apply(model, blocks_attr=blocks_attr, blocks=blocks, check_fn=check_fn,
                example_batch=example_batch, loss_fn=loss_fn)
    return strat
