"""Fake-tensor twins of real models and batches: same shapes, dtypes and storage sizes,
no data, no memory. Used to predict a step (memprop.estimate) and to check a
checkpointing plan (memprop.checkpoint.planner) without running it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_map

__all__ = ["is_fake", "fake_mode_of", "fake_copy", "fake_batch"]


def is_fake(model_or_tensor) -> bool:
    if isinstance(model_or_tensor, nn.Module):
        return any(isinstance(p, FakeTensor) for p in model_or_tensor.parameters())
    return isinstance(model_or_tensor, FakeTensor)


def fake_mode_of(model: nn.Module) -> FakeTensorMode | None:
    for p in model.parameters():
        if isinstance(p, FakeTensor):
            return p.fake_mode
    return None


def fake_copy(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake tensors of ``mode``.

    ``deepcopy`` is seeded with the fake twins, so no real weight is ever copied.
    Checkpointing patches (instance ``forward`` attributes) are not carried over: copy
    the plain model."""
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        fake = mode.from_tensor(t.detach())
        memo[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) \
            if isinstance(t, nn.Parameter) else fake
    clone = copy.deepcopy(model, memo)
    for module in clone.modules():   # never carry a strategy's patches over
        for key in ("forward", "_memprop_forward", "_memprop_applied"):
            module.__dict__.pop(key, None)
    return clone


def fake_batch(batch, mode: FakeTensorMode):
    return tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, batch)
