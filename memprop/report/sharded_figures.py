"""The sharded figure: each rank's memory by category against the world size, from a
sweep's sharded trials (a spec's ``[parallel]``; experiments/sharded.toml). It takes
``ReportData`` and returns a Figure, or None with the reason; ``make_figures`` draws it
only when the store holds sharded trials (``PARALLEL_FIGURES``).

Left: the largest rank's peak as stacked bars, split by the categories it holds at that
peak (NOTE [ A rank's categories at its peak ], memprop.sharded.row), so each bar is the
rank's peak. Right: each category at its own maximum over the step against the world
size, with ideal division (1/N from one rank) dashed: FSDP2 divides the parameters,
gradients and optimizer state by the shard degree; the activations, which come from the
rank's own batch, it does not divide.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from memprop.report.axes import BYTES, CATEGORY_COLORS, bytes_axis  # noqa: E402
from memprop.report.data import ReportData  # noqa: E402
from memprop.units import format_bytes  # noqa: E402

__all__ = ["PARALLEL_FIGURES", "fig_sharded_memory", "sharded_series"]

DIVIDED = ("parameter", "gradient", "optimizer")       # what FSDP2 shards
KEPT = ("activation", "temporary", "input", "buffer")  # what each rank holds whole
# everything that picks one line of ranks: the workload and the sharding but the size
SETUP = ("model", "batch", "strategy", "dtype", "optimizer", "tp", "replicate",
         "reshard_after_forward", "mixed_precision", "offload", "predicted")


def sharded_series(data: ReportData) -> pd.DataFrame:
    """The sharded trials of one setup (``SETUP`` and the model's fields) over the most
    world sizes, one row per world size, sorted; empty when there are none."""
    rows = data.parallel
    if rows.empty:
        return rows
    keys = [c for c in rows.columns if c in SETUP or c.startswith("cfg_")]
    label = rows[keys].map(str).agg("|".join, axis=1)
    sizes = rows.groupby(label).world_size.nunique()
    best = sizes[sizes == sizes.max()].index[0]
    return (rows[label == best].sort_values("world_size")
            .drop_duplicates("world_size").reset_index(drop=True))


def fig_sharded_memory(data: ReportData):
    rows = sharded_series(data)
    if rows.empty or len(rows) < 2:
        return None, "needs sharded trials of one setup at two or more world sizes"
    shown = [c for c in (*DIVIDED, *KEPT) if (rows[f"{c}_bytes_at_peak"] > 0).any()
             or (rows[f"{c}_max_bytes"] > 0).any()]
    sizes = rows.world_size.astype(int).tolist()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for c in shown:
        values = rows[f"{c}_bytes_at_peak"].to_numpy(float)
        left.bar(x, values, 0.6, bottom=bottom, color=CATEGORY_COLORS[c],
                 hatch="//" if c in DIVIDED else None, edgecolor="white", linewidth=0.5,
                 label=f"{c} ({'sharded' if c in DIVIDED else 'not sharded'})")
        bottom += values
    for xi, peak in zip(x, rows.peak_bytes):
        left.text(xi, peak, format_bytes(peak), ha="center", va="bottom", fontsize=7)
    left.set_xticks(x, [str(n) for n in sizes])
    left.set_xlabel("world size (ranks)")
    left.set_ylabel("largest rank's tensor-level peak")
    bytes_axis(left.yaxis)
    left.set_title("at each rank's peak, by what holds it", fontsize=10)
    left.grid(axis="y", alpha=0.3)
    left.margins(y=0.1)
    for c in shown:
        values = rows[f"{c}_max_bytes"].to_numpy(float)
        if not (values > 0).any():
            continue
        right.plot(sizes, np.where(values > 0, values, np.nan), "o-",
                   color=CATEGORY_COLORS[c], label=c)
        if c in DIVIDED and values[0] > 0:       # ideal division from the smallest size
            right.plot(sizes, values[0] * sizes[0] / np.array(sizes, float), ":",
                       color=CATEGORY_COLORS[c], lw=1)
    right.plot([], [], "k:", lw=1, label="divided by the world size")
    right.set_xscale("log", base=2)
    right.set_yscale("log", base=2)
    right.set_xticks(sizes, [str(n) for n in sizes])
    right.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    right.yaxis.set_major_formatter(BYTES)
    right.set_xlabel("world size (ranks)")
    right.set_ylabel("bytes held at most (largest rank)")
    right.set_title("each category at its own maximum over the step", fontsize=10)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    first = rows.iloc[0]
    how = "predicted on a fake process group" if bool(first.predicted) else \
        "measured in real gloo processes"
    fields = ", ".join(f"{c[4:]}={first[c]}" for c in rows.columns
                       if c.startswith("cfg_") and pd.notna(first[c]))
    fig.suptitle(f"Each rank's memory under FSDP2 ({first.model}: {fields}; batch "
                 f"{int(first.batch)} per rank, {first.optimizer}, strategy "
                 f"{first.strategy}), {how}\nsharding divides parameters, gradients and "
                 "optimizer state (hatched); not activations", fontsize=10)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(shown),
               frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig, None


PARALLEL_FIGURES = {"sharded_memory": fig_sharded_memory}
