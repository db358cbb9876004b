"""Any user model, named ``package.module:factory``.

The factory is called with the config's ``kwargs`` and returns either

* an ``nn.Module``: the user states the shape of one input example (``input_shape``,
  without the batch dimension) and memprop feeds it float ``randn`` inputs. If the
  module has an ``objective(output, targets)`` method it is the loss; otherwise memprop
  uses a synthetic objective, the mean square of the output, which needs no targets and
  differentiates every parameter that reaches the output; or
* a *workload*: a ``Workload`` (or a dict with the same keys) holding the model, a batch
  builder ``batch(batch_size, generator)`` returning a batch of any structure (token
  ids, dicts, tuples), and ``loss(model, batch)``; optionally ``forward(model, batch)``
  for inference (default: the loss). Token-id models (an ``nn.Embedding`` first) are
  profiled this way. Floating-point tensors of the batch are cast to the step's dtype.
  To reach the batch builder without building weights twice, ``example_batch`` calls
  the factory on the meta device (no memory).

Your own module object, without a factory (``measure_step(model, batch)``,
``estimate(model, batch)``): NOTE [ One step of any module ] below says what a batch is
and which loss a step differentiates (``own_loss``, ``own_forward``, ``step_loss``).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from memprop.errors import ConfigError
from memprop.models.base import ModelConfig

__all__ = ["UserModelConfig", "Workload", "load_factory", "Criterion", "own_loss",
           "own_forward", "step_loss", "split_batch", "synthetic_objective"]

_SHAPE_HINT = ("a factory returning an nn.Module needs --input-shape 3,32,32 (input_shape="
               "(3, 32, 32) in Python or a spec); one returning a workload "
               "(memprop.models.Workload) builds its own batches")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


# NOTE [ One step of any module ]
#   ``measure_step(model, batch)``, ``estimate(model, batch)`` (and the planner, given
#   ``loss_fn=own_loss``) take any ``nn.Module`` and an example batch, which is one of:
#   * a tensor: the model's one positional input, no targets: ``model(x)``;
#   * ``(inputs, targets)``, a tuple or list of two: ``inputs`` a tensor (``model(x)``),
#     a tuple or list (``model(*inputs)``: the zoo's ``((x,), y)``) or a dict
#     (``model(**inputs)``); ``targets`` anything, ``None`` for none;
#   * a dict (any mapping, as transformers' ``BatchEncoding``): keyword inputs, no
#     separate targets: ``model(**batch)`` (transformers models find ``labels`` there).
#   The loss one training step differentiates is the first of these that applies:
#   1. ``loss_fn=``: called ``loss_fn(model, batch)``, memprop's step-loss form (every
#      config's ``loss``, a ``Workload``'s, the planner's); torch's own losses, an
#      ``nn.Module`` (``nn.CrossEntropyLoss()``) or a function of ``torch.nn.functional``
#      (``F.cross_entropy``), and ``Criterion(fn)`` for any other ``fn(output, targets)``,
#      are called ``fn(model(inputs), targets)`` (``step_loss``);
#   2. the output's own ``.loss`` (a transformers ``ModelOutput``, a dict with "loss"),
#      when it is not None;
#   3. the model's ``objective(output, targets)`` method (the zoo's convention);
#   4. without targets, a tensor output's synthetic objective: the mean square of the
#      output (``synthetic_objective``), which needs no targets and differentiates every
#      parameter that reaches the output. Its bytes are the model's with a cheap loss;
#      a real loss adds what it stores (cross-entropy: the log-softmax, B x classes).
#   Otherwise the step has no loss to take, and ``ConfigError`` says so in one line,
#   naming ``loss_fn=`` and what was given. Prediction alone (the inference pass) runs
#   ``own_forward``: the same inputs without the targets (nor a dict's ``labels``, as
#   ``hf:`` models' inference does).

_BATCH_FORMS = ("a tensor (the input), (inputs, targets), or a dict of keyword inputs")
_LOSS_FIX = ("pass loss_fn=, e.g. loss_fn=F.cross_entropy (called as loss_fn(output, "
             "targets)) or loss_fn=fn(model, batch) returning the scalar to differentiate")


def _describe(value) -> str:
    """A value as an error message names it: a tensor by its shape and dtype."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        article = "an" if dtype[0] in "aeiou" else "a"
        return f"{article} {dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))}"
    return f"a {type(value).__name__}"


def split_batch(batch) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch (NOTE [ One step of any module ]); targets None
    for a tensor or a dict. A ``ConfigError`` naming the forms for anything else."""
    if isinstance(batch, torch.Tensor) or isinstance(batch, Mapping):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(
            batch[0], (torch.Tensor, tuple, list, Mapping)):
        return batch[0], batch[1]
    raise ConfigError(f"memprop.measure: a batch is {_BATCH_FORMS}; got {_describe(batch)}; "
                      "for any other structure pass loss_fn=fn(model, batch) and "
                      "forward_fn=fn(model, batch)")


def _run(model: nn.Module, inputs):
    """``model`` on the inputs of a batch: positional, or keywords for a mapping."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def synthetic_objective(output: torch.Tensor) -> torch.Tensor:
    """The mean square of ``output``, in float32: a loss that needs no targets."""
    return output.float().pow(2).mean()


def _own_loss_of(output):
    """The ``.loss`` a model's output carries (transformers' ``ModelOutput``), or None."""
    if isinstance(output, Mapping):
        return output.get("loss")
    return getattr(output, "loss", None) if not isinstance(output, torch.Tensor) else None


def own_loss(model: nn.Module, batch) -> torch.Tensor:
    """The loss of one step of any module on ``batch`` when no ``loss_fn`` is given:
    the output's ``.loss``, else ``model.objective(output, targets)``, else (no targets)
    the synthetic objective (NOTE [ One step of any module ])."""
    inputs, targets = split_batch(batch)
    output = _run(model, inputs)
    loss = _own_loss_of(output)
    if loss is not None:
        return loss
    objective = getattr(model, "objective", None)
    if callable(objective):
        return objective(output, targets)
    if targets is None and isinstance(output, torch.Tensor):
        return synthetic_objective(output)
    name = type(model).__name__
    if targets is None:
        raise ConfigError(f"memprop.measure: {name}'s output is {_describe(output)}, not a "
                          f"tensor, and has no .loss, so a step has no loss to take; "
                          f"{_LOSS_FIX}")
    raise ConfigError(f"memprop.measure: {name} has no objective(output, targets) method "
                      f"and its output ({_describe(output)}) has no .loss, so nothing says "
                      f"how to compare it with the batch's targets ({_describe(targets)}); "
                      f"{_LOSS_FIX}")


def own_forward(model: nn.Module, batch):
    """Prediction alone on ``batch``: the model on its inputs, without the targets (and
    without a dict's ``labels``) (NOTE [ One step of any module ])."""
    inputs, _ = split_batch(batch)
    if isinstance(inputs, Mapping) and "labels" in inputs:
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
    return _run(model, inputs)


class Criterion:
    """``fn(output, targets)`` as a step loss ``(model, batch) -> scalar``: the model
    runs on the batch's inputs and ``fn`` compares its output with the targets (NOTE
    [ One step of any module ]). An object, not a closure: it pickles (sweeps) and
    deep-copies with whatever holds it.

        loss_fn = Criterion(my_loss)                  # my_loss(output, targets)
        plan(model, (x, y), "1GiB", loss_fn=loss_fn)  # any API taking loss_fn(model, batch)
    """

    def __init__(self, fn: Callable[[Any, Any], torch.Tensor]):
        if not callable(fn):
            raise ConfigError(f"memprop.measure: Criterion needs fn(output, targets), got "
                              f"{_describe(fn)}")
        self.fn = fn

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        inputs, targets = split_batch(batch)
        if targets is None:
            raise ConfigError(f"memprop.measure: loss_fn={_name(self.fn)} compares the "
                              f"output with targets, but the batch ({_describe(batch)}) has "
                              "none; pass (inputs, targets), or leave loss_fn out for the "
                              "output's own .loss or the synthetic objective")
        return self.fn(_run(model, inputs), targets)

    def __repr__(self) -> str:
        return f"Criterion({_name(self.fn)})"


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _is_torch_loss(fn) -> bool:
    """torch's own losses: loss modules and ``torch.nn.functional``'s functions, whose
    first argument is a tensor, never a model."""
    return isinstance(fn, nn.Module) or getattr(fn, "__module__", None) == "torch.nn.functional"


def step_loss(loss_fn=None) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The step loss ``(model, batch) -> scalar`` that ``loss_fn`` means (NOTE [ One step
    of any module ]): ``own_loss`` for None, a ``Criterion`` for torch's own losses,
    ``loss_fn`` itself otherwise."""
    if loss_fn is None:
        return own_loss
    if _is_torch_loss(loss_fn):
        return Criterion(loss_fn)
    if not callable(loss_fn):
        raise ConfigError(f"memprop.measure: loss_fn = {loss_fn!r} is not callable; "
                          f"{_LOSS_FIX}")
    return loss_fn


def load_factory(spec: str):
    """The callable named by ``package.module:factory``; a clear error if it is missing."""
    if not isinstance(spec, str) or not _FACTORY_RE.match(spec):
        raise ConfigError(f"memprop.models: model {spec!r} is neither a built-in model nor "
                          "a factory; write 'package.module:factory' or one of: "
                          "d2l_mlp, mlp, transformer, convnet")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"memprop.models: cannot import {module_name!r} for factory "
                          f"{spec!r}: {exc}; is it on PYTHONPATH?") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"memprop.models: {module_name!r} has no callable {attr!r} "
                          f"(from factory {spec!r})")
    return factory


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    """What a factory may return instead of a bare module (see module docstring)."""

    model: nn.Module
    batch: Callable[[int, torch.Generator], Any]        # (batch_size, generator) -> batch
    loss: Callable[[nn.Module, Any], torch.Tensor]      # (model, batch) -> scalar
    forward: Callable[[nn.Module, Any], Any] | None = None

    @classmethod
    def of(cls, made, factory: str) -> "Workload | None":
        """``made`` as a Workload; None for a bare module; an error for anything else."""
        if isinstance(made, cls) or isinstance(made, nn.Module):
            return made if isinstance(made, cls) else None
        keys = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(made, dict) or not {"model", "batch", "loss"} <= set(made) or (
                set(made) - set(keys)):
            raise ConfigError(f"memprop.models: factory {factory!r} returned "
                              f"{type(made).__name__}"
                              + (f" with keys {sorted(made)}" if isinstance(made, dict) else "")
                              + "; return an nn.Module or a workload: memprop.models.Workload"
                              "(model=..., batch=fn(batch_size, generator), loss=fn(model, "
                              "batch)) or a dict with keys model, batch, loss (and forward)")
        workload = cls(**made)
        if not isinstance(workload.model, nn.Module) or not callable(workload.batch) or \
                not callable(workload.loss):
            raise ConfigError(f"memprop.models: factory {factory!r} returned a workload whose "
                              "model is not an nn.Module or whose batch / loss is not callable")
        return workload


class _UserWorkload(nn.Module):
    """Wraps the user's module so that it has ``objective`` and, if named, ``blocks``;
    a factory's workload rides along (not a submodule: only ``module`` holds weights)."""

    def __init__(self, module: nn.Module, blocks_attr: str | None,
                 workload: Workload | None = None):
        super().__init__()
        self.module = module
        self.__dict__["workload"] = workload
        if blocks_attr:
            self.blocks_attr = "module." + blocks_attr
        elif isinstance(module, nn.Sequential):    # a Sequential is its own chain of blocks
            self.blocks_attr = "module"

    def forward(self, *inputs):
        return self.module(*inputs)

    def objective(self, output, targets):
        if hasattr(self.module, "objective"):
            return self.module.objective(output, targets)
        return synthetic_objective(output)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserModelConfig(ModelConfig):
    """A user factory, the shape of one input example, and where its blocks are."""

    name = "user"
    factory: str = ""
    input_shape: tuple[int, ...] = ()   # required when the factory returns a bare module
    blocks_attr: str | None = None  # attribute path of the ModuleList / Sequential chain
    kwargs: tuple[tuple[str, Any], ...] = ()

    def _validate(self):
        load_factory(self.factory)
        shape = self.input_shape
        if not isinstance(shape, tuple) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape):
            self._fail("input_shape", "a non-empty tuple of positive integers, e.g. (3, 32, 32)")

    def _make(self):
        try:
            return load_factory(self.factory)(**dict(self.kwargs))
        except TypeError as exc:       # wrong arguments for the factory
            raise ConfigError(f"memprop.models: factory {self.factory!r} cannot be called with "
                              f"{dict(self.kwargs)}: {exc}. Set its arguments with --set "
                              f"(kwargs= in Python); {_SHAPE_HINT}") from exc

    def _need_shape(self) -> None:
        if not self.input_shape:
            raise ConfigError(f"memprop.models: factory {self.factory!r} returned an nn.Module "
                              f"and input_shape is empty; {_SHAPE_HINT}")

    def _build(self) -> nn.Module:
        made = self._make()
        workload = Workload.of(made, self.factory)
        if workload is None:
            self._need_shape()
        return _UserWorkload(made if workload is None else workload.model, self.blocks_attr,
                             workload)

    def _batch(self, batch_size, gen, dtype):
        if self.input_shape:
            x = torch.randn(batch_size, *self.input_shape, generator=gen, dtype=dtype)
            return (x,), None
        with torch.device("meta"):          # the batch builder only: no weights allocated
            workload = Workload.of(self._make(), self.factory)
        if workload is None:
            self._need_shape()
        cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and (  # noqa: E731
            t.is_floating_point()) else t
        return tree_map(cast, workload.batch(batch_size, gen))

    def loss(self, model, batch) -> torch.Tensor:
        workload = getattr(model, "workload", None)
        if workload is None:
            return super().loss(model, batch)
        return workload.loss(model.module, batch)

    def forward(self, model, batch):
        workload = getattr(model, "workload", None)
        if workload is None:
            return super().forward(model, batch)
        return (workload.forward or workload.loss)(model.module, batch)
