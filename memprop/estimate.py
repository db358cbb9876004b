"""Predict a training step's memory without allocating it: the same measurement, run on
fake tensors.

    m = estimate(model_config("mlp", depth=512, width=8192), batch_size=4096)
    m.predicted, m.saved_bytes, m.peak_bytes       # True, bytes, bytes: nothing allocated

Under ``torch._subclasses.fake_tensor.FakeTensorMode`` every tensor carries shape,
dtype, device and storage size but no data, so the recorder, the tracker and the FLOP
counter see exactly the storages a real step would create and free. Built-in and
factory models are built directly as fake tensors, so configurations far beyond this
machine's memory are predicted in seconds. What fake tensors cannot predict: time, and
memory that never surfaces as a tensor (allocator rounding and caching, kernel
workspaces, the Python process itself).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memprop.measure import Measurement, build_workload, measure_step

__all__ = ["estimate"]


def estimate(config, batch_size: int, *, dtype=torch.float32, device="cpu",
             strategy: str = "none", optimizer: str = "sgd", seed: int = 0,
             flops: bool = True, inference: bool = True) -> Measurement:
    """A ``Measurement`` with ``predicted=True``: bytes and FLOPs of one step of
    ``config`` at ``batch_size``, computed on fake tensors (no times, no device peak)."""
    with FakeTensorMode(allow_non_fake_inputs=False):
        model, batch = build_workload(config, batch_size, dtype=dtype, device=device,
                                      strategy=strategy, seed=seed)
        result = measure_step(model, batch, optimizer=optimizer, strategy=strategy,
                              loss_fn=config.loss, forward_fn=config.forward, timing=False, flops=flops, inference=inference, predicted=True)
    result.meta.update(config.row_fields())
    return result
