"""One trial in its own process: ``python -m memprop.sweep.worker TRIAL.json RESULT.json``.

Reads a ``Trial``, measures it (under its budget, if any; every rank of a sharded
trial, memprop.sweep.sharded_trial) and writes one JSON result:
status ``ok``, ``oom`` (with the phase, op and bytes where memory ran out) or ``error``
(a Python exception, with its message). A process that dies before writing a result is
recorded by the executor as ``crashed`` (signal or exit code) or ``timeout``.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
import traceback
import zlib

import torch

from memprop.backprop import max_formula_error
from memprop.budget import TensorBudgetExceeded
from memprop.checkpoint import parse_strategy
from memprop.measure import DataDependentStepError, measure_step, phase_of
from memprop.sweep.budget import apply_process_budget, is_out_of_memory, peak_address_space_bytes
from memprop.sweep.sharded_trial import run_sharded
from memprop.sweep.trial import Trial
from memprop.workload import build_workload, estimate

__all__ = ["run_trial", "main", "CpuLoad", "timing_noise", "TIMING_SPREAD_LIMIT",
           "RUNQUEUE_WAIT_LIMIT", "CPU_WALL_LIMIT"]

# NOTE [ When a step's times are unusable ]
# Times are noisy when the timed steps disagree: (max - min) / median above
# TIMING_SPREAD_LIMIT. They are also unusable when the machine was loaded while the step
# was measured, even if every step was equally slow (the demo ran 10-100x slower beside
# another job with a small spread: issue 24). Load is read from the process itself over
# its whole measure_step call (every pass, the timed steps among them; a load that came
# only between the timed steps is flagged too): the seconds its threads spent runnable
# but waiting for a CPU
# (the run-queue wait in /proc/self/task/*/schedstat, Linux) per second of wall time,
# above RUNQUEUE_WAIT_LIMIT. Where the kernel does not say, a CPU step that got less
# than CPU_WALL_LIMIT seconds of CPU time per second of wall time (time.process_time,
# every thread) was waiting too; a CUDA step's CPU waits for the device, so there only
# the run-queue wait counts. Measured on 2 shared cores (an MLP trial, 20 timed steps):
# with a core to itself, a wait of 0.002 s/s and CPU/wall 1.00; pinned to one core
# beside a busy process, 0.67 s/s and 0.33; with 2 threads beside other jobs, 0.68 s/s.
TIMING_SPREAD_LIMIT = 0.5   # (max - min) / median of the timed steps above this: noisy
RUNQUEUE_WAIT_LIMIT = 0.1   # s waited for a CPU per s of wall time, all threads: loaded
CPU_WALL_LIMIT = 0.8        # s of CPU time per s of wall time below this (CPU): loaded


def _runqueue_wait_s() -> dict[int, float] | None:
    """Seconds each thread of this process has waited for a CPU while runnable, by thread
    id; None where the kernel does not keep schedstat."""
    waits = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                waits[int(tid)] = int(f.read().split()[1]) / 1e9      # ns -> s
        except (OSError, IndexError, ValueError):
            continue       # a thread that ended meanwhile
    return waits or None


class CpuLoad:
    """How loaded the machine was while the block ran, as this process saw it (NOTE
    [ When a step's times are unusable ]): ``cpu_wall_ratio`` (CPU seconds of every
    thread per wall second) and ``runqueue_wait_ratio`` (seconds its threads waited for a
    CPU per wall second; None where unknown)."""

    def __enter__(self):
        self._wait0 = _runqueue_wait_s()
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = max(time.perf_counter() - self._wall0, 1e-9)
        self.wall_s = wall
        self.cpu_wall_ratio = (time.process_time() - self._cpu0) / wall
        wait1 = _runqueue_wait_s()
        self.runqueue_wait_ratio = None if self._wait0 is None or wait1 is None else sum(
            w - self._wait0.get(tid, 0.0) for tid, w in wait1.items()) / wall
        return False

    def row(self) -> dict:
        return {"cpu_wall_ratio": round(self.cpu_wall_ratio, 4),
                "runqueue_wait_ratio": None if self.runqueue_wait_ratio is None
                else round(self.runqueue_wait_ratio, 4)}


def timing_noise(spread: float | None, *, cpu_wall_ratio: float | None = None,
                 runqueue_wait_ratio: float | None = None, device: str = "cpu") -> str | None:
    """Why a step's times are unusable, or None when they are usable (NOTE [ When a
    step's times are unusable ]): the timed steps' spread, the machine's load, or both."""
    reasons = []
    if spread is not None and spread > TIMING_SPREAD_LIMIT:
        reasons.append(f"spread: the slowest and fastest timed steps differ by {spread:.2f} "
                       f"times their median (limit {TIMING_SPREAD_LIMIT})")
    if runqueue_wait_ratio is not None:
        if runqueue_wait_ratio > RUNQUEUE_WAIT_LIMIT:
            reasons.append(f"load: its threads waited {runqueue_wait_ratio:.2f} s for a CPU "
                           f"per second (limit {RUNQUEUE_WAIT_LIMIT}), the machine was busy")
    elif (cpu_wall_ratio is not None and device.startswith("cpu")
          and cpu_wall_ratio < CPU_WALL_LIMIT):
        reasons.append(f"load: it ran {cpu_wall_ratio:.2f} s on a CPU per second (limit "
                       f"{CPU_WALL_LIMIT}), the machine was busy")
    return "; ".join(reasons) or None


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


def _set_budget(trial: Trial, config, strategy) -> tuple[int | None, dict]:
    """Put the trial's budget in force. Returns (tensor limit for measure_step, what was
    set, for the row). CUDA: the caching allocator's fraction; CPU: the tensor budget
    (NOTE [ What a tensor budget means ]) or the process's address-space limit."""
    if trial.budget_bytes is None:
        return None, {}
    if trial.device.startswith("cuda"):
        device = torch.device(trial.device)
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, trial.budget_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        return None, {"budget_kind": "cuda_memory_fraction", "budget_fraction": fraction}
    if trial.budget_mode == "tensor":
        return trial.budget_bytes, {"budget_kind": "tensor_bytes"}
    # process: a dry run at batch 1 loads every module and kernel the step needs before
    # the baseline is measured (NOTE [ How a process budget is enforced ])
    model, batch = build_workload(config, 1, dtype=trial.dtype, device=trial.device,
                                  strategy=strategy, seed=trial.seed)
    measure_step(model, batch, optimizer=trial.optimizer, loss_fn=config.loss,
                 forward_fn=config.forward, amp=trial.amp, warmup=0, repeats=1,
                 flops=trial.mode == "measure", inference=True)
    del model, batch
    return None, apply_process_budget(trial.budget_bytes)


def run_trial(trial: Trial) -> dict:
    """Measure ``trial`` in this process; the result dict the store keeps."""
    if trial.threads:
        torch.set_num_threads(trial.threads)
    result: dict = {"status": "ok", "threads": torch.get_num_threads(),
                    "budget_mode": trial.budget_mode if trial.budget_bytes else None}
    try:
        config = trial.config()
        strategy = parse_strategy(trial.strategy)
        # the full config, defaults included: the store says exactly what was measured
        result.update({k: v for k, v in config.row_fields().items() if k != "model"})
        if trial.parallel is not None:          # every rank (memprop.sweep.sharded_trial)
            row, timeline = run_sharded(trial, config)
            result.update(row, timeline=_pack_frame(timeline))
            return result
        if trial.estimate and trial.mode == "measure":
            try:
                predicted = estimate(config, trial.batch, dtype=trial.dtype,
                                     strategy=strategy, optimizer=trial.optimizer,
                                     amp=trial.amp)
            except DataDependentStepError as exc:  # not predictable: the trial still runs
                result["predicted_error"] = str(exc)[:500]
            else:
                result.update(predicted_peak_bytes=predicted.peak_bytes,
                              predicted_saved_bytes=predicted.saved_bytes,
                              predicted_budget_peak_bytes=predicted.budget_peak_bytes,
                              predicted_forward_flops=predicted.forward_flops,
                              predicted_backward_flops=predicted.backward_flops,
                              predicted_routing=predicted.routing,
                              predicted_capacity_routing_peak_bytes=(
                                  predicted.capacity_routing_peak_bytes))
        limit, budget_row = _set_budget(trial, config, strategy)
        result.update(budget_row)
        model, batch = build_workload(config, trial.batch, dtype=trial.dtype,
                                      device=trial.device, strategy=strategy, seed=trial.seed)
        measuring = trial.mode == "measure"   # "fit": does one step fit the budget?
        with CpuLoad() as load:
            m = measure_step(model, batch, optimizer=trial.optimizer, strategy=strategy.spec,
                             loss_fn=config.loss, forward_fn=config.forward, amp=trial.amp,
                             budget_bytes=limit, warmup=trial.warmup,
                             repeats=trial.repeats if measuring else 1,
                             flops=measuring, inference=measuring)
        result.update({k: _clean(v) for k, v in m.summary().items()})
        # NOTE [ When a step's times are unusable ]
        why = timing_noise(m.timing_spread, device=trial.device, **load.row())
        result.update(load.row(), timing_noisy=why is not None, timing_noisy_reason=why)
        if measuring and config.name == "d2l_mlp":      # claim C3, checked per trial
            result["backprop_max_abs_diff"] = max_formula_error(config, trial.batch,
                                                                seed=trial.seed)
        result["timeline"] = _pack_frame(m.timeline) if measuring else None
        result["saved"] = _pack_frame(m.saved) if measuring else None
        if result.get("budget_kind") == "rlimit_as":
            # what the process mapped beyond the tensors it held: the margin of this mode
            peak = peak_address_space_bytes()
            result.update(address_space_peak_bytes=peak, process_margin_bytes=peak - result[
                "baseline_address_space_bytes"] - m.budget_peak_bytes)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a result row
        if isinstance(exc, KeyboardInterrupt):
            raise
        oom = is_out_of_memory(exc)
        result.update(status="oom" if oom else "error", phase=phase_of(exc),
                      error=f"{type(exc).__name__}: {str(exc)[:500]}")
        if isinstance(exc, TensorBudgetExceeded):
            result.update(oom_op=exc.op, oom_where=exc.where,
                          oom_requested_bytes=exc.requested_bytes,
                          oom_live_bytes=exc.live_bytes)
        if not oom:
            result["traceback"] = traceback.format_exc()[-2000:]
        del exc
    if trial.device.startswith("cuda") and torch.cuda.is_available():
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def main(argv: list[str]) -> int:
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
