"""The report's figures: each takes ``ReportData`` and returns a matplotlib Figure (or
None with the reason, when the store lacks what it needs). Axes carry units, bytes
are shown in binary units, predictions are drawn dashed and labelled as such."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from memprop.models import MLPConfig, model_config  # noqa: E402
from memprop.predict import predict_saved_bytes  # noqa: E402
from memprop.report.axes import BYTES, bytes_axis, log_bytes_axis  # noqa: E402
from memprop.report.claims import fit_depth_batch  # noqa: E402
from memprop.report.data import ReportData, config_of  # noqa: E402
from memprop.tracker import CATEGORIES  # noqa: E402
from memprop.units import format_bytes  # noqa: E402

__all__ = ["ALL_FIGURES", "make_figures"]

COLORS = {"parameter": "#4C72B0", "buffer": "#8172B3", "input": "#937860",
          "gradient": "#DD8452", "optimizer": "#C44E52", "activation": "#55A868",
          "temporary": "#BBBBBB"}


def _closed_form(row, depth=None, batch=None):
    cfg = config_of(row)
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
        closed = [_closed_form(rows.iloc[0], depth=x if axis == "depth" else value,
                               batch=value if axis == "depth" else x) for x in rows[x_key]]
        if all(c is not None for c in closed):
            ax.plot(rows[x_key], closed, "--", color=color, lw=1, alpha=0.8)
    ax.plot([], [], "k--", lw=1, label="closed-form prediction")
    ax.plot([], [], "k:", lw=1, label=f"fit a + b·depth·batch (R² = {fit['r2']:.4f})")
    ax.set_xlabel("depth (hidden layers)" if axis == "depth" else "batch size (examples)")
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


def fig_peak_heatmap(data: ReportData):
    plain = data.plain()
    if plain.empty or "cfg_depth" not in plain:
        return None, "needs plain trials over depth and batch"
    budget = _budget(data)
    depths = sorted(set(plain.cfg_depth.astype(int)) | set(
        data.frontier.depth.astype(int) if not data.frontier.empty else []))
    measured = plain.pivot_table(index="cfg_depth", columns="batch", values="peak_bytes")
    if budget is None:
        grid, batches, title = measured, list(measured.columns), "measured"
    else:   # predicted on fake tensors across the boundary, so the OOM region shows
        from memprop.estimate import estimate
        top = int(data.frontier.first_oom_batch.max()) if not data.frontier.empty and \
            data.frontier.first_oom_batch.notna().any() else int(plain.batch.max()) * 4
        low = 2 ** int(np.floor(np.log2(plain.batch.min())))
        batches = [low * 2**k for k in range(40) if low * 2**k <= top * 2]
        row = plain.iloc[0]
        grid = pd.DataFrame(index=depths, columns=batches, dtype=float)
        for d in depths:
            cfg = config_of({**row, "cfg_depth": d})
            if cfg is None:
                return None, "the model cannot be rebuilt here to predict the heatmap"
            for b in batches:
                grid.loc[d, b] = estimate(cfg, b, flops=False, inference=False).peak_bytes
        title = "predicted on fake tensors"
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    values = grid.to_numpy(float)
    im = ax.imshow(values, origin="lower", aspect="auto", cmap="viridis",
                   norm=matplotlib.colors.LogNorm(vmin=np.nanmin(values), vmax=np.nanmax(values)))
    ax.set_xticks(range(len(grid.columns)), [str(int(b)) for b in grid.columns], rotation=45)
    ax.set_yticks(range(len(grid.index)), [str(int(d)) for d in grid.index])
    ax.set_xlabel("batch size (examples)")
    ax.set_ylabel("depth (hidden layers)")
    cbar = fig.colorbar(im, ax=ax)
    lo, hi = np.log2(np.nanmin(values)), np.log2(np.nanmax(values))
    ticks = [2.0**k for k in range(int(np.ceil(lo)), int(np.floor(hi)) + 1)]
    cbar.set_ticks(ticks[:: max(1, len(ticks) // 6)])
    cbar.ax.yaxis.set_major_formatter(BYTES)
    cbar.ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    cbar.set_label("tensor-level peak of one training step")
    for (i, j), v in np.ndenumerate(values):
        if budget is not None and v > budget:
            ax.text(j, i, "OOM", ha="center", va="center", color="white", fontsize=7)
    if budget is not None and np.nanmin(values) < budget < np.nanmax(values):
        ax.contour(values, levels=[budget], colors="red", linewidths=2)
        ax.plot([], [], color="red", lw=2, label=f"budget {format_bytes(budget)}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"Peak memory over depth × batch ({title}; no checkpointing)")
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
        ax.text(xi, t, f"{t / i:.2f}×", ha="center", va="bottom", fontsize=8)
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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, row in zip(axes, pair):
        tl = data.frame(row.key, "timeline")
        if tl is None:
            return None, "the trials have no stored timeline"
        stack = [tl[f"{c}_bytes"].to_numpy() for c in CATEGORIES]
        ax.stackplot(tl.op_index, *stack, labels=CATEGORIES, colors=[COLORS[c] for c in CATEGORIES],
                     alpha=0.9)
        for phase, color in (("forward", "#E8F0FF"), ("backward", "#FFF0E0")):
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
    fig.legend(handles[::-1], labels[::-1], fontsize=7, loc="center right")
    depth = f"depth {int(pair[0].cfg_depth)}, " if "cfg_depth" in pair[0] else ""
    fig.suptitle(f"Memory timeline of one training step ({pair[0].model}, {depth}batch "
                 f"{int(pair[0].batch)}): plain vs checkpointed - recompute shows as saw-teeth")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    return fig, None


def _pareto(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
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
    return rows.assign(gflops=(rows.forward_flops + rows.backward_flops) / 1e9)


def fig_tradeoff(data: ReportData):
    ok = data.ok
    models = [m for m in ok.model.unique() if ok[ok.model == m].strategy.nunique() >= 2] \
        if not ok.empty else []
    if not models:
        return None, "needs trials of two or more strategies"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    titles = []
    for i, model in enumerate(models):
        sel = _tradeoff_points(ok[ok.model == model])
        where = ", ".join(f"{k.replace('cfg_', '')} {int(sel[k].iloc[0])}"
                          for k in ("cfg_depth", "batch") if k in sel)
        titles.append(f"{model} ({where})")
        for ax, x in ((axes[0], "step_ms"), (axes[1], "gflops")):
            ax.scatter(sel[x], sel.peak_bytes, s=40, zorder=3, color=f"C{i}",
                       label=titles[-1] if ax is axes[0] else None)
            for _, p in sel.iterrows():
                ax.annotate(p.strategy, (p[x], p.peak_bytes), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")
            front = _pareto(sel, x, "peak_bytes")
            ax.plot(front[x], front.peak_bytes, "--", color=f"C{i}", lw=1)
    for ax, label in ((axes[0], "step time (ms, median)"),
                      (axes[1], "GFLOP per step (forward + backward, counted)")):
        ax.set_xlabel(label)
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("tensor-level peak")
    log_bytes_axis(axes[0].yaxis)
    axes[0].plot([], [], "k--", lw=1, label="Pareto front (per model)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Checkpointing tradeoff: memory vs compute, one point per strategy")
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
        ax.plot(rows.depth, rows.predicted_batch, "--", color=f"C{i}", alpha=0.7,
                label=f"{strategy}: predicted (fake tensors)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xticks(sorted(fr.depth.unique()))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain if axis is ax.yaxis else FuncFormatter(lambda v, _: ""))
    ax.set_xlabel(f"{fr.field.iloc[0]} (hidden layers)")
    ax.set_ylabel("largest batch that fits (examples)")
    ax.set_title(f"Out-of-memory frontier at a real budget of {format_bytes(fr.budget_bytes.iloc[0])}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
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
    from memprop.report.graph import d2l_graph_figure
    return d2l_graph_figure(data), None


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
