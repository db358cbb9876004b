"""The op-key grammar every op-level form shares (``ops:``, ``forward:``, ``remat:``,
``selective``): which aten calls a key names, which calls are worth keeping, and the
shortest spelling of a set of keys.

NOTE [ Op keys ]
  An op key names calls of one aten op (its overload packet, e.g. ``addmm``,
  ``_scaled_dot_product_flash_attention_for_cpu``; ``sdpa`` is short for every
  scaled-dot-product attention kernel) inside one run: a block's forward for ``ops:``,
  the model's whole forward for ``forward:`` and ``remat:``. ``addmm`` matches every
  call, ``addmm#2`` the third, ``addmm#0-11`` the first twelve. A key naming a call the
  run does not make is refused when the run ends (``refuse_unmatched``): never keep less
  than asked, silently.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections import Counter

import torch

from memprop.errors import StrategyError

__all__ = ["SDPA", "SAVED_OPS", "HEAVY_OPS", "op_name", "split_key", "KeyMatcher",
           "refuse_unmatched", "canonical_keys", "parse_keys", "draws_random"]

# every scaled-dot-product attention kernel: the key ``sdpa`` names them all
SDPA = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")

# the aten ops whose outputs are worth keeping: matmuls, convolutions, attention
SAVED_OPS = {
    op for name in ("mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", *SDPA)
    if (op := getattr(torch.ops.aten, name, None)) is not None
}

_KEY = re.compile(r"[a-z_][a-z0-9_]*(#\d+(-\d+)?)?")


def op_name(func) -> str:
    """The name an op key uses for an aten call: its overload packet (``sdpa`` for every
    attention kernel)."""
    name = func.overloadpacket.__name__
    return "sdpa" if name in SDPA else name


# op names of the matmul, convolution and attention kernels (as keys name them)
HEAVY_OPS = {"sdpa" if op.__name__ in SDPA else op.__name__ for op in SAVED_OPS}


def split_key(key: str) -> tuple[str, int | None, int | None]:
    """(op name, first call, last call) of an op key (NOTE [ Op keys ]); a bare name
    (every call): (name, None, None)."""
    name, _, calls = key.partition("#")
    if not calls:
        return name, None, None
    first, _, last = calls.partition("-")
    return name, int(first), int(last or first)


def draws_random(func, args=(), kwargs=None) -> bool:
    """Whether a call draws from the RNG: a seeded op (dropout, rand) or attention with
    ``dropout_p > 0``. A selective-checkpoint cache must not keep its outputs: the
    recompute would skip the draw, and every random op after it would draw other
    numbers than the forward did (other dropout masks: other gradients)."""
    if torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()):
        return False
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            return bool(args[i] if i < len(args) else (kwargs or {}).get("dropout_p", 0.0))
    return True


class KeyMatcher:
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
        name = op_name(func)
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


def refuse_unmatched(matcher: KeyMatcher, where: str = "block") -> None:
    """A ``StrategyError`` for keys that named calls the run did not make (never keep
    less than asked, silently): in a block's run, call indices (an op name may be absent
    from a block); in the whole forward's run (``where="forward"``), op names as well."""
    missing = matcher.unmatched(names_too=where == "forward")
    if missing:
        calls = ", ".join(f"{name}#0-{n - 1}" if n > 1 else f"{name}#0"
                          for name, n in sorted(matcher.seen.items())
                          if name in HEAVY_OPS) or "none"
        raise StrategyError(
            f"memprop.checkpoint: op key(s) {missing} name calls "
            f"{'the model' if where == 'forward' else 'a block'}'s forward does "
            f"not make, so nothing would be kept for them; its matmul, convolution and "
            f"attention calls: {calls}")


def canonical_keys(keys) -> tuple[str, ...]:
    """The shortest keys that name the same calls, in spec order (NOTE [ Compact op-level
    specs ], memprop.checkpoint.forms.oplevel): bare names first, then each op's runs of
    call indices as ranges (``mm#0+mm#1+mm#2`` -> ``mm#0-2``); a bare name covers its
    op's ranges."""
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


def parse_keys(text: str, spec: str, form: str = "ops") -> frozenset:
    """The op keys of ``KEY+KEY+...`` in strategy ``form:spec``; a ``StrategyError``
    naming a malformed key, a backwards range or a name that is no aten op (a typo would
    keep nothing, silently, in every block)."""
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
    names = {split_key(k)[0] for k in keys}
    unknown = sorted(names - {"sdpa"} - {n for n in names if hasattr(torch.ops.aten, n)})
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(HEAVY_OPS), n=1)
        raise StrategyError(f"memprop.checkpoint: {form}:{spec} names {unknown}, no aten op; "
                            "an op key names an aten op as the model calls it (addmm, mm, "
                            "bmm, convolution, sdpa, ...)"
                            + (f"; did you mean {close[0]!r}?" if close else ""))
    return keys
