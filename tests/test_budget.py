"""Budgets that mean tensor memory on any machine: exact in-process, exact frontiers,
and sweeps that survive faults (kills, two writers, a full disk).

The tests marked ``budget`` (the budget's meaning: exact bytes, frontiers, the process
mode) must pass unchanged under MKL_DISABLE_FAST_MM=1 and OMP_NUM_THREADS=1 / 2: .ci/run
runs them again under each setting. The fault tests need no BLAS and run once.
"""

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import torch
from helpers import write_spec

from memprop.budget import TensorBudgetExceeded
from memprop.cli import main
from memprop.measure import measure_step, phase_of
from memprop.models import model_config
from memprop.sweep import load_results, load_spec, run_sweep
from memprop.sweep.executor import LocalProcessExecutor, clean_stale_trials
from memprop.sweep.frontier import run_frontier
from memprop.sweep.store import ResultsStore, StoreError
from memprop.sweep.trial import Trial
from memprop.workload import WontFitError, build_workload, estimate, measure

MODELS = {
    "mlp": dict(depth=6, width=128, d_in=64),
    "transformer": dict(depth=4, d_model=32, heads=4, seq_len=16, vocab=64),
    "convnet": dict(depth=4, channels=8, image_size=8),
}


@pytest.mark.budget
@pytest.mark.parametrize("strategy", ["none", "sqrt"])
@pytest.mark.parametrize("name", list(MODELS))
def test_tensor_budget_is_exact_at_the_byte(name, strategy):
    """A step fits a budget of exactly its predicted need, and fails one byte below."""
    cfg = model_config(name, **MODELS[name])
    need = estimate(cfg, 8, strategy=strategy, optimizer="adam").budget_peak_bytes

    model, batch = build_workload(cfg, 8, strategy=strategy)
    m = measure_step(model, batch, optimizer="adam", loss_fn=cfg.loss, budget_bytes=need,
                     repeats=1)
    assert m.budget_peak_bytes == need and m.peak_bytes <= need
    assert m.timeline.total_bytes.max() <= need

    model, batch = build_workload(cfg, 8, strategy=strategy)
    with pytest.raises(TensorBudgetExceeded) as info:
        measure_step(model, batch, optimizer="adam", loss_fn=cfg.loss, budget_bytes=need - 1,
                     repeats=1)
    exc = info.value
    assert isinstance(exc, torch.OutOfMemoryError)
    assert exc.live_bytes == need and exc.budget_bytes == need - 1
    assert phase_of(exc) in ("forward", "backward", "optimizer") and exc.requested_bytes > 0


def test_measure_step_leaves_the_model_as_found():
    cfg = model_config("convnet", depth=2, channels=4, image_size=8)     # BatchNorm buffers
    model, batch = build_workload(cfg, 4)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_step(model, batch, optimizer="adam", loss_fn=cfg.loss, repeats=2)
    assert not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)         # weights, BN stats


def _frontier_spec(tmp_path, model, fields, strategies, budget, step, name="front"):
    fixed = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in fields.items()
                      if k != "depth")
    return load_spec(write_spec(tmp_path, f"""
        name = "{name}"
        [model]
        name = "{model}"
        {fixed}
        [grid]
        batch = [8]
        [run]
        optimizer = "adam"
        [frontier]
        budget = "{budget}"
        depths = [{fields['depth']}]
        strategies = {strategies!r}
        batch_step = {step}
        max_batch = 8192
    """.replace("'", '"'), f"{name}.toml"))


@pytest.mark.budget
@pytest.mark.parametrize("name,budget,step", [("mlp", "6MiB", 64),
                                              ("transformer", "4MiB", 4),
                                              ("convnet", "3MiB", 8)])
def test_frontier_prediction_equals_confirmation_in_two_trials(tmp_path, name, budget, step):
    spec = _frontier_spec(tmp_path, name, MODELS[name], ["none", "sqrt"], budget, step)
    db = tmp_path / "f.sqlite"
    points = run_frontier(spec, db_path=db)
    rows = load_results(db)
    for point in points:
        assert point.confirmed_batch > 0
        assert point.predicted_batch == point.confirmed_batch
        assert point.first_oom_batch == point.confirmed_batch + step
        assert point.real_trials == 2 and point.budget_mode == "tensor"
        counted = estimate(model_config(name, **MODELS[name]), point.confirmed_batch,
                           strategy=point.strategy, optimizer="adam", inference=False)
        assert point.predicted_flops == counted.forward_flops + counted.backward_flops > 0
        mine = rows[rows.strategy == point.strategy].set_index("batch")
        assert mine.loc[point.confirmed_batch, "status"] == "ok"
        assert mine.loc[point.first_oom_batch, "status"] == "oom"
    ok = rows[rows.status == "ok"]
    assert (ok.budget_peak_bytes <= ok.budget_bytes).all()
    assert (ok.peak_bytes <= ok.budget_bytes).all()
    none, sqrt = points
    assert sqrt.confirmed_batch > none.confirmed_batch            # claim C7 moves the boundary


class _Counting:
    """An executor that counts trials and can stop (as a kill would) after ``stop_after``."""

    def __init__(self, stop_after=None):
        self.inner, self.ran, self.stop_after = LocalProcessExecutor(1), 0, stop_after

    def run(self, trials, on_result):
        if self.stop_after is not None and self.ran >= self.stop_after:
            raise KeyboardInterrupt
        self.ran += len(trials)
        self.inner.run(trials, on_result)


@pytest.mark.budget
def test_frontier_rerun_is_identical_and_a_killed_frontier_resumes(tmp_path):
    spec = _frontier_spec(tmp_path, "mlp", MODELS["mlp"], ["none", "sqrt"], "6MiB", 64)
    full_db, cut_db = tmp_path / "full.sqlite", tmp_path / "cut.sqlite"
    first = run_frontier(spec, db_path=full_db)
    with ResultsStore(full_db) as store:
        trials_before, frontier_before = store.results(), store.frontier()
    again = _Counting()
    assert run_frontier(spec, db_path=full_db, executor=again) == first
    assert again.ran == 0                                         # every probe reused
    with ResultsStore(full_db) as store:
        assert store.results().equals(trials_before) and store.frontier().equals(frontier_before)

    with pytest.raises(KeyboardInterrupt):                        # killed after 3 trials
        run_frontier(spec, db_path=cut_db, executor=_Counting(stop_after=3))
    resumed = _Counting()
    assert run_frontier(spec, db_path=cut_db, executor=resumed) == first
    assert resumed.ran == 4 - 3
    assert sorted(load_results(cut_db).key) == sorted(load_results(full_db).key)


@pytest.mark.budget
def test_process_budget_far_above_fits_far_below_runs_out(tmp_path):
    """The process mode counts libraries and pools too: only what holds on any machine."""
    spec = load_spec(write_spec(tmp_path, """
        name = "process"
        [model]
        name = "mlp"
        width = 256
        d_in = 256
        depth = 2
        [grid]
        batch = [8, 65536]
        [run]
        repeats = 1
        budget = "64MiB"
        budget_mode = "process"
        estimate = false
    """))
    db = tmp_path / "p.sqlite"
    run_sweep(spec, db_path=db)
    rows = load_results(db).set_index("batch")
    assert rows.loc[8, "status"] == "ok" and rows.loc[8, "budget_kind"] == "rlimit_as"
    assert rows.loc[8, "process_margin_bytes"] is not None
    # ~320 MiB of tensors, five times the budget: far enough below that no mapping freed
    # after the baseline (MKL_DISABLE_FAST_MM=1 frees ~17 MiB of it) lets it fit
    assert rows.loc[65536, "status"] == "oom"
    assert set(rows.budget_mode) == {"process"}


def test_trial_records_threads_and_timing_spread(tmp_path):
    spec = load_spec(write_spec(tmp_path, """
        name = "threads"
        [model]
        name = "mlp"
        depth = 2
        width = 32
        d_in = 16
        [grid]
        batch = [4]
        [run]
        repeats = 5
        threads = 1
    """))
    db = tmp_path / "t.sqlite"
    run_sweep(spec, db_path=db)
    row = load_results(db).iloc[0]
    assert row.threads == 1 and row.repeats == 5
    assert row.step_ms_min <= row.step_ms <= row.step_ms_max
    assert row.timing_spread == pytest.approx((row.step_ms_max - row.step_ms_min) / row.step_ms)
    assert row.timing_noisy in (True, False)


HANGING = """
name = "orphan"
[model]
name = "trial_models:hangs"
input_shape = [4]
[grid]
batch = [2, 3]
[run]
timeout = 120
estimate = false
"""


def _env(tmp):
    tests = os.path.dirname(__file__)
    return {**os.environ, "TMPDIR": str(tmp),
            "PYTHONPATH": os.pathsep.join([tests, *sys.path])}


@pytest.mark.parametrize("start", ["fork-server", "subprocess"])
def test_killed_sweep_leaves_no_trial_process_and_no_folder(tmp_path, monkeypatch, start):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    spec_path = write_spec(tmp_path, HANGING)
    code = (f"import sys; sys.argv=['x']; from memprop.sweep import load_spec, run_sweep; "
            f"from memprop.sweep.executor import LocalProcessExecutor; "
            f"run_sweep(load_spec({str(spec_path)!r}), db_path={str(tmp_path / 'o.sqlite')!r}, "
            f"executor=LocalProcessExecutor(1, start={start!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(scratch),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(scratch.glob("memprop-trial-*/trial.json")):
        time.sleep(0.1)
    time.sleep(1.0)                                 # the trial is running its hanging step
    family = psutil.Process(proc.pid).children(recursive=True)
    assert family, "the sweep started no trial process"
    proc.send_signal(signal.SIGKILL)                # the parent alone, not its group
    proc.wait()
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"trial processes outlived their sweep: {alive}"
    assert list(scratch.glob("memprop-trial-*"))    # its folder is left behind ...
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert clean_stale_trials() == 1                # ... until the next run cleans it
    assert not list(scratch.glob("memprop-trial-*"))


def test_second_sweep_on_one_database_refuses_clearly(tmp_path, capsys):
    spec_path = write_spec(tmp_path, HANGING)
    db = tmp_path / "busy.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "memprop", "sweep", str(spec_path), "--db",
                             str(db), "--quiet"], env=_env(tempfile.gettempdir()),
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "busy.sqlite.lock"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (lock.exists() and lock.read_text()):
            time.sleep(0.1)
        with pytest.raises(StoreError, match=rf"being written by memprop sweep \(pid {proc.pid}"):
            run_sweep(load_spec(spec_path), db_path=db)
        assert main(["sweep", str(spec_path), "--db", str(db), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another --db" in err[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_full_disk_is_a_clear_error_and_keeps_stored_rows(tmp_path):
    db = tmp_path / "full.sqlite"
    trial = Trial(spec="s", model="mlp", model_fields=(("depth", 1),), batch=1)
    with ResultsStore(db) as store:
        store.put(trial, {"status": "ok", "peak_bytes": 1})
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count = {pages}")      # the disk is now full
        with pytest.raises(StoreError, match="every trial stored before is intact"):
            for b in range(2, 200):
                store.put(dataclasses.replace(trial, batch=b),
                          {"status": "ok", "timeline": "ab" * 5000})
    rows = load_results(db)
    assert len(rows) >= 1 and rows.iloc[0].peak_bytes == 1
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_step_larger_than_the_machine_is_refused_before_allocating(capsys):
    cfg = model_config("mlp", depth=2, width=64, d_in=64)
    rss = psutil.Process().memory_info().rss
    with pytest.raises(WontFitError, match="--estimate"):
        measure(cfg, 50_000_000)
    assert psutil.Process().memory_info().rss - rss < 256 * 2**20
    assert main(["profile", "--batch", "50000000", "--set", "depth=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--estimate" in err[0]
    assert main(["profile", "--batch", "4", "--set", "width=10000000"]) == 2
