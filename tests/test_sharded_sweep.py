"""Sharded trials in sweeps (a spec's [parallel] table, issue 22 item 6): the table parses
and grids, bad values are refused in one line, a predicted sweep's rows are
``memprop.sharded.predict``'s figures to the byte, a real 2-rank trial's equal its
prediction, the report draws the per-rank figure, and an interrupted sweep resumes."""

import math

import pytest
import torch
from helpers import SHARDED_MLP, SHARDED_SPEC, write_spec

from memprop.cli import main
from memprop.models import model_config
from memprop.report.data import load_report_data
from memprop.report.render import build_report
from memprop.report.sharded_figures import fig_sharded_memory
from memprop.sharded import FSDPConfig, predict
from memprop.sharded.row import bytes_at_peak
from memprop.sweep import SpecError, load_results, load_spec, parse_spec, run_sweep
from memprop.sweep.parallel import Parallel
from memprop.sweep.trial import Trial
from memprop.tracker import CATEGORIES

MLP = SHARDED_MLP                          # the spec's model fields
PREDICTED = SHARDED_SPEC                   # world sizes 1, 2, 4, predicted; Adam


def test_the_parallel_table_grids_with_the_grid(tmp_path):
    spec = parse_spec({"name": "g", "model": {"name": "transformer", "depth": 2},
                       "grid": {"batch": [2, 4], "strategy": ["none", "sqrt"]},
                       "parallel": {"fsdp": [2, 4], "tp": [1, 2], "mixed_precision": "bf16",
                                    "reshard_after_forward": [True, False],
                                    "estimate": True}})
    trials = spec.trials()
    assert len(trials) == 2 * 2 * (2 * 2 * 2)          # batch x strategy x parallel points
    assert len({t.key() for t in trials}) == len(trials)
    points = {t.parallel for t in trials}
    assert points == {Parallel(world_size=n, tp=t, reshard_after_forward=r,
                               mixed_precision="bf16", predicted=True)
                      for n in (2, 4) for t in (1, 2) for r in (True, False)}
    assert trials[0].parallel.fsdp() == FSDPConfig(world_size=2, mixed_precision="bf16")
    assert Trial.from_dict(trials[-1].to_dict()) == trials[-1]
    # a trial of one device keeps its old key: no "parallel" in what is hashed
    assert "parallel" not in parse_spec({"name": "g", "model": {"name": "mlp"},
                                         "grid": {"batch": [2]}}).trials()[0].to_dict()


@pytest.mark.parametrize("table, key, words", [
    ({"world_size": [2, 0]}, "parallel.world_size", "0 is not allowed"),
    ({"world_size": "2"}, "parallel.world_size", "'2' is not allowed"),
    ({"world_size": []}, "parallel.world_size", "the list is empty"),
    ({"world_size": [4, 6], "tp": 4}, "parallel.world_size",
     "world_size = 6 is not divisible by replicate x tp = 1 x 4"),
    ({"world_size": 2, "mixed_precision": "fp16"}, "parallel.mixed_precision",
     "'fp16' is not allowed; choose one of: none, bf16"),
    ({"world_size": 2, "estimate": "yes"}, "parallel.estimate", "'yes' is not allowed"),
    ({"world_size": 2, "fsdp": 2}, "parallel.fsdp", "not both"),
    ({"worldsize": 2}, "parallel.worldsize", "did you mean 'world_size'?"),
    ({"tp": 2}, "parallel.world_size", "missing"),
    ({"world_size": 128}, "parallel.world_size", "add estimate = true"),
    ({"world_size": 3, "tp": 3, "estimate": True}, "parallel.tp",
     "tp = 3 with model transformer: tp = 3 does not divide the transformer's heads = 4"),
])
def test_bad_parallel_values_are_refused_in_one_line(table, key, words):
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "b", "model": {"name": "transformer"}, "grid": {"batch": [2]},
                    "parallel": table}, path="s.toml")
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"s.toml: {key}: ") and words in text, text


def test_tensor_parallelism_on_a_model_without_a_plan_is_refused_before_any_trial():
    with pytest.raises(SpecError, match=r"^s.toml: parallel.tp: tp = 2 with model mlp: no "
                                        "tensor-parallel plan for MLP"):
        parse_spec({"name": "b", "model": {"name": "mlp"}, "grid": {"batch": [2]},
                    "parallel": {"world_size": 2, "tp": 2}}, path="s.toml")


@pytest.mark.parametrize("line, key", [('amp = "bf16"', "run.amp"),
                                       ('budget = "1GiB"', "run.budget")])
def test_what_a_sharded_trial_does_not_take_is_refused_and_the_cli_exits_2(tmp_path, capsys,
                                                                          line, key):
    path = write_spec(tmp_path, PREDICTED.replace('optimizer = "adam"', line))
    assert main(["sweep", str(path), "--db", str(tmp_path / "r.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f": {key}: " in err and "Traceback" not in err
    assert not (tmp_path / "r.sqlite").exists()


def _padded_shard_bytes(model, n: int) -> int:
    """A rank's FSDP2 shard of every parameter: ceil(rows / n) rows each, float32."""
    return sum(math.ceil(p.shape[0] / n) * (p.numel() // p.shape[0]) * 4
               for p in model.parameters())


def test_a_predicted_sweep_stores_predict_to_the_byte_and_resumes(tmp_path):
    spec = load_spec(write_spec(tmp_path, PREDICTED))
    db = tmp_path / "r.sqlite"
    stop = []

    def interrupt(trial, result):                 # Ctrl-C after the first trial ends
        stop.append(trial)
        raise KeyboardInterrupt

    first = run_sweep(spec, db_path=db, on_result=interrupt)
    assert first.interrupted and first.ran == 1 and len(load_results(db)) == 1
    kept = load_results(db).set_index("key").finished_at
    rest = run_sweep(spec, db_path=db)
    assert (rest.skipped, rest.ran, rest.counts) == (1, 2, {"ok": 2})
    rows = load_results(db).set_index("world_size").sort_index()
    assert rows.loc[stop[0].parallel.world_size, "finished_at"] == kept.iloc[0]

    cfg = model_config("mlp", **MLP)
    model = cfg.build()
    for n in (1, 2, 4):
        row, p = rows.loc[n], predict(cfg, 8, world_size=n, optimizer="adam")
        assert bool(row.predicted) and row.status == "ok"
        assert list(row.rank_peak_bytes) == p.rank_peak_bytes and row.peak_bytes == p.peak_bytes
        assert list(row.rank_saved_bytes) == p.rank_saved_bytes
        for r in range(n):
            at_peak = bytes_at_peak(p.rank(r))
            assert sum(at_peak.values()) == p.rank_peak_bytes[r]   # they stack to the peak
            for c in CATEGORIES:
                assert row[f"rank_{c}_bytes_at_peak"][r] == at_peak[c]
        # by hand: the 64-row weights and biases split evenly; the 10-row head pads to
        # ceil(10 / n) rows; Adam keeps two float32 states of the rank's rows and a step
        assert row.parameter_max_bytes == _padded_shard_bytes(model, n)
        if n in (1, 2):                   # every rank holds whole rows: no padding
            assert row.optimizer_max_bytes == 2 * row.parameter_max_bytes + 4 * 6


def test_a_real_two_rank_trial_equals_its_prediction(tmp_path):
    text = PREDICTED.replace("world_size = [1, 2, 4]\nestimate = true", "world_size = 2")
    assert text != PREDICTED
    spec = load_spec(write_spec(tmp_path, text))
    summary = run_sweep(spec, db_path=tmp_path / "r.sqlite")
    assert summary.counts == {"ok": 1}
    row = load_results(tmp_path / "r.sqlite").iloc[0]
    p = predict(model_config("mlp", **MLP), 8, fsdp=FSDPConfig(world_size=2),
                optimizer="adam", dtype=torch.float32)
    assert not bool(row.predicted) and list(row.ranks_run) == [0, 1]
    assert list(row.rank_peak_bytes) == p.rank_peak_bytes == list(row.predicted_rank_peak_bytes)
    assert list(row.rank_saved_bytes) == p.rank_saved_bytes
    for c in CATEGORIES:
        assert list(row[f"rank_{c}_bytes_at_peak"]) == [bytes_at_peak(p.rank(r))[c]
                                                        for r in range(2)]


def test_the_report_draws_each_rank_by_category_against_world_size(tmp_path):
    spec = load_spec(write_spec(tmp_path, PREDICTED.replace("[1, 2, 4]", "[1, 4]")))
    db = tmp_path / "r.sqlite"
    run_sweep(spec, db_path=db)
    files = build_report(db, tmp_path / "report")
    assert (tmp_path / "report/figures/sharded_memory.png").stat().st_size > 0
    md = files["report.md"].read_text()
    assert "![sharded_memory](figures/sharded_memory.png)" in md
    data = load_report_data(db)
    assert data.ok.empty and len(data.parallel) == 2     # no single-device figure uses them
    fig, _ = fig_sharded_memory(data)
    bars = fig.axes[0].patches                         # stacked: one column per world size
    tops = {}
    for b in bars:
        x = round(b.get_x() + b.get_width() / 2)
        tops[x] = max(tops.get(x, 0), b.get_y() + b.get_height())
    peaks = data.parallel.sort_values("world_size").peak_bytes.tolist()
    assert [round(tops[x]) for x in sorted(tops)] == peaks   # each bar: that size's peak
