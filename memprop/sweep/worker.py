"""One trial in its own process: ``python -m memprop.sweep.worker TRIAL.json RESULT.json``.

Reads a ``Trial``, measures it (under its budget, if any) and writes one JSON result:
status ``ok``, ``oom`` (with the phase where memory ran out) or ``error`` (a Python
exception, with its message). A process that dies before writing a result is recorded
by the executor as ``crashed`` (signal or exit code) or ``timeout``.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
import traceback
import zlib


def _pack_frame(frame) -> str | None:
    """A DataFrame as zlib-compressed CSV, hex-encoded (stored in the results DB)."""
    if frame is None:
        return None
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return zlib.compress(buf.getvalue().encode(), 6).hex()


def _clean(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def run_trial(trial) -> dict:
    """Measure ``trial`` in this process; the result dict the store keeps."""
    import torch

    from memprop.cli._common import parse_dtype
    from memprop.estimate import estimate
    from memprop.measure import build_workload, current_phase, measure_step
    from memprop.sweep.budget import apply_budget, is_out_of_memory

    result: dict = {"status": "ok"}
    try:
        dtype = parse_dtype(trial.dtype)
        config = trial.config()
        # the full config, defaults included: the store says exactly what was measured
        result.update({k: v for k, v in config.row_fields().items() if k != "model"})
        if trial.estimate and trial.mode == "measure":
            predicted = estimate(config, trial.batch, dtype=dtype, strategy=trial.strategy,
                                 optimizer=trial.optimizer, inference=False)
            result.update(predicted_peak_bytes=predicted.peak_bytes,
                          predicted_saved_bytes=predicted.saved_bytes)
        if trial.budget_bytes is not None:
            # a dry run at batch 1 loads every module and kernel the step needs before
            # the baseline is measured (NOTE [ How a CPU budget is enforced ])
            warm_model, warm_batch = build_workload(config, 1, dtype=dtype, device=trial.device,
                                                    strategy=trial.strategy, seed=trial.seed)
            measure_step(warm_model, warm_batch, optimizer=trial.optimizer, warmup=0,
                         repeats=1, flops=trial.mode == "measure", inference=True)
            del warm_model, warm_batch
            result.update(apply_budget(trial.budget_bytes, trial.device))
        model, batch = build_workload(config, trial.batch, dtype=dtype, device=trial.device,
                                      strategy=trial.strategy, seed=trial.seed)
        if trial.mode == "fit":   # does one step fit? one timed step and the instruments
            m = measure_step(model, batch, optimizer=trial.optimizer, strategy=trial.strategy,
                             warmup=0, repeats=1, flops=False, inference=False)
        else:
            m = measure_step(model, batch, optimizer=trial.optimizer, strategy=trial.strategy,
                             warmup=trial.warmup, repeats=trial.repeats)
        result.update({k: _clean(v) for k, v in m.summary().items()})
        result["timeline"] = _pack_frame(m.timeline) if trial.mode == "measure" else None
        result["saved"] = _pack_frame(m.saved) if trial.mode == "measure" else None
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a result row
        if isinstance(exc, KeyboardInterrupt):
            raise
        oom = is_out_of_memory(exc)
        result.update(status="oom" if oom else "error", phase=current_phase(),
                      error=f"{type(exc).__name__}: {str(exc)[:500]}")
        if not oom:
            result["traceback"] = traceback.format_exc()[-2000:]
        del exc
    if trial.device.startswith("cuda") and torch.cuda.is_available():
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def main(argv: list[str]) -> int:
    from memprop.sweep.trial import Trial

    trial_path, result_path = argv
    with open(trial_path) as f:
        trial = Trial.from_dict(json.load(f))
    t0 = time.perf_counter()
    result = run_trial(trial)
    result["duration_s"] = round(time.perf_counter() - t0, 3)
    with open(result_path, "w") as f:
        json.dump(result, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
