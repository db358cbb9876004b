"""Every rank's figures of one sharded step, measured or predicted.

    s = predict(cfg, 8, world_size=64)
    s.rank_peak_bytes        # [int] * 64: each rank's tensor-level peak
    s.peak_bytes             # the largest: the figure for "the run"
    s.frame()                # one row per rank (raw bytes)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from memprop.measure import Measurement
from memprop.sharded.config import FSDPConfig

__all__ = ["ShardedMeasurement"]


@dataclasses.dataclass
class ShardedMeasurement:
    """One sharded step (FSDP2, HSDP, tensor parallelism) on every rank. ``ranks``
    holds the ``Measurement`` of each rank that ran; ``same_as[r]`` is the rank whose
    figures rank ``r`` has (``r`` itself when it ran: every rank of a real run; in a
    prediction one rank per shard layout, NOTE [ Which ranks are predicted ],
    memprop.sharded.prediction)."""

    fsdp: FSDPConfig
    predicted: bool
    ranks: dict[int, Measurement]
    same_as: list[int]
    seconds: float | None = None            # wall time of the prediction or the run
    # layers="extrapolate": the depths predicted (NOTE [ Predicting a deep model from
    # three shallow ones ], memprop.sharded.layers), or None and why the whole model was
    extrapolated_from: tuple[int, ...] | None = None
    extrapolation_refused: str | None = None

    @property
    def world_size(self) -> int:
        return self.fsdp.world_size

    def rank(self, r: int) -> Measurement:
        return self.ranks[self.same_as[r]]

    @property
    def rank_peak_bytes(self) -> list[int]:
        return [self.rank(r).peak_bytes for r in range(self.world_size)]

    @property
    def peak_bytes(self) -> int:
        return max(self.rank_peak_bytes)

    @property
    def rank_saved_bytes(self) -> list[int]:
        return [self.rank(r).saved_bytes for r in range(self.world_size)]

    @property
    def largest_rank(self) -> int:
        peaks = self.rank_peak_bytes
        return peaks.index(max(peaks))

    def frame(self) -> pd.DataFrame:
        """One row per rank: its peak by phase, stored bytes, live bytes before the step,
        its sharded parameters, the all-gathered parameters at the peak and at their
        maximum (NOTE [ Gathered parameters ], memprop.sharded.resizes), gradients and
        optimizer state (each at its maximum), and the rank whose run it is
        (``same_as``)."""
        rows = []
        for r in range(self.world_size):
            m = self.rank(r)
            rows.append({"rank": r, "same_as": self.same_as[r], "peak_bytes": m.peak_bytes,
                         **{f"{p}_peak_bytes": m.peak_by_phase.get(p, 0)
                            for p in ("forward", "backward", "optimizer")},
                         "saved_bytes": m.saved_bytes, "start_bytes": m.start_bytes,
                         "sharded_parameter_bytes": m.peak_by_category.get("parameter", 0),
                         "gathered_bytes_at_peak": m.meta.get("gathered_bytes_at_peak"),
                         "gathered_peak_bytes": m.meta.get("gathered_peak_bytes"),
                         "gradient_bytes": m.peak_by_category.get("gradient", 0),
                         "optimizer_bytes": m.peak_by_category.get("optimizer", 0)})
        return pd.DataFrame(rows)

    def to_json(self) -> dict[str, Any]:
        first = self.rank(self.largest_rank)
        return {"predicted": self.predicted, "world_size": self.world_size,
                "replicate": self.fsdp.replicate, "shard": self.fsdp.shard,
                "tp": self.fsdp.tp, "fsdp": self.fsdp.fsdp, "offload": self.fsdp.offload,
                "reshard_after_forward": self.fsdp.reshard_after_forward,
                "mixed_precision": self.fsdp.mixed_precision, "backend": self.fsdp.backend,
                "peak_bytes": self.peak_bytes, "largest_rank": self.largest_rank,
                "rank_peak_bytes": self.rank_peak_bytes,
                "rank_saved_bytes": self.rank_saved_bytes,
                "ranks_run": sorted(self.ranks), "seconds": self.seconds,
                "extrapolated_from": list(self.extrapolated_from or []) or None,
                "extrapolation_refused": self.extrapolation_refused,
                "batch_size_per_rank": first.batch_size, "optimizer": first.optimizer,
                "strategy": first.strategy,
                "peak_by_phase": first.peak_by_phase}
