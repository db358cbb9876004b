"""A deep model's per-rank prediction extrapolated from the same model at 3, 4 and 5
layers equals the prediction of every layer, to the byte, figure by figure (NOTE
[ Predicting a deep model from three shallow ones ], memprop.sharded.layers); where it
cannot be extrapolated the whole model is predicted and the result says why."""

import dataclasses
import json

import pytest
import torch.distributed as dist

import memprop
from memprop.cli import main
from memprop.errors import ConfigError
from memprop.measure import bytes_at_peak
from memprop.sharded import FSDPConfig, plan_rank, predict
from memprop.sharded.layers import NotLinear, extrapolate_rank, layer_count
from memprop.sharded.predictions import RankPredictions

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")

TRANSFORMER = memprop.model_config("transformer", depth=13, d_model=32, heads=2, seq_len=16,
                                   vocab=50)
LLAMA = memprop.model_config("hf:llama", num_hidden_layers=13)


def _figures(s):
    """Every figure extrapolation promises, per rank."""
    return [(m.peak_bytes, m.saved_bytes, m.saved_count, m.start_bytes,
             m.first_step_peak_bytes, m.budget_peak_bytes, m.peak_by_phase,
             m.peak_by_category, bytes_at_peak(m), m.meta.get("gathered_bytes_at_peak"),
             m.meta.get("gathered_peak_bytes")) for m in map(s.rank, range(s.world_size))]


CASES = {
    "fsdp-adam": (TRANSFORMER, dict(world_size=4), dict(optimizer="adam")),
    "fsdp-uneven-full": (TRANSFORMER, dict(world_size=3), dict(strategy="full")),
    "no-reshard": (TRANSFORMER, dict(world_size=4, reshard_after_forward=False), {}),
    "hsdp": (TRANSFORMER, dict(world_size=4, replicate=2), {}),
    "fsdp-x-tp": (TRANSFORMER, dict(world_size=4, tp=2), dict(optimizer="adam")),
    "llama-selective": (LLAMA, dict(world_size=4), dict(strategy="selective")),
    "llama-bf16": (LLAMA, dict(world_size=8, mixed_precision="bf16"), dict(optimizer="adam")),
}


@pytest.mark.parametrize("name", CASES)
def test_extrapolated_figures_equal_every_layer_predicted(name):
    config, mesh, step = CASES[name]
    fsdp = FSDPConfig(**mesh)
    whole = predict(config, 2, fsdp=fsdp, layers="all", **step)
    fast = predict(config, 2, fsdp=fsdp, layers="extrapolate", **step)
    assert fast.extrapolated_from == (3, 4, 5) and whole.extrapolated_from is None
    assert fast.same_as == whole.same_as
    assert _figures(fast) == _figures(whole)
    assert fast.rank(0).meta["layers"] == 13 and fast.rank(0).timeline is None


def test_what_is_not_extrapolated_is_predicted_whole_and_says_why():
    fsdp = FSDPConfig(world_size=2)
    # every:2 checkpoints blocks 0, 2, 4, ...: which ones depends on the depth, so every
    # layer is run
    s = predict(TRANSFORMER, 2, fsdp=fsdp, strategy="every:2", layers="extrapolate")
    assert s.extrapolated_from is None and "'every:2' does not treat every layer" in \
        s.extrapolation_refused
    assert _figures(s) == _figures(predict(TRANSFORMER, 2, fsdp=fsdp, strategy="every:2"))
    # 12 layers or fewer cost no more whole than at 3, 4 and 5: nothing refused
    shallow = dataclasses.replace(TRANSFORMER, depth=12)
    s = predict(shallow, 2, fsdp=fsdp, layers="extrapolate")
    assert s.extrapolated_from is None and s.extrapolation_refused is None
    # the layer field of a zoo and an hf: model; a composite hf model's layers are a
    # sub-config's: not resized
    assert layer_count(TRANSFORMER) == ("depth", 13)
    assert layer_count(LLAMA) == ("num_hidden_layers", 13)
    assert layer_count(memprop.model_config("hf:gemma3")) is None
    with pytest.raises(ConfigError, match="layers 'some' is not allowed; choose one of: "
                                          "all, extrapolate"):
        predict(TRANSFORMER, 2, world_size=2, layers="some")


def test_a_figure_off_the_line_is_not_extrapolated():
    s = predict(TRANSFORMER, 2, world_size=2)
    m = s.rank(0)
    bumped = dataclasses.replace(m, saved_bytes=m.saved_bytes + 8)
    with pytest.raises(NotLinear, match=r"saved_bytes is .* bytes at 3, 4, 5 layers, not a "
                                        r"line"):
        extrapolate_rank([m, m, bumped], 9)
    # the peak in another phase at depth than at 3, 4 and 5 layers
    moved = [dataclasses.replace(m, peak_by_phase={**m.peak_by_phase, "optimizer": v})
             for v in (0, 10**6, 2 * 10**6)]
    with pytest.raises(NotLinear, match="the peak moves between phases"):
        extrapolate_rank(moved, 10**4)


def test_a_rank_is_planned_on_extrapolated_predictions():
    # the rank planner reads the bytes by category at the plain step's peak, which an
    # extrapolated rank carries without a timeline: the plan and its predicted peak are
    # those planned on every layer
    fsdp = FSDPConfig(world_size=4)
    plain = predict(TRANSFORMER, 2, fsdp=fsdp, layers="all")
    budget = int(plain.peak_bytes * 0.9)
    plans = [plan_rank(TRANSFORMER, 2, fsdp, budget, predictions=RankPredictions(
        TRANSFORMER, fsdp, layers=layers)) for layers in ("extrapolate", "all")]
    fast, whole = plans
    assert fast.plain.extrapolated_from == (3, 4, 5) and fast.spec != "none"
    assert (fast.spec, fast.fits, fast.predicted_peak_bytes) == (
        whole.spec, whole.fits, whole.predicted_peak_bytes)


def test_cli_estimate_says_it_extrapolated(capsys):
    args = ["profile", "--model", "transformer", "--set", "depth=13", "--set", "d_model=32",
            "--set", "heads=2", "--set", "seq_len=16", "--set", "vocab=50", "--batch", "2",
            "--fsdp", "4", "--estimate"]
    assert main([*args, "--json"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["extrapolated_from"] == [3, 4, 5]
    assert main([*args, "--json", "--layers", "all"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["extrapolated_from"] is None
    assert (fast["rank_peak_bytes"], fast["rank_saved_bytes"]) == (
        whole["rank_peak_bytes"], whole["rank_saved_bytes"])
    assert main(args) == 0
    assert ("from the model at 3, 4 and 5 layers, extrapolated to 13 (every figure linear in "
            "depth, checked)") in capsys.readouterr().out
    assert main([*args, "--layers", "half"]) == 2
    assert "invalid choice: 'half'" in capsys.readouterr().err
