"""A trial: one isolated run of one configuration, and its identity in the results store."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from memprop._version import __version__
from memprop.models import ModelConfig, model_config
from memprop.sweep.parallel import Parallel

__all__ = ["Trial"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Trial:
    """One isolated run: a model config, a batch, a strategy, and how to run it.

    Frozen and hashable; ``key()`` identifies its result in the store (the full config,
    the memprop version and the torch version). ``parallel``: a sharded trial (every
    rank, ``batch`` examples each; memprop.sweep.parallel), or None for one device; a
    trial without one keeps the key it had before sharded trials existed (``to_dict``
    leaves the field out), so stores made then resume."""

    spec: str
    model: str
    model_fields: tuple[tuple[str, Any], ...]
    batch: int
    strategy: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    optimizer: str = "sgd"
    repeats: int = 3
    warmup: int = 1
    timeout_s: float = 600.0
    seed: int = 0
    budget_bytes: int | None = None
    budget_mode: str = "tensor"    # NOTE [ What a tensor budget means ]; or "process"
    threads: int = 0               # torch threads; 0: the executor's share of the cores
    amp: str | None = None         # autocast: "bf16" / "fp16"
    estimate: bool = True
    mode: str = "measure"          # "measure": everything; "fit": does one step fit?
    parallel: Parallel | None = None

    def config(self) -> ModelConfig:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in self.model_fields}
        return model_config(self.model, **fields)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_fields"] = dict(self.model_fields)
        if d["parallel"] is None:
            del d["parallel"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trial":
        d = dict(d)
        d["model_fields"] = tuple(sorted(d["model_fields"].items()))
        if d.get("parallel") is not None:
            d["parallel"] = Parallel(**d["parallel"])
        return cls(**d)

    def point(self) -> dict[str, Any]:
        """What identifies the trial's workload apart from its batch: a frontier is keyed
        by this (model config, strategy, dtype, optimizer, amp, budget and its mode)."""
        d = self.to_dict()
        for k in ("batch", "repeats", "warmup", "timeout_s", "estimate", "mode", "spec"):
            d.pop(k)
        return d

    def key(self) -> str:
        import torch
        payload = json.dumps({**self.to_dict(), "memprop": __version__,
                              "torch": torch.__version__}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def label(self) -> str:
        fields = ",".join(f"{k}={v}" for k, v in self.model_fields)
        ranks = (f" x{self.parallel.world_size} ranks"
                 f"{' predicted' if self.parallel.predicted else ''}" if self.parallel else "")
        return f"{self.model}({fields}) batch={self.batch} {self.strategy}{ranks}"
