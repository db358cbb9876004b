"""The report of a workload whose depth is not called ``depth``: a ``hf:gpt2`` sweep over
``num_hidden_layers`` (or ``n_layer``, ``num_layers``, ...) x batch x strategy draws every
figure it has data for, labels each depth, and judges C1, C2, C4, C5 and C7 with numbers
derived by hand.

The sweep's rows are written here with numbers chosen by hand (a real hf sweep of 12
trials takes minutes on 2 cores); one real trial checks that a sweep stores the very
columns these rows fill."""

import re

import numpy as np
import pandas as pd
import pytest

from memprop.report.claims import compute_claims
from memprop.report.data import load_report_data
from memprop.report.figures import ALL_FIGURES, make_figures
from memprop.report.render import CAPTIONS, build_report, caption
from memprop.sweep.store import ResultsStore
from memprop.sweep.trial import Trial
from memprop.sweep.worker import _pack_frame
from memprop.tracker import CATEGORIES
from memprop.units import format_bytes

DEPTHS, BATCHES, STRATEGIES = (2, 4, 6), (4, 8), ("none", "sqrt")
PARAMS = 800_000                        # parameter bytes, every trial
PER_LAYER = 4096                        # bytes one layer stores per example, no checkpointing


def saved_bytes(layers: int, batch: int, strategy: str) -> int:
    """a + b·layers·batch + c·batch: embeddings and head per example (3072 B), one layer's
    4096 B per example each; sqrt keeps a quarter of each layer plus one layer's worth."""
    if strategy == "none":
        return 1024 + 3072 * batch + PER_LAYER * layers * batch
    return 1024 + 3072 * batch + 1024 * layers * batch + PER_LAYER * batch


def row(layers: int, batch: int, strategy: str) -> dict:
    saved = saved_bytes(layers, batch, strategy)
    return {"status": "ok", "mode": "measure", "saved_bytes": saved, "saved_count": 10,
            "peak_bytes": PARAMS + saved + 2048 * batch,
            "inference_peak_bytes": PARAMS + 6000 * batch, "inference_saved_bytes": 0,
            "forward_flops": 2_000_000 * layers * batch,
            "backward_flops": (4_000_000 if strategy == "none" else 6_000_000) * layers * batch,
            "step_ms": (10.0 if strategy == "none" else 13.0) * layers * batch / 4,
            "timing_noisy": strategy == "sqrt" and layers == 6,   # the sweep's flag: unusable
            "timeline": _pack_frame(timeline(layers, batch, strategy)),
            "saved": _pack_frame(saved_table(layers, batch))}


def timeline(layers: int, batch: int, strategy: str) -> pd.DataFrame:
    """Forward adds one layer's activations per op, backward frees them in reverse."""
    held = PER_LAYER * batch if strategy == "none" else 1024 * batch
    steps = ([("forward", i * held) for i in range(layers + 1)]
             + [("backward", i * held) for i in range(layers, -1, -1)] + [("optimizer", 0)])
    frame = pd.DataFrame({"op_index": range(len(steps)), "phase": [p for p, _ in steps],
                          "module": "", "op": "mm"})
    for category in CATEGORIES:
        frame[f"{category}_bytes"] = 0
    frame["parameter_bytes"] = PARAMS
    frame["activation_bytes"] = [b for _, b in steps]
    frame["total_bytes"] = frame.parameter_bytes + frame.activation_bytes
    return frame


def saved_table(layers: int, batch: int) -> pd.DataFrame:
    modules = (["transformer.wte"] + [f"transformer.h.{i}.{m}" for i in range(layers)
                                      for m in ("attn", "mlp")] + ["lm_head"])
    return pd.DataFrame({"order": range(len(modules)), "module": modules, "op": "MmBackward0",
                         "shape": "(4, 16, 64)", "dtype": "float32",
                         "kind": ["input"] + ["activation"] * (len(modules) - 1),
                         "saved_bytes": [1024] + [PER_LAYER // 2 * batch] * (len(modules) - 1),
                         "saves": 1})


def trial(field: str, layers: int, batch: int, strategy: str) -> Trial:
    return Trial(spec="gpt2_depth", model="hf:gpt2",
                 model_fields=tuple(sorted({field: layers, "seq_len": 16}.items())),
                 batch=batch, strategy=strategy, repeats=1, warmup=0, estimate=False)


def depth_store(path, field: str):
    with ResultsStore(path) as store:
        for layers in DEPTHS:
            for batch in BATCHES:
                for strategy in STRATEGIES:
                    store.put(trial(field, layers, batch, strategy), row(layers, batch, strategy))
    return path


FIELDS = ["num_hidden_layers", "n_layer", "num_layers", "n_layers",
          "text_config.num_hidden_layers"]


@pytest.mark.parametrize("field", FIELDS)
def test_the_depth_axis_is_found_whatever_the_field_is_called(field, tmp_path):
    data = load_report_data(depth_store(tmp_path / "r.sqlite", field))
    assert data.depth_name == field
    assert data.depth_label() == f"layers ({field})"
    assert sorted(data.results.depth.unique()) == list(DEPTHS)
    _, rows = data.main_model()
    assert len(rows) == 12                       # one setup: every depth, not one of them


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return load_report_data(depth_store(tmp_path_factory.mktemp("d") / "r.sqlite",
                                        "num_hidden_layers"))


def test_every_figure_with_data_is_drawn(gpt2):
    figures, missing = make_figures(gpt2)
    assert set(figures) == {"stored_vs_depth", "stored_vs_batch", "peak_heatmap",
                            "train_vs_inference", "timeline", "tradeoff", "stored_per_layer"}
    assert set(missing) == {"graph", "frontier", "precision"} == set(ALL_FIGURES) - set(figures)
    # the notes' graph (x, z, h, o of a B x 784 input) means nothing for GPT-2
    assert "d2l_mlp" in missing["graph"]

    heatmap = figures["peak_heatmap"].axes[0]
    assert heatmap.get_ylabel() == "layers (num_hidden_layers)"
    assert sorted(t.get_text() for t in heatmap.texts) == sorted(
        format_bytes(row(d, b, "none")["peak_bytes"]) for d in DEPTHS for b in BATCHES)
    assert not any(line.get_label().startswith("budget") for line in heatmap.lines)
    # no budget in this store: the caption names none (it once described an undrawn contour)
    assert caption("peak_heatmap", gpt2) == CAPTIONS["peak_heatmap"]
    assert "contour" not in caption("peak_heatmap", gpt2)

    bars = figures["train_vs_inference"].axes[0]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["2", "4", "6"]
    assert "batch 8, no checkpointing" in bars.get_title()
    assert [t.get_text() for t in bars.texts] == [
        f"{(row(d, 8, 'none')['peak_bytes'] / row(d, 8, 'none')['inference_peak_bytes']):.2f}×"
        for d in DEPTHS]

    depth_axis = figures["stored_vs_depth"].axes[0]
    assert depth_axis.get_xlabel() == "layers (num_hidden_layers)"
    assert {t.get_text() for t in depth_axis.get_legend().get_texts()} >= {
        "batch 4: measured", "batch 8: measured"}
    assert "closed-form prediction" not in [t.get_text() for t in
                                            depth_axis.get_legend().get_texts()]

    timeline_title = figures["timeline"]._suptitle.get_text()
    assert "(hf:gpt2, num_hidden_layers 6, batch 8)" in timeline_title
    blocks = figures["stored_per_layer"].axes[0]
    assert [t.get_text() for t in blocks.get_xticklabels()] == [
        "transformer.wte", *[f"transformer.h.{i}.{m}" for i in range(6) for m in ("attn", "mlp")],
        "lm_head"]
    for fig in figures.values():
        fig.clf()


def test_tradeoff_labels_each_depth_and_strategy(gpt2):
    fig, _ = ALL_FIGURES["tradeoff"](gpt2)
    time_axis, flops_axis = fig.axes
    assert [t.get_text() for t in time_axis.get_legend().get_texts()] == [
        f"hf:gpt2, num_hidden_layers {d}, batch 8" for d in DEPTHS]
    # one point per strategy per depth, each labelled, at its own FLOPs and peak
    points = sorted((round(t.xy[0]), round(t.xy[1]), t.get_text()) for t in flops_axis.texts)
    expected = sorted((r["forward_flops"] + r["backward_flops"], r["peak_bytes"], s)
                      for d in DEPTHS for s in STRATEGIES for r in [row(d, 8, s)])
    assert points == expected
    # the one time the sweep flagged (sqrt at 6 layers) is drawn hollow, and the axis says so
    assert time_axis.get_xlabel() == "step time (median, ms); hollow: flagged noisy"
    hollow = [[int(face[3] == 0) for face in c.get_facecolors()] for c in time_axis.collections
              if len(c.get_offsets())]                 # the points, not the legend's markers
    assert hollow == [[0, 0], [0, 0], [0, 1]]          # per depth: none, sqrt
    assert all(face[3] > 0 for c in flops_axis.collections for face in c.get_facecolors())


def test_claims_are_judged_with_numbers_derived_by_hand(gpt2):
    claims = {c.id: c for c in compute_claims(gpt2)}
    verdicts = {k: c.supported for k, c in claims.items()}
    assert verdicts == {"C1": True, "C2": True, "C3": None, "C4": True, "C5": True,
                        "C6": None, "C7": True}
    deepest = trial("num_hidden_layers", 6, 8, "none").key()
    assert claims["C1"].numbers["trial"] == deepest
    assert claims["C1"].numbers["end_bytes"] == 6 * PER_LAYER * 8
    assert "(hf:gpt2, num_hidden_layers 6, batch 8)" in claims["C1"].verdict

    # C4: the six trials without checkpointing, named; the six checkpointed left out
    c4 = claims["C4"]
    plain = [trial("num_hidden_layers", d, b, "none").key() for d in DEPTHS for b in BATCHES]
    assert c4.numbers["trials"] == sorted(plain) and c4.numbers["n"] == 6
    ratios = [row(d, b, "none")["peak_bytes"] / row(d, b, "none")["inference_peak_bytes"]
              for d in DEPTHS for b in BATCHES]
    assert c4.numbers["min_ratio"] == pytest.approx(min(ratios))
    assert c4.numbers["max_ratio"] == pytest.approx(max(ratios))
    assert ("over the 6 measured trials without checkpointing (strategy none)" in c4.verdict
            and "(6 checkpointed trials left out: the claim is about the plain model's "
                "training step)" in c4.verdict)

    # C5: saved = 1024 + 4096·layers·batch + 3072·batch exactly
    c5 = claims["C5"]
    assert c5.numbers["n"] == 6
    assert c5.numbers["with_batch"] == pytest.approx((1024, PER_LAYER, 3072))
    assert c5.numbers["r2_with_batch"] == pytest.approx(1.0)
    assert "× num_hidden_layers × batch" in c5.verdict

    # C7 without a frontier: sqrt's stored bytes at the deepest depth over none's (median
    # over batches), FLOPs (2 + 6) / (2 + 4) per layer and example
    c7 = claims["C7"]
    none = np.median([saved_bytes(6, b, "none") for b in BATCHES])
    sqrt = np.median([saved_bytes(6, b, "sqrt") for b in BATCHES])
    assert c7.numbers["saved_ratio"] == pytest.approx(sqrt / none)
    assert c7.numbers["flops_ratio"] == pytest.approx(8 / 6)
    assert c7.verdict.startswith("partly supported: sqrt stores")


def test_the_report_names_the_field_and_misses_only_what_has_no_data(gpt2, tmp_path):
    files = build_report(gpt2.db_path, tmp_path / "out")
    trials = pd.read_csv(files["trials.csv"])
    assert "num_hidden_layers" in trials.columns and "depth" not in trials.columns
    md = files["report.md"].read_text()
    missing = re.findall(r"figure '(\w+)' not drawn", md)
    assert sorted(missing) == ["frontier", "graph", "precision"]
    assert "not enough plain trials" not in md


def test_a_real_hf_trial_stores_the_columns_these_rows_fill(tmp_path):
    """One real step of a tiny GPT-2 (in this process): its row has the depth field as
    ``cfg_num_hidden_layers`` and every number the synthetic rows above set."""
    pytest.importorskip("transformers")
    from memprop.sweep.worker import run_trial
    real = trial("num_hidden_layers", 2, 2, "none")
    result = run_trial(real)
    assert result["status"] == "ok", result.get("error")
    db = tmp_path / "real.sqlite"
    with ResultsStore(db) as store:
        store.put(real, result)
    data = load_report_data(db)
    assert data.depth_name == "num_hidden_layers" and data.results.depth.tolist() == [2]
    stored = data.results.iloc[0]
    for column in row(2, 2, "none"):
        if column not in ("timeline", "saved"):
            assert column in data.results.columns, column
    assert stored.inference_peak_bytes > 0 and stored.inference_saved_bytes == 0
    assert stored.peak_bytes > stored.inference_peak_bytes
    timeline_frame, saved = data.frame(stored.key, "timeline"), data.frame(stored.key, "saved")
    assert set(timeline(2, 2, "none").columns) <= set(timeline_frame.columns)
    assert set(saved_table(2, 2).columns) <= set(saved.columns)
    assert saved.module.str.match(r"^transformer\.h\.[01]\.").any()


def test_a_model_without_a_depth_field_says_so(tmp_path):
    """Trials that vary no field counting layers (here: ``hidden_size``) have no depth axis:
    C5 says why it has no data, and the depth figures are not drawn."""
    data = load_report_data(depth_store(tmp_path / "r.sqlite", "hidden_size"))
    assert data.depth_name is None and "depth" not in data.results
    c5 = {c.id: c for c in compute_claims(data)}["C5"]
    assert c5.supported is None
    assert c5.verdict == ("no data: the model of these trials (hf:gpt2) has no field that "
                          "counts its layers (depth, num_hidden_layers, n_layer, num_layers, "
                          "...), so there is no depth axis")
    _, missing = make_figures(data)
    assert {"stored_vs_depth", "stored_vs_batch", "peak_heatmap"} <= set(missing)


def test_a_frontier_over_num_hidden_layers_is_the_heatmaps_budget_line(tmp_path):
    """The frontier walked num_hidden_layers: C6 and C7 name that field, and the heatmap
    draws the budget's contour through the confirmed batches (as hf_depth.toml's sweep)."""
    db = depth_store(tmp_path / "r.sqlite", "num_hidden_layers")
    confirmed = {("none", 2): 40, ("none", 6): 16, ("sqrt", 2): 60, ("sqrt", 6): 36}
    with ResultsStore(db) as store:
        for (strategy, layers), batch in confirmed.items():
            store.put_frontier({"spec": "gpt2_depth", "point_key": f"{strategy}{layers}",
                                "field": "num_hidden_layers", "depth": layers,
                                "strategy": strategy, "budget_bytes": 32 * 2**20,
                                "budget_mode": "tensor", "predicted_batch": batch,
                                "confirmed_batch": batch, "first_oom_batch": batch + 4})
    data = load_report_data(db)
    claims = {c.id: c for c in compute_claims(data)}
    assert claims["C6"].supported and claims["C6"].numbers["batches"] == [40, 16]
    assert "(num_hidden_layers 2: batch 40; num_hidden_layers 6: batch 16)" in claims["C6"].verdict
    assert claims["C7"].supported and claims["C7"].numbers["best_batch"] == 36
    assert ("num_hidden_layers 6: batch 16 without checkpointing, 36 with sqrt"
            in claims["C7"].verdict)
    fig, _ = ALL_FIGURES["peak_heatmap"](data)
    line, = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("budget 32.0 MiB")]
    assert list(line.get_xdata()) == [40, 16] and list(line.get_ydata()) == [2, 6]
    assert ALL_FIGURES["frontier"](data)[0].axes[0].get_xlabel() == "layers (num_hidden_layers)"
    assert "The red line is the budget's contour" in caption("peak_heatmap", data)
