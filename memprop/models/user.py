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
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from memprop.errors import ConfigError
from memprop.models.base import ModelConfig

__all__ = ["UserModelConfig", "Workload", "load_factory"]

_SHAPE_HINT = ("a factory returning an nn.Module needs --input-shape 3,32,32 (input_shape="
               "(3, 32, 32) in Python or a spec); one returning a workload "
               "(memprop.models.Workload) builds its own batches")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


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
        return output.float().pow(2).mean()  # synthetic: mean square of the output


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
