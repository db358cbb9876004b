"""Measure one training step of any ``nn.Module``: what it stores, what it holds, how long.

    m = measure_step(model, (x, y), loss_fn=F.cross_entropy)   # any nn.Module
    m.saved_bytes, m.peak_bytes, m.inference_peak_bytes, m.step_ms, m.backward_flops

A batch is a tensor, ``(inputs, targets)`` or a dict of keyword inputs, and the loss
defaults to the output's ``.loss``, the model's ``objective``, or (no targets) the mean
square of the output (NOTE [ One step of any module ], memprop.models.user); a
``loss_fn(model, batch)`` and ``forward_fn(model, batch)`` take a batch of any structure.

``measure_step`` runs one step body (``_Step``) under one instrument per pass, in order:
  1. the first step (creates the optimizer's state), under a ``LiveMemoryTracker``;
  2. the measured step, under a ``LiveMemoryTracker``: the timeline and the peak;
  3. one forward and backward under the ``SavedTensorRecorder``: what is stored;
  4. ... counting FLOPs (``FlopCounter``, memprop.flops) in the same pass: a dispatch
     mode that only counts changes nothing autograd saves;
  5. the same batch as inference (``eval()`` under ``torch.no_grad()``) on the plain
     model (NOTE [ Inference runs the plain model ]): its peak under a tracker, and
     what it stores under a recorder inside it (only the innermost saved-tensor hooks
     run; a forward that turns gradients on inside ``no_grad`` does store tensors);
  6. further warm-up steps, then the timed steps (medians, min and max; device synced);
  7. on CUDA, one plain step between allocator-peak resets.
Each pass measures one thing (3 and 4 share one, 5 nests its two as above), so no
instrument disturbs another.

NOTE [ measure_step leaves the model as it found it ]
  The optimizer memprop builds steps with learning rate 0: every op of the update runs
  (the same memory, FLOPs and time), and the weights stay bitwise as they were. Buffers
  (BatchNorm statistics) are restored after the last pass and so is the training mode.
  A ``Strategy`` object given as ``strategy`` is applied for the measurement and removed
  afterwards; a string is only the label of what is already applied.

NOTE [ Inference runs the plain model ]
  Pass 5 measures prediction alone, so that "training needs Nx" compares a training step
  with what the same model needs to predict. A checkpointing strategy is a training
  device: under ``no_grad`` it saves nothing, yet a checkpointed model runs differently
  even there (measured, ``mlp`` depth 8, width 128, batch 256: inference peak 1.57 MiB
  plain, 1.82 MiB under ``sqrt``), and it turns a model's KV cache off (NOTE
  [ Checkpointing and KV caches ], memprop.checkpoint.forms.cache), which prediction keeps on
  (``hf:gpt2`` with 6 layers at batch 8: 5.70 MiB plain, 4.33 MiB under ``sqrt``,
  4.20 MiB under ``full``, before this rule; 5.70 MiB under each since). So pass 5 runs
  with the applied strategy suspended (``Applied.suspended``, memprop.checkpoint.forms.patch):
  each patch the model's ``Applied`` record holds is uninstalled and each config whose
  cache it turned off gets ``use_cache = True`` back, the cache as the user left it;
  afterwards the same patch objects are installed again in order and the caches turned
  off again, so the record, its patches and the model are exactly as before. The
  inference peak is then the same under every strategy.

NOTE [ MoE routing and the estimate ]
  How many tokens each expert of a mixture-of-experts layer receives depends on the
  router's values, which fake tensors do not have. Whether the bytes depend on it
  depends on how the experts run:
  * Grouped (transformers' ``experts_implementation`` "grouped_mm", the default of
    every model built with ``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, OLMoE,
    GPT-OSS, PhiMoE, GraniteMoE, ...; and "batched_mm"): the (token, expert) pairs are
    sorted by expert and each expert projection is one GEMM over all tokens × top_k
    pairs; the split exists only as the values of an offsets tensor (or of gathered
    indices). Every storage has the same size whatever the routing, so a fake step -
    which reads no value (NOTE [ Fake grouped GEMMs allocate what the kernel allocates
    ], memprop.fake) - is the real step for EVERY routing: exact for the batch's own
    routing, a uniform split and the worst case alike. ``Measurement.routing`` says so.
  * Per expert (``experts_implementation="eager"``, JetMoE's experts, LongCat-Flash's
    before transformers 5.25, ...): the step reads the routing (``nonzero``,
    ``.tolist()``) and allocates one slice per expert, so shapes depend on values.
    ``estimate`` predicts it under a routing it names - the batch's own, a uniform
    split, or the capacity bound - with the capacity bound's peak beside it (NOTE [
    Predicting experts that run one by one ], memprop.routing). Bare fake tensors
    cannot run it: ``measure_step`` on fake tensors without a routing raises
    ``DataDependentStepError`` naming the op and the module, instead of predicting under
    a silent assumption.
  A measured step states the routing it ran with: the batch's own.

NOTE [ How a tensor budget covers every pass ]
  With ``budget_bytes``, passes 1, 2 and 5 run under a tracker with that limit
  (NOTE [ What a tensor budget means ], memprop.budget). Passes 3, 4, 6 and 7 repeat the
  step of pass 2 (forward and backward alone, or the whole step) from the same state, so
  they create and free exactly the same storages and need no guard of their own. The
  largest of the guarded peaks is ``budget_peak_bytes``: the trial fits a tensor budget
  exactly when ``budget_peak_bytes <= budget``, which a fake-tensor estimate predicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import statistics
import sys
import time
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from memprop.allocation_log import ALLOCATION_COLUMNS, AllocationLog
from memprop.errors import ConfigError, MemPropError
from memprop.fake import is_fake
from memprop.flops import FlopCounter
from memprop.models.user import own_forward, split_batch, step_loss
from memprop.routing import has_experts
from memprop.saved import SavedTensorRecorder, batch_tensors, per_module_table
from memprop.tracker import CATEGORIES, LiveMemoryTracker

__all__ = ["Measurement", "measure_step", "make_optimizer", "OPTIMIZERS", "AMP_MODES",
           "phase_of", "StepScaler", "DataDependentStepError", "moe_routing", "values_needed"]

OPTIMIZERS = ("sgd", "momentum", "adam")
AMP_MODES = ("bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_optimizer(name: str, params, *, lr: float = 1e-3) -> torch.optim.Optimizer:
    """``sgd`` (no state), ``momentum`` (one buffer per parameter), ``adam`` (two)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ConfigError(f"memprop.measure: unknown optimizer {name!r}; choose one of: "
                      f"{', '.join(OPTIMIZERS)}")


# The attribute an exception raised in a step carries its phase in (set by _phase, read
# by phase_of; TensorBudgetExceeded sets it itself).
_PHASE_ATTR = "memprop_phase"


def phase_of(exc: BaseException) -> str:
    """The step phase (forward / backward / optimizer / inference / setup) in which
    ``exc`` was raised inside ``measure_step``: where memory ran out, when it did."""
    return getattr(exc, _PHASE_ATTR, None) or "setup"


@contextlib.contextmanager
def _phase(name: str, tracker: LiveMemoryTracker | None = None):
    """Run a phase of the step: the tracker's rows carry it, and an exception raised in
    it carries it too (``phase_of``)."""
    if tracker is not None:
        tracker.phase = name
    try:
        yield
    except BaseException as exc:
        if getattr(exc, _PHASE_ATTR, None) is None:
            setattr(exc, _PHASE_ATTR, name)
        raise


@dataclasses.dataclass
class Measurement:
    """One training step, measured (or, with ``predicted=True``, estimated on fake tensors).

    Bytes are raw bytes; times are milliseconds (medians, with the min and max of the
    timed repeats); FLOPs are counted by ``FlopCounter`` (torch's formulas; a
    multiply-add counts 2).
    ``None`` = not measured in this mode."""

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
    amp: str | None = None                                      # autocast: bf16 / fp16
    # mixture of experts: the routing these bytes hold for (NOTE [ MoE routing and the
    # estimate ]); None for a model without experts
    routing: str | None = None
    # experts run one by one: the predicted peak with every token routed to the same
    # experts (the capacity bound), where the bytes depend on the routing (memprop.routing)
    capacity_routing_peak_bytes: int | None = None
    # live memory (NOTE [ What counts as live memory ], memprop.tracker)
    peak_bytes: int = 0
    start_bytes: int = 0                                        # live before the step
    peak_by_phase: dict[str, int] = dataclasses.field(default_factory=dict)
    peak_by_category: dict[str, int] = dataclasses.field(default_factory=dict)
    timeline: pd.DataFrame = dataclasses.field(default=None, repr=False)
    # each category's bytes at the peak where there is no timeline to read them from (an
    # extrapolated rank, NOTE [ Predicting a deep model from three shallow ones ],
    # memprop.sharded.layers); ``bytes_at_peak`` reads either
    composition_at_peak: dict[str, int] = dataclasses.field(default_factory=dict)
    first_step_peak_bytes: int = 0                              # the step creating opt. state
    budget_peak_bytes: int = 0          # max over every pass: what a tensor budget must hold
    # claim C4: the same batch as prediction
    inference_peak_bytes: int = 0
    inference_saved_bytes: int = 0
    # device-level peaks: CUDA allocator after a reset; CPU process resident-set high-water
    device_peak_bytes: int | None = None
    device_reserved_bytes: int | None = None
    # cost
    forward_flops: int = 0
    backward_flops: int = 0
    # per phase (forward, backward): (aten calls run, bytes their outputs hold), counted
    # with the FLOPs (NOTE [ A step's work ], memprop.flops); empty when FLOPs are not
    work: dict = dataclasses.field(default_factory=dict)
    forward_ms: float | None = None
    backward_ms: float | None = None
    optimizer_ms: float | None = None
    step_ms: float | None = None
    step_ms_min: float | None = None
    step_ms_max: float | None = None
    repeats: int = 0
    threads: int = 0                                            # torch.get_num_threads()
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    # every storage the first and the measured step allocate and free, in order (NOTE
    # [ What the allocation log records ], memprop.allocation_log): the allocator
    # simulation's input (memprop.allocator.replay_measurement)
    allocations: pd.DataFrame = dataclasses.field(
        default_factory=lambda: pd.DataFrame(columns=list(ALLOCATION_COLUMNS)), repr=False)

    @property
    def saved_per_module(self) -> pd.DataFrame:
        return per_module_table(self.saved)

    @property
    def timing_spread(self) -> float | None:
        """(max - min) / median of the timed steps: 0 for steady timings."""
        if not self.step_ms or self.step_ms_min is None or self.step_ms_max is None:
            return None
        return (self.step_ms_max - self.step_ms_min) / self.step_ms

    def summary(self) -> dict[str, Any]:
        """The scalar results as one flat dict (a result row): ``<phase>_peak_bytes`` is
        the peak within a phase (forward, backward, optimizer); ``<category>_bytes_at_peak``
        the bytes of one category at the step's peak (they add up to ``peak_bytes``;
        None without a timeline), ``<category>_max_bytes`` its own maximum over the step
        (maxima need not coincide); ``optimizer`` is a phase and a category."""
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if not isinstance(getattr(self, f.name), (pd.DataFrame, dict))}
        row["timing_spread"] = self.timing_spread
        for phase, value in self.peak_by_phase.items():
            row[f"{phase}_peak_bytes"] = value
        at_peak = bytes_at_peak(self)
        for cat in CATEGORIES:
            row[f"{cat}_bytes_at_peak"] = at_peak.get(cat)
            row[f"{cat}_max_bytes"] = self.peak_by_category.get(cat, 0)
        row.update(self.meta)
        return row


def bytes_at_peak(m: Measurement) -> dict[str, int]:
    """Each category's bytes at the row of ``m``'s peak (the first timeline row whose
    total is the largest): they add up to the peak, a stacked bar of what holds it.
    Without a timeline, the ``composition_at_peak`` the measurement carries (empty if
    none)."""
    tl = m.timeline
    if tl is None or tl.empty:
        return dict(m.composition_at_peak)
    i = int(tl["total_bytes"].to_numpy().argmax())
    return {c: int(tl[f"{c}_bytes"].iloc[i]) for c in CATEGORIES}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class DataDependentStepError(MemPropError):
    """A step whose tensor shapes or control flow depend on tensor values (an expert
    routing read by ``nonzero`` or ``.tolist()``, say) run on fake tensors, which have
    no values (NOTE [ MoE routing and the estimate ])."""


_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException,
                   GuardOnDataDependentSymNode)


def _experts_implementations(model: nn.Module) -> list[str]:
    """The ``experts_implementation`` of each transformers experts module (those built
    with ``@use_experts_implementation``, which can switch it), sorted, distinct."""
    return sorted({str(getattr(m.config, "_experts_implementation", None))
                   for m in model.modules()
                   if hasattr(m, "_is_expert_parallel") and hasattr(m, "config")})


def moe_routing(model: nn.Module, *, predicted: bool) -> str | None:
    """What ``Measurement.routing`` says for ``model`` (NOTE [ MoE routing and the
    estimate ]): None without mixture-of-experts modules (found by class name:
    ``...Experts``, ``...MoE``/``...Moe...``)."""
    if not has_experts(model):
        return None
    impls = _experts_implementations(model)
    how = f" (experts_implementation {', '.join(impls)})" if impls else ""
    if not predicted:
        return f"measured with this batch's own routing{how}"
    # a fake step that ran read no value: no size depended on how tokens were routed
    return (f"any{how}: the step read no value, so no allocation depended on the routing "
            "(grouped experts run each projection over all tokens x top-k pairs, whatever "
            "their split): these bytes hold for every routing, the batch's own and the "
            "worst case alike")


def _data_dependent_error(exc: BaseException, model: nn.Module,
                          fix: str | None = None) -> DataDependentStepError:
    """``exc`` (fake tensors met a value they lack) as a clear error naming the op and
    the innermost module of ``model`` that ran it; ``fix``: what to do instead (default:
    measure the step)."""
    names = {id(m): n for n, m in model.named_modules()}
    where = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            where = f"{names[id(owner)] or '(the model)'} ({type(owner).__name__})"
        tb = tb.tb_next
    op = getattr(exc, "func", None)
    fix = "; " + (fix or "measure it instead (memprop profile without --estimate; "
                         "Python: measure_step)")
    # the estimate routes experts run one by one (memprop.routing): values computed from
    # a router's topk indices, inside a module named as experts; not this one
    if moe_routing(model, predicted=True) is not None:
        fix = ("; the routing memprop predicts gives only values computed from a router's "
               "top-k indices, and this one is not" + fix)
        if _experts_implementations(model):
            fix += (", or estimate it with grouped experts, whose bytes hold for every "
                    "routing: --set experts_implementation=grouped_mm (transformers' "
                    "default)")
    else:
        fix += ("; if it is an expert routing, memprop predicts it once the experts' "
                "module class is named ...Experts, ...MoE or ...Moe (how it finds "
                "routers)")
    return DataDependentStepError(
        f"memprop: this step reads tensor values to decide shapes or control flow "
        f"({op if op is not None else type(exc).__name__}"
        f"{f' in {where}' if where else ''}), which fake tensors do not have, so it "
        f"cannot be predicted without running it{fix}")


@contextlib.contextmanager
def values_needed(model: nn.Module, fix: str | None = None):
    """A step on fake tensors that needs a tensor's value raises
    ``DataDependentStepError`` (NOTE [ MoE routing and the estimate ]); ``fix``: what
    the error tells the user to do instead (default: measure the step)."""
    try:
        yield
    except _DATA_DEPENDENT as exc:
        error = _data_dependent_error(exc, model, fix)
        setattr(error, _PHASE_ATTR, getattr(exc, _PHASE_ATTR, None))
        raise error from exc


class StepScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` that also steps on fake tensors (NOTE [ fp16's inf check
    on fake tensors ]). On real tensors it is the plain ``GradScaler``.

    NOTE [ fp16's inf check on fake tensors ]
      ``GradScaler.step`` unscales the gradients and records in a 0-dim ``found_inf``
      tensor whether any was inf or NaN, then reads it (``found_inf.item()``, one
      ``aten._local_scalar_dense``) to decide whether ``optimizer.step()`` runs. A fake
      tensor has no value to read. The prediction ASSUMES NO INF IS FOUND: the step is
      taken, as it is in every step of a healthy fp16 run (a step with an overflow is
      skipped and the scale halved, and then creates no optimizer state and writes no
      parameter). The assumption is made by giving each fake ``found_inf`` the value 0
      (its ``item_memo``, the value fake tensors answer ``.item()`` with) right before
      it is read, so the fake step runs the very ops of the real one, the read included,
      and creates and frees the same storages: the estimate equals a measured step in
      which no inf occurs. ``update`` then grows the scale as a real step does
      (``_amp_update_scale_`` in place: no new storage either way)."""

    def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        for found_inf in optimizer_state["found_inf_per_device"].values():
            if is_fake(found_inf):
                found_inf.item_memo = 0.0      # the assumption: no inf found, step taken
        return super()._maybe_opt_step(optimizer, optimizer_state, *args, **kwargs)


class _Step:
    """One training step - forward (the loss), backward, optimizer - of a model on a
    batch: the body every pass of ``measure_step`` runs under its own instrument.

    ``amp``: run forward (and the loss) under ``torch.autocast`` in bf16 or fp16; fp16
    scales the loss with a ``GradScaler`` (``StepScaler``), as mixed-precision training
    does; on fake tensors its inf check assumes no inf (NOTE [ fp16's inf check on fake
    tensors ])."""

    def __init__(self, model, batch, optimizer: torch.optim.Optimizer, loss_fn,
                 device: torch.device, amp: str | None):
        self.model, self.batch, self.opt, self.loss_fn = model, batch, optimizer, loss_fn
        self.device, self.amp = device, amp
        self.scaler = StepScaler(device.type) if amp == "fp16" else None

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AMP_DTYPES[self.amp])

    def loss(self) -> torch.Tensor:
        with self.autocast():
            loss = self.loss_fn(self.model, self.batch)
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def forward_backward(self, tracker: LiveMemoryTracker | None = None) -> None:
        with _phase("forward", tracker):
            loss = self.loss()
        with _phase("backward", tracker):
            loss.backward()
            del loss

    def optimizer_step(self, tracker: LiveMemoryTracker | None = None) -> None:
        with _phase("optimizer", tracker):
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            if tracker is not None:
                tracker.tag_optimizer_state()
            self.opt.zero_grad(set_to_none=True)

    def run(self, tracker: LiveMemoryTracker | None = None) -> None:
        self.forward_backward(tracker)
        if tracker is not None:
            tracker.end_backward()
        self.optimizer_step(tracker)

    def timed(self) -> tuple[float, float, float]:
        """One step timed: (forward, backward, optimizer) milliseconds, device synced."""
        _sync(self.device)
        t0 = time.perf_counter()
        with _phase("forward"):
            loss = self.loss()
        _sync(self.device)
        t1 = time.perf_counter()
        with _phase("backward"):
            loss.backward()
            del loss
        _sync(self.device)
        t2 = time.perf_counter()
        self.optimizer_step()
        _sync(self.device)
        t3 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3


@contextlib.contextmanager
def _as_found(model: nn.Module, strategy, batch, loss_fn):
    """Apply ``strategy`` (an object with ``apply``) for the measurement; afterwards put
    back the mode, the buffers and the plain model (NOTE [ measure_step leaves the model
    as it found it ])."""
    was_training = model.training
    with torch.no_grad():
        buffers = [(b, b.clone()) for b in model.buffers()]
    applied = hasattr(strategy, "apply")
    if applied:
        strategy.apply(model, example_batch=batch, loss_fn=loss_fn)
    try:
        yield
    finally:
        if applied:
            strategy.remove(model)
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        model.train(was_training)


_APPLIED = "_memprop_applied"   # the model's Applied record: memprop.checkpoint.forms.patch.APPLIED
# (memprop.checkpoint imports this module, so the key is named here, as memprop.fake does)


def _strategy_suspended(model: nn.Module):
    """The plain model inside, the applied strategy exactly as it was afterwards (NOTE
    [ Inference runs the plain model ]): its ``Applied`` record's ``suspended()``."""
    applied = model.__dict__.get(_APPLIED)
    return applied.suspended() if applied is not None else contextlib.nullcontext()


def _stored_pass(step: _Step, tensors, flops: bool) -> tuple[SavedTensorRecorder,
                                                              FlopCounter | None,
                                                              FlopCounter | None]:
    """Passes 3 and 4: one forward under the recorder (then its backward): what is
    stored; with ``flops``, the (forward, backward) counters of that step too."""
    fwd, bwd = (FlopCounter(), FlopCounter()) if flops else (None, None)
    with _phase("forward"), SavedTensorRecorder(step.model, inputs=tensors) as rec:
        with fwd or contextlib.nullcontext(), step.autocast():
            loss = step.loss_fn(step.model, step.batch)
        rec.add_root(loss)
    with _phase("backward"), bwd or contextlib.nullcontext():
        loss.backward()
        del loss
    step.opt.zero_grad(set_to_none=True)
    return rec, fwd, bwd


def _inference_pass(step: _Step, forward_fn, tracker: LiveMemoryTracker) -> tuple[int, int]:
    """Pass 5 (claim C4): (peak, stored bytes) of the batch as prediction alone, on the
    plain model (NOTE [ Inference runs the plain model ])."""
    step.model.eval()
    tracker.phase = "inference"
    # the recorder inside the tracker: torch applies only the innermost saved-tensor
    # hooks, and only the recorder needs them here (the tracker's label saved tensors,
    # which a no_grad forward makes none of unless it turns gradients on itself)
    with _phase("inference"), _strategy_suspended(step.model), torch.no_grad():
        with tracker, SavedTensorRecorder(step.model) as rec, step.autocast():
            out = forward_fn(step.model, step.batch)
            del out
    step.model.train()
    return tracker.peak_bytes, rec.saved_bytes


def _device_peak_pass(step: _Step) -> tuple[int | None, int | None]:
    """Pass 7: (allocated, reserved) peak bytes of one plain step as the device sees it:
    CUDA's allocator after a reset; on CPU the process's resident-set high-water mark."""
    if step.device.type != "cuda":
        return _rss_peak_bytes(), None
    _sync(step.device)
    torch.cuda.reset_peak_memory_stats(step.device)
    step.run()
    _sync(step.device)
    return (torch.cuda.max_memory_allocated(step.device),
            torch.cuda.max_memory_reserved(step.device))


def measure_step(model: nn.Module, batch, *, optimizer: str = "sgd",
                 loss_fn: Callable | None = None,
                 forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                 strategy="none", amp: str | None = None, budget_bytes: int | None = None,
                 warmup: int = 1, repeats: int = 3, timing: bool = True, flops: bool = True,
                 inference: bool = True, predicted: bool = False,
                 warm: bool = False) -> Measurement:
    """Measure one training step of ``model`` on ``batch`` (see module docstring).

    ``model``: any ``nn.Module``. ``batch``: a tensor, ``(inputs, targets)`` or a dict of
    keyword inputs, and then the loss defaults to the output's ``.loss``, the model's
    ``objective(output, targets)`` or, without targets, the mean square of the output
    (NOTE [ One step of any module ], memprop.models.user); a batch of any other
    structure needs ``loss_fn(model, batch)``, the scalar a step differentiates, and
    ``forward_fn(model, batch)``, prediction alone. ``loss_fn`` may also be torch's own
    loss (``F.cross_entropy``, ``nn.MSELoss()``), called ``loss_fn(output, targets)``.
    The inference pass runs the plain model (NOTE [ Inference runs the plain model ]).
    ``amp``: ``bf16`` / ``fp16``
    autocast. ``strategy``: a ``Strategy`` object is applied for this measurement and
    removed after it; a string is only the label of what is applied already (apply it
    first, or pass ``parse_strategy(text)``). ``budget_bytes``: a tensor budget (NOTE
    [ How a tensor budget covers every pass ]); past it ``TensorBudgetExceeded`` (a
    ``torch.OutOfMemoryError``) is raised.
    ``timing=False`` skips the timed repeats (used under fake tensors). ``warm=True``:
    the caller vouches that the model has already run this forward (no first-call work
    left, such as a data-dependent init or a cache); with ``optimizer="sgd"``, which
    creates no state, the first step is then the steady step and pass 1 is skipped (the
    planner's simulations on the twin it profiled). The model is left as it was found
    (NOTE [ measure_step leaves the model as it found it ])."""
    if amp is not None and amp not in AMP_MODES:
        raise ConfigError(f"memprop.measure: amp {amp!r} is not allowed; choose one of: "
                          f"{', '.join(AMP_MODES)}, or None for full precision")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"memprop.measure: repeats = {repeats!r} is not allowed; it must "
                          "be an integer >= 1")
    if forward_fn is None:
        if inference:
            split_batch(batch)            # a batch own_forward cannot read: say so now
        forward_fn = own_forward
    if loss_fn is None:
        split_batch(batch)
    loss_fn = step_loss(loss_fn)
    tensors = batch_tensors(batch)
    device = tensors[0].device if tensors else torch.device("cpu")
    with values_needed(model), _as_found(model, strategy, batch, loss_fn):
        model.train()
        opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad],
                             lr=0.0)
        step = _Step(model, batch, opt, loss_fn, device, amp)

        def tracker(**kw) -> LiveMemoryTracker:
            return LiveMemoryTracker(model, inputs=batch, device=device,
                                     limit_bytes=budget_bytes, **kw)

        first = None
        log = AllocationLog()                             # passes 1 and 2, in order
        if not (warm and optimizer == "sgd"):
            with tracker(optimizer=opt, log=log) as first:  # 1. creates optimizer state
                step.run(first)
        with tracker(optimizer=opt, log=log) as tracked:    # 2. the measured step
            start_bytes = tracked.live_bytes
            step.run(tracked)
        log.close()
        if first is None:                                 # warm: the first is the steady
            first = tracked
        rec, fwd_count, bwd_count = _stored_pass(step, tensors, flops)  # 3, 4.
        inf_peak, inf_saved = _inference_pass(step, forward_fn, tracker()) if inference \
            else (0, 0)
        times = []
        if timing:                                        # 6. time
            for _ in range(max(warmup - 1, 0)):
                step.run()
            times = [step.timed() for _ in range(repeats)]
        dev_peak, dev_reserved = (None, None) if predicted else _device_peak_pass(step)

    steps = [sum(t) for t in times]
    median = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    first_param = next(model.parameters(), None)
    return Measurement(
        batch_size=int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 0,
        device=str(device),
        dtype=str(first_param.dtype if first_param is not None else torch.float32
                  ).replace("torch.", ""),
        strategy=str(getattr(strategy, "spec", strategy)), optimizer=optimizer,
        predicted=predicted, amp=amp,
        routing=moe_routing(model, predicted=predicted or is_fake(model)),
        saved_bytes=rec.saved_bytes, saved_count=rec.saved_count,
        param_saved_bytes=rec.param_saved_bytes, saved=rec.frame(),
        peak_bytes=tracked.peak_bytes, start_bytes=start_bytes,
        peak_by_phase=tracked.peak_by_phase(), peak_by_category=tracked.peak_by_category(),
        timeline=tracked.timeline(), first_step_peak_bytes=first.peak_bytes,
        budget_peak_bytes=max(first.peak_bytes, tracked.peak_bytes, inf_peak),
        inference_peak_bytes=inf_peak, inference_saved_bytes=inf_saved,
        device_peak_bytes=dev_peak, device_reserved_bytes=dev_reserved,
        forward_flops=fwd_count.total if fwd_count else 0,
        backward_flops=bwd_count.total if bwd_count else 0,
        work={phase: (c.ops, c.written) for phase, c in (("forward", fwd_count),
                                                         ("backward", bwd_count)) if c},
        forward_ms=median([t[0] for t in times]), backward_ms=median([t[1] for t in times]),
        optimizer_ms=median([t[2] for t in times]), step_ms=median(steps),
        step_ms_min=min(steps) if steps else None, step_ms_max=max(steps) if steps else None,
        repeats=len(times), threads=torch.get_num_threads(), allocations=log.frame())
