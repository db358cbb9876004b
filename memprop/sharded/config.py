"""What a sharded step is: how many ranks, on which mesh, with which FSDP2 knobs.

    FSDPConfig(world_size=64)                                  # ZeRO-3: reshard after forward
    FSDPConfig(world_size=8, reshard_after_forward=False)      # ZeRO-2: keep the gathered ones
    FSDPConfig(world_size=8, mixed_precision="bf16")   # bf16 parameters, fp32 reduction
    FSDPConfig(world_size=4, replicate=2)              # HSDP: 2 replicas of 2 shards
    FSDPConfig(world_size=4, tp=2)                     # FSDP over 2 ranks x tensor parallel 2
    FSDPConfig(world_size=2, tp=2, fsdp=False)         # tensor parallelism alone
    FSDPConfig(world_size=8, offload=True)             # CPUOffloadPolicy

NOTE [ The rank mesh ]
  ``world_size`` counts every rank: ``replicate x shard x tp``. The mesh
  (memprop.sharded.mesh) has the dimensions of degree above 1, outermost first, named
  ``replicate``, ``shard``, ``tp`` (``shard`` is there whenever FSDP2 is on, even of
  degree 1): rank ``r`` sits at ``(r // (shard*tp), r // tp % shard, r % tp)``, so the
  ranks of one tensor-parallel group are neighbours, as torchtitan lays them out. FSDP2
  shards over ``shard`` and, with ``replicate > 1``, all-reduces the shards' gradients
  over ``replicate`` (HSDP); ``parallelize_module`` splits the layers over ``tp``.
"""

from __future__ import annotations

import dataclasses

import torch

from memprop.errors import ConfigError

__all__ = ["FSDPConfig", "MIXED_PRECISION", "BACKENDS"]

# mixed_precision -> (param_dtype, reduce_dtype) of FSDP2's MixedPrecisionPolicy
MIXED_PRECISION = {"bf16": (torch.bfloat16, torch.float32)}
BACKENDS = ("gloo",)        # the process group a real run uses, and its prediction models


def _degree(name: str, value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"memprop.sharded: {name} = {value!r} is not allowed; it must be "
                          f"an integer >= 1 ({what})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FSDPConfig:
    """A sharded step over ``world_size`` CPU ranks (NOTE [ The rank mesh ]): FSDP2
    (``fully_shard``) on every block and then the root, as torchtitan applies it, over
    the ``shard`` ranks, with ``replicate`` replicas (HSDP) and ``tp``-way tensor
    parallelism inside (memprop.sharded.tensor_parallel).

    ``fsdp``: shard with FSDP2 (True), or tensor parallelism alone (False: then
    ``world_size == tp``). ``reshard_after_forward``: free each block's all-gathered
    parameters after its forward and gather them again for backward (True, ZeRO-3), or
    keep them to backward (False, ZeRO-2). ``mixed_precision``: ``"bf16"`` runs forward
    and backward on bf16 parameters and reduces gradients in float32
    (``MixedPrecisionPolicy``); None keeps the parameters' dtype. ``offload``: FSDP2's
    ``CPUOffloadPolicy`` (sharded parameters, gradients and optimizer step on the host;
    NOTE [ Offload on CPU ranks ], memprop.sharded.apply). ``backend``: the process
    group of a real run (``gloo``, CPU); a prediction allocates what that backend's
    collectives allocate (NOTE [ gloo reduce-scatters through a full copy ],
    memprop.sharded.gloo)."""

    world_size: int
    replicate: int = 1
    tp: int = 1
    fsdp: bool = True
    reshard_after_forward: bool = True
    mixed_precision: str | None = None
    offload: bool = False
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
        _degree("world_size", self.world_size, "the number of ranks")
        _degree("replicate", self.replicate, "HSDP's replicas of each shard group")
        _degree("tp", self.tp, "the tensor-parallel degree")
        n, r, t = self.world_size, self.replicate, self.tp
        if n % (r * t):
            raise ConfigError(f"memprop.sharded: world_size = {n} is not divisible by "
                              f"replicate x tp = {r} x {t} = {r * t}; world_size is "
                              "replicate x shard x tp (NOTE [ The rank mesh ])")
        for name in ("fsdp", "reshard_after_forward", "offload"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"memprop.sharded: {name} = {getattr(self, name)!r} is not "
                                  "allowed; use True or False")
        if not self.fsdp and (r > 1 or t != n):
            raise ConfigError(f"memprop.sharded: fsdp = False (tensor parallelism alone) "
                              f"needs world_size == tp and replicate = 1; got world_size = "
                              f"{n}, tp = {t}, replicate = {r}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"memprop.sharded: mixed_precision = {self.mixed_precision!r} is "
                              f"not allowed; choose one of: {', '.join(MIXED_PRECISION)}, or "
                              "None for the parameters' own dtype")
        if not self.fsdp and (self.mixed_precision or self.offload):
            raise ConfigError("memprop.sharded: mixed_precision and offload are FSDP2 "
                              "policies; with fsdp = False (tensor parallelism alone) leave "
                              "them unset")
        if self.backend not in BACKENDS:
            raise ConfigError(f"memprop.sharded: backend = {self.backend!r} is not supported; "
                              f"choose one of: {', '.join(BACKENDS)}")

    @property
    def shard(self) -> int:
        """The ranks FSDP2 shards each parameter over (1 without FSDP2)."""
        return self.world_size // (self.replicate * self.tp)

    def mesh_dims(self) -> list[tuple[str, int]]:
        """(name, degree) of each mesh dimension, outermost first (NOTE [ The rank mesh ])."""
        dims = [("replicate", self.replicate)] if self.replicate > 1 else []
        if self.fsdp:
            dims.append(("shard", self.shard))
        if self.tp > 1 or not self.fsdp:
            dims.append(("tp", self.tp))
        return dims

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """``rank``'s (replicate, shard, tp) indices (NOTE [ The rank mesh ])."""
        return (rank // (self.shard * self.tp), rank // self.tp % self.shard, rank % self.tp)

    def describe(self) -> str:
        if self.fsdp:
            parts = [f"FSDP2 over {self.world_size} ranks" if self.world_size == self.shard
                     else f"{self.world_size} ranks: FSDP2 over {self.shard}"]
            if self.replicate > 1:
                parts.append(f"{self.replicate} replicas (HSDP)")
            if self.tp > 1:
                parts.append(f"tensor parallel {self.tp}")
            parts.append("reshard after forward" if self.reshard_after_forward
                         else "no reshard after forward")
        else:
            parts = [f"tensor parallel over {self.tp} ranks (no FSDP2)"]
        if self.mixed_precision:
            parts.append(f"{self.mixed_precision} parameters, fp32 reduction")
        if self.offload:
            parts.append("CPU offload")
        return ", ".join(parts)
