"""Any user model, named ``package.module:factory``.

The factory is called with the config's ``kwargs`` and must return an ``nn.Module``.
The user states the input shape of one example (without the batch dimension). If the
module has an ``objective(output, targets)`` method it is the loss; otherwise memprop
uses a synthetic objective, the mean square of the output, which needs no targets and
differentiates every parameter that reaches the output.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any

import torch
from torch import nn

from memprop.errors import ConfigError
from memprop.models.base import Batch, ModelConfig

__all__ = ["UserModelConfig", "load_factory"]

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


class _UserWorkload(nn.Module):
    """Wraps the user's module so that it has ``objective`` and, if named, ``blocks``."""

    def __init__(self, module: nn.Module, blocks_attr: str | None):
        super().__init__()
        self.module = module
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
    input_shape: tuple[int, ...] = ()
    blocks_attr: str | None = None  # attribute path of the ModuleList / Sequential chain
    kwargs: tuple[tuple[str, Any], ...] = ()

    def _validate(self):
        load_factory(self.factory)
        shape = self.input_shape
        if not isinstance(shape, tuple) or not shape or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape):
            self._fail("input_shape", "a non-empty tuple of positive integers, e.g. (3, 32, 32)")

    def _build(self) -> nn.Module:
        module = load_factory(self.factory)(**dict(self.kwargs))
        if not isinstance(module, nn.Module):
            raise ConfigError(f"memprop.models: factory {self.factory!r} returned "
                              f"{type(module).__name__}, not an nn.Module")
        return _UserWorkload(module, self.blocks_attr)

    def _batch(self, batch_size, gen, dtype) -> Batch:
        x = torch.randn(batch_size, *self.input_shape, generator=gen, dtype=dtype)
        return (x,), None
