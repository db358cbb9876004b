"""The out-of-memory frontier: for each depth and strategy, the largest batch that fits a
memory budget - predicted on fake tensors, then confirmed by real trials under the real
budget (the batch fits, the next step up runs out of memory).

With a tensor budget (the default, NOTE [ What a tensor budget means ]) the prediction is
exact on CPU: the fake-tensor step creates and frees the same storages as the real one,
so the confirmation costs two real trials (b fits, b + step runs out) on any machine.
A frontier point is keyed by its spec and its workload (``Trial.point()``: model config,
strategy, dtype, optimizer, amp, budget and budget mode); its probes are ordinary trials
in the store, so a rerun reuses every probe already run - it resumes after a kill and
never stores a second, contradicting outcome for the same trial.

The prediction is a search over batch sizes (multiples of ``batch_step``) with
``estimate``: doubling, then bisection, each probe a fake-tensor step that allocates
nothing. The confirmation starts at the predicted batch and gallops (1, 2, 4 ... steps) up or
down until it has a fitting and a failing batch, then bisects to one step apart, so an
exact prediction costs two real trials. ``probe_trials_doubling`` is what a search that probes by
crashing would have run to find the same boundary (doubling from one step, then
bisection, as batch-size finders do), computed from the confirmed boundary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Callable

from memprop.sweep.executor import Executor, LocalProcessExecutor
from memprop.sweep.spec import SweepSpec
from memprop.sweep.store import ResultsStore, default_db_path
from memprop.sweep.trial import Trial
from memprop.workload import estimate

__all__ = ["run_frontier", "predict_largest_batch", "doubling_probe_count", "FrontierPoint"]


@dataclasses.dataclass
class FrontierPoint:
    depth: int
    strategy: str
    budget_bytes: int
    budget_mode: str
    predicted_batch: int            # 0: not even one step fits
    predicted_peak_bytes: int | None
    confirmed_batch: int            # largest batch that really fitted (0: none)
    first_oom_batch: int | None     # confirmed_batch + step, which really ran out of memory
    real_trials: int
    probe_trials_doubling: int
    predicted_flops: int | None = None   # forward + backward at the confirmed batch (fake)


def _search(fits: Callable[[int], bool], step: int, top: int) -> tuple[int, int]:
    """(largest multiple of ``step`` <= ``top`` for which ``fits``, probes used):
    doubling from ``step``, then bisection. ``fits`` must be monotone."""
    probes, lo, b = 0, 0, step
    while True:
        probes += 1
        if fits(b):
            lo = b
            if b >= top:
                return lo, probes
            b = min(b * 2, top)
        else:
            hi = b
            break
    while hi - lo > step:
        mid = lo + ((hi - lo) // step // 2) * step
        probes += 1
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


def doubling_probe_count(boundary: int, step: int, top: int) -> int:
    """Trials a probe-by-crashing search runs to find ``boundary`` (the largest fitting
    batch): doubling from ``step``, then bisection to ``step`` resolution."""
    return _search(lambda b: b <= boundary, step, top)[1]


def predict_largest_batch(config, strategy, budget_bytes: int, *, step: int, top: int,
                          dtype="float32", optimizer="sgd",
                          amp: str | None = None) -> tuple[int, int | None]:
    """(largest batch whose fake-tensor step fits ``budget_bytes``, its predicted peak).
    A step fits when every pass a "fit" trial runs does: ``budget_peak_bytes``
    (NOTE [ How a tensor budget covers every pass ], memprop.measure)."""
    peaks: dict[int, int] = {}

    def fits(b: int) -> bool:
        peaks[b] = estimate(config, b, dtype=dtype, strategy=strategy, optimizer=optimizer,
                            amp=amp, flops=False, inference=False).budget_peak_bytes
        return peaks[b] <= budget_bytes

    batch, _ = _search(fits, step, top)
    return batch, peaks.get(batch)


def _step_flops(probe: Trial, batch: int) -> int:
    """Forward + backward FLOPs of one step at ``batch``, counted on fake tensors: what
    claim C7's recompute costs are read from when the grid measured no pair."""
    m = estimate(probe.config(), batch, dtype=probe.dtype, strategy=probe.strategy,
                 optimizer=probe.optimizer, amp=probe.amp, inference=False)
    return m.forward_flops + m.backward_flops


def point_key(probe: Trial) -> str:
    """A frontier point's identity: a hash of ``probe.point()``."""
    payload = json.dumps(probe.point(), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def run_frontier(spec: SweepSpec, *, db_path=None, executor: Executor | None = None,
                 progress: Callable[[FrontierPoint], None] | None = None
                 ) -> list[FrontierPoint]:
    """Predict and confirm the frontier of ``spec.frontier`` (see module docstring);
    stores every real trial and one frontier row per point; ``progress(point)`` is
    called as each point is confirmed."""
    opts = spec.frontier
    if opts is None:
        raise ValueError(f"memprop.sweep: {spec.path} has no [frontier] table")
    executor = executor or LocalProcessExecutor(1)
    db_path = db_path or default_db_path(spec.name)
    points = []
    with ResultsStore(db_path) as store:
        store.lock("frontier")
        store.record_environment(spec)
        for model, fixed in spec.frontier_models():   # those with its field
            for depth in opts.depths:
                for strategy in opts.strategies:
                    probe = spec.trial(model, {**dict(fixed), opts.field: depth}, batch=1,
                                       strategy=strategy, repeats=1, estimate=False,
                                       budget_bytes=opts.budget_bytes, mode="fit")
                    point = _confirm(probe, store, executor, opts)
                    store.put_frontier({"spec": spec.name, "point_key": point_key(probe),
                                        "field": opts.field, **dataclasses.asdict(point)})
                    points.append(point)
                    if progress:
                        progress(point)
    return points


def _confirm(probe: Trial, store, executor, opts) -> FrontierPoint:
    step = opts.batch_step
    predicted, predicted_peak = predict_largest_batch(
        probe.config(), probe.strategy, opts.budget_bytes, step=step, top=opts.max_batch,
        dtype=probe.dtype, optimizer=probe.optimizer, amp=probe.amp)
    outcomes: dict[int, str] = {}

    def real(batch: int) -> bool:
        trial = dataclasses.replace(probe, batch=batch)
        box = store.get(trial.key())          # run before (a resumed frontier): reuse it
        if box is None or box.get("status") not in ("ok", "oom"):
            box = {}
            executor.run([trial], lambda t, r: box.update(r))
            store.put(trial, dict(box))
        outcomes[batch] = box.get("status", "crashed")
        if outcomes[batch] not in ("ok", "oom"):
            raise RuntimeError(f"memprop.sweep: frontier trial {trial.label()} ended "
                               f"{outcomes[batch]}: {box.get('error', '')[:300]}")
        return outcomes[batch] == "ok"

    # gallop from the prediction (1, 2, 4 ... steps) to a fitting and a failing batch,
    # then bisect between them to one step
    b = min(max(predicted, step), opts.max_batch)
    if real(b):
        lo, hi, jump = b, None, step
        while lo + jump <= opts.max_batch:
            if real(lo + jump):
                lo, jump = lo + jump, jump * 2
            else:
                hi = lo + jump
                break
    else:
        lo, hi, jump = 0, b, step
        while hi - jump >= step:
            if real(hi - jump):
                lo = hi - jump
                break
            hi, jump = hi - jump, jump * 2
    while hi is not None and hi - lo > step:
        mid = lo + ((hi - lo) // step // 2) * step
        if real(mid):
            lo = mid
        else:
            hi = mid
    fitted = lo
    first_oom = fitted + step if fitted + step <= opts.max_batch else None
    if first_oom is not None and first_oom not in outcomes:
        real(first_oom)
    return FrontierPoint(
        depth=dict(probe.model_fields)[opts.field], strategy=probe.strategy,
        budget_bytes=opts.budget_bytes, budget_mode=probe.budget_mode,
        predicted_batch=predicted,
        predicted_peak_bytes=predicted_peak, confirmed_batch=fitted,
        first_oom_batch=first_oom if first_oom is not None and outcomes.get(first_oom) == "oom"
        else None,
        real_trials=len(outcomes),
        predicted_flops=_step_flops(probe, fitted) if fitted else None,
        probe_trials_doubling=doubling_probe_count(fitted, step, opts.max_batch))
