"""A ``ShardedMeasurement`` as text for people (``memprop profile --fsdp N``, ``--tp M``).

Ranks whose figures are identical share one row, named by their ranks as ranges
(``0-62``, ``63``), so 1024 ranks print as a few rows; the largest rank is named.
"""

from __future__ import annotations

from memprop.sharded.result import ShardedMeasurement
from memprop.units import format_bytes

__all__ = ["render_sharded", "rank_ranges"]

# per group of ranks: the peak, by phase, and what autograd stores (raw bytes)
SHOWN = ["peak_bytes", "forward_peak_bytes", "backward_peak_bytes", "optimizer_peak_bytes",
         "saved_bytes"]


def rank_ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    spans: list[list[int]] = []
    for r in sorted(ranks):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def render_sharded(s: ShardedMeasurement, config, *, batch_size: int) -> str:
    """Header, one row per group of identical ranks, the largest rank."""
    from memprop.cli._common import render_table  # table look shared with the CLI

    m = s.rank(s.largest_rank)
    how = ("PREDICTED on a fake process group and fake tensors (nothing allocated), "
           f"{len(s.ranks)} of {s.world_size} ranks run (the others hold the same shards)"
           if s.predicted else f"measured in {s.world_size} processes (gloo)")
    sizes = ", ".join(f"{k}={v}" for k, v in config.fields().items())
    frame = s.frame()
    figures = [c for c in frame.columns if c not in ("rank", "same_as")]
    groups = frame.groupby(figures, sort=False)["rank"].apply(list).reset_index()
    groups.insert(0, "ranks", [rank_ranges(r) for r in groups["rank"]])
    shown = groups[["ranks", *SHOWN]]
    took = f" in {s.seconds:.1f} s" if s.seconds is not None else ""
    if s.extrapolated_from:
        took += (f"; from the model at {', '.join(map(str, s.extrapolated_from[:-1]))} and "
                 f"{s.extrapolated_from[-1]} layers, extrapolated to {m.meta.get('layers')} "
                 "(every figure linear in depth, checked)")
    elif s.extrapolation_refused:
        took += f"; every layer run ({s.extrapolation_refused})"
    held = m.peak_by_category
    # tensor parallelism alone: whole slices of each layer, nothing FSDP2 gathers
    params = "sharded parameters" if s.fsdp.fsdp else "parameters (its tensor-parallel slices)"
    lines = [f"{config.name} ({sizes})",
             f"batch {batch_size} per rank, {m.dtype}, cpu, strategy {m.strategy}, optimizer "
             f"{m.optimizer}; {s.fsdp.describe()}: {how}{took}",
             "",
             render_table(shown),
             "",
             f"  largest rank          {s.largest_rank}: tensor-level peak "
             f"{format_bytes(s.peak_bytes)} ({s.peak_bytes} bytes)",
             f"  held by that rank     {params} {format_bytes(held['parameter'])}, "
             f"gradients {format_bytes(held['gradient'])}, optimizer state "
             f"{format_bytes(held['optimizer'])}; live before the step "
             f"{format_bytes(m.start_bytes)}"]
    if s.fsdp.fsdp:
        lines.append(f"  gathered parameters   {format_bytes(m.meta['gathered_bytes_at_peak'])} "
                     f"at that peak, at most {format_bytes(m.meta['gathered_peak_bytes'])} "
                     "(FSDP2's all-gathered, unsharded parameters)")
    return "\n".join(lines)
