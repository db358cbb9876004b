"""KV caches off while a model is checkpointed, as transformers'
``gradient_checkpointing_enable`` does for training.

NOTE [ Checkpointing and KV caches ]
  A decoder with ``config.use_cache`` appends each layer's keys and values to a cache
  object during forward. Under checkpointing every recompute runs the layer again and
  appends again (64 -> 128 cached tokens on a tiny GPT-2), the peak grows (1.3x GPT-2's
  under transformers' own checkpointing), other decoders fail with shape errors, and the
  cache holds tensors no saved-tensor hook sees. A training step never reads the cache,
  so applying a strategy turns ``use_cache`` off on every config of the model (a
  one-line warning says so) and ``remove_strategy`` turns it back on.
"""

from __future__ import annotations

import warnings

from torch import nn

__all__ = ["cache_off", "CacheRestore"]


def _configs(model: nn.Module) -> list:
    """Every distinct config object (and sub-config) the model's modules hold."""
    seen: dict[int, object] = {}
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "to_dict"):
            continue
        seen[id(cfg)] = cfg
        stack.extend(v for v in vars(cfg).values() if hasattr(v, "to_dict"))
    return list(seen.values())


class CacheRestore:
    """The undo of ``cache_off``: turns ``use_cache`` back on for ``configs``. An object,
    not a closure, so a model holding it deep-copies and pickles (NOTE [ A strategy
    travels with the model ], memprop.checkpoint.forms.patch)."""

    def __init__(self, configs: list):
        self.configs = configs

    def __call__(self) -> None:
        for cfg in self.configs:
            cfg.use_cache = True
        self.configs = []


def cache_off(model: nn.Module, *, warn: bool = True) -> CacheRestore:
    """Set ``use_cache = False`` wherever it is true; returns the undo (a
    ``CacheRestore``)."""
    turned = [cfg for cfg in _configs(model) if getattr(cfg, "use_cache", False) is True]
    for cfg in turned:
        cfg.use_cache = False
    if turned and warn:
        warnings.warn(f"memprop.checkpoint: use_cache=True is incompatible with activation "
                      f"checkpointing; {type(model).__name__}'s KV cache is off while the "
                      "strategy is applied", stacklevel=3)
    return CacheRestore(turned)
