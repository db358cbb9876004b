"""Measure one training step of any ``nn.Module``: what it stores, what it holds, how long.

    m = measure_step(model, batch)            # batch = (inputs, targets)
    m.saved_bytes, m.peak_bytes, m.inference_peak_bytes, m.step_ms, m.backward_flops

``measure_step`` runs, in order: warm-up steps; timed plain steps (medians, device
synchronised); one forward under the ``SavedTensorRecorder``; one step under the
``LiveMemoryTracker``; one step under ``FlopCounterMode``; the same batch as inference
(``model.eval()`` under ``torch.no_grad()``); and on CUDA one plain step between
allocator-peak resets. Each pass measures one thing, so no instrument disturbs another.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import time
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from torch.utils._pytree import tree_flatten

from memprop.models import Batch, inference_forward, training_loss
from memprop.saved import SavedTensorRecorder, per_module_table
from memprop.tracker import CATEGORIES, LiveMemoryTracker

__all__ = ["Measurement", "measure_step", "measure", "make_optimizer", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "momentum", "adam")

_phase = {"now": "setup"}


def current_phase() -> str:
    """The step phase running now (forward / backward / optimizer / inference / setup):
    where an out-of-memory error happened, when one does."""
    return _phase["now"]


def _enter(phase: str) -> None:
    _phase["now"] = phase


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    """``sgd`` (no state), ``momentum`` (one buffer per parameter), ``adam`` (two)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    if name == "momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    from memprop.errors import ConfigError
    raise ConfigError(f"memprop.measure: unknown optimizer {name!r}; choose one of: "
                      f"{', '.join(OPTIMIZERS)}")


@dataclasses.dataclass
class Measurement:
    """One training step, measured (or, with ``predicted=True``, estimated on fake tensors).

    Bytes are raw bytes; times are milliseconds (medians); FLOPs are counted by
    ``FlopCounterMode`` (a multiply-add counts 2). ``None`` = not measured in this mode."""

    batch_size: int
    device: str
    dtype: str
    strategy: str
    optimizer: str
    predicted: bool
    # stored intermediates (NOTE [ What counts as a stored intermediate ], memprop.saved)
    saved_bytes: int
    saved_count: int
    param_saved_bytes: int
    saved: pd.DataFrame = dataclasses.field(repr=False)        # one row per storage
    # live memory (NOTE [ What counts as live memory ], memprop.tracker)
    peak_bytes: int = 0
    start_bytes: int = 0                                        # live before the step
    peak_by_phase: dict[str, int] = dataclasses.field(default_factory=dict)
    peak_by_category: dict[str, int] = dataclasses.field(default_factory=dict)
    timeline: pd.DataFrame = dataclasses.field(default=None, repr=False)
    # claim C4: the same batch as prediction
    inference_peak_bytes: int = 0
    inference_saved_bytes: int = 0
    # device-level peaks: CUDA allocator after a reset; CPU process resident-set high-water
    device_peak_bytes: int | None = None
    device_reserved_bytes: int | None = None
    # cost
    forward_flops: int = 0
    backward_flops: int = 0
    forward_ms: float | None = None
    backward_ms: float | None = None
    optimizer_ms: float | None = None
    step_ms: float | None = None
    repeats: int = 0
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def saved_per_module(self) -> pd.DataFrame:
        return per_module_table(self.saved)

    def summary(self) -> dict[str, Any]:
        """The scalar results as one flat dict (a result row)."""
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if not isinstance(getattr(self, f.name), (pd.DataFrame, dict))}
        for phase, value in self.peak_by_phase.items():
            row[f"{phase}_peak_bytes"] = value
        for cat in CATEGORIES:
            row[f"{cat}_peak_bytes"] = self.peak_by_category.get(cat, 0)
        row.update(self.meta)
        return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _batch_tensors(batch) -> list[torch.Tensor]:
    """Every tensor in a batch of any structure (tuple, dict, nested)."""
    return [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]


def _batch_device(batch) -> torch.device:
    tensors = _batch_tensors(batch)
    return tensors[0].device if tensors else torch.device("cpu")


def measure_step(model: nn.Module, batch: Batch, *, optimizer: str = "sgd",
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] = training_loss,
                 forward_fn: Callable[[nn.Module, Any], Any] = inference_forward,
                 strategy: str = "none", warmup: int = 1, repeats: int = 3,
                 timing: bool = True, flops: bool = True, inference: bool = True,
                 predicted: bool = False) -> Measurement:
    """Measure one training step of ``model`` on ``batch`` (see module docstring).

    ``batch`` may have any structure; ``loss_fn(model, batch)`` returns the scalar a step
    differentiates and ``forward_fn(model, batch)`` runs prediction alone (defaults: the
    zoo's ``(inputs, targets)`` and ``model.objective``).

    ``strategy`` is only recorded here; apply it to ``model`` first (memprop.checkpoint).
    ``timing=False`` skips warm-up and timed repeats (used under fake tensors)."""
    device = _batch_device(batch)
    opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad])
    model.train()

    def step(tracker: LiveMemoryTracker | None = None):
        _enter("forward")
        if tracker is not None:
            tracker.phase = "forward"
        loss = loss_fn(model, batch)
        _enter("backward")
        if tracker is not None:
            tracker.phase = "backward"
        loss.backward()
        del loss
        _enter("optimizer")
        if tracker is not None:
            tracker.end_backward()
            tracker.phase = "optimizer"
        opt.step()
        if tracker is not None:
            tracker.tag_optimizer_state()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
    if timing:
        for _ in range(warmup):
            step()
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            _enter("forward")
            loss = loss_fn(model, batch)
            _sync(device)
            t1 = time.perf_counter()
            _enter("backward")
            loss.backward()
            del loss
            _sync(device)
            t2 = time.perf_counter()
            _enter("optimizer")
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            t3 = time.perf_counter()
            times["forward"].append((t1 - t0) * 1e3)
            times["backward"].append((t2 - t1) * 1e3)
            times["optimizer"].append((t3 - t2) * 1e3)
            times["step"].append((t3 - t0) * 1e3)
    else:
        step()  # the optimizer state exists from here on, as after a warm-up

    _enter("forward")
    with SavedTensorRecorder(model, inputs=_batch_tensors(batch)) as rec:
        loss = loss_fn(model, batch)
        rec.add_root(loss)
    loss.backward()
    del loss
    opt.zero_grad(set_to_none=True)

    tracker = LiveMemoryTracker(model, optimizer=opt, inputs=batch, device=device)
    with tracker:
        start_bytes = tracker.live_bytes
        step(tracker)

    fwd_flops = bwd_flops = 0
    if flops:
        with FlopCounterMode(display=False) as fc:
            loss = loss_fn(model, batch)
        fwd_flops = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            loss.backward()
        bwd_flops = fc.get_total_flops()
        del loss
        opt.zero_grad(set_to_none=True)

    inf_peak = inf_saved = 0
    if inference:
        _enter("inference")
        model.eval()
        infer = LiveMemoryTracker(model, inputs=batch, device=device)
        infer.phase = "inference"
        with torch.no_grad(), SavedTensorRecorder(model) as inf_rec, infer:
            out = forward_fn(model, batch)
            del out
        inf_peak, inf_saved = infer.peak_bytes, inf_rec.saved_bytes
        model.train()

    dev_peak = dev_reserved = None
    if not predicted:
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            _sync(device)
            dev_peak = torch.cuda.max_memory_allocated(device)
            dev_reserved = torch.cuda.max_memory_reserved(device)
        else:
            dev_peak = _rss_peak_bytes()

    _enter("setup")
    med = {k: statistics.median(v) if v else None for k, v in times.items()}
    tensors = _batch_tensors(batch)
    return Measurement(
        batch_size=int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 0,
        device=str(device), dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        strategy=str(strategy), optimizer=optimizer, predicted=predicted,
        saved_bytes=rec.saved_bytes, saved_count=rec.saved_count,
        param_saved_bytes=rec.param_saved_bytes, saved=rec.frame(),
        peak_bytes=tracker.peak_bytes, start_bytes=start_bytes,
        peak_by_phase=tracker.peak_by_phase(), peak_by_category=tracker.peak_by_category(),
        timeline=tracker.timeline(),
        inference_peak_bytes=inf_peak, inference_saved_bytes=inf_saved,
        device_peak_bytes=dev_peak, device_reserved_bytes=dev_reserved,
        forward_flops=fwd_flops, backward_flops=bwd_flops,
        forward_ms=med["forward"], backward_ms=med["backward"], optimizer_ms=med["optimizer"],
        step_ms=med["step"],
        repeats=repeats if timing else 0)


def check_device(device) -> None:
    """A clear error for a device this torch cannot use (before anything is built)."""
    from memprop.errors import ConfigError
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"memprop: unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"memprop: device {device!r} requested, but torch {torch.__version__} sees no CUDA "
            "device; use --device cpu, or install a CUDA build (make test "
            "TORCH_INDEX=https://download.pytorch.org/whl/cu128)")
    if dev.type not in ("cpu", "cuda", "meta"):
        raise ConfigError(f"memprop: device {device!r} is not supported; use cpu or cuda")


def build_workload(config, batch_size: int, *, dtype=torch.float32, device="cpu",
                   strategy: str = "none", seed: int = 0):
    """(model, batch) for a model config, with ``strategy`` applied to the model."""
    check_device(device)
    model = config.build(dtype=dtype, device=device, seed=seed)
    batch = config.example_batch(batch_size, dtype=dtype, device=device, seed=seed)
    if strategy not in (None, "none"):
        from memprop.checkpoint import apply_strategy
        apply_strategy(model, strategy, example_batch=batch, loss_fn=config.loss)
    return model, batch


def measure(config, batch_size: int, *, dtype=torch.float32, device="cpu",
            strategy: str = "none", optimizer: str = "sgd", seed: int = 0,
            **kwargs) -> Measurement:
    """``measure_step`` on a model config: builds the model and batch, applies
    ``strategy``, measures. ``kwargs`` go to ``measure_step``."""
    model, batch = build_workload(config, batch_size, dtype=dtype, device=device,
                                  strategy=strategy, seed=seed)
    result = measure_step(model, batch, optimizer=optimizer, strategy=strategy,
                          loss_fn=config.loss, forward_fn=config.forward, **kwargs)
    result.meta.update(config.row_fields())
    return result
