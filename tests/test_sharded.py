"""FSDP2 per rank: real 2-process gloo runs against fake-process-group predictions.

Each rank's measured peak, peak by phase and category, live bytes before the step,
bytes stored for backward and whole live-memory timeline equal the prediction to the
byte (NOTE [ One rank, two passes ], memprop.sharded.step); sharded parameter,
gradient and optimizer bytes equal what FSDP2's dim-0 chunking gives by hand; a
checkpointed sharded model's gradients are bitwise the plain sharded model's.
"""

import json
import time

import pytest
import torch.distributed as dist
from helpers import assert_ranks_equal

import memprop
from memprop.cli import main
from memprop.errors import ConfigError
from memprop.sharded import FSDPConfig, RankJob, measure_jobs, predict, predict_job, shard_layout
from memprop.sharded.render import rank_ranges
from memprop.sharded.verify import checkpoint_matches

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")

# width 21 over 2 ranks: 11 rows on rank 0, 10 on rank 1 (uneven shards)
MLP = memprop.model_config("mlp", depth=3, width=21, d_in=12)
TRANSFORMER = memprop.model_config("transformer", depth=2, d_model=32, heads=2, seq_len=16,
                                   vocab=50)


def _job(config, *, reshard=True, optimizer="sgd", mixed_precision=None, strategy="none"):
    return RankJob(config=config, batch_size=4, optimizer=optimizer, strategy=strategy,
                   fsdp=FSDPConfig(world_size=2, reshard_after_forward=reshard,
                                   mixed_precision=mixed_precision))


JOBS = {
    "mlp-reshard": _job(MLP),
    "mlp-no-reshard": _job(MLP, reshard=False),
    "mlp-adam-full": _job(MLP, optimizer="adam", strategy="full"),
    "transformer-reshard": _job(TRANSFORMER),
    "transformer-no-reshard": _job(TRANSFORMER, reshard=False),
    "transformer-bf16-adam": _job(TRANSFORMER, optimizer="adam", mixed_precision="bf16"),
}


@pytest.fixture(scope="module")
def measured():
    """Every job measured on 2 real ranks, in one pair of processes."""
    return dict(zip(JOBS, measure_jobs(list(JOBS.values()))))


@pytest.fixture(scope="module")
def predicted():
    return {name: predict_job(job) for name, job in JOBS.items()}


@pytest.mark.parametrize("name", JOBS)
def test_each_rank_measured_equals_predicted(measured, predicted, name):
    assert_ranks_equal(measured[name], predicted[name])


def _padded_bytes(config, world_size, itemsize=4):
    """Each rank's sharded parameter storage: ceil(rows / N) rows of every parameter
    (FSDP2 pads every rank's shard to the full chunk)."""
    total = 0
    for p in config.build().parameters():
        rows = p.shape[0]
        total += -(-rows // world_size) * (p.numel() // rows) * itemsize
    return total


def test_sharded_bytes_by_hand(measured):
    # parameters (21,12) (21,) (21,21) (21,) (21,21) (21,) (10,21) (10,): padded shards of
    # 11 and 5 rows on both ranks = 737 floats
    assert _padded_bytes(MLP, 2) == 4 * (11 * 12 + 11 + 2 * (11 * 21 + 11) + 5 * 21 + 5) \
        == 2948
    # gathered (unsharded, padded) parameters: every block and the root kept from forward
    # to backward without reshard, 2 x 737 floats; with it, at most the root's head
    # (2 x 110 floats) and one block (2 x 242)
    gathered = {"mlp-reshard": 4 * 2 * (110 + 242), "mlp-no-reshard": 4 * 2 * 737}
    assert gathered == {"mlp-reshard": 2816, "mlp-no-reshard": 5896}
    for name in ("mlp-reshard", "mlp-no-reshard"):
        for r in range(2):
            m = measured[name].rank(r)
            assert m.peak_by_category["parameter"] == 2948
            assert m.peak_by_category["gradient"] == 2948     # reduce-scatter output, padded
            assert m.peak_by_category["optimizer"] == 0       # sgd
            assert m.meta["gathered_peak_bytes"] == gathered[name]


def test_uneven_shards_make_ranks_differ(measured, predicted):
    # Adam's moments follow the unpadded shard: rank 0 holds 11 rows of each width-21
    # parameter (737 floats), rank 1 holds 10 (680); plus one 4-byte step per parameter
    s = measured["mlp-adam-full"]
    opt = [s.rank(r).peak_by_category["optimizer"] for r in range(2)]
    assert opt == [2 * 737 * 4 + 8 * 4, 2 * 680 * 4 + 8 * 4] == [5928, 5472]
    assert s.rank_peak_bytes[0] - s.rank_peak_bytes[1] == 2 * (737 - 680) * 4 == 456
    assert s.largest_rank == 0
    assert predicted["mlp-adam-full"].same_as == [0, 1]       # both ranks predicted
    assert predicted["transformer-reshard"].same_as == [0, 0]  # even shards: one rank


def test_reshard_after_forward_frees_gathered_parameters(measured):
    # ZeRO-3 frees each block's gathered parameters after its forward: a lower forward peak
    on = measured["transformer-reshard"].rank(0).peak_by_phase["forward"]
    off = measured["transformer-no-reshard"].rank(0).peak_by_phase["forward"]
    assert on < off


def test_full_checkpointing_under_fsdp_gives_bitwise_gradients():
    ranks = checkpoint_matches(TRANSFORMER, 4, world_size=2, strategy="full")
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["equal"] and r["max_abs_diff"] == 0.0 for r in ranks), ranks
    assert ranks[0]["params"] == len(list(TRANSFORMER.build().parameters()))


def test_prediction_at_64_ranks_takes_seconds():
    config = memprop.model_config("transformer", depth=4, d_model=256, heads=4, seq_len=128,
                                  vocab=1024)
    start = time.perf_counter()
    s = predict(config, 4, world_size=64, optimizer="adam")
    took = time.perf_counter() - start
    assert took < 30, took                   # ~4 s here (2 shared cores)
    assert len(s.rank_peak_bytes) == 64 and s.peak_bytes == max(s.rank_peak_bytes)
    assert s.same_as == [0] * 64             # every dimension divides by 64: one layout
    m = s.rank(0)
    assert m.peak_by_category["parameter"] == _padded_bytes(config, 64)
    # the same model on 2 ranks holds 32x the sharded parameter bytes
    two = predict(config, 4, world_size=2)
    assert two.rank(0).peak_by_category["parameter"] == _padded_bytes(config, 2)
    assert _padded_bytes(config, 2) == 32 * _padded_bytes(config, 64)


def test_shard_layout_and_rank_ranges():
    # 10 rows over 4 ranks: chunks of 3, 3, 3, 1; 2 rows over 4: 1, 1, 0, 0
    assert [shard_layout([(10, 5), (2,)], 4, r) for r in range(4)] == \
        [(3, 1), (3, 1), (3, 0), (1, 0)]
    assert rank_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


@pytest.mark.parametrize("kwargs, word", [
    (dict(world_size=0), "world_size"), (dict(world_size=2, mixed_precision="fp8"),
                                         "mixed_precision"),
    (dict(world_size=2, reshard_after_forward=2), "reshard_after_forward"),
    (dict(world_size=2, backend="nccl"), "backend")])
def test_fsdp_config_names_the_bad_field(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        FSDPConfig(**kwargs)


def test_cli_fsdp_estimate_json_equals_the_real_run(measured, capsys):
    args = ["profile", "--model", "mlp", "--set", "depth=3", "--set", "width=21", "--set",
            "d_in=12", "--batch", "4", "--optimizer", "adam", "--strategy", "full",
            "--fsdp", "2", "--estimate", "--json"]
    assert main(args) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["rank_peak_bytes"] == measured["mlp-adam-full"].rank_peak_bytes
    assert row["peak_bytes"] == measured["mlp-adam-full"].peak_bytes
    assert row["predicted"] is True and row["world_size"] == 2


def test_cli_fsdp_text_and_refusals(capsys):
    assert main(["profile", "--model", "mlp", "--set", "width=21", "--batch", "4",
                 "--fsdp", "3", "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "FSDP2 over 3 ranks" in out and "largest rank" in out and "PREDICTED" in out
    assert main(["profile", "--fsdp", "64"]) != 0          # 64 real processes: refused
    assert "--estimate" in capsys.readouterr().err
    assert main(["profile", "--fsdp", "2", "--amp", "bf16", "--estimate"]) != 0
    assert "--fsdp-mixed-precision" in capsys.readouterr().err


def _tests_on_path(monkeypatch):
    """The ranks import the rank functions of tests/helpers.py by name."""
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH", "")) if p))


def test_a_failing_rank_fails_the_run_at_once_with_its_own_error(monkeypatch):
    # rank 0 waits in a barrier for rank 1, which raised: rank 0 is killed when rank 1
    # ends, and the error is rank 1's (not a timeout, not rank 0's killed status)
    from helpers import rank_fails_on_rank_1

    from memprop.sharded.spawn import RankRunError, run_on_ranks
    _tests_on_path(monkeypatch)
    with pytest.raises(RankRunError, match=r"rank \d of 2 failed \(exit 1\)") as err:
        run_on_ranks(rank_fails_on_rank_1, [_job(MLP)], timeout_s=300)
    assert "rank 1 fails on purpose" in str(err.value)
    assert "did not end within" not in str(err.value)


def test_ranks_end_when_the_process_that_started_them_is_killed(monkeypatch, tmp_path):
    # a sweep killed by SIGKILL cannot kill its ranks: they notice their parent is gone
    import os
    import signal
    import subprocess
    import sys
    _tests_on_path(monkeypatch)
    monkeypatch.setenv("MEMPROP_TEST_PIDS", str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", (
        "from helpers import rank_writes_pid_and_waits as f\n"
        "from test_sharded import MLP, _job\n"
        "from memprop.sharded.spawn import run_on_ranks\n"
        "run_on_ranks(f, [_job(MLP)], timeout_s=600)\n")])
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("[01]"))) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, "ranks never started"
            time.sleep(0.2)
        pids += [int((tmp_path / r).read_text()) for r in ("0", "1")]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()

        def alive(pid):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            with open(f"/proc/{pid}/stat") as f:       # an exited, unreaped child
                return f.read().split(") ")[1][0] != "Z"
        deadline = time.monotonic() + 60
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in pids)
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in pids:                  # left behind only when the test fails
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
