"""Instrumentation overhead: recorder and tracker steps against plain steps, side by side,
and the time ``estimate`` takes for a configuration needing over 100 GiB."""

from __future__ import annotations

import statistics
import time

import torch

from memprop.estimate import estimate
from memprop.models import model_config
from memprop.saved import SavedTensorRecorder
from memprop.tracker import LiveMemoryTracker
from memprop.workload import build_workload

TARGETS = """
Targets (issue 3): recorder overhead <= 5 %, tracker overhead <= 25 % (median step time
against a plain step, interleaved rounds), estimate of a 100+ GiB configuration <= 5 s.
"""

WORKLOADS = {
    "mlp depth 16 x 1024, batch 256": (model_config("mlp", depth=16, width=1024, d_in=1024), 256),
    "transformer 4 x d256, T 128, batch 16": (
        model_config("transformer", depth=4, d_model=256, heads=8, seq_len=128, vocab=512), 16),
}
ROUNDS = 15


def _time_steps(model, batch, opt):
    def plain():
        loss = model.objective(model(*batch[0]), batch[1])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def recorded():
        with SavedTensorRecorder(model, inputs=(*batch[0], batch[1])) as rec:
            loss = model.objective(model(*batch[0]), batch[1])
            rec.add_root(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def tracked():
        tracker = LiveMemoryTracker(model, optimizer=opt, inputs=batch)
        with tracker:
            tracker.phase = "forward"
            loss = model.objective(model(*batch[0]), batch[1])
            tracker.phase = "backward"
            loss.backward()
            del loss
            tracker.end_backward()
            tracker.phase = "optimizer"
            opt.step()
            tracker.tag_optimizer_state()
            opt.zero_grad(set_to_none=True)

    runs = {"plain": plain, "recorder": recorded, "tracker": tracked}
    for fn in runs.values():  # warm-up
        fn()
    times = {k: [] for k in runs}
    for _ in range(ROUNDS):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def run() -> dict:
    table = []
    for label, (cfg, batch_size) in WORKLOADS.items():
        model, batch = build_workload(cfg, batch_size)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        med = _time_steps(model, batch, opt)
        table.append({"workload": label, "plain_step_ms": round(med["plain"], 2),
                      "recorder_step_ms": round(med["recorder"], 2),
                      "tracker_step_ms": round(med["tracker"], 2),
                      "recorder_overhead": round(med["recorder"] / med["plain"] - 1, 4),
                      "tracker_overhead": round(med["tracker"] / med["plain"] - 1, 4)})
    big = model_config("transformer", depth=48, d_model=2048, heads=16, seq_len=2048)
    t0 = time.perf_counter()
    est = estimate(big, 16, flops=False)
    est_s = time.perf_counter() - t0
    table.append({"workload": "estimate: transformer 48 x d2048, T 2048, batch 16",
                  "predicted_peak_GiB": round(est.peak_bytes / 2**30, 1),
                  "estimate_seconds": round(est_s, 2)})
    verdicts = [
        *(f"{r['workload']}: recorder {r['recorder_overhead']:+.1%} "
          f"({'meets' if r['recorder_overhead'] <= 0.05 else 'MISSES'} <= 5 %), tracker "
          f"{r['tracker_overhead']:+.1%} ({'meets' if r['tracker_overhead'] <= 0.25 else 'MISSES'}"
          " <= 25 %)" for r in table[:-1]),
        f"estimate of a {est.peak_bytes / 2**30:.0f} GiB step took {est_s:.2f} s "
        f"({'meets' if est_s <= 5 else 'MISSES'} <= 5 s)",
    ]
    return {"table": table, "verdicts": verdicts, "rounds": ROUNDS}
