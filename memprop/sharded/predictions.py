"""One sharded workload predicted at several micro-batches and strategies, each once.

    runs = RankPredictions(config, FSDPConfig(world_size=64), optimizer="adam",
                           dtype=torch.bfloat16)
    runs.peak(4, "full")          # bytes: the largest rank's predicted peak at batch 4
    runs.get(4, "full")           # the ShardedMeasurement (predicted once, then kept)

``memprop fit`` and the per-rank planner ask the same questions many times (the plain
step at the batch being planned, ``full`` at the batch above the largest that fits); a
7B-shaped prediction takes seconds, so each is made once per (batch, strategy).
"""

from __future__ import annotations

import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memprop.checkpoint import NoCheckpoint, parse_strategy
from memprop.checkpoint.forms.cache import cache_off
from memprop.checkpoint.planning.simulate import simulate
from memprop.sharded.config import FSDPConfig
from memprop.sharded.prediction import predict
from memprop.sharded.result import ShardedMeasurement

__all__ = ["RankPredictions", "RecomputeFlops"]


class RankPredictions:
    """Predictions (``memprop.sharded.predict``) of ``config`` under ``fsdp`` with one
    optimizer and dtype, kept by (micro-batch per rank, strategy spec). ``seconds``:
    the wall time spent predicting; ``made``: how many predictions ran; ``extrapolated``:
    how many of them came from the model at 3, 4 and 5 layers (``layers="extrapolate"``,
    NOTE [ Predicting a deep model from three shallow ones ], memprop.sharded.layers)."""

    def __init__(self, config, fsdp: FSDPConfig, *, optimizer: str = "sgd",
                 dtype: torch.dtype = torch.float32, layers: str = "all"):
        self.config, self.fsdp, self.optimizer, self.dtype = config, fsdp, optimizer, dtype
        self.layers = layers
        self._kept: dict[tuple[int, str], ShardedMeasurement] = {}
        self.seconds = 0.0
        self.made = 0
        self.extrapolated = 0

    def get(self, batch_size: int, strategy: str = "none") -> ShardedMeasurement:
        key = (batch_size, strategy)
        if key not in self._kept:
            start = time.perf_counter()
            self._kept[key] = predict(self.config, batch_size, fsdp=self.fsdp,
                                      optimizer=self.optimizer, strategy=strategy,
                                      dtype=self.dtype, layers=self.layers)
            self.seconds += time.perf_counter() - start
            self.made += 1
            self.extrapolated += self._kept[key].extrapolated_from is not None
        return self._kept[key]

    def peak(self, batch_size: int, strategy: str = "none") -> int:
        """The largest rank's predicted tensor-level peak (bytes)."""
        return self.get(batch_size, strategy).peak_bytes

    def known(self, strategy: str) -> dict[int, int]:
        """{micro-batch: peak bytes} of the predictions of ``strategy`` made so far."""
        return {b: s.peak_bytes for (b, spec), s in self._kept.items() if spec == strategy}


class RecomputeFlops:
    """Per-rank recompute FLOPs of a strategy at a micro-batch: backward FLOPs beyond the
    plain step's, counted (FlopCounterMode) on a fake build of the unsharded model at
    that batch, divided by the TP degree: TP splits the blocks' matmuls and attention
    ``tp`` ways; the norms it repeats on every rank are under-counted. FSDP2 changes no
    rank's FLOPs (each runs the whole model on its own micro-batch). Each (batch,
    strategy) is simulated once."""

    def __init__(self, config, *, optimizer: str = "sgd", dtype: torch.dtype = torch.float32):
        self.config, self.optimizer, self.dtype = config, optimizer, dtype
        self._kept: dict[tuple[int, str], int] = {}

    def flops(self, batch_size: int, spec: str, *, tp: int = 1) -> int:
        if spec == "none":
            return 0
        key = (batch_size, spec)
        if key not in self._kept:
            with FakeTensorMode():
                model = self.config.build(dtype=self.dtype)
                batch = self.config.example_batch(batch_size, dtype=self.dtype)
            restore = cache_off(model, warn=False)          # as plan() runs it
            try:
                plain, m = (simulate(model, batch, s, optimizer=self.optimizer,
                                     loss_fn=self.config.loss)
                            for s in (NoCheckpoint(), parse_strategy(spec)))
            finally:
                restore()
            self._kept[key] = m.backward_flops - plain.backward_flops
        return self._kept[key] // tp
