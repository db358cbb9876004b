"""Sweeps: specs rejected before anything runs, isolated trials whose failures are
results, a store that survives SIGKILL and resumes, and a confirmed OOM frontier."""

import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import BUDGETED_SPEC, FRONTIER_SPEC, write_spec

from memprop.cli import main
from memprop.sweep import SpecError, load_results, load_spec, run_sweep
from memprop.sweep.frontier import doubling_probe_count, run_frontier
from memprop.sweep.store import ResultsStore

TESTS = pathlib.Path(__file__).parent

GOOD = """
name = "t"
[model]
name = "mlp"
width = 16
d_in = 16
[grid]
depth = [1, 2]
batch = [4]
[run]
repeats = 1
"""


BAD_SPECS = [
    # (what is wrong, edit of GOOD, key path, message fragment)
    ("TOML syntax", lambda s: s + "\n[run\n", "(syntax)", "not valid TOML"),
    ("unknown top-level key", lambda s: s.replace("[grid]", "[grdi]"), "grdi",
     "unknown key (did you mean 'grid'?)"),
    ("unknown run key", lambda s: s.replace("repeats = 1", "repeat = 1"), "run.repeat",
     "did you mean 'repeats'?"),
    ("wrong type", lambda s: s.replace("repeats = 1", 'repeats = "3"'), "run.repeats",
     "'3' is not allowed; it must be an integer >= 1"),
    ("out of range", lambda s: s.replace("repeats = 1", "repeats = 0"), "run.repeats",
     "0 is not allowed"),
    ("negative timeout", lambda s: s.replace("repeats = 1", "timeout = -5"), "run.timeout",
     "a number of seconds > 0"),
    ("unknown model", lambda s: s.replace('name = "mlp"', 'name = "mpl"'), "model.name",
     "unknown model 'mpl' (did you mean 'mlp'?)"),
    ("unknown model field", lambda s: s.replace("width = 16", "widht = 16"), "model.widht",
     "has no field 'widht' (did you mean 'width'?)"),
    ("bad model value", lambda s: s.replace("depth = [1, 2]", "depth = [0, 2]"), "grid.depth",
     "mlp.depth = 0 is not allowed; depth must be an integer >= 1"),
    ("unknown strategy", lambda s: s.replace("batch = [4]", 'batch = [4]\nstrategy = ["sqrtn"]'),
     "grid.strategy", "unknown strategy 'sqrtn'; choose one of: none, full"),
    ("unparsable size", lambda s: s + 'budget = "lots"\n', "run.budget", "'lots' is not a size"),
    ("empty grid", lambda s: s.replace("depth = [1, 2]", "depth = []"), "grid.depth",
     "expands to zero trials"),
    ("grid value not a list", lambda s: s.replace("depth = [1, 2]", "depth = 4"), "grid.depth",
     "is not a list"),
    ("unknown dtype", lambda s: s + 'dtype = "float8"\n', "run.dtype",
     "'float8' is not allowed; choose one of: float32"),
    ("unknown device", lambda s: s + 'device = "tpu"\n', "run.device", "choose one of: cpu, cuda"),
    ("missing batch", lambda s: s.replace("batch = [4]", ""), "grid.batch", "missing"),
    ("bad name", lambda s: s.replace('name = "t"', 'name = "my spec"'), "name",
     "letters, digits, _ and -"),
    ("missing model", lambda s: s.replace('[model]\nname = "mlp"\nwidth = 16\nd_in = 16\n', ""),
     "model", "missing"),
    ("bad batch", lambda s: s.replace("batch = [4]", "batch = [0]"), "grid.batch",
     "must be a batch size, an integer >= 1"),
    ("zero budget", lambda s: s + 'budget = "0MiB"\n', "run.budget", "is not positive"),
    ("zero budget strategy", lambda s: s.replace("batch = [4]",
                                                 'batch = [4]\nstrategy = ["budget:0"]'),
     "grid.strategy", "size '0' is not positive"),
    ("frontier key", lambda s: s + '[frontier]\nbudget = "1GiB"\ndepths = [2]\nstep = 8\n',
     "frontier.step", "did you mean 'batch_step'?"),
]


@pytest.mark.parametrize("what,edit,key,message", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_malformed_spec_names_file_key_value_and_starts_nothing(tmp_path, capsys, what, edit,
                                                                key, message):
    path = write_spec(tmp_path, edit(textwrap.dedent(GOOD)))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.key == key
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert message in str(info.value)
    db = tmp_path / "out.sqlite"
    assert main(["sweep", str(path), "--db", str(db)]) == 2     # exit status 2
    assert message in capsys.readouterr().err
    assert not db.exists()                                       # no trial started


def test_missing_spec_file(capsys):
    assert main(["sweep", "no/such/spec.toml"]) == 2
    assert "no such spec file" in capsys.readouterr().err


def test_every_shipped_spec_validates():
    specs = sorted((TESTS.parent / "experiments").glob("*.toml"))
    assert {p.stem for p in specs} >= {"quickstart", "depth_batch", "train_vs_inference",
                                       "checkpoint_tradeoff", "oom_frontier", "d2l_mlp"}
    for path in specs:
        spec = load_spec(path)
        assert spec.trials() and spec.name == path.stem


def test_trial_keys_are_stable_and_distinct(tmp_path):
    spec = load_spec(write_spec(tmp_path, GOOD))
    keys = [t.key() for t in spec.trials()]
    assert len(set(keys)) == 2 and keys == [t.key() for t in load_spec(
        write_spec(tmp_path, GOOD, "again.toml")).trials()]


def test_failures_are_results_oom_crashed_timeout(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    spec = load_spec(write_spec(tmp_path, BUDGETED_SPEC))
    db = tmp_path / "r.sqlite"
    summary = run_sweep(spec, db_path=db)
    assert summary.counts == {"ok": 1, "oom": 1}
    rows = load_results(db).set_index("batch")
    assert rows.loc[8, "status"] == "ok" and rows.loc[8, "budget_peak_bytes"] <= 16 * 2**20
    oom = rows.loc[4096]
    assert oom.status == "oom" and oom.budget_mode == "tensor"
    # the first matmul's output (4096 x 512 float32 = 8 MiB) is what no longer fits
    assert (oom.phase, oom.oom_op, oom.oom_where) == ("forward", "addmm", "blocks.0.linear")
    assert oom.oom_requested_bytes == 4096 * 512 * 4
    assert oom.oom_live_bytes > 16 * 2**20 >= oom.oom_live_bytes - oom.oom_requested_bytes
    assert "TensorBudgetExceeded" in oom.error

    for factory, status in (("trial_models:dies", "crashed"), ("trial_models:hangs", "timeout")):
        other = load_spec(write_spec(tmp_path, f"""
            name = "bad_{status}"
            [model]
            name = "{factory}"
            input_shape = [4]
            [grid]
            batch = [2]
            [run]
            repeats = 1
            timeout = 15
            estimate = false
        """, f"{status}.toml"))
        run_sweep(other, db_path=db)
    rows = load_results(db)
    crashed = rows[rows.status == "crashed"].iloc[0]
    assert crashed.signal == "SIGKILL" and "killed by SIGKILL" in crashed.error
    assert (rows.status == "timeout").sum() == 1
    assert set(rows.status) == {"ok", "oom", "crashed", "timeout"}   # the sweep went on


SLOW_SPEC = """
name = "killme"
[model]
name = "mlp"
width = 64
d_in = 64
[grid]
depth = [1, 2, 3, 4, 5, 6, 7, 8]
batch = [16]
[run]
repeats = 40
estimate = false
"""


def test_sigkill_keeps_finished_trials_and_rerun_completes_the_rest(tmp_path):
    spec_path = write_spec(tmp_path, SLOW_SPEC)
    db = tmp_path / "k.sqlite"
    cmd = [sys.executable, "-m", "memprop", "sweep", str(spec_path), "--db", str(db), "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 120
    stored = 0
    while time.monotonic() < deadline and stored < 3:
        time.sleep(0.2)
        if db.exists():
            try:
                stored = sqlite3.connect(db).execute("SELECT COUNT(*) FROM trials").fetchone()[0]
            except sqlite3.OperationalError:
                stored = 0
    os.killpg(proc.pid, signal.SIGKILL)                 # the sweep and its fork server
    proc.wait()
    with ResultsStore(db) as store:
        kept = store.results()
    assert 3 <= len(kept) < 8
    assert (kept.status == "ok").all() and kept.peak_bytes.notna().all()   # rows intact

    spec = load_spec(spec_path)
    summary = run_sweep(spec, db_path=db)
    assert summary.skipped == len(kept) and summary.ran == 8 - len(kept)
    final = load_results(db)
    assert sorted(final.key) == sorted(t.key() for t in spec.trials())   # = an uninterrupted run
    assert (final.status == "ok").all()


@pytest.mark.budget
def test_frontier_finds_a_batch_that_fits_and_the_next_step_runs_out(tmp_path):
    spec = load_spec(write_spec(tmp_path, FRONTIER_SPEC))
    db = tmp_path / "f.sqlite"
    (point,) = run_frontier(spec, db_path=db, progress=None)
    rows = load_results(db).set_index("batch")
    assert rows.loc[point.confirmed_batch, "status"] == "ok"
    assert rows.loc[point.confirmed_batch + 512, "status"] == "oom"
    assert point.first_oom_batch == point.confirmed_batch + 512
    assert point.predicted_batch == point.confirmed_batch      # exact with a tensor budget
    assert point.real_trials == len(rows) == 2 < point.probe_trials_doubling
    with ResultsStore(db) as store:
        assert store.frontier().confirmed_batch.tolist() == [point.confirmed_batch]


def test_doubling_probe_count_by_hand():
    # boundary 700, step 100: 100 200 400 800(x) then 600 700 (between 400 and 800)
    assert doubling_probe_count(700, 100, 10_000) == 6
    assert doubling_probe_count(100, 100, 10_000) == 2        # 100, 200(x)


def test_results_command_and_csv(tmp_path, capsys):
    spec_path = write_spec(tmp_path, GOOD)
    db = tmp_path / "g.sqlite"
    assert main(["sweep", str(spec_path), "--db", str(db), "--quiet"]) == 0
    assert main(["results", str(db)]) == 0
    out = capsys.readouterr().out
    assert "2 trials (2 ok)" in out
    assert main(["results", str(db), "--csv", str(tmp_path / "r.csv")]) == 0
    import pandas as pd
    frame = pd.read_csv(tmp_path / "r.csv")
    assert len(frame) == 2 and {"saved_bytes", "peak_bytes", "cfg_depth"} <= set(frame.columns)
    assert main(["results", str(tmp_path / "none.sqlite")]) == 2
    assert "no results database" in capsys.readouterr().err
    with ResultsStore(db) as store:
        env = store.environment()
    assert env["torch_version"] and env["memprop_version"] and int(env["ram_bytes"]) > 0
    key = load_results(db).key.iloc[0]
    with ResultsStore(db) as store:
        timeline = store.frame(key, "timeline")
    assert timeline.total_bytes.max() == load_results(db).set_index("key").loc[key, "peak_bytes"]


def test_d2l_trials_store_the_formula_check_for_claim_c3(tmp_path):
    spec = load_spec(write_spec(tmp_path, """
        name = "c3"
        [model]
        name = "d2l_mlp"
        [grid]
        batch = [4]
        [run]
        repeats = 1
        estimate = false
    """))
    db = tmp_path / "c3.sqlite"
    run_sweep(spec, db_path=db)
    row = load_results(db).iloc[0]
    assert row.status == "ok" and 0 <= row.backprop_max_abs_diff < 1e-12    # float64


TWO_MODELS = """
name = "two"
[[model]]
name = "mlp"
width = 16
d_in = 16
[model.grid]
depth = [1, 3]
batch = [2]
[[model]]
name = "d2l_mlp"
d = 8
h = 4
q = 3
[grid]
batch = [4, 8]
strategy = ["none", "sqrt"]
[frontier]
budget = "1MiB"
depths = [2]
"""


def test_models_with_their_own_grids(tmp_path):
    # NOTE [ Models with their own grids ]: the MLP's depth and batch are its own, the
    # notes' network (no depth) takes [grid]; the frontier walks only the MLP
    spec = load_spec(write_spec(tmp_path, TWO_MODELS))
    got = [(t.model, dict(t.model_fields).get("depth"), t.batch, t.strategy)
           for t in spec.trials()]
    assert got == [("mlp", 1, 2, "none"), ("mlp", 3, 2, "none"),     # [grid]'s keys first
                   ("mlp", 1, 2, "sqrt"), ("mlp", 3, 2, "sqrt"),
                   ("d2l_mlp", None, 4, "none"), ("d2l_mlp", None, 4, "sqrt"),
                   ("d2l_mlp", None, 8, "none"), ("d2l_mlp", None, 8, "sqrt")]
    assert [m for m, _ in spec.frontier_models()] == ["mlp"]
    with pytest.raises(SpecError) as info:            # a model grid's bad value: its key
        load_spec(write_spec(tmp_path, TWO_MODELS.replace("depth = [1, 3]", "depth = [1, 0]")))
    assert info.value.key == "model[0].grid.depth"
    with pytest.raises(SpecError) as info:            # no model has the frontier's field
        load_spec(write_spec(tmp_path, 'name = "t"\n[[model]]\nname = "d2l_mlp"\n[grid]\n'
                        'batch = [4]\n[frontier]\nbudget = "1MiB"\ndepths = [2]\n'))
    assert info.value.key == "frontier.depth" and "no field 'depth'" in str(info.value)
