"""The report's figures: each takes ``ReportData`` and returns a matplotlib Figure (or
None with the reason, when the store lacks what it needs). Axes carry units, bytes
are shown in binary units, predictions are drawn dashed and labelled as such.

Drawing only reads the store: nothing is measured or estimated here (the closed-form
saved bytes of the zoo MLPs are arithmetic on the stored config)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from memprop.models import MLPConfig, model_config  # noqa: E402
from memprop.predict import predict_saved_bytes  # noqa: E402
from memprop.report.axes import BYTES, bytes_axis, flops_axis, power_of_two_ticks  # noqa: E402
from memprop.report.claims import fit_depth_batch  # noqa: E402
from memprop.report.data import ReportData  # noqa: E402
from memprop.report.graph import d2l_graph_figure  # noqa: E402
from memprop.tracker import CATEGORIES  # noqa: E402
from memprop.units import format_bytes, format_ratio  # noqa: E402

__all__ = ["ALL_FIGURES", "make_figures"]

COLORS = {"parameter": "#4C72B0", "buffer": "#8172B3", "input": "#937860",
          "gradient": "#DD8452", "optimizer": "#C44E52", "activation": "#55A868",
          "temporary": "#BBBBBB"}


def _closed_form(data: ReportData, row, depth=None, batch=None):
    cfg = data.config(row.key)
    if cfg is None or not isinstance(cfg, MLPConfig) and cfg.name != "d2l_mlp":
        return None
    if depth is not None and isinstance(cfg, MLPConfig):
        cfg = model_config("mlp", **{**cfg.fields(), "depth": int(depth)})
    return predict_saved_bytes(cfg, int(batch or row["batch"]))["saved_bytes"]


def fig_stored_vs(data: ReportData, axis: str):
    plain = data.plain()
    if plain.empty or "cfg_depth" not in plain or plain.cfg_depth.nunique() < 2 or plain.batch.nunique() < 2:
        return None, "needs plain trials over at least two depths and two batch sizes"
    fit = fit_depth_batch(plain)
    line_key, x_key = ("batch", "cfg_depth") if axis == "depth" else ("cfg_depth", "batch")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (value, rows) in enumerate(plain.sort_values(x_key).groupby(line_key)):
        color = f"C{i}"
        label = f"batch {int(value)}" if line_key == "batch" else f"depth {int(value)}"
        ax.plot(rows[x_key], rows.saved_bytes, "o", color=color, label=f"{label}: measured")
        xs = np.linspace(rows[x_key].min(), rows[x_key].max(), 50)
        depth_batch = xs * value
        ax.plot(xs, fit["a"] + fit["b"] * depth_batch, ":", color=color, lw=1)
        closed = [_closed_form(data, rows.iloc[0], depth=x if axis == "depth" else value,
                               batch=value if axis == "depth" else x) for x in rows[x_key]]
        if all(c is not None for c in closed):
            ax.plot(rows[x_key], closed, "--", color=color, lw=1, alpha=0.8)
    ax.plot([], [], "k--", lw=1, label="closed-form prediction")
    ax.plot([], [], "k:", lw=1, label=f"fit a + b·depth·batch (R² = {fit['r2']:.4f})")
    ax.set_xlabel("depth (hidden layers)" if axis == "depth" else "batch size (examples)")
    ax.set_xticks(sorted(plain[x_key].unique()))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("stored for backward")
    bytes_axis(ax.yaxis)
    ax.set_title(f"Stored intermediates vs {axis} ({plain.model.iloc[0]}, no checkpointing)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return fig, None


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
    r = data.results
    if model is None or r.empty or "cfg_depth" not in r:
        return pd.DataFrame(columns=["cfg_depth", "batch", "peak_bytes", "status"])
    rows = r[(r.model == model) & (r.strategy == "none") & r.status.isin(["ok", "oom"])]
    return rows[["cfg_depth", "batch", "peak_bytes", "status"]]


def fig_peak_heatmap(data: ReportData):
    rows = _plain_peaks(data)
    if rows.empty or rows.cfg_depth.nunique() < 2:
        return None, "needs plain trials over two or more depths"
    budget = _budget(data)
    ok, oom = rows[rows.status == "ok"], rows[rows.status == "oom"]
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    norm = matplotlib.colors.LogNorm(vmin=ok.peak_bytes.min(), vmax=ok.peak_bytes.max())
    points = ax.scatter(ok.batch, ok.cfg_depth, c=ok.peak_bytes, norm=norm, cmap="viridis",
                        marker="s", s=110, edgecolors="#333333", linewidths=0.5, zorder=3,
                        label="fits: colour = measured peak")
    if not oom.empty:
        ax.scatter(oom.batch, oom.cfg_depth, marker="X", s=110, color="#C62828", zorder=3,
                   label="ran out of memory" + (f" (budget {format_bytes(budget)})"
                                                if budget else ""))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    power_of_two_ticks(ax.xaxis, rows.batch)
    ax.set_yticks(sorted(rows.cfg_depth.unique()))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.margins(y=0.15)
    ax.set_xlabel("batch size (examples)")
    ax.set_ylabel("depth (hidden layers)")
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
    ax.set_title("Peak memory over depth × batch, measured\n(grid trials and frontier "
                 "probes, no checkpointing)", fontsize=10)
    return fig, None


def fig_train_vs_inference(data: ReportData):
    plain = data.plain()
    if plain.empty or "inference_peak_bytes" not in plain or "cfg_depth" not in plain:
        return None, "needs plain trials with an inference peak"
    rows = plain[plain.batch == plain.batch.max()].sort_values("cfg_depth")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, rows.peak_bytes, 0.4, label="training step peak")
    ax.bar(x + 0.2, rows.inference_peak_bytes, 0.4, label="inference peak (no_grad)")
    for xi, (t, i) in enumerate(zip(rows.peak_bytes, rows.inference_peak_bytes)):
        ax.text(xi - 0.2, t, f"{format_ratio(t / i)}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [str(int(d)) for d in rows.cfg_depth])
    ax.set_xlabel("depth (hidden layers)")
    ax.set_ylabel("tensor-level peak")
    bytes_axis(ax.yaxis)
    ax.set_title(f"Training vs inference memory (batch {int(rows.batch.iloc[0])}); "
                 "label: training / inference")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig, None


def _timeline_pair(data: ReportData):
    _, rows = data.main_model()
    if rows.empty:
        return None
    for _, plain in rows[rows.strategy == "none"].sort_values("saved_bytes", ascending=False).iterrows():
        same = rows[(rows.strategy != "none") & (rows.batch == plain.batch)]
        if "cfg_depth" in rows:
            same = same[same.cfg_depth == plain.cfg_depth]
        if not same.empty:
            return plain, same.iloc[0]
    return None


def fig_timeline(data: ReportData):
    pair = _timeline_pair(data)
    if pair is None:
        return None, "needs a plain and a checkpointed trial of the same configuration"
    timelines = [data.frame(row.key, "timeline") for row in pair]
    if any(tl is None for tl in timelines):
        return None, "the trials have no stored timeline"
    # only the categories that held memory in either step: empty ones clutter the legend
    shown = [c for c in CATEGORIES if any(tl[f"{c}_bytes"].max() > 0 for tl in timelines)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, row, tl in zip(axes, pair, timelines):
        stack = [tl[f"{c}_bytes"].to_numpy() for c in shown]
        ax.stackplot(tl.op_index, *stack, labels=shown, colors=[COLORS[c] for c in shown],
                     alpha=0.9)
        for phase, color in (("forward", "#E8F0FF"), ("backward", "#FFF0E0"),
                             ("optimizer", "#EFEFEF")):
            idx = tl.op_index[tl.phase == phase]
            if not idx.empty:
                ax.axvspan(idx.min(), idx.max(), color=color, zorder=-1)
                ax.text((idx.min() + idx.max()) / 2, 0.98, phase, transform=ax.get_xaxis_transform(),
                        ha="center", va="top", fontsize=8)
        ax.set_title(f"strategy {row.strategy}: peak {format_bytes(row.peak_bytes)}, "
                     f"{len(tl)} ops", fontsize=10)
        ax.set_xlabel("op index in one training step")
        ax.grid(alpha=0.2)
    axes[0].set_ylabel("live tensor memory")
    bytes_axis(axes[0].yaxis)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(shown),
               frameon=False, title="live memory by category (stacked)", title_fontsize=8)
    depth = f"depth {int(pair[0].cfg_depth)}, " if "cfg_depth" in pair[0] else ""
    fig.suptitle(f"Memory timeline of one training step ({pair[0].model}, {depth}batch "
                 f"{int(pair[0].batch)}): plain vs checkpointed - recompute shows as saw-teeth")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig, None


def _pareto(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The points no other point beats on both ``x`` and ``y`` (lower is better)."""
    front, best = [], float("inf")
    for _, p in points.sort_values([x, y]).iterrows():
        if p[y] < best:
            front.append(p)
            best = p[y]
    return pd.DataFrame(front)


def _tradeoff_points(rows: pd.DataFrame) -> pd.DataFrame:
    """One model's configuration with the most strategies measured (the deepest, largest)."""
    key = [k for k in ("cfg_depth", "batch") if k in rows]
    counts = rows.groupby(key).strategy.nunique()
    best = counts[counts == counts.max()].index[-1]
    best = best if isinstance(best, tuple) else (best,)
    for k, v in zip(key, best):
        rows = rows[rows[k] == v]
    return rows.assign(flops=rows.forward_flops + rows.backward_flops)


def fig_tradeoff(data: ReportData):
    ok = data.ok
    models = [m for m in ok.model.unique() if ok[ok.model == m].strategy.nunique() >= 2] \
        if not ok.empty else []
    if not models:
        return None, "needs trials of two or more strategies"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    fronts = False
    for i, model in enumerate(models):
        sel = _tradeoff_points(ok[ok.model == model])
        where = ", ".join(f"{k.replace('cfg_', '')} {int(sel[k].iloc[0])}"
                          for k in ("cfg_depth", "batch") if k in sel)
        for ax, x in ((axes[0], "step_ms"), (axes[1], "flops")):
            ax.scatter(sel[x], sel.peak_bytes, s=40, zorder=3, color=f"C{i}",
                       label=f"{model} ({where})" if ax is axes[0] else None)
            for _, p in sel.iterrows():
                ax.annotate(p.strategy, (p[x], p.peak_bytes), fontsize=8, xytext=(5, 3),
                            textcoords="offset points")
            front = _pareto(sel, x, "peak_bytes")
            if len(front) >= 3:         # two points are a line, not a front
                ax.plot(front[x], front.peak_bytes, "--", color=f"C{i}", lw=1)
                fronts = True
    axes[0].set_xlabel("step time (median, ms)")
    for ax in axes:
        ax.margins(x=0.25, y=0.15)
        ax.grid(alpha=0.3)
    flops_axis(axes[1].xaxis, "FLOPs per step (forward + backward, counted)")
    axes[0].set_ylabel("tensor-level peak")
    bytes_axis(axes[0].yaxis)
    if fronts:
        axes[0].plot([], [], "k--", lw=1, label="Pareto front (per model)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Checkpointing tradeoff: memory vs compute, one point per strategy "
                 "(lower left is better)")
    fig.tight_layout()
    return fig, None


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
    ax.set_xlabel(f"{fr.field.iloc[0]} (hidden layers)")
    ax.set_ylabel("largest batch that fits (examples)")
    mode = fr.budget_mode.iloc[0] if "budget_mode" in fr and fr.budget_mode.notna().any() else ""
    ax.set_title(f"Out-of-memory frontier at a real {mode + ' ' if mode else ''}budget of "
                 f"{format_bytes(fr.budget_bytes.iloc[0])}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig, None


def fig_stored_per_layer(data: ReportData):
    plain = data.plain()
    if plain.empty:
        return None, "needs a plain trial"
    row = plain.sort_values("saved_bytes").iloc[-1]
    saved = data.frame(row.key, "saved")
    if saved is None:
        return None, "the trial has no stored per-tensor table"
    stored = saved[saved.kind.isin(["activation", "input"])].fillna({"module": ""})
    table = stored.groupby("module", sort=False).saved_bytes.sum()
    table.index = [m or "(loss)" for m in table.index]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.bar(range(len(table)), table.to_numpy(), color="#55A868")
    ax.set_xticks(range(len(table)), table.index, rotation=60, ha="right", fontsize=7)
    bytes_axis(ax.yaxis)
    ax.set_ylabel("stored for backward")
    depth = f"depth {int(row.cfg_depth)}, " if "cfg_depth" in row and pd.notna(row.cfg_depth) else ""
    ax.set_title(f"Stored bytes per layer, in order of saving ({row.model}, {depth}batch {int(row.batch)})")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig, None


def fig_graph(data: ReportData):
    return d2l_graph_figure(data), None


def fig_precision(data: ReportData):
    """Claim C4's cousin for mixed precision: stored bytes and peak of the same step in
    float32 and under autocast, side by side (trials that differ only in ``amp``)."""
    ok = data.ok
    if ok.empty or "amp" not in ok:
        return None, "needs trials that differ only in amp (grid amp = [\"none\", \"bf16\"])"
    ok = ok.assign(precision=ok.amp.fillna("float32").replace({"none": "float32"}))
    same = [c for c in ok.columns if c.startswith("cfg_") and ok[c].notna().any()]
    keys = ok[["model", "batch", "strategy", "dtype", "optimizer", *same]].map(str).agg(
        "|".join, axis=1)
    groups = [g for _, g in ok.groupby(keys) if g.precision.nunique() > 1]
    if not groups:
        return None, "needs trials that differ only in amp (grid amp = [\"none\", \"bf16\"])"
    rows = max(groups, key=lambda g: g.saved_bytes.max()).sort_values("precision",
                                                                       key=lambda p: p != "float32")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, rows.saved_bytes, 0.4, label="stored for backward")
    ax.bar(x + 0.2, rows.peak_bytes, 0.4, label="tensor-level peak")
    base = rows.iloc[0]
    for xi, (_, r) in enumerate(rows.iterrows()):
        ax.text(xi - 0.2, r.saved_bytes, f"{format_ratio(r.saved_bytes / base.saved_bytes)}×",
                ha="center", va="bottom", fontsize=8)
        ax.text(xi + 0.2, r.peak_bytes, f"{format_ratio(r.peak_bytes / base.peak_bytes)}×",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [p if p == "float32" else f"autocast {p}" for p in rows.precision])
    bytes_axis(ax.yaxis)
    depth = f", depth {int(base.cfg_depth)}" if "cfg_depth" in rows and pd.notna(base.cfg_depth) else ""
    ax.set_title(f"Mixed precision ({base.model}{depth}, batch {int(base.batch)}, "
                 f"strategy {base.strategy}); "
                 "label: vs float32", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig, None


ALL_FIGURES = {
    "stored_vs_depth": lambda d: fig_stored_vs(d, "depth"),
    "stored_vs_batch": lambda d: fig_stored_vs(d, "batch"),
    "peak_heatmap": fig_peak_heatmap,
    "train_vs_inference": fig_train_vs_inference,
    "timeline": fig_timeline,
    "tradeoff": fig_tradeoff,
    "frontier": fig_frontier,
    "graph": fig_graph,
    "stored_per_layer": fig_stored_per_layer,
    "precision": fig_precision,
}


def make_figures(data: ReportData) -> tuple[dict, dict]:
    """(name -> Figure, name -> why it is missing)."""
    figures, missing = {}, {}
    for name, make in ALL_FIGURES.items():
        fig, why = make(data)
        if fig is None:
            missing[name] = why
        else:
            figures[name] = fig
    return figures, missing
