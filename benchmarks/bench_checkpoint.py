"""What each checkpointing strategy buys and costs on a deep MLP, side by side.

For depth 16, 32, 64, 128: stored bytes, tensor-level peak, FLOPs ratio and step-time
ratio against ``none``. The planner runs at a budget that halves ``none``'s stored
activations (budget = plain peak - saved/2) and is compared with every fixed strategy
that fits the same budget. Step times: interleaved rounds, medians.
"""

from __future__ import annotations

import statistics
import time

import torch

from memprop.checkpoint.planning.planner import plan
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.workload import build_workload

TARGETS = """
Targets (issue 4): at depth 64, sqrt stores <= 1/4 of none's activations for <= 1.40x
FLOPs; the planner at a budget of half of none's activation memory pays no more
recompute FLOPs than sqrt, and never more than any fixed strategy that fits the budget.
MLP: width 256, d_in 256, relu, batch 1024, float32, SGD; CPU.
"""

DEPTHS = (16, 32, 64, 128)
FIXED = ("none", "full", "every:2", "segments:4", "sqrt", "selective")
WIDTH, BATCH, ROUNDS = 256, 1024, 5


def _step_ms(models):
    """Median step time per model, in interleaved rounds."""
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, (m, _) in models.items()}

    def step(key):
        model, batch = models[key]
        loss = model.objective(model(*batch[0]), batch[1])
        loss.backward()
        opts[key].step()
        opts[key].zero_grad(set_to_none=True)

    for key in models:
        step(key)
    times = {k: [] for k in models}
    for _ in range(ROUNDS):
        for key in models:
            t0 = time.perf_counter()
            step(key)
            times[key].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def run() -> dict:
    table, verdicts = [], []
    for depth in DEPTHS:
        cfg = model_config("mlp", depth=depth, width=WIDTH, d_in=WIDTH, phi="relu")
        models, results = {}, {}
        for spec in FIXED:
            model, batch = build_workload(cfg, BATCH, strategy=spec)
            results[spec] = measure_step(model, batch, strategy=spec, timing=False,
                                         inference=False)
            models[spec] = (model, batch)
        none = results["none"]
        budget = none.peak_bytes - none.saved_bytes // 2
        model, batch = build_workload(cfg, BATCH)
        p = plan(model, batch, budget)
        p.apply(model)
        key = f"plan ({p.spec})"
        results[key] = measure_step(model, batch, strategy=p.spec, timing=False,
                                    inference=False)
        models[key] = (model, batch)
        times = _step_ms(models)
        base_flops = none.forward_flops + none.backward_flops
        for spec, m in results.items():
            flops = m.forward_flops + m.backward_flops
            table.append({"depth": depth, "strategy": spec,
                          "saved_MiB": round(m.saved_bytes / 2**20, 2),
                          "saved_ratio": round(m.saved_bytes / none.saved_bytes, 3),
                          "peak_MiB": round(m.peak_bytes / 2**20, 2),
                          "peak_ratio": round(m.peak_bytes / none.peak_bytes, 3),
                          "fits_budget": m.peak_bytes <= budget,
                          "flops_ratio": round(flops / base_flops, 3),
                          "step_ms": round(times[spec], 1),
                          "time_ratio": round(times[spec] / times["none"], 3)})
        rows = {r["strategy"]: r for r in table if r["depth"] == depth}
        planned = rows[key]
        fitting = [s for s in FIXED if rows[s]["fits_budget"]]
        beaten = all(planned["flops_ratio"] <= rows[s]["flops_ratio"] for s in fitting)
        verdicts.append(
            f"depth {depth}: budget {budget / 2**20:.1f} MiB; plan {p.spec} at "
            f"{planned['flops_ratio']:.3f}x FLOPs, peak {planned['peak_MiB']} MiB (predicted "
            f"{p.predicted_peak_bytes / 2**20:.2f}); fixed strategies that fit: "
            f"{', '.join(fitting) or 'none'}; plan pays no more than each of them: {beaten}")
        if depth == 64:
            s = rows["sqrt"]
            verdicts.append(
                f"depth 64: sqrt stores {s['saved_ratio']:.3f} of none "
                f"({'meets' if s['saved_ratio'] <= 0.25 else 'MISSES'} <= 1/4) for "
                f"{s['flops_ratio']:.3f}x FLOPs "
                f"({'meets' if s['flops_ratio'] <= 1.40 else 'MISSES'} <= 1.40x); "
                f"plan {planned['flops_ratio']:.3f}x vs sqrt {s['flops_ratio']:.3f}x")
    return {"table": table, "verdicts": verdicts, "rounds": ROUNDS}
