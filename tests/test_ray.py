"""The Ray executor on a real Ray cluster that this module starts on this machine (every
server on 127.0.0.1, 2 CPUs, stopped at the end): the same rows as the local executor,
a budget that runs out, crashes that are rows, and a killed driver that resumes."""

import dataclasses
import importlib.util
import os
import pathlib
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from helpers import (  # the sweep tests' specs
    BUDGETED_SPEC,
    FRONTIER_SPEC,
    SHARDED_MLP,
    SHARDED_SPEC,
    write_spec,
)

from memprop.cli import main
from memprop.errors import ConfigError
from memprop.models import model_config
from memprop.sharded import predict
from memprop.sweep import RayExecutor, SpecError, load_results, load_spec, make_executor, run_sweep
from memprop.sweep.frontier import run_frontier

TESTS = pathlib.Path(__file__).parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="Ray is not installed: pip install 'memprop[ray]'")


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster for this module: its GCS address."""
    with pytest.MonkeyPatch.context() as mp:
        # single-node mode: Ray binds every server to loopback; read when ray is first
        # imported, hence the import here
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.delenv("RAY_ADDRESS", raising=False)
        import ray
        info = ray.init(address="local", num_cpus=2, include_dashboard=False,
                        object_store_memory=80 * 2**20, log_to_driver=False,
                        logging_level="WARNING")
        try:
            address = info.address_info["gcs_address"]
            assert address.startswith("127.0.0.1:")
            yield address
        finally:
            ray.shutdown()



BUDGETED = BUDGETED_SPEC.replace("timeout = 60", "timeout = 120")   # Ray starts slower


def test_ray_rows_equal_local_rows_and_a_budget_runs_out(cluster, tmp_path):
    spec = write_spec(tmp_path, BUDGETED)
    local, remote = tmp_path / "local.sqlite", tmp_path / "ray.sqlite"
    assert main(["sweep", str(spec), "--db", str(local), "--quiet"]) == 0
    assert main(["sweep", str(spec), "--db", str(remote), "--quiet", "--executor", "ray",
                 "--ray-address", cluster]) == 0
    a, b = (load_results(db).set_index("key").sort_index() for db in (local, remote))
    assert list(a.index) == list(b.index) == sorted(t.key() for t in load_spec(spec).trials())
    columns = ["status", "phase", "saved_bytes", "peak_bytes", "budget_peak_bytes",
               "oom_op", "oom_requested_bytes"]
    pd.testing.assert_frame_equal(a[columns], b[columns])
    # the first matmul's output at batch 4096 (4096 x 512 float32 = 8 MiB) no longer fits
    # in 16 MiB beside the weights and the input
    oom = b.set_index("batch").loc[4096]
    assert oom.status == "oom" and oom.phase == "forward"
    assert oom.oom_requested_bytes == 4096 * 512 * 4
    assert b.set_index("batch").loc[8, "status"] == "ok"
    assert (b.executor == "ray").all() and (b.ray_attempts == 1).all()
    assert (b.node_host == socket.gethostname()).all() and (b.node_gpu == "none").all()
    assert (b.node_torch_version == torch.__version__).all()


MIXED = """
name = "mixed"
[[model]]
name = "trial_models:dies"
input_shape = [4]
[[model]]
name = "trial_models:kills_ray_worker"
input_shape = [4]
[[model]]
name = "trial_models:tiny"
input_shape = [4]
[grid]
batch = [2]
[run]
repeats = 1
timeout = 60
estimate = false
"""


def test_a_trial_that_kills_its_process_or_its_worker_is_crashed_and_the_sweep_goes_on(
        cluster, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))       # reaches the tasks with the driver's path
    spec = load_spec(write_spec(tmp_path, MIXED))
    db = tmp_path / "m.sqlite"
    summary = run_sweep(spec, db_path=db, executor=RayExecutor(cluster, retries=1))
    assert summary.counts == {"crashed": 2, "ok": 1}
    rows = load_results(db).set_index("model")
    dies = rows.loc["trial_models:dies"]            # the trial's own process: as locally
    assert dies.signal == "SIGKILL" and "killed by SIGKILL" in dies.error
    assert dies.ray_attempts == 1
    worker = rows.loc["trial_models:kills_ray_worker"]   # its node's worker: retried once
    assert worker.ray_attempts == 2 and "WorkerCrashedError" in worker.error
    assert len(worker.ray_retried_after) == 2
    assert rows.loc["trial_models:tiny"].status == "ok"


KILLME = """
name = "killme"
[model]
name = "mlp"
width = 64
d_in = 64
[grid]
depth = [1, 2, 3]
batch = [16]
[run]
repeats = 20
estimate = false
"""


def test_a_killed_driver_keeps_finished_trials_and_a_rerun_runs_only_the_rest(cluster,
                                                                              tmp_path):
    spec_path = write_spec(tmp_path, KILLME)
    db = tmp_path / "k.sqlite"
    cmd = [sys.executable, "-m", "memprop", "sweep", str(spec_path), "--db", str(db),
           "--quiet", "--executor", "ray", "--ray-address", cluster]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    stored, deadline = 0, time.monotonic() + 300    # a ceiling: loaded machines are slow
    while stored < 1 and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.1)
        if db.exists():
            try:
                stored = sqlite3.connect(db).execute("SELECT COUNT(*) FROM trials").fetchone()[0]
            except sqlite3.OperationalError:
                stored = 0
    os.kill(driver.pid, signal.SIGKILL)              # the driver alone: Ray runs elsewhere
    driver.wait()
    kept = load_results(db)
    assert 1 <= len(kept) < 3 and (kept.status == "ok").all()

    spec, ran = load_spec(spec_path), []
    summary = run_sweep(spec, db_path=db, executor=RayExecutor(cluster),
                        on_result=lambda trial, result: ran.append(trial.key()))
    assert summary.skipped == len(kept) and summary.ran == 3 - len(kept)
    assert sorted(ran) == sorted(set(t.key() for t in spec.trials()) - set(kept.key))
    final = load_results(db)
    assert sorted(final.key) == sorted(t.key() for t in spec.trials())
    assert (final.status == "ok").all()


def test_the_frontier_runs_its_probes_on_ray(cluster, tmp_path):
    spec = load_spec(write_spec(tmp_path, FRONTIER_SPEC))
    db = tmp_path / "f.sqlite"
    (point,) = run_frontier(spec, db_path=db, executor=RayExecutor(cluster))
    rows = load_results(db).set_index("batch")
    assert rows.loc[point.confirmed_batch, "status"] == "ok"
    assert rows.loc[point.confirmed_batch + 512, "status"] == "oom"
    assert (rows.executor == "ray").all()


def test_a_cuda_trial_on_a_cluster_without_gpus_stops_before_it_runs(cluster, tmp_path):
    (trial,) = load_spec(write_spec(tmp_path, BUDGETED.replace("batch = [8, 4096]", "batch = [8]"))
                         ).trials()
    with pytest.raises(ConfigError, match="need a GPU but no node of the Ray cluster"):
        RayExecutor(cluster).run([dataclasses.replace(trial, device="cuda")],
                                 lambda t, r: pytest.fail("no trial may run"))


def test_spec_executor_key_and_a_missing_ray_name_the_fix(tmp_path, monkeypatch):
    bad = write_spec(tmp_path,
                     BUDGETED.replace("timeout = 120", 'timeout = 120\nexecutor = "dask"'))
    with pytest.raises(SpecError, match="run.executor: 'dask' is not allowed; choose one of: "
                                        "local, ray"):
        load_spec(bad)
    spec = load_spec(write_spec(tmp_path, BUDGETED.replace("timeout = 120",
                                                           'timeout = 120\nexecutor = "ray"')))
    assert spec.run.executor == "ray"
    assert spec.trials() == load_spec(write_spec(tmp_path, BUDGETED, "local.toml")).trials()
    with pytest.raises(ConfigError, match="the executor is local; add --executor ray"):
        make_executor("local", ray_address="10.0.0.1:6379")
    monkeypatch.setitem(sys.modules, "ray", None)            # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"pip install 'memprop\[ray\]'"):
        make_executor("ray")


# one real trial of 2 ranks (Adam)
SHARDED = SHARDED_SPEC.replace("world_size = [1, 2, 4]\nestimate = true", "world_size = 2")


def test_a_real_sharded_trial_is_one_placement_group_of_its_ranks(cluster, tmp_path):
    import ray
    spec = load_spec(write_spec(tmp_path, SHARDED))
    db = tmp_path / "s.sqlite"
    assert run_sweep(spec, db_path=db, executor=RayExecutor(cluster)).counts == {"ok": 1}
    row = load_results(db).iloc[0]
    assert SHARDED != SHARDED_SPEC
    p = predict(model_config("mlp", **SHARDED_MLP), 8, world_size=2, optimizer="adam")
    assert list(row.rank_peak_bytes) == p.rank_peak_bytes == list(row.predicted_rank_peak_bytes)
    assert row.executor == "ray" and not bool(row.predicted)
    group = ray.util.placement_group_table()[row.ray_placement_group]
    assert group["strategy"] == "STRICT_PACK" and group["state"] == "REMOVED"
    assert list(group["bundles"].values()) == [{"CPU": 1.0}, {"CPU": 1.0}]
    # 3 ranks on a cluster of 2 CPUs: refused before anything runs
    (trial,) = spec.trials()
    three = dataclasses.replace(trial, parallel=dataclasses.replace(trial.parallel, world_size=3))
    with pytest.raises(ConfigError, match="3 ranks asks Ray for 3 CPUs on one node"):
        RayExecutor(cluster).run([three], lambda t, r: pytest.fail("no trial may run"))
