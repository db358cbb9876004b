"""The report's figures: each takes ``ReportData`` and returns a matplotlib Figure (or
None with the reason, when the store lacks what it needs). Axes carry units, bytes
are shown in binary units, predictions are drawn dashed and labelled as such.

Drawing only reads the store: nothing is measured or estimated here (the closed-form
saved bytes of the zoo MLPs are arithmetic on the stored config). Depth is whatever field
the workload counts layers with (NOTE [ The depth axis ] in data.py), labelled by its name.
The out-of-memory figures live in oom_figures.py; ``ALL_FIGURES`` lists every figure of
one device. The sharded figure (sharded_figures.py) is drawn when the store holds
sharded trials, and only then."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from memprop.models import MLPConfig, model_config  # noqa: E402
from memprop.predict import predict_saved_bytes  # noqa: E402
from memprop.report.axes import CATEGORY_COLORS as COLORS  # noqa: E402
from memprop.report.axes import bytes_axis, flops_axis  # noqa: E402
from memprop.report.claims import c4_rows, fit_depth_batch  # noqa: E402
from memprop.report.data import DEPTH, ReportData  # noqa: E402
from memprop.report.graph import d2l_graph_figure  # noqa: E402
from memprop.report.oom_figures import fig_frontier, fig_peak_heatmap  # noqa: E402
from memprop.report.sharded_figures import PARALLEL_FIGURES  # noqa: E402
from memprop.tracker import CATEGORIES  # noqa: E402
from memprop.units import format_bytes, format_ratio  # noqa: E402

__all__ = ["ALL_FIGURES", "make_figures"]


def _closed_form(data: ReportData, row, depth=None, batch=None):
    cfg = data.config(row.key)
    if cfg is None or not isinstance(cfg, MLPConfig) and cfg.name != "d2l_mlp":
        return None
    if depth is not None and isinstance(cfg, MLPConfig):
        cfg = model_config("mlp", **{**cfg.fields(), "depth": int(depth)})
    return predict_saved_bytes(cfg, int(batch or row["batch"]))["saved_bytes"]


def fig_stored_vs(data: ReportData, axis: str):
    plain = data.plain()
    if plain.empty or DEPTH not in plain or plain[DEPTH].nunique() < 2 or plain.batch.nunique() < 2:
        return None, "needs plain trials over at least two depths and two batch sizes"
    fit = fit_depth_batch(plain)
    line_key, x_key = ("batch", DEPTH) if axis == "depth" else (DEPTH, "batch")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drew_closed = False
    for i, (value, rows) in enumerate(plain.sort_values(x_key).groupby(line_key)):
        color = f"C{i}"
        label = f"batch {int(value)}" if line_key == "batch" else data.depth_word(value)
        ax.plot(rows[x_key], rows.saved_bytes, "o", color=color, label=f"{label}: measured")
        xs = np.linspace(rows[x_key].min(), rows[x_key].max(), 50)
        depth, batch = (xs, value) if axis == "depth" else (value, xs)
        a, b, c = fit["with_batch"]           # the fit claim C5 judges
        ax.plot(xs, a + b * depth * batch + c * batch, ":", color=color, lw=1)
        closed = [_closed_form(data, rows.iloc[0], depth=x if axis == "depth" else value,
                               batch=value if axis == "depth" else x) for x in rows[x_key]]
        if all(c is not None for c in closed):
            ax.plot(rows[x_key], closed, "--", color=color, lw=1, alpha=0.8)
            drew_closed = True
    if drew_closed:
        ax.plot([], [], "k--", lw=1, label="closed-form prediction")
    ax.plot([], [], "k:", lw=1,
            label=f"fit a + b·depth·batch + c·batch (R² = {fit['r2_with_batch']:.4f})")
    ax.set_xlabel(data.depth_label() if axis == "depth" else "batch size (examples)")
    ax.set_xticks(sorted(plain[x_key].unique()))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("stored for backward")
    bytes_axis(ax.yaxis)
    ax.set_title(f"Stored intermediates vs {axis} ({plain.model.iloc[0]}, no checkpointing)")
    # below the axes: inside, a legend of long field names covers the top points
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              frameon=False)
    ax.grid(alpha=0.3)
    return fig, None


def fig_train_vs_inference(data: ReportData):
    rows, _, _ = c4_rows(data)
    if rows.empty:
        return None, "needs measured trials with an inference peak"
    model, _ = data.main_model()
    plain = data.plain()
    plain = plain[plain.key.isin(rows.key)] if not plain.empty else plain
    rows = plain if not plain.empty else rows[rows.model == model]
    checkpointed = (rows.strategy != "none").any()
    by_depth = DEPTH in rows and rows[DEPTH].nunique() >= 2
    if by_depth:      # one bar pair per depth at the largest batch
        rows = rows[rows.batch == rows.batch.max()].sort_values(DEPTH)
        names, xlabel = [f"{int(d)}" for d in rows[DEPTH]], data.depth_label()
        where = f"batch {int(rows.batch.iloc[0])}"
    else:             # one per batch (the deepest, if depths differ)
        if DEPTH in rows and rows[DEPTH].notna().any():
            rows = rows[rows[DEPTH] == rows[DEPTH].max()]
        rows = rows.sort_values("batch").drop_duplicates("batch")
        names, xlabel = [f"{int(b)}" for b in rows.batch], "batch size (examples)"
        where = (data.depth_word(rows[DEPTH].iloc[0])
                 if DEPTH in rows and rows[DEPTH].notna().any() else "")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, rows.peak_bytes, 0.4, label="training step peak")
    ax.bar(x + 0.2, rows.inference_peak_bytes, 0.4, label="inference peak (no_grad)")
    for xi, (t, i) in enumerate(zip(rows.peak_bytes, rows.inference_peak_bytes)):
        ax.text(xi - 0.2, t, f"{format_ratio(t / i)}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tensor-level peak")
    bytes_axis(ax.yaxis)
    what = "checkpointed trials: none ran without" if checkpointed else "no checkpointing"
    ax.set_title(f"Training vs inference memory ({model}{', ' + where if where else ''}, "
                 f"{what})\nlabel: training peak / inference peak", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig, None


def _timeline_pair(data: ReportData):
    _, rows = data.main_model()
    if rows.empty:
        return None
    plains = rows[rows.strategy == "none"].sort_values("saved_bytes", ascending=False)
    for _, plain in plains.iterrows():
        same = rows[(rows.strategy != "none") & (rows.batch == plain.batch)]
        if DEPTH in rows:
            same = same[same[DEPTH] == plain[DEPTH]]
        if not same.empty:
            return plain, same.iloc[0]
    return None


def _depth_of(data: ReportData, row, sep: str = ", ") -> str:
    """``num_hidden_layers 6, `` for a row with a depth, else nothing."""
    return (f"{data.depth_word(row[DEPTH])}{sep}" if DEPTH in row and pd.notna(row[DEPTH])
            else "")


def fig_timeline(data: ReportData):
    pair = _timeline_pair(data)
    if pair is None:
        return None, "needs a plain and a checkpointed trial of the same configuration"
    frames = [data.frame(row.key, "timeline") for row in pair]
    timelines = [tl for tl in frames if tl is not None]
    if len(timelines) < len(frames):
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
                ax.text((idx.min() + idx.max()) / 2, 0.98, phase,
                        transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=8)
        ax.set_title(f"strategy {row.strategy}: peak {format_bytes(row.peak_bytes)}, "
                     f"{len(tl)} ops", fontsize=10)
        ax.set_xlabel("op index in one training step")
        ax.grid(alpha=0.2)
    axes[0].set_ylabel("live tensor memory")
    bytes_axis(axes[0].yaxis)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(shown),
               frameon=False, title="live memory by category (stacked)", title_fontsize=8)
    fig.suptitle(f"Memory timeline of one training step ({pair[0].model}, "
                 f"{_depth_of(data, pair[0])}batch {int(pair[0].batch)}): plain vs "
                 "checkpointed - recompute shows as saw-teeth")
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


MAX_TRADEOFF_DEPTHS = 4


def _labels_at(sel: pd.DataFrame, x: str, everything: pd.DataFrame) -> dict:
    """(x, peak) -> the strategies drawn there: points within 1 % of the axes' spans (over
    ``everything`` drawn) share one label (``none = sqrt``), so labels do not overprint."""
    span_x = float(np.ptp(everything[x].to_numpy(float))) or 1.0
    span_y = float(np.ptp(everything.peak_bytes.to_numpy(float))) or 1.0
    labels: dict = {}
    for _, p in sel.sort_values(x).iterrows():
        near = next((k for k in labels if abs(k[0] - p[x]) <= 0.01 * span_x
                     and abs(k[1] - p.peak_bytes) <= 0.01 * span_y), None)
        labels.setdefault(near or (p[x], p.peak_bytes), []).append(p.strategy)
    return labels


def tradeoff_series(rows: pd.DataFrame) -> list[tuple[object, pd.DataFrame]]:
    """One model's points: the largest batch among those with the most strategies, and at
    it one series per depth (the deepest ``MAX_TRADEOFF_DEPTHS``, when more were measured),
    each one point per strategy: [(depth or None, rows), ...]."""
    rows = rows.assign(flops=rows.forward_flops + rows.backward_flops)
    counts = rows.groupby("batch").strategy.nunique()
    rows = rows[rows.batch == counts[counts == counts.max()].index.max()]
    if DEPTH not in rows or rows[DEPTH].isna().all():
        return [(None, rows)]
    series = [(d, g) for d, g in rows.groupby(DEPTH) if g.strategy.nunique() >= 2]
    return series[-MAX_TRADEOFF_DEPTHS:] or [(None, rows)]


def fig_tradeoff(data: ReportData):
    ok = data.ok
    models = [m for m in ok.model.unique() if ok[ok.model == m].strategy.nunique() >= 2] \
        if not ok.empty else []
    if not models:
        return None, "needs trials of two or more strategies"
    main, main_rows = data.main_model()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    series = [(model, depth, sel) for model in models
              for depth, sel in tradeoff_series(main_rows if model == main
                                                else ok[ok.model == model])]
    drawn = pd.concat([sel for _, _, sel in series])
    fronts = any_noisy = False
    for color, (model, depth, sel) in enumerate(series):
        label = (f"{model}, {data.depth_word(depth) + ', ' if depth is not None else ''}"
                 f"batch {int(sel.batch.iloc[0])}")
        for ax, x in ((axes[0], "step_ms"), (axes[1], "flops")):
            # a time the sweep flagged unusable (timing_noisy: spread or load) is drawn hollow
            noisy = (sel.timing_noisy.fillna(False).astype(bool) if x == "step_ms"
                     and "timing_noisy" in sel else pd.Series(False, index=sel.index))
            any_noisy |= bool(noisy.any())
            marker = "osD^v<>"[color % 7]
            ax.scatter(sel[x], sel.peak_bytes, s=40, zorder=3, color=f"C{color}",
                       facecolors=[f"C{color}" if not n else "none" for n in noisy],
                       marker=marker)
            if ax is axes[0]:           # the legend's marker solid, whatever the first point
                ax.scatter([], [], s=40, color=f"C{color}", marker=marker, label=label)
            for (px, py), names in _labels_at(sel, x, drawn).items():
                ax.annotate(" = ".join(names), (px, py), fontsize=7, xytext=(5, 3),
                            textcoords="offset points", color=f"C{color}")
            front = _pareto(sel, x, "peak_bytes")
            if len(front) >= 3:         # two points are a line, not a front
                ax.plot(front[x], front.peak_bytes, "--", color=f"C{color}", lw=1)
                fronts = True
    axes[0].set_xlabel("step time (median, ms)" + ("; hollow: flagged noisy" if any_noisy
                                                   else ""))
    for ax in axes:
        ax.margins(x=0.25, y=0.15)
        ax.grid(alpha=0.3)
    flops_axis(axes[1].xaxis, "FLOPs per step (forward + backward, counted)")
    axes[0].set_ylabel("tensor-level peak")
    bytes_axis(axes[0].yaxis)
    if fronts:
        axes[0].plot([], [], "k--", lw=1, label="Pareto front (per colour)")
    axes[0].legend(fontsize=7, title="one colour per setup, one point per strategy",
                   title_fontsize=7)
    fig.suptitle("Checkpointing tradeoff: memory vs compute (lower left is better)")
    fig.tight_layout()
    return fig, None


MAX_BARS = 40


def _block_of(module) -> str:
    """``transformer.h.3`` for ``transformer.h.3.attn.c_attn``: the module up to its block
    index; a module outside the blocks stays as it is."""
    module = module if isinstance(module, str) else ""
    match = re.match(r"^(.*?(?:^|\.)\d+)(?:\.|$)", module)
    return match.group(1) if match else module


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
    unit = "module"
    if len(table) > MAX_BARS:   # a deep model: one bar per block (transformer.h.3), not per module
        table = stored.groupby(stored.module.map(_block_of), sort=False).saved_bytes.sum()
        unit = "block"
    table.index = [m or "(loss)" for m in table.index]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.bar(range(len(table)), table.to_numpy(), color="#55A868")
    ax.set_xticks(range(len(table)), table.index, rotation=60, ha="right", fontsize=7)
    bytes_axis(ax.yaxis)
    ax.set_ylabel("stored for backward")
    ax.set_title(f"Stored bytes per {unit}, in order of saving\n({row.model}, "
                 f"{_depth_of(data, row)}batch {int(row.batch)}, no checkpointing)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig, None


def fig_graph(data: ReportData):
    """The notes' graph, for the notes' network only: drawn at the sizes of the store's
    d2l_mlp trials, and not at all for other models (its bytes would mean nothing there)."""
    if data.ok.empty or not (data.ok.model == "d2l_mlp").any():
        return None, ("the notes' graph is the d2l_mlp network's; this store has no measured "
                      "d2l_mlp trial (experiments/d2l_mlp.toml has some)")
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
    ax.set_title(f"Mixed precision ({base.model}, {_depth_of(data, base)}batch {int(base.batch)}, "
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
    sharded = "world_size" in data.results and data.results.world_size.notna().any()
    for name, make in {**ALL_FIGURES, **(PARALLEL_FIGURES if sharded else {})}.items():
        fig, why = make(data)
        if fig is None:
            missing[name] = why
        else:
            figures[name] = fig
    return figures, missing
