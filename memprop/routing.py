"""Expert routing for steps on fake tensors: a mixture-of-experts step whose experts run
one by one, predicted under a routing it names.

    routing = Routing.uniform()                       # or .capacity(), or a real batch's:
    routing = record_routing(model, batch, loss_fn)   # one no-grad forward of the batch
    with FakeTensorMode(), RoutedValues(routing):
        ...                                           # nonzero / .tolist() now answer

NOTE [ Predicting experts that run one by one ]
  A mixture-of-experts layer whose experts run one by one (transformers'
  ``experts_implementation="eager"``, JetMoE's experts, LongCat-Flash's before transformers
  5.25) reads the routing to size each expert's slice: ``nonzero`` of the expert mask,
  ``.tolist()`` of the tokens per expert. Fake tensors have no values (NOTE [ MoE routing and the
  estimate ], memprop.measure), so the step is predicted under a routing it states:
  * ``Routing.batch`` - the user's own batch: the expert indices every router's
    ``topk`` chose in one real forward of the batch (``record_routing``: no gradients
    kept, the model's training mode and autocast, the random state restored after).
    Where random ops before a router (dropout) route the batch otherwise in each step -
    a second forward tells - the estimate says so: it is exact for the first forward's
    draws, and each step differs from it a little (tiny JetMoE with dropout 0.1: peaks
    within 512 bytes). The first rows of the batch (the planner times and calibrates
    on a few) take the first rows of its routing: routers route each token on its own.
  * ``Routing.uniform`` - the (token, choice) pairs dealt round-robin: token t's j-th
    choice is expert (t*k + j) mod n, so every expert receives t*k/n pairs, give or take
    one; the default when there is no real batch (a config's estimate).
  * ``Routing.capacity`` - every token to experts 0..k-1: each of them receives every
    token, the most top-k routing allows one expert (its capacity bound). It bounds the
    tokens per expert, not the step's peak: fewer experts run, and each running expert
    allocates a little of its own, so it can peak below the uniform split (tiny eager
    Mixtral, 4 experts, top 2, 32 tokens: 84.4 KiB below; tiny LongCat-Flash, whose
    zero-compute experts then go unused: 506 KiB above the batch's own).
  ``RoutedValues``, a dispatch mode between the tracker and the fake tensors, gives
  each router's indices a *shadow*: a real CPU tensor holding the routing's values. A
  router is an ``aten.topk`` run inside a mixture-of-experts module (its class named
  ``...Experts``, ``...MoE``, ``...Moe...``); it is told apart from the other routers by
  the module that calls it and how many ``topk`` that module's forward has run, so a
  forward that runs again (a checkpoint's recompute, the next pass) reads the same
  routing. Every op whose tensor inputs all have shadows runs once more on the shadows,
  which gives its outputs shadows; where the fake op needs a value it lacks (``nonzero``,
  ``_local_scalar_dense``: ``.item()``, ``.tolist()``, ``if``), the outputs are made from
  the shadows' results, with their shapes, and the numbers are the shadows'. Factory ops
  (``zeros``, ``arange``, ``zeros_like``, ...) run in such a module get a shadow made on
  first use (a recipe: nothing is allocated for the hidden states' ``zeros_like``). An
  op that writes values without shadows into a tensor with one drops the shadow of
  every tensor on that storage, so a shadow never holds a stale value: a value that
  has no shadow stays unreadable, and the step raises ``DataDependentStepError`` as
  before: so does a replay of recorded calls (``remat:``) that rebuilds a router's
  indices in backward, outside the module that routes (tiny LongCat-Flash under
  ``remat:-``), which no router key names. Everything else runs on the fake tensors as
  it would: every storage the step creates has the real step's size for that routing
  (tests/test_routing.py checks the prediction against a real step forced to the same
  routing, ``ForcedRouting``, and against the batch's own).
  The planner routes its fake steps the same way (``planned_under`` around a planning
  run, ``routed`` around each fake step): the batch's own for a real model and batch, an
  even split for fake ones (``memprop plan``). Where a step read its routing, the op
  calls a block makes depend on it (an expert with no token makes none), so op keys,
  which count calls, would name other calls in another step: the plan keeps to
  block-level forms and says so in its notes.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Any, Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from memprop.errors import ConfigError, MemPropError

__all__ = ["Routing", "RoutedValues", "ForcedRouting", "record_routing", "ROUTINGS",
           "MOE_CLASS", "RoutingMismatch", "has_experts", "planned_under", "routed",
           "routing_read"]

ROUTINGS = ("batch", "uniform", "capacity")

# a mixture-of-experts module, by class name: ...Experts, ...MoE, ...Moe... (not Moement)
MOE_CLASS = re.compile(r"(Experts?|MoE|Moe)(?![a-z])")

_TOPK = torch.ops.aten.topk.default
_FACTORIES = {torch.ops.aten.zeros, torch.ops.aten.ones, torch.ops.aten.full,
              torch.ops.aten.arange, torch.ops.aten.zeros_like, torch.ops.aten.ones_like,
              torch.ops.aten.full_like, torch.ops.aten.new_zeros, torch.ops.aten.new_ones,
              torch.ops.aten.new_full, torch.ops.aten.scalar_tensor, torch.ops.aten.eye}
_VALUE_NEEDED = (DataDependentOutputException, DynamicOutputShapeException)


def has_experts(model: nn.Module) -> bool:
    """Whether ``model`` holds a mixture-of-experts module (by class name)."""
    return any(MOE_CLASS.search(type(m).__name__) for m in model.modules())


class RoutingMismatch(MemPropError):
    """The recorded routing of a batch does not cover a router the step runs."""


Key = tuple[str, int]            # (the module running topk, its n-th topk in that forward)


class Routing:
    """Which experts each router chooses (NOTE [ Predicting experts that run one by
    one ]): ``kind`` is "batch", "uniform" or "capacity"; ``recorded`` holds a batch's
    indices by router."""

    def __init__(self, kind: str, recorded: dict[Key, torch.Tensor] | None = None, *,
                 varies: bool = False):
        if kind not in ROUTINGS:
            raise ConfigError(f"memprop: routing {kind!r} is not allowed; choose one of: "
                              f"{', '.join(ROUTINGS)}")
        self.kind = kind
        self.recorded = recorded or {}
        self.varies = varies            # a batch routed otherwise by a second forward

    @classmethod
    def uniform(cls) -> "Routing":
        return cls("uniform")

    @classmethod
    def capacity(cls) -> "Routing":
        return cls("capacity")

    def describe(self) -> str:
        """One phrase for ``Measurement.routing``."""
        if self.varies:
            return ("this batch's own routing in one forward (recorded from one real "
                    "forward of it); a second forward routed it otherwise (random ops "
                    "before a router, such as dropout), so each step differs a little: "
                    "exact for the first forward's draws")
        return {"batch": "this batch's own routing (recorded from one real forward of it)",
                "uniform": "a uniform split (every expert receives an equal share of the "
                           "token choices, give or take one)",
                "capacity": "the capacity bound (every token to the same k experts: "
                            "each receives every token)"}[self.kind]

    def indices(self, key: Key, shape: torch.Size, dim: int, choices: int) -> torch.Tensor:
        """The int64 CPU indices the router ``key`` returns, of ``shape``, choosing
        ``shape[dim]`` of ``choices`` experts along ``dim``."""
        if self.kind == "batch":
            got = self.recorded.get(key)
            if got is not None and dim > 0 and got.shape[1:] == shape[1:] \
                    and shape[0] <= got.shape[0]:
                got = got[:shape[0]]       # the first rows of the batch (a planner's slice)
            if got is None or tuple(got.shape) != tuple(shape):
                seen = "not at all" if got is None else f"with shape {tuple(got.shape)}"
                raise RoutingMismatch(
                    f"memprop: the router {key[0] or '(the model)'} (top-k call {key[1]}) "
                    f"returns indices of shape {tuple(shape)} in this step, but the "
                    f"recorded forward of the batch ran it {seen}; estimate under "
                    "routing='uniform' or 'capacity' instead")
            return got.clone()
        k = shape[dim]
        rows = shape.numel() // max(k, 1)
        j = torch.arange(k, dtype=torch.int64)
        if self.kind == "capacity":
            flat = j.expand(rows, k)
        else:
            flat = (torch.arange(rows, dtype=torch.int64)[:, None] * k + j) % choices
        moved = [s for i, s in enumerate(shape) if i != dim] + [k]
        return flat.reshape(moved).movedim(-1, dim).contiguous()


class _Routers(TorchDispatchMode):
    """The module stack (global forward hooks) and which ``topk`` is a router: one run
    inside a mixture-of-experts module, keyed by (innermost module, its n-th topk)."""

    def __init__(self, model: nn.Module | None):
        super().__init__()
        self._names: dict[int, str] = {}
        if model is not None:
            self.name_modules(model)
        self._stack: list[list] = []              # [name, topk calls so far, in MoE]
        self._handles: list = []

    def name_modules(self, model: nn.Module) -> None:
        """Name routers by their module's name in ``model`` (default: its class)."""
        self._names = {id(m): n for n, m in model.named_modules()}

    def _pre(self, module, args):
        inside = bool(self._stack and self._stack[-1][2])
        self._stack.append([self._names.get(id(module), type(module).__name__), 0,
                            inside or bool(MOE_CLASS.search(type(module).__name__))])

    def _post(self, module, args, output):
        if self._stack:
            self._stack.pop()

    @property
    def in_experts(self) -> bool:
        return bool(self._stack and self._stack[-1][2])

    def router_key(self) -> Key:
        frame = self._stack[-1]
        frame[1] += 1
        return frame[0], frame[1] - 1

    def __enter__(self):
        reg = nn.modules.module
        self._handles = [reg.register_module_forward_pre_hook(self._pre),
                         reg.register_module_forward_hook(self._post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles, self._stack = [], []
        return super().__exit__(*exc)


def _topk_dim(args, kwargs) -> int:
    dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
    return dim % args[0].dim() if args[0].dim() else 0


class RoutedValues(_Routers):
    """Fake steps under ``routing``: routers' indices and what is computed from them
    carry real values (NOTE [ Predicting experts that run one by one ]). ``read`` counts
    the values the step read from shadows (0: no allocation depended on the routing)."""

    def __init__(self, routing: Routing, model: nn.Module | None = None):
        super().__init__(model)
        self.routing = routing
        self.read = 0
        self._shadow: WeakIdKeyDictionary = WeakIdKeyDictionary()   # fake -> real (CPU)
        self._recipe: WeakIdKeyDictionary = WeakIdKeyDictionary()   # fake -> () -> real

    # -- shadows --------------------------------------------------------------
    def _real(self, t: torch.Tensor) -> torch.Tensor | None:
        if t in self._shadow:
            return self._shadow[t]
        make = self._recipe.get(t)
        if make is None:
            return None
        with unset_fake_temporarily():
            real = make()
        self._shadow[t] = real
        return real

    def _drop_storage(self, t: torch.Tensor) -> None:
        """Forget every shadow on ``t``'s storage: values without shadows were written."""
        cdata = t.untyped_storage()._cdata
        for table in (self._shadow, self._recipe):
            for fake in [f for f in table.keys() if f.untyped_storage()._cdata == cdata]:
                del table[fake]

    def _has(self, t: torch.Tensor) -> bool:
        return t in self._shadow or t in self._recipe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TOPK and self.in_experts and isinstance(args[0], FakeTensor):
            return self._route(args, kwargs)
        if not self.in_experts and not self._shadow and not self._recipe:
            return func(*args, **kwargs)       # outside experts, nothing routed alive
        if func.namespace != "aten":
            return func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if func.overloadpacket in _FACTORIES and self.in_experts \
                and not any(self._has(t) for t in tensors):
            out = func(*args, **kwargs)
            if isinstance(out, FakeTensor):
                self._recipe[out] = _factory_recipe(func, args, kwargs)
            return out
        written = [a for a in _written_args(func, args, kwargs) if isinstance(a, torch.Tensor)]
        if tensors and all(self._has(t) for t in tensors):
            return self._run_shadowed(func, args, kwargs, written)
        if written and (self._shadow or self._recipe):
            for t in written:                   # values without shadows written in
                self._drop_storage(t)
        return func(*args, **kwargs)

    def _route(self, args, kwargs):
        """A router's ``topk``: its indices get the routing's as their shadow."""
        out = _TOPK(*args, **kwargs)
        dim = _topk_dim(args, kwargs)
        with unset_fake_temporarily():
            self._shadow[out[1]] = self.routing.indices(self.router_key(), out[1].shape,
                                                        dim, args[0].shape[dim])
        return out

    def _run_shadowed(self, func, args, kwargs, written):
        """``func`` on the fake tensors and once more on their shadows; the outputs get
        the shadows' results (and, where the fake op needs values, their shapes)."""
        swap = lambda x: self._real(x) if isinstance(x, torch.Tensor) else (  # noqa: E731
            torch.device("cpu") if isinstance(x, torch.device) else x)
        with unset_fake_temporarily():
            try:
                real = func(*tree_map(swap, args), **tree_map(swap, kwargs))
            except Exception:       # the op cannot run on CPU shadows: values unknown
                for t in written:
                    self._drop_storage(t)
                return func(*args, **kwargs)
        try:
            out = func(*args, **kwargs)
        except _VALUE_NEEDED:
            self.read += 1
            device = next(a.device for a in tree_flatten(args)[0]
                          if isinstance(a, torch.Tensor))
            out = tree_map(lambda r: torch.empty_strided(r.shape, r.stride(), dtype=r.dtype,
                                                         device=device)
                           if isinstance(r, torch.Tensor) else r, real)
        outs, _ = tree_flatten(out)
        reals, _ = tree_flatten(real)
        for o, r in zip(outs, reals):
            if isinstance(o, torch.Tensor) and isinstance(r, torch.Tensor):
                self._shadow[o] = r
        return out


def _factory_recipe(func, args, kwargs) -> Callable[[], torch.Tensor]:
    """The factory call ``func(*args, **kwargs)`` made real on the CPU, for later: a
    ``*_like`` input becomes a real CPU tensor of its shape, strides and dtype (its
    values are never read)."""
    flat, spec = tree_flatten((args, kwargs))
    meta: list[Any] = [(x.shape, x.stride(), x.dtype) if isinstance(x, torch.Tensor) else
                       torch.device("cpu") if isinstance(x, torch.device) else x for x in flat]

    def make() -> torch.Tensor:
        values = [torch.empty_strided(*m[:2], dtype=m[2]) if isinstance(x, torch.Tensor)
                  else m for x, m in zip(flat, meta)]
        a, kw = tree_unflatten(values, spec)
        return func(*a, **kw)
    return make


def _written_args(func, args, kwargs) -> list[Any]:
    """The arguments ``func`` writes into (its schema's mutable aliases)."""
    out: list[Any] = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = kwargs.get(arg.name, args[i] if i < len(args) else None)
            out.extend(value if isinstance(value, (list, tuple)) else [value])
    return out


class _Use:
    """The routing the fake steps of one planning run are routed by, and how many
    values they read from it (0: no allocation depended on it)."""

    def __init__(self, routing: Routing):
        self.routing, self.read = routing, 0


_PLANNED: contextvars.ContextVar[_Use | None] = contextvars.ContextVar("memprop_routing",
                                                                       default=None)


@contextlib.contextmanager
def planned_under(routing: Routing | None):
    """While inside: every fake step that ``routed`` wraps is routed by ``routing`` (the
    planner's profile and simulations, NOTE [ Predicting experts that run one by one
    ]); yields the ``_Use`` that counts the values read. None: routes nothing."""
    use = _Use(routing) if routing is not None else None
    token = _PLANNED.set(use)
    try:
        yield use
    finally:
        _PLANNED.reset(token)


def routing_read() -> bool:
    """Whether a fake step inside ``planned_under`` has read values of its routing: the
    model's op calls then depend on the routing (experts with no token skipped)."""
    use = _PLANNED.get()
    return use is not None and use.read > 0


@contextlib.contextmanager
def routed(model: nn.Module):
    """Around one fake step of ``model``, inside its ``FakeTensorMode`` and outside the
    tracker: the routing ``planned_under`` set, if any and if the model has experts."""
    use = _PLANNED.get()
    if use is None or not has_experts(model):
        yield
        return
    with RoutedValues(use.routing, model) as values:
        try:
            yield
        finally:
            use.read += values.read


class ForcedRouting(_Routers):
    """A real step under ``routing`` (not the batch's own): every router's indices are
    overwritten with the routing's (tests check a prediction against such a step)."""

    def __init__(self, routing: Routing, model: nn.Module | None = None):
        super().__init__(model)
        self.routing = routing

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is _TOPK and self.in_experts:
            dim = _topk_dim(args, kwargs or {})
            out[1].copy_(self.routing.indices(self.router_key(), out[1].shape, dim,
                                              args[0].shape[dim]))
        return out


class _Recorder(_Routers):
    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.recorded: dict[Key, torch.Tensor] = {}
        self.ambiguous: set[Key] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is _TOPK and self.in_experts:
            key = self.router_key()
            got = out[1].detach().to("cpu", copy=True)
            if key in self.recorded and not torch.equal(self.recorded[key], got):
                self.ambiguous.add(key)      # one module routing twice in one forward
            self.recorded[key] = got
        return out


def record_routing(model: nn.Module, batch, loss_fn, *, amp_dtype=None) -> Routing:
    """The routing of ``batch`` (``Routing.batch``): one real forward of
    ``loss_fn(model, batch)`` without gradients, in the model's training mode, under
    autocast to ``amp_dtype`` if given; the random state is restored after, so the step
    that follows draws what it would have drawn. A second forward, drawing afresh, tells
    whether the routing varies from step to step (``Routing.varies``: dropout before a
    router, say), which the estimate then says."""
    tensors = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    devices = [device] if device.type == "cuda" else []
    cast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None \
        else contextlib.nullcontext()
    recorded = []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), cast:
        for _ in range(2):          # the second draws afresh: does the routing vary?
            with _Recorder(model) as rec:
                loss_fn(model, batch)
            for key in rec.ambiguous:
                rec.recorded.pop(key)        # a lookup of it then says what is missing
            recorded.append(rec.recorded)
    first, second = recorded
    varies = first.keys() != second.keys() or any(not torch.equal(first[k], second[k])
                                                  for k in first)
    return Routing("batch", first, varies=varies)
