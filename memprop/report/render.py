"""Write a report: ``report.md``, a self-contained ``report.html`` (figures embedded as
data URIs, no network), ``figures/*.png`` and ``*.svg``, and the tables as CSV.

Names that come from users (spec names, model factories, strategies) are HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import pathlib

import matplotlib.pyplot as plt
import pandas as pd

from memprop.report.claims import Claim, compute_claims
from memprop.report.data import DEPTH, ReportData, load_report_data
from memprop.report.figures import make_figures
from memprop.report.oom_figures import budget_line
from memprop.units import format_bytes, format_value

__all__ = ["build_report", "ReportFiles"]

CAPTIONS = {
    "stored_vs_depth": "Stored intermediates vs depth, one line per batch: measured points, "
                       "the least-squares fit claim C5 judges (dotted) and, for the zoo's "
                       "MLPs, the closed-form prediction (dashed).",
    "stored_vs_batch": "Stored intermediates vs batch, one line per depth.",
    "peak_heatmap": "Peak memory over depth × batch, measured without checkpointing.",
    "train_vs_inference": "Training-step peak vs inference peak of the same trial (trials "
                          "without checkpointing, as claim C4).",
    "timeline": "Live memory of one training step by category, plain vs checkpointed.",
    "tradeoff": "Checkpointing strategies: peak memory vs step time and vs FLOPs; one colour "
                "per setup (depth, batch), one labelled point per strategy.",
    "frontier": "Largest batch that fits the budget per depth: confirmed by real trials "
                "(the next step up ran out of memory) and predicted on fake tensors.",
    "graph": "The notes' computational graph with the bytes forward propagation stores.",
    "stored_per_layer": "Stored bytes per module (per block for a deep model) for one "
                        "configuration, in the order forward propagation saved them.",
    "precision": "The same step in float32 and under autocast: bytes stored for backward "
                 "and tensor-level peak (float32 master weights either way).",
    "sharded_memory": "Each rank's memory under FSDP2 against the world size (the largest "
                      "rank): left, its peak stacked by what holds it at that peak; right, "
                      "each category at its own maximum, with division by the world size "
                      "dotted. All-gathered parameters count as temporary (or activation "
                      "while autograd holds them).",
}

SUMMARY_COLUMNS = ["model", DEPTH, "world_size", "tp", "replicate", "batch",
                   "strategy", "mode", "status", "phase", "saved_bytes",
                   "peak_bytes", "predicted_peak_bytes", "inference_peak_bytes",
                   "forward_flops", "backward_flops", "step_ms"]


class ReportFiles(dict):
    """name -> path of everything written; ``claims``: the verdicts, as computed."""

    claims: list[Claim]


def caption(name: str, data: ReportData) -> str:
    """The caption of figure ``name``: what it shows of this store."""
    if name == "peak_heatmap":
        budget = budget_line(data)
        if budget is not None:
            return (CAPTIONS[name] + " The red line is the budget's contour: the largest "
                    f"batch that fits {format_bytes(budget.budget_bytes.iloc[0])} at each "
                    "depth, from the frontier; red crosses ran out of memory.")
        if (data.results.get("status", pd.Series(dtype=str)) == "oom").any():
            return CAPTIONS[name] + " Red crosses ran out of memory under the budget."
    return CAPTIONS.get(name, name)


def _summary(data: ReportData) -> pd.DataFrame:
    """The trials table: the depth column under its field's own name."""
    r = data.results
    if r.empty:
        return r
    cols = [c for c in SUMMARY_COLUMNS if c in r.columns]
    if "world_size" in r:        # sharded trials: measured or predicted ranks, the knobs varied
        at = cols.index("world_size") + 1
        cols[at:at] = ["predicted"] + [c for c in ("reshard_after_forward", "mixed_precision",
                                                   "offload")
                                       if c in r and r[c].nunique(dropna=False) > 1]
    return r[cols].rename(columns={DEPTH: data.depth_name or DEPTH})


def _display(frame: pd.DataFrame) -> pd.DataFrame:
    """A table for people: each cell in its column's unit (memprop.units.format_value:
    binary bytes, SI FLOPs, 3 significant digits), "-" where nothing was measured."""
    shown = frame.copy().astype(object)
    for c in shown.columns:
        shown[c] = [format_value(str(c), v) for v in frame[c]]
    return shown


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_(none)_"
    shown = _display(frame).astype(str)
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "---|" * len(shown.columns)
    rows = ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |"
            for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _frontier_shown(tables) -> pd.DataFrame:
    """The frontier table for people: without the spec name and the point's hash."""
    return tables["frontier"].drop(columns=["spec", "point_key"], errors="ignore")


def _verdict_mark(claim: Claim) -> str:
    return {True: "✅", False: "❌", None: "⚪"}[claim.supported]


def build_report(source, out_dir=None, *, dpi: int = 90) -> ReportFiles:
    """Build the report of a store (spec or database) into ``out_dir`` (default: the
    store's folder), replacing a report there (a figure not drawn this time is removed,
    not left from an earlier report). Works on partial results and lists what is missing."""
    data = load_report_data(source)
    out = pathlib.Path(out_dir) if out_dir else data.db_path.parent
    (out / "figures").mkdir(parents=True, exist_ok=True)
    files = ReportFiles()
    figures, missing_figures = make_figures(data)
    for name in missing_figures:
        for ext in ("png", "svg"):
            (out / "figures" / f"{name}.{ext}").unlink(missing_ok=True)
    pngs = {}
    for name, fig in figures.items():
        png, svg = out / "figures" / f"{name}.png", out / "figures" / f"{name}.svg"
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        png.write_bytes(buf.getvalue())
        fig.savefig(svg, format="svg", bbox_inches="tight")
        plt.close(fig)
        pngs[name] = buf.getvalue()
        files[f"figures/{name}.png"], files[f"figures/{name}.svg"] = png, svg
    claims = compute_claims(data)
    files.claims = claims
    tables = {"trials": _summary(data), "frontier": data.frontier,
              "claims": pd.DataFrame([{"claim": c.id, "supported": c.supported,
                                       "verdict": c.verdict} for c in claims])}
    for name, frame in tables.items():
        path = out / f"{name}.csv"
        frame.to_csv(path, index=False)
        files[f"{name}.csv"] = path
    files["report.md"] = out / "report.md"
    files["report.md"].write_text(_markdown(data, claims, figures, missing_figures, tables))
    files["report.html"] = out / "report.html"
    files["report.html"].write_text(_html(data, claims, pngs, missing_figures, tables))
    return files


def _missing_lines(data: ReportData, missing_figures: dict) -> list[str]:
    r = data.results
    probes = int(((r["mode"] == "fit") & (r.status == "oom")).sum()) if not r.empty else 0
    lines = [f"{n - (probes if status == 'oom' else 0)} trials ended {status}"
             for status, n in data.missing().items() if n - (probes if status == "oom" else 0)]
    if probes:
        lines.append(f"{probes} frontier probes ran out of memory, as the frontier expects "
                     "(each is one batch step above a largest batch that fits)")
    if data.stale:
        lines.append(f"{data.stale} stored trials belong to an earlier version of the spec "
                     "and are not shown (report the .sqlite file to see every trial)")
    lines += [f"figure '{name}' not drawn: {why}" for name, why in missing_figures.items()]
    return lines


def _environment(data: ReportData) -> str:
    env = data.environment
    keys = ("memprop_version", "git_commit", "torch_version", "cpu_model", "cpu_count",
            "ram_bytes", "cuda_device", "recorded_at")
    return ", ".join(f"{k}: {format_bytes(int(env[k])) if k == 'ram_bytes' else env[k]}"
                     for k in keys if k in env)


def _markdown(data, claims, figures, missing_figures, tables) -> str:
    counts = data.results.status.value_counts().to_dict() if not data.results.empty else {}
    lines = [f"# memprop report: {data.name}", ""]
    if data.description:
        lines += [data.description, ""]
    lines += [f"{len(data.results)} trials (" + ", ".join(f"{v} {k}" for k, v in counts.items())
              + f"); measured on {_environment(data)}.", "",
              "Every number below is measured, or labelled as a prediction (fake tensors).", "",
              "## Claims", ""]
    for c in claims:
        lines += [f"### {_verdict_mark(c)} {c.id}: {c.statement}", "",
                  f"**Verdict:** {c.verdict}", ""]
        for name in c.evidence:
            if name in figures:
                lines += [f"![{name}](figures/{name}.png)", ""]
    missing = _missing_lines(data, missing_figures)
    if missing:
        lines += ["## What is missing", "", *[f"- {m}" for m in missing], ""]
    lines += ["## All figures", ""]
    for name in figures:
        lines += [f"**{name}**: {caption(name, data)}", "", f"![{name}](figures/{name}.png)", ""]
    lines += ["## Trials", "", _md_table(tables["trials"]), ""]
    if not tables["frontier"].empty:
        lines += ["## Out-of-memory frontier", "", _md_table(_frontier_shown(tables)), ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;
font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
.claim{border-left:4px solid #888;padding:.3em 1em;margin:1em 0}.yes{border-color:#2e7d32}
.no{border-color:#c62828}.none{border-color:#9e9e9e}figcaption{font-size:13px;color:#555}
.badge{font-size:12px;padding:1px 6px;border-radius:3px;color:white;vertical-align:middle}
.badge.yes{background:#2e7d32}.badge.no{background:#c62828}.badge.none{background:#9e9e9e}"""


def _html(data, claims, pngs, missing_figures, tables) -> str:
    e = html.escape

    def img(name: str) -> str:
        uri = "data:image/png;base64," + base64.b64encode(pngs[name]).decode()
        return (f'<figure><img alt="{e(name)}" src="{uri}">'
                f"<figcaption>{e(caption(name, data))}</figcaption></figure>")

    def table(frame: pd.DataFrame) -> str:
        return _display(frame).to_html(index=False, escape=True, border=0)

    counts = data.results.status.value_counts().to_dict() if not data.results.empty else {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>memprop report: "
             f"{e(data.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>memprop report: {e(data.name)}</h1>",
             f"<p>{e(data.description)}</p>" if data.description else "",
             f"<p>{len(data.results)} trials ("
             + e(", ".join(f"{v} {k}" for k, v in counts.items()))
             + f"); measured on {e(_environment(data))}. Every number is measured, or labelled "
             "as a prediction (fake tensors).</p>", "<h2>Claims</h2>"]
    for c in claims:
        css = {True: "yes", False: "no", None: "none"}[c.supported]
        badge = {True: "supported", False: "not supported", None: "no data"}[c.supported]
        parts.append(f"<div class='claim {css}'><h3><span class='badge {css}'>{badge}</span> "
                     f"{e(c.id)}: "
                     f"{e(c.statement)}</h3><p><b>Verdict:</b> {e(c.verdict)}</p>"
                     + "".join(img(n) for n in c.evidence[:1] if n in pngs) + "</div>")
    missing = _missing_lines(data, missing_figures)
    if missing:
        parts.append("<h2>What is missing</h2><ul>" + "".join(f"<li>{e(m)}</li>" for m in missing)
                     + "</ul>")
    parts.append("<h2>All figures</h2>" + "".join(img(n) for n in pngs))
    parts.append("<h2>Trials</h2>" + table(tables["trials"]))
    if not tables["frontier"].empty:
        parts.append("<h2>Out-of-memory frontier</h2>" + table(_frontier_shown(tables)))
    parts.append("</body></html>")
    return "\n".join(parts)
