"""A model config made into one training step's workload, and measured or refused.

    model, batch = build_workload(model_config("mlp", depth=8), 64, strategy="sqrt")
    m = measure(model_config("mlp", depth=8), 64, strategy="sqrt", amp="bf16")

``measure`` is ``measure_step`` on a config: it builds the model and batch, applies the
strategy, and uses the config's own loss and forward (``ModelConfig.loss`` /
``ModelConfig.forward``). Before allocating anything it predicts the step on fake tensors
and refuses one larger than the memory this machine has available (NOTE [ Refuse what
cannot fit ]).

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

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memprop.checkpoint import parse_strategy
from memprop.dtypes import parse_dtype
from memprop.errors import ConfigError, MemPropError
from memprop.measure import DataDependentStepError, Measurement, measure_step
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


def estimate(config, batch_size: int, *, dtype=torch.float32, device="cpu",
             strategy="none", optimizer: str = "sgd", amp: str | None = None, seed: int = 0,
             flops: bool = True, inference: bool = True) -> Measurement:
    """A ``Measurement`` with ``predicted=True``: bytes and FLOPs of one step of
    ``config`` at ``batch_size``, computed on fake tensors (no times, no device peak).

    Under ``FakeTensorMode`` every tensor carries shape, dtype, device and storage size
    but no data, so the recorder, the tracker and the FLOP counter see exactly the
    storages a real step would create and free. What fake tensors cannot predict: time,
    and memory that never surfaces as a tensor (allocator rounding and caching, kernel
    workspaces, the Python process itself)."""
    strat = parse_strategy(strategy)
    with FakeTensorMode(allow_non_fake_inputs=False):
        model, batch = build_workload(config, batch_size, dtype=dtype, device=device,
                                      strategy=strat, seed=seed)
        result = measure_step(model, batch, optimizer=optimizer, strategy=strat.spec,
                              loss_fn=config.loss, forward_fn=config.forward, amp=amp,
                              timing=False, flops=flops, inference=inference,
                              predicted=True)
    result.meta.update(config.row_fields())
    return result


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
