"""The planner's step time: what each plan costs in seconds, predicted and measured.

    python benchmarks/run.py plan_time     # results/plan_time.json and plan_time.md

Three tiny decoders (GPT-2-, Llama- and Mistral-class: 4 layers, hidden 128, seq 128,
batch 8, CPU, random weights, half the rows left-padded) at 60 % of the plain step's
measured peak. For each: the default plan (``objective="time"``: least predicted step
time among the plans that fit, NOTE [ Pricing a plan in seconds ]), the plan of least
recompute FLOPs (``objective="flops"``, the planner's choice before), the chain's plan
(``whole=False``: checkpoints on the block chain only), the fastest plan of plain
segments the default weighed (``segments only``: the default before a block could
checkpoint a part of itself, ``ops:2=@mlp``), and ``full``. Columns: the
predicted peak (fake tensors) and the measured one, the predicted step time as a ratio
to the plain step's (timed at two rows, the rest priced at the machine's rates) and the
measured ratio: one forward and backward, medians of ROUNDS interleaved rounds in one
process, the plain step timed in every round.
"""

from __future__ import annotations

import time

import torch

from memprop.checkpoint import apply_strategy, plan, remove_strategy
from memprop.checkpoint.planning.timing import time_strategies
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.models.user import step_loss
from memprop.workload import build_workload

TARGETS = """\
Targets (issue 21): at 60 % of the plain peak the default plan costs at most 1.3x the
plain step, and never more than `full` unless it also peaks lower; measured step-time
ratios are interleaved medians in one process (noisy shared machine: compare ratios)."""

SHAPE = dict(num_hidden_layers=4, hidden_size=128, seq_len=128)
WORKLOADS = {
    "gpt2": ("hf:gpt2", dict(n_layer=4, n_embd=128, n_head=4, seq_len=128)),
    "llama": ("hf:llama", SHAPE),
    "mistral": ("hf:mistral", SHAPE),
}
BATCH = 8
FRACTION = 0.6
ROUNDS = 25


def _peak(cfg, model, data) -> int:
    return measure_step(model, data, loss_fn=cfg.loss, timing=False,
                        inference=False).peak_bytes


def run() -> dict:
    rows, verdicts = [], []
    for name, (model_name, fields) in WORKLOADS.items():
        torch.manual_seed(0)
        cfg = model_config(model_name, **fields)
        model, data = build_workload(cfg, BATCH)
        plain = _peak(cfg, model, data)
        budget = int(plain * FRACTION)
        plans = {}
        for label, kw in (("default (time)", {}), ("flops", dict(objective="flops")),
                          ("chain (whole=False)", dict(whole=False))):
            start = time.perf_counter()
            p = plan(model, data, budget, loss_fn=cfg.loss, **kw)
            plans[label] = (p, time.perf_counter() - start)
        specs = {label: p.spec for label, (p, _) in plans.items()}
        # the best plan of plain segments the default weighed: the default before blocks
        # could checkpoint a part of themselves (NOTE [ Checkpointing a part of a block ])
        default = plans["default (time)"][0]
        segments = min(((spec, ms) for spec, _, ms in default.weighed
                        if spec.startswith("blocks:")), key=lambda s: s[1], default=None)
        if segments is not None:
            specs["segments only"] = segments[0]
        specs["full"] = "full"
        measured = time_strategies(model, data, step_loss(cfg.loss), {
            spec: spec for spec in ["none", *dict.fromkeys(specs.values())]}, rounds=ROUNDS)
        for label, spec in specs.items():
            p, seconds = plans.get(label, (None, None))
            apply_strategy(model, spec)
            try:
                peak = _peak(cfg, model, data)
            finally:
                remove_strategy(model)
            rows.append(dict(
                model=name, plan=label, spec=spec[:60], budget_bytes=budget,
                predicted_peak_bytes=p.predicted_peak_bytes if p else None,
                measured_peak_bytes=peak, peak_ratio=round(peak / plain, 3),
                predicted_step_ratio=(round(p.predicted_step_ms / p.plain_step_ms, 3)
                                      if p and p.predicted_step_ms else
                                      round(segments[1] / default.plain_step_ms, 3)
                                      if label == "segments only" and segments else None),
                measured_step_ratio=round(measured[spec] / measured["none"], 3),
                planning_s=round(seconds, 1) if seconds is not None else None))
        ratio = measured[default.spec] / measured["none"]
        full_ratio = measured["full"] / measured["none"]
        full_peak = next(r["measured_peak_bytes"] for r in rows
                         if r["model"] == name and r["plan"] == "full")
        verdicts.append(
            f"{name}: default plan {default.spec[:40]} measured {ratio:.2f}x the plain step "
            f"({'within' if ratio <= 1.3 else 'ABOVE'} 1.3x); full {full_ratio:.2f}x at "
            f"{full_peak / plain:.2f}x the peak; "
            + ("not slower than full" if ratio <= full_ratio else
               "slower than full, and peaks lower" if default.predicted_peak_bytes < full_peak
               else "SLOWER than full without peaking lower"))
    return {"table": rows, "verdicts": verdicts}
