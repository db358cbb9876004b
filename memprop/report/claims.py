"""The notes' claims C1-C7, each with a verdict computed from the measured data.

A verdict carries its numbers (``Claim.numbers``), so tests recompute them from the store;
``supported`` is True, False (the data contradicts the claim) or None (no data for it).
Nothing here is hard-coded: a claim the data does not support says so. Nothing here
measures or estimates either: every number is read from the store (what is missing is
"no data").
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from memprop.report.data import DEPTH, ReportData
from memprop.units import format_bytes, format_ratio

__all__ = ["Claim", "compute_claims", "fit_depth_batch", "c4_rows", "STATEMENTS"]

STATEMENTS = {
    "C1": "Forward propagation stores each layer's intermediates in order: the stored set "
          "grows layer by layer during the forward pass.",
    "C2": "Backward propagation reuses the stored intermediates, so they stay alive until "
          "backward has consumed them; memory falls as backward walks from the output back "
          "to the input.",
    # one convention with `memprop backprop`: rows are examples, z = x W1ᵀ, o = h W2ᵀ (for
    # one example as a column vector, the notes' ∂J/∂W2 = ∂J/∂o hᵀ is the same matrix)
    "C3": "The chain-rule formulas (∂J/∂W2 = (∂J/∂o)ᵀ h + λW2, ∂J/∂h = (∂J/∂o) W2, "
          "∂J/∂z = ∂J/∂h ⊙ φ′(z), ∂J/∂W1 = (∂J/∂z)ᵀ x + λW1; rows are examples, "
          "z = x W1ᵀ, o = h W2ᵀ) are exactly what autograd computes.",
    "C4": "Training needs more memory than prediction alone: inference under "
          "torch.no_grad() stores nothing for backward.",
    "C5": "The size of the stored intermediates is roughly proportional to the number of "
          "layers and to the batch size.",
    "C6": "Deeper networks with larger batches therefore run out of memory sooner.",
    "C7": "Recomputing activations during backward (checkpointing) trades extra compute for "
          "less stored memory, which moves the out-of-memory boundary.",
}


@dataclasses.dataclass
class Claim:
    id: str
    statement: str
    verdict: str
    supported: bool | None
    evidence: list[str]                       # figure names, table names
    numbers: dict = dataclasses.field(default_factory=dict)


def _lstsq(columns, y) -> tuple[np.ndarray, float]:
    design = np.column_stack([np.ones_like(y), *columns])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - ((y - design @ coef) ** 2).sum() / total if total > 0 else float("nan")
    return coef, float(r2)


def fit_depth_batch(rows: pd.DataFrame) -> dict:
    """Least squares saved_bytes ≈ a + b·depth·batch over ``rows``: a, b, R², n; and the
    same with a per-example term c·batch (the input and output layers, which do not grow
    with depth): (a, b, c) as ``with_batch``, its R² as ``r2_with_batch``."""
    depth_batch = (rows[DEPTH] * rows.batch).to_numpy(float)
    y = rows.saved_bytes.to_numpy(float)
    (a, b), r2 = _lstsq([depth_batch], y)
    (a2, b2, c2), r2_batch = _lstsq([depth_batch, rows.batch.to_numpy(float)], y)
    return {"a": float(a), "b": float(b), "r2": r2, "r2_with_batch": r2_batch,
            "with_batch": (float(a2), float(b2), float(c2)), "n": int(len(rows))}


def _deepest_plain_with_timeline(data: ReportData):
    plain = data.plain()
    if plain.empty:
        plain = data.ok[data.ok.strategy == "none"] if not data.ok.empty else plain
    for _, row in plain.sort_values(["saved_bytes"], ascending=False).iterrows():
        timeline = data.frame(row.key, "timeline")
        if timeline is not None:
            return row, timeline
    return None, None


def _where(data: ReportData, row) -> str:
    """``hf:gpt2, num_hidden_layers 6, batch 8``: which trial a number comes from."""
    depth = (f"{data.depth_word(row[DEPTH])}, " if DEPTH in row and pd.notna(row[DEPTH])
             else "")
    return f"{row.model}, {depth}batch {int(row.batch)}"


# a block's index in a module's qualified name: blocks.3.fc, transformer.h.3.attn, layers.3
_BLOCK_INDEX = r"(?:^|\.)(\d+)(?:\.|$)"


def claim_c1_c2(data: ReportData) -> list[Claim]:
    row, tl = _deepest_plain_with_timeline(data)
    if row is None:
        none = "no measured plain trial with a timeline in this store"
        return [Claim("C1", STATEMENTS["C1"], none, None, []),
                Claim("C2", STATEMENTS["C2"], none, None, [])]
    fwd = tl[tl.phase == "forward"].activation_bytes.to_numpy()
    bwd = tl[tl.phase == "backward"].activation_bytes.to_numpy()
    saved = data.frame(row.key, "saved")
    in_order = True
    if saved is not None:
        blocks = saved.module.dropna().astype(str).str.extract(_BLOCK_INDEX)[0].dropna() \
            .astype(int)
        in_order = bool((blocks.diff().dropna() >= 0).all())
    rising = bool(len(fwd) > 1 and (np.diff(fwd) >= 0).all() and fwd[-1] > fwd[0])
    c1 = Claim("C1", STATEMENTS["C1"],
               f"{'supported' if rising and in_order else 'NOT supported'}: over the "
               f"{len(fwd)} forward ops of one step ({_where(data, row)}) the bytes held for "
               f"backward only grew, from {format_bytes(fwd[0])} to {format_bytes(fwd.max())}, in "
               f"{int((np.diff(fwd) > 0).sum())} increments; layers stored in order: "
               f"{'yes' if in_order else 'no'}",
               rising and in_order, ["stored_per_layer", "timeline"],
               {"forward_ops": len(fwd), "start_bytes": int(fwd[0]),
                "end_bytes": int(fwd.max()), "increments": int((np.diff(fwd) > 0).sum()),
                "trial": row.key})
    falling = bool(len(bwd) > 1 and (np.diff(bwd) <= 0).all() and bwd[-1] == 0)
    c2 = Claim("C2", STATEMENTS["C2"],
               f"{'supported' if falling else 'NOT supported'}: during backward the stored "
               f"bytes fell from {format_bytes(bwd.max())} to {format_bytes(bwd[-1])} over "
               f"{len(bwd)} ops and never rose; they were all alive when backward began",
               falling, ["timeline"],
               {"backward_ops": len(bwd), "start_bytes": int(bwd.max()),
                "end_bytes": int(bwd[-1]), "trial": row.key})
    return [c1, c2]


# the field a d2l_mlp trial stores at sweep time: the largest |formula - autograd| over
# the five gradients (memprop.backprop, float64); the report only reads it
FORMULA_CHECK_FIELD = "backprop_max_abs_diff"


def claim_c3(data: ReportData) -> Claim:
    ok = data.ok
    rows = ok[ok.model == "d2l_mlp"] if not ok.empty else ok
    if rows.empty or FORMULA_CHECK_FIELD not in rows or rows[FORMULA_CHECK_FIELD].isna().all():
        return Claim("C3", STATEMENTS["C3"], "no data: no d2l_mlp trial in this store recorded "
                     "the formula check; 'memprop backprop' shows it step by step", None,
                     ["graph"])
    rows = rows[rows[FORMULA_CHECK_FIELD].notna()]
    worst = float(rows[FORMULA_CHECK_FIELD].max())
    config = data.config(rows.iloc[0].key)       # exact: ints stay ints
    sizes = {k: v for k, v in (config.fields() if config else {}).items()
             if k in ("d", "h", "q", "phi")}
    good = worst < 1e-10
    return Claim("C3", STATEMENTS["C3"],
                 f"{'supported' if good else 'NOT supported'}: the notes' formulas and autograd "
                 f"agree to {worst:.1e} (largest |difference| over ∂J/∂o, ∂J/∂h, ∂J/∂z, ∂J/∂W1, "
                 f"∂J/∂W2 in {len(rows)} d2l_mlp trials, float64; "
                 + ", ".join(f"{k}={v}" for k, v in sizes.items()) + ")",
                 good, ["graph"], {"max_abs_diff": worst, "n": int(len(rows))})


def c4_rows(data: ReportData) -> tuple[pd.DataFrame, str, str]:
    """The trials C4 (and its figure) compare training with inference on, which they are in
    words, and which were left out: the measured trials without checkpointing, whose
    training step and inference pass ran the same plain model; every measured trial only
    when there is none. (Checkpointed trials are left out whatever their inference pass
    ran: stores measured before memprop's inference pass ran the plain model hold the
    checkpointed model's inference peak, NOTE [ Inference runs the plain model ].)"""
    ok = data.ok
    if ok.empty or "inference_peak_bytes" not in ok:
        return ok.iloc[:0], "no measured trials", ""
    measured = ok[ok.inference_peak_bytes > 0]
    plain = measured[measured.strategy == "none"]
    if not plain.empty:
        left = len(measured) - len(plain)
        return plain, f"the {len(plain)} measured trials without checkpointing (strategy none)", \
            (f" ({left} checkpointed trials left out: the claim is about the plain model's "
             "training step)" if left else "")
    return measured, f"all {len(measured)} measured trials", \
        " (every one checkpointed: this store has no trial without checkpointing)"


def claim_c4(data: ReportData) -> Claim:
    rows, source, left_out = c4_rows(data)
    if rows.empty:
        return Claim("C4", STATEMENTS["C4"], "no data: no measured trial with an inference "
                     "peak in this store", None, [])
    ratio = rows.peak_bytes / rows.inference_peak_bytes
    plain = data.plain()
    plain = plain[plain.key.isin(rows.key)] if not plain.empty else plain
    top = (plain if not plain.empty else rows).sort_values("saved_bytes").iloc[-1]
    top_ratio = top.peak_bytes / top.inference_peak_bytes
    stores_nothing = bool((rows.inference_saved_bytes == 0).all())
    supported = bool((ratio > 1).all() and stores_nothing)
    stored = ("0 B for backward in every one" if stores_nothing
              else "tensors for backward in some")
    return Claim("C4", STATEMENTS["C4"],
                 f"{'supported' if supported else 'NOT supported'}: training needs "
                 f"{format_ratio(top_ratio)}× the memory of inference at {_where(data, top)}; "
                 f"the ratio is {format_ratio(ratio.min())}× to {format_ratio(ratio.max())}× "
                 f"over {source}, and inference stored {stored}{left_out}",
                 supported, ["train_vs_inference"],
                 {"top_ratio": float(top_ratio), "min_ratio": float(ratio.min()),
                  "max_ratio": float(ratio.max()), "n": int(len(rows)), "trial": top.key,
                  "trials": sorted(rows.key), "source": source})


def _slope(b: float) -> str:
    """Bytes per layer and example: 569.7 B (a slope keeps its fraction), 296.8 KiB."""
    return f"{b:.1f} B" if abs(b) < 1024 else format_bytes(b)


def claim_c5(data: ReportData) -> Claim:
    plain = data.plain()
    if not plain.empty and (DEPTH not in plain or plain[DEPTH].isna().all()):
        return Claim("C5", STATEMENTS["C5"], "no data: the model of these trials "
                     f"({plain.model.iloc[0]}) has no field that counts its layers (depth, "
                     "num_hidden_layers, n_layer, num_layers, ...), so there is no depth axis",
                     None, ["stored_vs_depth"])
    if plain.empty or DEPTH not in plain or plain[[DEPTH, "batch"]].dropna() \
            .drop_duplicates().shape[0] < 3:
        return Claim("C5", STATEMENTS["C5"], "not enough plain trials across depth and batch "
                     "(need 3 or more (depth, batch) points)", None, ["stored_vs_depth"])
    fit = fit_depth_batch(plain)
    # "roughly proportional": linear in depth × batch once the input and output layers'
    # per-example bytes (which do not grow with depth) have their own term
    good = fit["r2_with_batch"] >= 0.99 and fit["b"] > 0
    return Claim("C5", STATEMENTS["C5"],
                 f"{'supported' if good else 'NOT supported'}: stored bytes ≈ "
                 f"{format_bytes(fit['a'])} + {_slope(fit['b'])} × "
                 f"{data.depth_name or 'depth'} × batch, "
                 f"R² = {fit['r2']:.5f} over {fit['n']} trials; with a per-example term for the "
                 f"input and output layers R² = {fit['r2_with_batch']:.6f}",
                 good, ["stored_vs_depth", "stored_vs_batch", "peak_heatmap"], fit)


def _flops_ratio(data: ReportData, strategy: str, depth) -> float | None:
    _, rows = data.main_model()
    if rows.empty or "forward_flops" not in rows:
        return None
    rows = rows.assign(flops=rows.forward_flops + rows.backward_flops)
    if DEPTH in rows and depth is not None:
        near = (rows[DEPTH] - depth).abs()
        rows = rows[near == near.min()]
    base = rows[rows.strategy == "none"]
    other = rows[rows.strategy == strategy]
    if base.empty or other.empty:
        return None
    merged = other.merge(base, on=["batch"], suffixes=("", "_none"))
    return float((merged.flops / merged.flops_none).median()) if not merged.empty else None


def _frontier_flops_ratio(data: ReportData, strategy: str, depth: int) -> float | None:
    """FLOPs of ``strategy`` over ``none`` at ``depth``, from the frontier's stored
    ``predicted_flops`` (fake-tensor count at the confirmed batch, per step), if stored."""
    fr = data.frontier
    if "predicted_flops" not in fr or fr.empty:
        return None
    at = fr[fr.depth == depth].set_index("strategy").predicted_flops
    if strategy not in at or "none" not in at or not at["none"] or pd.isna(at[strategy]):
        return None
    # per example: the two confirmed batches differ
    batch = fr[fr.depth == depth].set_index("strategy").confirmed_batch
    return float((at[strategy] / batch[strategy]) / (at["none"] / batch["none"]))


_BUDGET_MODES = {"tensor": "a tensor budget (live tensor bytes, checked at every allocation; "
                          "the same on any CPU, BLAS and thread count)",
                "process": "a process budget (the operating system's address-space limit: "
                           "libraries and allocator pools count too)"}


def _budget_words(fr) -> str:
    """'24.0 MiB, a tensor budget (...)': the budget and what it means."""
    mode = fr.budget_mode.iloc[0] if "budget_mode" in fr and fr.budget_mode.notna().any() \
        else None
    return (f"{format_bytes(fr.budget_bytes.iloc[0])}"
            f"{', ' + _BUDGET_MODES[mode] if mode in _BUDGET_MODES else ''}")


def _frontier_field(fr) -> str:
    """The model field the frontier walked, by its own name (``num_hidden_layers``)."""
    return str(fr.field.iloc[0]) if "field" in fr and fr.field.notna().any() else "depth"


def claim_c6(data: ReportData) -> Claim:
    fr = data.frontier
    fr = fr[fr.strategy == "none"] if not fr.empty else fr
    if fr.empty or fr.depth.nunique() < 2:
        return Claim("C6", STATEMENTS["C6"], "no out-of-memory frontier with two or more depths "
                     "in this store (add a [frontier] table and run memprop sweep)", None,
                     ["frontier", "peak_heatmap"])
    fr = fr.sort_values("depth")
    shrinking = bool((fr.confirmed_batch.diff().dropna() < 0).all())
    field = _frontier_field(fr)
    parts = "; ".join(f"{field} {int(d)}: batch {int(b)}"
                      for d, b in zip(fr.depth, fr.confirmed_batch))
    return Claim("C6", STATEMENTS["C6"],
                 f"{'supported' if shrinking else 'NOT supported'}: at a real budget of "
                 f"{_budget_words(fr)}, the largest batch that fits falls as "
                 f"depth grows ({parts}); each confirmed by a real out-of-memory one step above",
                 shrinking, ["frontier", "peak_heatmap"],
                 {"depths": fr.depth.astype(int).tolist(),
                  "batches": fr.confirmed_batch.astype(int).tolist(),
                  "budget_bytes": int(fr.budget_bytes.iloc[0])})


def claim_c7(data: ReportData) -> Claim:
    fr = data.frontier
    if not fr.empty and (fr.strategy != "none").any() and (fr.strategy == "none").any():
        pivot = fr.pivot_table(index="depth", columns="strategy", values="confirmed_batch")
        others = [c for c in pivot.columns if c != "none"]
        best = pivot[others].max(axis=1)
        strategy = pivot[others].idxmax(axis=1)
        depth = int(pivot.index.max())
        moved = bool(best.loc[depth] > pivot.loc[depth, "none"])
        unmoved = [int(d) for d in pivot.index if best.loc[d] <= pivot.loc[d, "none"]]
        ratio, source = _flops_ratio(data, strategy.loc[depth], depth), \
            "FLOPs measured at the nearest grid depth"
        if ratio is None:
            ratio, source = _frontier_flops_ratio(data, strategy.loc[depth], depth), \
                "FLOPs per example counted on fake tensors at the sweep"
        cost = f", at {format_ratio(ratio)}× FLOPs" if ratio else ", FLOPs: no data"
        field = _frontier_field(fr)
        note = (f"; at {field} {', '.join(map(str, unmoved))} it does not move the boundary "
                "(too few layers to recompute)") if unmoved else ""
        return Claim("C7", STATEMENTS["C7"],
                     f"{'supported' if moved else 'NOT supported'}: at "
                     f"{_budget_words(fr)}, {field} {depth}: batch "
                     f"{int(pivot.loc[depth, 'none'])} without checkpointing, "
                     f"{int(best.loc[depth])} with {strategy.loc[depth]}{cost}"
                     f"{f' ({source})' if ratio else ''}{note}",
                     moved, ["frontier", "tradeoff", "timeline"],
                     {"depth": depth, "none_batch": int(pivot.loc[depth, "none"]),
                      "unmoved": unmoved, "best_batch": int(best.loc[depth]),
                      "strategy": strategy.loc[depth], "flops_ratio": ratio})
    _, rows = data.main_model()
    if rows.empty or rows.strategy.nunique() < 2:
        return Claim("C7", STATEMENTS["C7"], "no checkpointed trials in this store", None, [])
    deepest = rows[rows[DEPTH] == rows[DEPTH].max()] if DEPTH in rows else rows
    base = deepest[deepest.strategy == "none"].saved_bytes.median()
    cand = deepest[deepest.strategy != "none"].groupby("strategy").saved_bytes.median()
    strategy = cand.idxmin()
    ratio = _flops_ratio(data, strategy, deepest[DEPTH].max() if DEPTH in deepest else None)
    less = bool(cand.min() < base)
    return Claim("C7", STATEMENTS["C7"],
                 f"{'partly supported' if less else 'NOT supported'}: {strategy} stores "
                 f"{format_ratio(cand.min() / base)}× the bytes of no checkpointing"
                 f"{f' for {format_ratio(ratio)}× FLOPs' if ratio else ''}; no frontier in this "
                 "store, so the moved boundary is not measured", less if less else False,
                 ["tradeoff"],
                 {"strategy": strategy, "saved_ratio": float(cand.min() / base),
                  "flops_ratio": ratio})


def compute_claims(data: ReportData) -> list[Claim]:
    return [*claim_c1_c2(data), claim_c3(data), claim_c4(data), claim_c5(data),
            claim_c6(data), claim_c7(data)]
