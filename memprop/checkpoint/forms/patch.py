"""What a strategy leaves on a model: objects the model holds, so it travels with it.

NOTE [ A strategy travels with the model ]
  A strategy changes how a module runs by setting an instance ``forward`` attribute,
  never by wrapping modules, so ``state_dict()`` keys do not change. That attribute is a
  ``PatchedForward``: an instance of a module-level class whose whole state (the module
  it patches, the blocks of its segment, the options) is ordinary attributes. So:
    * ``copy.deepcopy(model)`` copies each patch with its module, and deepcopy's memo
      maps every module the patch refers to onto the copy's: the copy runs and trains
      its own blocks (a closure would be copied by reference and run the original's);
    * ``pickle`` and ``torch.save(model)`` store it by class name and attributes, and a
      loaded model runs the strategy as it was applied;
    * anything that calls ``module(...)`` (``torch.compile``, DDP, FSDP2 hooks, the
      model's own loop) meets the patch through ``nn.Module.__call__``.
  The model holds one ``Applied`` record under ``_memprop_applied``: the strategy, its
  patches and the configs whose KV cache it turned off (NOTE [ Checkpointing and KV
  caches ], memprop.checkpoint.forms.cache). ``remove_strategy`` undoes exactly those, so on a
  copy it undoes the copy's. A patch holds nothing between steps but what the strategy
  itself is (a segment's hand-over ``box`` is emptied when its last block is called).

A new mechanism subclasses ``PatchedForward``, implements ``__call__`` (calling
``self.original(...)`` for the module's own forward) and is installed with
``patch.install()``; ``Applied(strategy, patches)`` then goes on the model via
``Applied.record``.
"""

from __future__ import annotations

import contextlib

from torch import nn

from memprop.checkpoint.forms.cache import CacheRestore, cache_off
from memprop.errors import StrategyError

_FSDP_MODULES: tuple[type, ...]              # FSDP2's module class, or none
try:                                          # FSDP2 (torch.distributed may be absent)
    from torch.distributed.fsdp import FSDPModule
    _FSDP_MODULES = (FSDPModule,)
except ImportError:                           # pragma: no cover
    _FSDP_MODULES = ()

__all__ = ["PatchedForward", "Applied", "APPLIED", "refuse_sharded"]

APPLIED = "_memprop_applied"      # model.__dict__ key of the Applied record


class PatchedForward:
    """Base of the instance ``forward`` a strategy installs on ``module`` (NOTE above).

    ``previous``: the instance ``forward`` the module had before (None: its class's)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.previous = None

    def original(self, *args, **kwargs):
        """The module's own forward, as it ran before the patch."""
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def install(self) -> "PatchedForward":
        had = self.module.__dict__.get("forward")
        if isinstance(had, PatchedForward):
            raise StrategyError("memprop.checkpoint: a block is already checkpointed; "
                                "remove the strategy first (memprop.checkpoint.remove_strategy)")
        self.previous = had
        self.module.forward = self
        return self

    def uninstall(self) -> None:
        if self.module.__dict__.get("forward") is not self:
            return                       # already gone (removed, or replaced by the user)
        if self.previous is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.previous

    def __call__(self, *args, **kwargs):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {type(self.module).__name__}>"


class Applied:
    """What one strategy changed on a model: ``patches`` installed, and the undo of the
    KV caches it turned off. Held by the model under ``APPLIED`` (NOTE above)."""

    def __init__(self, strategy, patches: list[PatchedForward], restore_cache: CacheRestore):
        self.strategy, self.patches, self.restore_cache = strategy, list(patches), restore_cache

    @classmethod
    def record(cls, model: nn.Module, strategy, patches: list[PatchedForward], *,
               cache: bool | None = None) -> nn.Module:
        """Mark ``model`` as running ``strategy`` with ``patches`` (already installed).
        While anything is patched (or ``cache=True``) the model's KV cache is off."""
        turn_off = bool(patches) if cache is None else cache
        restore = cache_off(model) if turn_off else CacheRestore([])
        model.__dict__[APPLIED] = cls(strategy, patches, restore)
        return model

    @contextlib.contextmanager
    def suspended(self):
        """The plain model inside: every patch uninstalled, every KV cache the strategy
        turned off on again; afterwards the same patch objects installed again in order
        and those caches off, so the model, this record and its patches are exactly as
        before (NOTE [ Inference runs the plain model ], memprop.measure)."""
        patches, configs = list(self.patches), list(self.restore_cache.configs)
        for patch in reversed(patches):
            patch.uninstall()
        for cfg in configs:
            cfg.use_cache = True
        try:
            yield
        finally:
            for patch in patches:
                patch.install()
            for cfg in configs:
                cfg.use_cache = False

    def remove(self) -> None:
        for patch in reversed(self.patches):
            patch.uninstall()
        self.restore_cache()
        self.patches = []

    def __repr__(self) -> str:
        return f"<Applied {self.strategy}: {len(self.patches)} patches>"


def refuse_sharded(modules: list[nn.Module], what: str, *, inside: list | None = None) -> None:
    """``StrategyError`` if FSDP2 (``fully_shard``) manages a module that runs inside one
    replayed region ``modules`` other than a lone block itself: its all-gathers and
    output hooks run inside the region, and a replay meets them in another state
    (measured: ``forward:`` and ``remat:`` fail, a multi-block segment finds the
    hand-over changed). One block per checkpoint is fine (``full``, ``selective``,
    ``ops:``, ``nested:`` with one-block top segments). ``inside``: the modules that
    run inside the region, if the caller walked them already (a lone block's modules
    without the block itself; every module of several)."""
    if not _FSDP_MODULES:
        return
    if inside is None:
        inside = [m for root in modules for m in (root.modules() if len(modules) > 1
                                                   else list(root.modules())[1:])]
    if any(isinstance(m, _FSDP_MODULES) for m in inside):
        raise StrategyError(
            f"memprop.checkpoint: {what} spans modules sharded with FSDP2 (fully_shard), "
            "whose all-gathers and hooks cannot be replayed inside one region; use a "
            "strategy that checkpoints each sharded block on its own (full, selective, "
            "ops:KEYS, every:K)")
