"""Helpers the test modules share: applying a strategy quietly and one seeded step."""

import warnings

import torch

from memprop.checkpoint import apply_strategy


def quiet_apply(model, strategy, **kwargs):
    """``apply_strategy`` without the KV-cache and CPU-offload notices."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return apply_strategy(model, strategy, **kwargs)


def loss_and_grads(loss_fn, model, batch, *, seed: int = 0, params=None):
    """Loss and a copy of each parameter's gradient (None where it got none) after one
    forward + backward from zeroed gradients, dropout seeded with ``seed``. ``params``:
    the module whose parameters to read (default ``model``; a wrapper's inner model)."""
    owner = params if params is not None else model
    owner.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone()
                           for n, p in owner.named_parameters()}


def assert_same_step(a, b, what=""):
    """Two ``loss_and_grads`` results are bitwise equal (None gradients alike)."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.equal(loss_a, loss_b), f"{what}: loss {loss_a} != {loss_b}"
    assert grads_a.keys() == grads_b.keys(), what
    for name, g in grads_a.items():
        h = grads_b[name]
        assert (g is None) == (h is None), f"{what}: {name} has a gradient in one run only"
        assert g is None or torch.equal(g, h), f"{what}: {name} differs"
