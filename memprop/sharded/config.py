"""What a sharded step is: FSDP2 over how many ranks, with which knobs.

    FSDPConfig(world_size=64)                                  # ZeRO-3: reshard after forward
    FSDPConfig(world_size=8, reshard_after_forward=False)      # ZeRO-2: keep the gathered ones
    FSDPConfig(world_size=8, mixed_precision="bf16")   # bf16 parameters, fp32 reduction
"""

from __future__ import annotations

import dataclasses

import torch

from memprop.errors import ConfigError

__all__ = ["FSDPConfig", "MIXED_PRECISION", "BACKENDS"]

# mixed_precision -> (param_dtype, reduce_dtype) of FSDP2's MixedPrecisionPolicy
MIXED_PRECISION = {"bf16": (torch.bfloat16, torch.float32)}
BACKENDS = ("gloo",)        # the process group a real run uses, and its prediction models


@dataclasses.dataclass(frozen=True, kw_only=True)
class FSDPConfig:
    """FSDP2 (``fully_shard``) on every block and then the root, as torchtitan applies
    it, over a 1-D mesh of ``world_size`` CPU ranks.

    ``reshard_after_forward``: free each block's all-gathered parameters after its
    forward and gather them again for backward (True, ZeRO-3), or keep them to backward
    (False, ZeRO-2). ``mixed_precision``: ``"bf16"`` runs forward and backward on bf16
    parameters and reduces gradients in float32 (``MixedPrecisionPolicy``); None keeps
    the parameters' dtype. ``backend``: the process group of a real run (``gloo``, CPU);
    a prediction allocates what that backend's collectives allocate (NOTE [ gloo
    reduce-scatters through a full copy ], memprop.sharded.gloo)."""

    world_size: int
    reshard_after_forward: bool = True
    mixed_precision: str | None = None
    backend: str = "gloo"

    @classmethod
    def of(cls, world_size: int | None, fsdp: "FSDPConfig | None", who: str) -> "FSDPConfig":
        """The config a caller gave as ``world_size=N`` or ``fsdp=FSDPConfig(...)``, one of
        them (``who``: the function, for the error)."""
        if (world_size is None) == (fsdp is None):
            raise ConfigError(f"memprop.sharded.{who}: pass world_size=N or "
                              "fsdp=FSDPConfig(world_size=N, ...), one of them")
        if fsdp is not None:
            return fsdp
        assert world_size is not None                       # checked just above
        return cls(world_size=world_size)

    def __post_init__(self) -> None:
        n = self.world_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"memprop.sharded: world_size = {n!r} is not allowed; it must "
                              "be an integer >= 1 (the number of ranks FSDP2 shards over)")
        if not isinstance(self.reshard_after_forward, bool):
            raise ConfigError(f"memprop.sharded: reshard_after_forward = "
                              f"{self.reshard_after_forward!r} is not allowed; use True or False")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"memprop.sharded: mixed_precision = {self.mixed_precision!r} is "
                              f"not allowed; choose one of: {', '.join(MIXED_PRECISION)}, or "
                              "None for the parameters' own dtype")
        if self.backend not in BACKENDS:
            raise ConfigError(f"memprop.sharded: backend = {self.backend!r} is not supported; "
                              f"choose one of: {', '.join(BACKENDS)}")

    def describe(self) -> str:
        parts = [f"FSDP2 over {self.world_size} ranks",
                 "reshard after forward" if self.reshard_after_forward
                 else "no reshard after forward"]
        if self.mixed_precision:
            parts.append(f"{self.mixed_precision} parameters, fp32 reduction")
        return ", ".join(parts)
