"""fp16 autocast with a GradScaler works wherever bf16 does: the CLI's measured step and
its --estimate (whose won't-fit check runs the step on fake tensors), specs, sweeps and
the frontier. On fake tensors the scaler's inf check cannot read a value: the estimate
assumes no inf is found (NOTE [ fp16's inf check on fake tensors ], memprop.measure) and
then equals the measured step to the byte."""

import json
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memprop.cli import main
from memprop.measure import StepScaler, measure_step
from memprop.models import model_config
from memprop.sweep import load_results, load_spec, run_sweep
from memprop.sweep.frontier import run_frontier
from memprop.workload import build_workload, estimate, measure

MLP = ["--set", "depth=3", "--set", "width=64", "--set", "d_in=32"]


def _profile(capsys, *extra) -> dict:
    assert main(["profile", *MLP, "--batch", "8", "--amp", "fp16", "--optimizer", "adam",
                 "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_profile_fp16_measured_and_estimate_are_equal_to_the_byte(capsys):
    measured = _profile(capsys, "--repeats", "1")       # its won't-fit check runs fake fp16
    predicted = _profile(capsys, "--estimate")
    assert measured["amp"] == predicted["amp"] == "fp16"
    assert measured["predicted"] is False and predicted["predicted"] is True
    for key in ("peak_bytes", "saved_bytes", "budget_peak_bytes", "first_step_peak_bytes",
                "forward_peak_bytes", "backward_peak_bytes", "optimizer_peak_bytes",
                "start_bytes", "inference_peak_bytes", "optimizer_bytes_at_peak"):
        assert measured[key] == predicted[key], key
    # the closed form describes a plain float32 step, not autocast's: not shown under amp
    assert "closed_form_saved_bytes" not in measured


def test_cli_profile_fp16_text_output(capsys):
    assert main(["profile", *MLP, "--batch", "4", "--amp", "fp16", "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "(autocast fp16)" in out and "PREDICTED on fake tensors" in out
    assert "closed-form" not in out


def test_fp16_estimate_equals_measurement_op_by_op_on_the_transformer():
    cfg = model_config("transformer", depth=2, d_model=32, heads=4, seq_len=16, vocab=64)
    real = measure(cfg, 4, amp="fp16", optimizer="adam", repeats=1, check_fits=False)
    fake = estimate(cfg, 4, amp="fp16", optimizer="adam")
    assert (fake.saved_bytes, fake.peak_bytes, fake.budget_peak_bytes,
            fake.first_step_peak_bytes) == (real.saved_bytes, real.peak_bytes,
                                            real.budget_peak_bytes, real.first_step_peak_bytes)
    # the fake step runs the real step's ops, the scaler's read of found_inf included
    # (fake tensors add prim.device rows, which allocate nothing)
    def ops(m):
        rows = m.timeline.query("op != 'prim.device'")
        return rows[["phase", "op", "total_bytes"]].reset_index(drop=True)
    assert ops(fake).equals(ops(real))


def test_step_scaler_on_fake_tensors_takes_the_step():
    cfg = model_config("mlp", depth=2, width=16, d_in=8)
    with FakeTensorMode():
        model, batch = build_workload(cfg, 4)
        m = measure_step(model, batch, amp="fp16", optimizer="adam", timing=False,
                         predicted=True)
    # Adam's state exists after the first step only if the step was taken
    assert m.peak_by_category["optimizer"] > 0
    assert issubclass(StepScaler, torch.amp.GradScaler)


def test_sweep_with_amp_none_and_fp16_stores_every_trial_ok(tmp_path, capsys):
    spec = tmp_path / "amp.toml"
    spec.write_text(textwrap.dedent("""
        name = "amp"
        [model]
        name = "mlp"
        width = 32
        d_in = 16
        [grid]
        depth = [2]
        batch = [4, 8]
        amp = ["none", "fp16"]
        [run]
        repeats = 1
        optimizer = "adam"
        estimate = true
    """))
    db = tmp_path / "amp.sqlite"
    assert main(["sweep", str(spec), "--db", str(db), "--quiet"]) == 0
    rows = load_results(db)
    assert len(rows) == 4
    assert rows.status.tolist() == ["ok"] * 4, rows.get("error")
    assert sorted(rows.amp.fillna("none")) == ["fp16", "fp16", "none", "none"]
    # the estimate stored beside each measured trial is exact, fp16 included
    assert (rows.predicted_peak_bytes == rows.peak_bytes).all()
    assert (rows.predicted_saved_bytes == rows.saved_bytes).all()


@pytest.mark.budget
def test_frontier_under_fp16(tmp_path):
    spec = tmp_path / "front.toml"
    spec.write_text(textwrap.dedent("""
        name = "front16"
        [model]
        name = "mlp"
        width = 64
        d_in = 64
        [grid]
        batch = [8]
        [run]
        amp = "fp16"
        [frontier]
        budget = "2MiB"
        depths = [2]
        strategies = ["none"]
        batch_step = 64
        max_batch = 8192
    """))
    db = tmp_path / "f.sqlite"
    (point,) = run_frontier(load_spec(spec), db_path=db, progress=None)
    rows = load_results(db).set_index("batch")
    assert set(rows.amp) == {"fp16"}
    assert rows.loc[point.confirmed_batch, "status"] == "ok"
    assert rows.loc[point.confirmed_batch + 64, "status"] == "oom"
    assert point.predicted_batch == point.confirmed_batch


def test_spec_with_fp16_runs_in_process(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\n[model]\nname = "mlp"\nwidth = 16\nd_in = 8\n'
                    '[grid]\nbatch = [4]\namp = ["fp16"]\n[run]\nrepeats = 1\n')
    db = tmp_path / "s.sqlite"
    run_sweep(load_spec(spec), db_path=db)
    row = load_results(db).iloc[0]
    assert row.status == "ok" and row.amp == "fp16"
