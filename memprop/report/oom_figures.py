"""The out-of-memory figures: peak memory over depth x batch with the budget's contour,
and the frontier (the largest batch that fits the budget, per depth and strategy). Each
takes ``ReportData`` and returns a Figure, or None with the reason.

They only read the store: the contour is the frontier's confirmed boundary, nothing is
measured here."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from memprop.report.axes import BYTES, power_of_two_ticks  # noqa: E402
from memprop.report.data import DEPTH, ReportData, single_device  # noqa: E402
from memprop.units import format_bytes  # noqa: E402

__all__ = ["budget_line", "fig_frontier", "fig_peak_heatmap"]


def _budget(data: ReportData):
    if not data.frontier.empty:
        return int(data.frontier.budget_bytes.iloc[0])
    budgets = data.results.get("budget_bytes")
    if budgets is not None and budgets.notna().any():
        return int(budgets.dropna().iloc[0])
    return None


def _plain_peaks(data: ReportData) -> pd.DataFrame:
    """Every stored step of the main model without checkpointing: the measured grid and
    the frontier's probes under the real budget; depth, batch, peak_bytes, status."""
    model, _ = data.main_model()
    r = single_device(data.results)
    if model is None or r.empty or DEPTH not in r:
        return pd.DataFrame(columns=[DEPTH, "batch", "peak_bytes", "status", "mode"])
    rows = r[(r.model == model) & (r.strategy == "none") & r.status.isin(["ok", "oom"])]
    return rows[[DEPTH, "batch", "peak_bytes", "status", "mode"]].dropna(subset=[DEPTH])


MAX_CELL_LABELS = 30


def fig_peak_heatmap(data: ReportData):
    rows = _plain_peaks(data)
    ok, oom = rows[rows.status == "ok"], rows[rows.status == "oom"]
    if ok.empty or rows[DEPTH].nunique() < 2:
        return None, "needs plain trials over two or more depths"
    budget = _budget(data)
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    norm = matplotlib.colors.LogNorm(vmin=ok.peak_bytes.min(), vmax=ok.peak_bytes.max())
    points = ax.scatter(ok.batch, ok[DEPTH], c=ok.peak_bytes, norm=norm, cmap="viridis",
                        marker="s", s=110, edgecolors="#333333", linewidths=0.5, zorder=3,
                        label="fits: colour = measured peak")
    grid = ok[ok["mode"] == "measure"]
    if len(grid) <= MAX_CELL_LABELS:      # each grid cell's peak, to read without the colour bar
        for _, cell in grid.iterrows():
            ax.annotate(format_bytes(cell.peak_bytes), (cell.batch, cell[DEPTH]), fontsize=7,
                        xytext=(0, 9), textcoords="offset points", ha="center")
    if not oom.empty:
        ax.scatter(oom.batch, oom[DEPTH], marker="X", s=110, color="#C62828", zorder=3,
                   label="ran out of memory" + (f" (budget {format_bytes(budget)})"
                                                if budget else ""))
    line = budget_line(data)
    if line is not None:       # the budget's contour: where the peak reaches it, per depth
        ax.plot(line.confirmed_batch, line.depth, "-", color="#C62828", lw=1.5, zorder=2,
                label=f"budget {format_bytes(budget)}: largest batch that fits (frontier)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    power_of_two_ticks(ax.xaxis, pd.concat([rows.batch, line.confirmed_batch]
                                           if line is not None else [rows.batch]))
    ax.set_yticks(sorted(rows[DEPTH].unique()))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.margins(y=0.15)
    ax.set_xlabel("batch size (examples)")
    ax.set_ylabel(data.depth_label())
    cbar = fig.colorbar(points, ax=ax)
    lo, hi = np.log2(ok.peak_bytes.min()), np.log2(ok.peak_bytes.max())
    ticks = [2.0**k for k in range(int(np.ceil(lo)), int(np.floor(hi)) + 1)]
    cbar.set_ticks(ticks[:: max(1, len(ticks) // 6)] or [ok.peak_bytes.min()])
    cbar.ax.yaxis.set_major_formatter(BYTES)
    cbar.ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    cbar.set_label("tensor-level peak of one training step (measured)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
              frameon=False)
    ax.grid(alpha=0.3)
    probes = "grid trials and frontier probes" if (rows["mode"] == "fit").any() else "grid trials"
    ax.set_title(f"Peak memory over depth × batch, measured ({data.main_model()[0]})\n"
                 f"({probes}, no checkpointing)", fontsize=10)
    return fig, None


def budget_line(data: ReportData) -> pd.DataFrame | None:
    """The frontier without checkpointing (depth, confirmed_batch), when it walked the
    report's depth field over two or more depths: the budget's contour on the heatmap."""
    fr = data.frontier
    if fr.empty or data.depth_name is None:
        return None
    fr = fr[(fr.strategy == "none") & (fr.field == data.depth_name)].sort_values("depth")
    return fr if fr.depth.nunique() >= 2 else None


def fig_frontier(data: ReportData):
    fr = data.frontier
    if fr.empty:
        return None, "no out-of-memory frontier in this store"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (strategy, rows) in enumerate(fr.sort_values("depth").groupby("strategy", sort=False)):
        ax.plot(rows.depth, rows.confirmed_batch, "o-", color=f"C{i}",
                label=f"{strategy}: confirmed (fits; next step OOM)")
        ax.plot(rows.depth, rows.predicted_batch, "x--", color=f"C{i}", alpha=0.8, ms=9,
                label=f"{strategy}: predicted (fake tensors)")
        for d, b in zip(rows.depth, rows.confirmed_batch):
            ax.annotate(f"{int(b)}", (d, b), fontsize=7, xytext=(5, 4),
                        textcoords="offset points", color=f"C{i}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(fr.depth.unique()))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=6, integer=True))
    ax.set_ylim(0, 1.12 * max(fr.confirmed_batch.max(), fr.predicted_batch.max()))
    ax.margins(x=0.1)
    field = fr.field.iloc[0]
    ax.set_xlabel(data.depth_label() if field == data.depth_name else field)
    ax.set_ylabel("largest batch that fits (examples)")
    mode = fr.budget_mode.iloc[0] if "budget_mode" in fr and fr.budget_mode.notna().any() else ""
    ax.set_title(f"Out-of-memory frontier at a real {mode + ' ' if mode else ''}budget of "
                 f"{format_bytes(fr.budget_bytes.iloc[0])}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig, None
