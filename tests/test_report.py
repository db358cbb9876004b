"""Reports built from a small real sweep: figures are valid images, every claim verdict's
numbers equal a recomputation from the store, partial stores render, HTML is offline."""

import html
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from memprop.cli import main
from memprop.report.claims import compute_claims
from memprop.report.data import load_report_data
from memprop.report.figures import ALL_FIGURES
from memprop.report.render import build_report
from memprop.sweep import load_spec, run_sweep
from memprop.sweep.frontier import run_frontier
from memprop.sweep.store import ResultsStore

SPEC = """
name = "tiny_report"
description = "A <b>tiny</b> sweep & its report"
[model]
name = "mlp"
width = 64
d_in = 64
[grid]
depth = [1, 2, 4]
batch = [16, 64]
strategy = ["none", "sqrt"]
[run]
repeats = 1
[frontier]
budget = "10MiB"
depths = [2, 8]
strategies = ["none", "sqrt"]
batch_step = 1024
max_batch = 65536
"""


D2L_SPEC = """
name = "tiny_report"
[model]
name = "d2l_mlp"
d = 20
h = 8
q = 4
[grid]
batch = [8]
[run]
repeats = 1
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    spec_path = root / "tiny_report.toml"
    spec_path.write_text(textwrap.dedent(SPEC))
    spec = load_spec(spec_path)
    db = root / "results.sqlite"
    run_sweep(spec, db_path=db)
    # one more trial, the same step under bf16 autocast: the precision figure's pair
    amp_path = root / "tiny_report_amp.toml"
    amp_path.write_text(textwrap.dedent(SPEC.split("[grid]")[0] + """
        [grid]
        depth = [4]
        batch = [64]
        amp = ["bf16"]
        [run]
        repeats = 1
    """))
    run_sweep(load_spec(amp_path), db_path=db)
    # one trial of the notes' own network: its graph, and claim C3's formula check
    d2l_path = root / "tiny_report_d2l.toml"
    d2l_path.write_text(textwrap.dedent(D2L_SPEC))
    run_sweep(load_spec(d2l_path), db_path=db)
    run_frontier(spec, db_path=db, progress=None)
    files = build_report(db, root / "out")
    return root, db, files


def test_every_figure_exists_and_is_a_valid_image(built):
    import matplotlib.image as mpimg
    _, _, files = built
    for name in ALL_FIGURES:
        png = files[f"figures/{name}.png"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = mpimg.imread(png).shape
        assert width > 200 and height > 150
        svg = files[f"figures/{name}.svg"].read_text()
        assert svg.lstrip().startswith("<?xml") and "</svg>" in svg


def test_claim_numbers_equal_a_recomputation_from_the_store(built):
    _, db, _ = built
    claims = {c.id: c for c in compute_claims(load_report_data(db))}
    assert all(c.supported for c in claims.values()), {k: c.verdict for k, c in claims.items()}
    # C3 reads the check the sweep stored for the one d2l_mlp trial
    assert claims["C3"].numbers["n"] == 1 and claims["C3"].numbers["max_abs_diff"] < 1e-10
    assert "d=20, h=8, q=4" in claims["C3"].verdict
    rows = pd.read_sql_query("SELECT config, result, status FROM trials", sqlite3.connect(db))
    config = pd.json_normalize(rows.config.map(json.loads))
    result = pd.json_normalize(rows.result.map(json.loads))
    trials = pd.concat([config, result.drop(columns=[c for c in result.columns
                                                      if c in config.columns or c == "status"])],
                       axis=1)
    everything = trials[(rows.status == "ok") & (trials["mode"] == "measure")]
    measured = everything[everything.amp.isna() & (everything.model == "mlp")]   # one setup
    plain = measured[measured.strategy == "none"]

    # C5: least squares of saved bytes on depth·batch, by numpy's polyfit
    x = plain["model_fields.depth"] * plain.batch
    b, a = np.polyfit(x, plain.saved_bytes, 1)
    r2 = 1 - ((plain.saved_bytes - (a + b * x)) ** 2).sum() / \
        ((plain.saved_bytes - plain.saved_bytes.mean()) ** 2).sum()
    assert claims["C5"].numbers["n"] == len(plain) == 6
    assert claims["C5"].numbers["b"] == pytest.approx(b, rel=1e-9)
    assert claims["C5"].numbers["r2"] == pytest.approx(r2, rel=1e-9)
    assert f"R² = {r2:.5f} over 6 trials" in claims["C5"].verdict

    # C4: training / inference peak, per trial, over the trials without checkpointing (all
    # setups: the mlp's 6, its bf16 one and the d2l_mlp's 1); the checkpointed ones are
    # named as left out
    c4 = everything[everything.strategy == "none"]
    ratio = c4.peak_bytes / c4.inference_peak_bytes
    assert claims["C4"].numbers["n"] == len(c4) == 8
    assert claims["C4"].numbers["min_ratio"] == pytest.approx(ratio.min())
    assert claims["C4"].numbers["max_ratio"] == pytest.approx(ratio.max())
    assert (c4.inference_saved_bytes == 0).all()
    left_out = len(everything) - len(c4)
    assert ("over the 8 measured trials without checkpointing (strategy none)"
            in claims["C4"].verdict)
    assert f"({left_out} checkpointed trials left out" in claims["C4"].verdict

    # C6, C7: the confirmed frontier, read straight from its table
    frontier = pd.read_sql_query("SELECT * FROM frontier", sqlite3.connect(db))
    none = frontier[frontier.strategy == "none"].sort_values("depth")
    assert claims["C6"].numbers["batches"] == none.confirmed_batch.tolist()
    assert claims["C6"].numbers["depths"] == [2, 8]
    deepest = frontier[frontier.depth == 8]
    deepest_plain = deepest[deepest.strategy == "none"]
    assert claims["C7"].numbers["none_batch"] == int(deepest_plain.confirmed_batch.iloc[0])
    assert claims["C7"].numbers["best_batch"] == int(deepest.confirmed_batch.max())

    # C1, C2: the stored timeline of the deepest plain trial
    key = claims["C1"].numbers["trial"]
    with ResultsStore(db) as store:
        timeline = store.frame(key, "timeline")
    fwd = timeline[timeline.phase == "forward"].activation_bytes
    assert claims["C1"].numbers["end_bytes"] == fwd.max()
    assert claims["C2"].numbers["end_bytes"] == 0


def test_heatmap_draws_the_budget_its_caption_names(built):
    """The red line is the budget's contour: at each frontier depth, the largest batch that
    fits it without checkpointing (the confirmed frontier)."""
    _, db, files = built
    data = load_report_data(db)
    fig, _ = ALL_FIGURES["peak_heatmap"](data)
    lines = [line for line in fig.axes[0].lines if line.get_label().startswith("budget")]
    assert [line.get_label() for line in lines] == [
        "budget 10.0 MiB: largest batch that fits (frontier)"]
    none = data.frontier[data.frontier.strategy == "none"].sort_values("depth")
    assert list(lines[0].get_xdata()) == none.confirmed_batch.tolist()
    assert list(lines[0].get_ydata()) == [2, 8]
    assert lines[0].get_color() == "#C62828"
    md = files["report.md"].read_text()
    assert ("The red line is the budget's contour: the largest batch that fits 10.0 MiB at "
            "each depth, from the frontier; red crosses ran out of memory.") in md
    # the frontier's expected out-of-memory probes are not reported as failed trials
    assert "trials ended oom" not in md and "frontier probes ran out of memory" in md


def test_the_notes_graph_is_drawn_at_the_d2l_trials_sizes(built):
    """The notes' graph is the d2l_mlp network's: drawn at its trial's sizes, with the bytes
    autograd stored in that trial next to the notes' cache x, z, h, o (and y)."""
    from memprop.units import format_bytes
    _, db, _ = built
    data = load_report_data(db)
    d2l = data.ok[data.ok.model == "d2l_mlp"].iloc[0]
    fig, _ = ALL_FIGURES["graph"](data)
    title = fig.axes[0].get_title()
    cache = 8 * (20 + 2 * 8 + 4) * 4                      # B·(d + 2h + q)·4, B = 8
    assert f"Forward stores x, z, h, o: {format_bytes(cache)}" in title
    assert "for B=8, d=20, h=8, q=4" in title
    assert (f"autograd stored {format_bytes(d2l.saved_bytes)}, the notes' cache and y "
            f"{format_bytes(cache + 8 * 8)}") in title


def test_c3_reads_the_formula_check_the_sweep_stored(built, tmp_path):
    from memprop.report.claims import FORMULA_CHECK_FIELD, claim_c3
    from memprop.sweep.trial import Trial
    _, db, _ = built
    copy = tmp_path / "with_d2l.sqlite"
    shutil.copy(db, copy)
    with ResultsStore(copy) as store:
        with store.db:                      # the fixture's own d2l_mlp trial: not this test's
            store.db.execute("DELETE FROM trials WHERE config LIKE '%d2l_mlp%'")
        for batch, diff in ((8, 2.5e-17), (16, 5.6e-17)):
            store.put(Trial(spec="tiny_report", model="d2l_mlp",
                            model_fields=(("d", 20), ("h", 8), ("q", 4)), batch=batch),
                      {"status": "ok", "mode": "measure", "saved_bytes": 1, "peak_bytes": 2,
                       FORMULA_CHECK_FIELD: diff})
    c3 = claim_c3(load_report_data(copy))
    assert c3.supported is True and c3.numbers == {"max_abs_diff": 5.6e-17, "n": 2}
    assert "agree to 5.6e-17" in c3.verdict and "d=20, h=8, q=4" in c3.verdict


def test_rendering_measures_nothing(built, tmp_path, monkeypatch):
    """The report reads the store: no step is measured, estimated or simulated while it
    renders. The modules that measure import ``measure_step`` (and the report would import
    ``estimate``, ``measure`` or ``simulate``) by name, so patching one module's attribute
    catches nothing: every loaded memprop module's name for a measuring function is
    replaced, a report module's own import included; a lazy import gets the refusal too."""
    import memprop.checkpoint.planning.simulate
    import memprop.workload

    measuring = (memprop.workload.estimate, memprop.workload.measure,
                 sys.modules["memprop.measure"].measure_step,   # memprop.measure: a function
                 memprop.checkpoint.planning.simulate.simulate)

    def refuse(*args, **kwargs):
        raise AssertionError("the report ran a measurement")
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.split(".")[0] != "memprop":
            continue
        for name, value in list(vars(module).items()):
            if any(value is f for f in measuring):
                monkeypatch.setattr(module, name, refuse)
    # the names every measurement goes through now refuse (the funnel: measure_step)
    from memprop.estimate import estimate
    from memprop.measure import measure_step
    assert estimate is measure_step is memprop.workload.measure_step is refuse
    assert memprop.checkpoint.planning.simulate.measure_step is refuse
    _, db, _ = built
    files = build_report(db, tmp_path / "pure")
    assert all(files[f"figures/{name}.png"].exists() for name in ALL_FIGURES)


def test_configs_are_rebuilt_exactly_from_the_stored_trial(built):
    from memprop.sweep.trial import Trial
    _, db, _ = built
    data = load_report_data(db)
    with ResultsStore(db) as store:
        stored = dict(store.db.execute("SELECT key, config FROM trials"))
    for key in data.results.key:
        assert data.config(key) == Trial.from_dict(json.loads(stored[key])).config()
    # frontier probes count no FLOPs and run no inference: "not measured", not 0
    probes = data.results[data.results["mode"] == "fit"]
    assert len(probes) and probes.forward_flops.isna().all()
    assert probes.inference_peak_bytes.isna().all()


def test_html_is_offline_escaped_and_md_links_figures(built):
    root, db, files = built
    text = files["report.html"].read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    assert "http://" not in text and "https://" not in text
    assert text.count("data:image/png;base64,") >= len(ALL_FIGURES)
    # the spec's description (recorded in the store) is user text: escaped, never markup
    assert html.escape("A <b>tiny</b> sweep & its report") in text and "<b>tiny</b>" not in text
    md = files["report.md"].read_text()
    for name in ALL_FIGURES:
        assert f"figures/{name}.png" in md


def test_store_with_oom_and_crashed_rows_still_renders(built, tmp_path):
    _, db, _ = built
    copy = tmp_path / "partial.sqlite"
    shutil.copy(db, copy)
    with ResultsStore(copy) as store:
        trial = load_spec_trial()
        store.put(trial, {"status": "crashed", "signal": "SIGKILL", "error": "killed"})
        store.put(__import__("dataclasses").replace(trial, batch=3),
                  {"status": "oom", "phase": "backward", "error": "can't allocate memory"})
    files = build_report(copy, tmp_path / "out")
    md = files["report.md"].read_text()
    assert "## What is missing" in md and "trials ended crashed" in md and "trials ended oom" in md


def load_spec_trial():
    from memprop.sweep.trial import Trial
    return Trial(spec="tiny_report", model="mlp", model_fields=(("d_in", 64), ("depth", 1),
                                                                  ("width", 64)), batch=2)


def test_empty_store_says_what_is_missing(tmp_path):
    db = tmp_path / "empty.sqlite"
    ResultsStore(db).close()
    files = build_report(db, tmp_path / "out")
    md = files["report.md"].read_text()
    assert "not drawn" in md and "no measured plain trial" in md


def test_report_command_prints_the_claims_as_a_table(built, capsys, tmp_path):
    _, db, _ = built
    assert main(["report", str(db), "-o", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "report written to" in out
    lines = out.splitlines()
    assert re.match(r"^  claim\s+verdict\s+evidence$", lines[1])
    rows = {m.group(1): m.group(2).strip() for m in
            (re.match(r"^  (C\d)\s{2,}(\S+(?: \S+)?)\s{2,}", line) for line in lines) if m}
    assert rows == {"C1": "supported", "C2": "supported", "C3": "supported",
                    "C4": "supported", "C5": "supported", "C6": "supported",
                    "C7": "supported"}
    assert "C5,True" not in out and '"' not in out          # no CSV
    assert all(len(line) <= 120 for line in lines[1:])       # wrapped, not one long line
    assert main(["report", str(tmp_path / "missing.sqlite")]) == 2


@pytest.fixture
def quick_report(monkeypatch):
    """``memprop report`` with a stand-in for the drawing (tested above): these tests are
    about which folder it writes, and when it refuses."""
    import memprop.report.render as render

    def build(source, out, *, dpi):
        (out / "figures").mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(f"# memprop report of {source}")
        files = render.ReportFiles({"report.md": out / "report.md"})
        files.claims = []
        return files
    monkeypatch.setattr(render, "build_report", build)


def test_report_refuses_to_replace_a_report_unless_forced(built, capfd, tmp_path,
                                                          quick_report):
    _, db, _ = built
    out = tmp_path / "once"
    assert main(["report", str(db), "-o", str(out)]) == 0
    (out / "report.md").write_text("mine")
    capfd.readouterr()
    assert main(["report", str(db), "-o", str(out)]) == 2
    err = capfd.readouterr().err
    assert err.strip() == (f"error: memprop report: -o {out} already holds a report (report.md, "
                           "figures/); add --force to replace it, or choose another folder")
    assert "Traceback" not in err
    assert (out / "report.md").read_text() == "mine"          # nothing written
    for flag in ("--force", "--overwrite"):
        (out / "report.md").write_text("mine")
        assert main(["report", str(db), "-o", str(out), flag]) == 0
        assert (out / "report.md").read_text() == f"# memprop report of {db}"
    # an existing folder without a report is fine; so is the database's own folder, whose
    # report is this database's (`make demo` rewrites reports/demo/ on every run)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(db), "-o", str(empty)]) == 0
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(db, own / "results.sqlite")
    for _ in range(2):
        assert main(["report", str(own / "results.sqlite"), "-o", str(own)]) == 0


def test_report_writes_a_default_folder_apart_from_the_committed_one(built, capsys, tmp_path,
                                                                    monkeypatch, quick_report):
    """``memprop report SPEC`` writes reports/<name>-report/ (ignored by git), never the
    store's folder reports/<name>/ where the committed example report lives."""
    _, db, _ = built
    monkeypatch.chdir(tmp_path)
    committed = tmp_path / "reports" / "tiny_report"
    committed.mkdir(parents=True)
    shutil.copy(db, committed / "results.sqlite")
    (committed / "report.md").write_text("the committed example")
    spec = tmp_path / "tiny_report.toml"
    spec.write_text(textwrap.dedent(SPEC))
    for _ in range(2):                           # memprop's own folder: replaced each time
        assert main(["report", str(spec)]) == 0
        assert "report written to reports/tiny_report-report:" in capsys.readouterr().out
    assert (committed / "report.md").read_text() == "the committed example"
    assert (tmp_path / "reports/tiny_report-report/report.md").read_text() == \
        f"# memprop report of {spec}"
    assert not (committed / "figures").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed")
def test_chromium_decodes_every_figure(built, tmp_path):
    _, _, files = built
    page = files["report.html"].read_text().replace(
        "</body>", "<script>window.addEventListener('load',()=>{document.body.setAttribute("
        "'data-widths',[...document.images].map(i=>i.naturalWidth).join(','))})</script></body>")
    probe = tmp_path / "probe.html"
    probe.write_text(page)
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120).stdout
    widths = [int(w) for w in re.search(r'data-widths="([^"]*)"', dom).group(1).split(",")]
    assert len(widths) >= len(ALL_FIGURES) and all(w > 0 for w in widths)


def test_report_of_a_spec_shows_its_current_grid_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                        # the spec's default store lands here
    spec_path = tmp_path / "changing.toml"
    spec_path.write_text(textwrap.dedent("""
        name = "changing"
        [model]
        name = "mlp"
        width = 16
        d_in = 16
        [grid]
        depth = [1, 2]
        batch = [4]
        [run]
        repeats = 1
        estimate = false
    """))
    run_sweep(load_spec(spec_path))
    spec_path.write_text(spec_path.read_text().replace("batch = [4]", "batch = [8]"))
    run_sweep(load_spec(spec_path))
    data = load_report_data(spec_path)
    assert data.stale == 2 and sorted(data.results.batch) == [8, 8]
    assert len(load_report_data(tmp_path / "reports/changing/results.sqlite").results) == 4
    md = build_report(spec_path)["report.md"].read_text()
    assert "2 stored trials belong to an earlier version of the spec" in md


def test_precision_figure_compares_float32_and_autocast(tmp_path):
    spec_path = tmp_path / "amp.toml"
    spec_path.write_text(textwrap.dedent("""
        name = "amp"
        [model]
        name = "transformer"
        depth = 2
        d_model = 32
        heads = 4
        seq_len = 16
        vocab = 64
        [grid]
        batch = [8]
        amp = ["none", "bf16"]
        [run]
        repeats = 1
        estimate = false
    """))
    db = tmp_path / "amp.sqlite"
    run_sweep(load_spec(spec_path), db_path=db)
    rows = load_report_data(db).ok.set_index("amp", drop=False)
    assert sorted(rows.amp.fillna("none")) == ["bf16", "none"]
    fp32 = rows[rows.amp.isna()].iloc[0]
    bf16 = rows[rows.amp == "bf16"].iloc[0]
    assert bf16.saved_bytes < fp32.saved_bytes
    build_report(db, tmp_path / "out")
    png = tmp_path / "out" / "figures" / "precision.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
