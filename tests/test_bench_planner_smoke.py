"""benchmarks/bench_planner.py end to end on a tiny MLP at two compile budgets: compile's
stored bytes and peak are measured (LiveMemoryTracker(compiled=True)), memprop plans for
each, and the verdicts compare them. A smoke test: the numbers are the benchmark's."""

import importlib.util
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_planner.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_planner_smoke", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "WORKLOADS",
                        {"mlp": ("mlp", dict(depth=6, width=32, d_in=32), 16)})
    monkeypatch.setattr(module, "BUDGETS", (1.0, 0.3))
    monkeypatch.setattr(module, "PEAK_FRACTIONS", ())
    monkeypatch.setattr(module, "ROUNDS", 1)
    monkeypatch.setattr(module, "INDUCTOR_BUDGETS", ())
    monkeypatch.setattr(module, "MEASURED_R", 0.3)
    return module


@pytest.mark.slow
def test_planner_benchmark_runs_and_compares_peaks(bench):
    rows, verdicts = bench._workload("mlp")
    by_method = {(r["method"], r["spec"]): r for r in rows}
    plain = by_method["fixed", "none"]
    full_budget = by_method["compile", "r=1.0"]
    # at r = 1.0 the partitioner keeps what eager keeps on this MLP: same bytes, same peak
    assert full_budget["stored_bytes"] == plain["stored_bytes"]
    assert full_budget["peak_bytes"] == plain["peak_bytes"]
    assert by_method["compile", "r=0.3"]["stored_bytes"] < plain["stored_bytes"]
    assert by_method["compile", "r=0.3"]["recompute_flops"] > 0
    methods = {r["method"] for r in rows}
    assert {"memprop stored<=compile r=0.3", "memprop peak<=compile r=0.3",
            "memprop time peak<=compile r=0.3", "multi-level optimum"} <= methods
    timed = next(
        r for r in rows if r["method"] == "memprop time peak<=compile r=0.3")
    # the faster side is the one of least step ratio, memprop's or compile's at r
    compiled = by_method["compile", "r=0.3"]
    assert timed["faster"] == ("memprop" if timed["step_ratio"] <= compiled["step_ratio"]
                               else "aot_eager")
    assert any(v.startswith("mlp r=0.3 (time):") and "faster:" in v for v in verdicts)
    assert all(r["step_ratio"] is not None for r in rows)
    assert any(v.startswith("mlp r=0.3 (peak):") for v in verdicts)
    assert any(v.startswith("mlp: lowest peak:") for v in verdicts)
    exact = next(v for v in verdicts if "predicted peak = measured" in v)
    assert exact.endswith(": True") and "for the 3 plans" in exact
