"""A model config made into one training step's workload, and measured or refused.

    model, batch = build_workload(model_config("mlp", depth=8), 64, strategy="sqrt")
    m = measure(model_config("mlp", depth=8), 64, strategy="sqrt", amp="bf16")
    e = estimate(model_config("mlp", depth=8), 64)          # a config at a batch size
    e = estimate(my_module, (x, y), loss_fn=F.cross_entropy)   # any module, its batch

``measure`` is ``measure_step`` on a config: it builds the model and batch, applies the
strategy, and uses the config's own loss and forward (``ModelConfig.loss`` /
``ModelConfig.forward``). Before allocating anything it predicts the step on fake tensors
and refuses one larger than the memory this machine has available (NOTE [ Refuse what
cannot fit ]).

NOTE [ One estimate for configs and modules ]
  Every estimate is one mechanism (``_predict``): inside one ``FakeTensorMode``, make a
  fake (model, batch), then ``measure_step`` it (``predicted=True``, no timing). Only
  the making differs. A config builds its model and batch under the mode (nothing is
  ever real) and applies the strategy. A module already exists: its fake twin
  (``fake_copy``, memprop.fake) has the same parameters, buffers, shapes, dtypes and
  devices as fake tensors, and carries the strategy the module runs; the example batch
  is faked the same way (``fake_batch``); ``strategy=`` is applied to the twin only.
  The real module and batch are only read (their shapes), never run: nothing of the
  step is allocated, and the module is left untouched. Both measure the same storages
  as a real step, so ``estimate(model, batch)`` equals ``measure_step(model, batch)``
  to the byte (tests/test_own_module.py).

NOTE [ Refuse what cannot fit ]
  A step whose predicted tensor peak (``budget_peak_bytes`` of the fake-tensor estimate)
  exceeds the memory available now (``psutil.virtual_memory().available`` on CPU, free
  device memory on CUDA) would end in the operating system's out-of-memory killer, a
  100 GB allocation error or worse; ``measure`` raises ``WontFitError`` instead, naming
  the predicted and available bytes and suggesting ``--estimate``. ``check_fits=False``
  skips the prediction (a sweep's trial under a budget needs none). A step fake tensors
  cannot run (its shapes depend on values: ``DataDependentStepError``, NOTE [ MoE routing
  and the estimate ], memprop.measure) is measured without the check.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memprop.checkpoint import applied_strategy, parse_strategy
from memprop.dtypes import parse_dtype
from memprop.errors import ConfigError, MemPropError
from memprop.fake import KernelStorages, fake_batch, fake_copy, is_fake
from memprop.measure import (
    _AMP_DTYPES,
    DataDependentStepError,
    Measurement,
    measure_step,
    moe_routing,
)
from memprop.models.user import step_loss
from memprop.routing import ROUTINGS, RoutedValues, Routing, record_routing
from memprop.saved import batch_tensors
from memprop.units import format_bytes

__all__ = ["build_workload", "check_device", "measure", "estimate", "WontFitError",
           "available_bytes"]


class WontFitError(MemPropError):
    """A step predicted larger than the memory available (NOTE [ Refuse what cannot fit ])."""


def check_device(device) -> None:
    """A clear error for a device this torch cannot use (before anything is built)."""
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
                   strategy="none", seed: int = 0):
    """(model, batch) for a model config, with ``strategy`` applied to the model."""
    check_device(device)
    dtype = parse_dtype(dtype)
    model = config.build(dtype=dtype, device=device, seed=seed)
    batch = config.example_batch(batch_size, dtype=dtype, device=device, seed=seed)
    strat = parse_strategy(strategy)
    if strat.spec != "none":
        strat.apply(model, example_batch=batch, loss_fn=config.loss)
    return model, batch


def available_bytes(device="cpu") -> int:
    """Memory a new step could use now: free device memory on CUDA, else the host's
    available memory (``psutil``)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    import psutil
    return psutil.virtual_memory().available


def _predict(make: Callable[[FakeTensorMode], tuple[nn.Module, Any]], routing: Routing,
             **step) -> tuple[Measurement, int]:
    """One step measured on the fake (model, batch) that ``make(mode)`` returns (NOTE
    [ One estimate for configs and modules ]); fake results sized as the kernels size
    them (``KernelStorages``, memprop.fake); experts that run one by one routed by
    ``routing`` (``RoutedValues``, memprop.routing). Also returns how many values the
    step read from the routing (0: its bytes do not depend on it)."""
    with FakeTensorMode(allow_non_fake_inputs=False) as mode, KernelStorages():
        model, batch = make(mode)
        # routers live in mixture-of-experts modules only: elsewhere no op pays for it
        routed = RoutedValues(routing, model) if moe_routing(model, predicted=True) \
            else None
        with routed or contextlib.nullcontext():
            result = measure_step(model, batch, timing=False, predicted=True, **step)
        return result, routed.read if routed else 0


def _routed(make, routing: str | None, record: Callable[[], Routing] | None,
            **step) -> Measurement:
    """The estimate of ``make``'s step under ``routing`` (NOTE [ Predicting experts that
    run one by one ], memprop.routing): None is the batch's own where ``record`` can
    read it (a real batch), else a uniform split. Where the step's bytes depend on the
    routing, ``Measurement.routing`` names it and ``capacity_routing_peak_bytes`` gives
    the capacity bound's peak beside it; elsewhere the routing changes nothing and is not read."""
    kind = routing or ("batch" if record is not None else "uniform")
    if kind not in ROUTINGS:
        raise ConfigError(f"memprop.estimate: routing {kind!r} is not allowed; choose one "
                          f"of: {', '.join(ROUTINGS)} (batch: the batch's own, read from "
                          "one real forward; uniform: an even split; capacity: every token "
                          "to the same experts)")
    if kind == "batch" and record is None:
        raise ConfigError("memprop.estimate: routing='batch' reads the routing from one real "
                          "forward of a real batch, and this model or batch is fake; choose "
                          "routing='uniform' or 'capacity'")
    first = Routing("uniform" if kind == "batch" else kind)
    result, read = _predict(make, first, **step)
    if not read:                       # no allocation depended on the routing
        return result
    chosen = record() if record is not None and kind == "batch" else first
    if kind == "batch":
        result, _ = _predict(make, chosen, **step)
    bound = result if kind == "capacity" else _predict(make, Routing("capacity"), **step)[0]
    result.routing = chosen.describe()
    result.capacity_routing_peak_bytes = bound.peak_bytes
    return result


def estimate(model, batch, *, dtype=None, device=None, strategy="none",
             optimizer: str = "sgd", amp: str | None = None, seed: int | None = None,
             flops: bool = True, inference: bool = True, loss_fn=None,
             forward_fn=None, routing: str | None = None) -> Measurement:
    """A ``Measurement`` with ``predicted=True``: bytes and FLOPs of one training step,
    computed on fake tensors (no times, no device peak), of either
    * a model config (``model_config(...)``) at a batch size (``batch``, an int), built
      in ``dtype`` (default float32) on ``device`` (default cpu) with ``seed``; or
    * any ``nn.Module`` on an example ``batch``, as ``measure_step(model, batch,
      loss_fn=..., forward_fn=...)`` would measure it (same batch forms, same default
      loss: NOTE [ One step of any module ], memprop.models.user), predicted on a fake
      twin in the module's own dtype and device, with the strategy it runs (or
      ``strategy``, applied to the twin): NOTE [ One estimate for configs and modules ].

    Under ``FakeTensorMode`` every tensor carries shape, dtype, device and storage size
    but no data, so the recorder, the tracker and the FLOP counter see exactly the
    storages a real step would create and free. What fake tensors cannot predict: time,
    and memory that never surfaces as a tensor (allocator rounding and caching, kernel
    workspaces, the Python process itself).

    ``routing``: for mixture-of-experts layers whose experts run one by one, which
    experts the routers choose (NOTE [ Predicting experts that run one by one ],
    memprop.routing): "batch" (the default for a real module and batch: the batch's
    own, from one real forward without gradients; for a config it builds the model
    and batch for real), "uniform" (the default otherwise) or "capacity" (every token
    to the same experts)."""
    strat = parse_strategy(strategy)
    step = dict(optimizer=optimizer, amp=amp, flops=flops, inference=inference)
    if isinstance(model, nn.Module):
        return _estimate_module(model, batch, strat, dict(dtype=dtype, device=device,
                                                          seed=seed),
                                loss_fn=loss_fn, forward_fn=forward_fn, routing=routing,
                                **step)
    config = model
    given = [k for k, v in (("loss_fn", loss_fn), ("forward_fn", forward_fn)) if v is not None]
    if given or not hasattr(config, "build"):
        raise ConfigError(
            f"memprop.estimate: the first argument is {type(config).__name__}"
            + (f" with {', '.join(f'{k}=' for k in given)}" if given else "")
            + "; estimate a model config at a batch size (estimate(model_config('mlp'), "
            "64), whose config brings its own loss) or any nn.Module on an example batch "
            "(estimate(model, (x, y), loss_fn=F.cross_entropy))")
    dtype = torch.float32 if dtype is None else dtype
    device = "cpu" if device is None else device
    seed = 0 if seed is None else seed

    def record() -> Routing:          # routing="batch": the config's model and batch, real
        real, real_batch = build_workload(config, batch, dtype=dtype, device=device,
                                          strategy=strat, seed=seed)
        return record_routing(real, real_batch, step_loss(config.loss),
                              amp_dtype=_AMP_DTYPES.get(amp or ""))

    result = _routed(lambda mode: build_workload(config, batch, dtype=dtype, device=device,
                                                 strategy=strat, seed=seed),
                     routing, record if routing == "batch" else None,
                     strategy=strat.spec, loss_fn=config.loss, forward_fn=config.forward,
                     **step)
    result.meta.update(config.row_fields())
    return result


def _estimate_module(model: nn.Module, batch, strat, config_only: dict, *, routing,
                     **step) -> Measurement:
    """``estimate`` of a module on its example batch, on a fake twin (NOTE [ One
    estimate for configs and modules ])."""
    given = [k for k, v in config_only.items() if v is not None]
    if isinstance(batch, int) and not isinstance(batch, bool):
        raise ConfigError(
            f"memprop.estimate: a module is estimated on an example batch, not a batch size "
            f"({batch}); pass the batch: a tensor, (inputs, targets) or a dict of keyword "
            "inputs, e.g. estimate(model, (x, y), loss_fn=F.cross_entropy) (only its "
            "shapes are read)")
    if given:
        raise ConfigError(
            f"memprop.estimate: {', '.join(f'{k}=' for k in given)} builds a model config; "
            f"a module ({type(model).__name__}) is estimated as it is, in its own dtype and "
            "on its own device: convert the module and the batch first")
    running = applied_strategy(model)
    if running is not None and strat.spec != "none":
        raise ConfigError(
            f"memprop.estimate: {type(model).__name__} already runs strategy {running}; "
            f"leave strategy={strat.spec!r} out to predict it as it runs, or call "
            "remove_strategy(model) first")
    label = strat if strat.spec != "none" else (running.spec if running else "none")
    real = not is_fake(model) and not any(is_fake(t) for t in batch_tensors(batch))

    def record() -> Routing:        # the batch's own: one real forward, no gradients kept
        return record_routing(model, batch, step_loss(step.get("loss_fn")),
                              amp_dtype=_AMP_DTYPES.get(step["amp"]))

    return _routed(lambda mode: (fake_copy(model, mode, keep_strategy=True),
                                 fake_batch(batch, mode)), routing,
                   record if real else None, strategy=label, **step)


def measure(config, batch_size: int, *, dtype=torch.float32, device="cpu",
            strategy="none", optimizer: str = "sgd", amp: str | None = None, seed: int = 0,
            check_fits: bool = True, **kwargs) -> Measurement:
    """``measure_step`` on a model config: builds the model and batch, applies
    ``strategy``, measures. ``kwargs`` go to ``measure_step``. Refuses a step predicted
    not to fit this machine (NOTE [ Refuse what cannot fit ])."""
    check_device(device)
    strat = parse_strategy(strategy)
    if check_fits:
        try:
            need = estimate(config, batch_size, dtype=dtype, device=device, strategy=strat,
                            optimizer=optimizer, amp=amp, seed=seed,
                            flops=False).budget_peak_bytes
        except DataDependentStepError:     # shapes depend on values: measured unchecked
            need = None
        have = available_bytes(device)
        if need is not None and need > have:
            raise WontFitError(
                f"memprop: one step of {config.name} at batch {batch_size} is predicted to "
                f"need {format_bytes(need)} of tensors, but this machine has "
                f"{format_bytes(have)} available; predict it without allocating with "
                "--estimate (Python: memprop.estimate), or lower the batch or the model size")
    model, batch = build_workload(config, batch_size, dtype=dtype, device=device,
                                  strategy=strat, seed=seed)
    result = measure_step(model, batch, optimizer=optimizer, strategy=strat.spec, amp=amp,
                          loss_fn=config.loss, forward_fn=config.forward, **kwargs)
    result.meta.update(config.row_fields())
    return result
