"""The notes' network by hand: forward propagation that stores x, z, h, o, and
backward propagation by the chain-rule formulas, in reverse order.

This is the teaching reference the rest of memprop is checked against (claim C3: the
formulas are exactly what autograd computes). Minibatch form, one row per example:

    forward                         backward (notes' steps 1-7)
    X  (B, d)   input               1. ∂J/∂L = 1, ∂J/∂s = 1
    Z = X W1ᵀ   (B, h)              2. ∂J/∂O = ∂L/∂O = (softmax(O) - onehot(y)) / B
    H = φ(Z)    (B, h)              3. ∂s/∂W1 = λ W1, ∂s/∂W2 = λ W2
    O = H W2ᵀ   (B, q)              4. ∂J/∂W2 = (∂J/∂O)ᵀ H + λ W2          needs H
    L = mean CE(O, y)               5. ∂J/∂H = (∂J/∂O) W2
    s = λ/2 (‖W1‖²_F + ‖W2‖²_F)     6. ∂J/∂Z = ∂J/∂H ⊙ φ'(Z)               needs Z
    J = L + s                       7. ∂J/∂W1 = (∂J/∂Z)ᵀ X + λ W1          needs X

(the notes' column-vector ``(∂J/∂o) hᵀ`` is the row-major ``(∂J/∂O)ᵀ H`` here).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

__all__ = ["ForwardCache", "Gradients", "forward", "backward", "phi_and_derivative",
           "autograd_gradients"]


def phi_and_derivative(name: str):
    """(φ, φ') for the element-wise activations of the notes' network."""
    if name == "relu":
        return torch.relu, lambda z: (z > 0).to(z.dtype)
    if name == "tanh":
        return torch.tanh, lambda z: 1 - torch.tanh(z) ** 2
    if name == "sigmoid":
        return torch.sigmoid, lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z))
    raise ValueError(f"memprop.backprop: unknown phi {name!r}; choose one of: relu, tanh, sigmoid")


@dataclasses.dataclass
class ForwardCache:
    """What forward propagation computes and stores, in order.

    ``stored`` holds exactly the tensors backward needs (x, z, h, o); the scalars L, s, J
    are kept apart. ``stored_bytes`` = B·(d + 2h + q)·itemsize."""

    stored: dict[str, torch.Tensor]   # x (B,d), z (B,h), h (B,h), o (B,q), in that order
    L: torch.Tensor
    s: torch.Tensor
    J: torch.Tensor

    @property
    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored.values())


@dataclasses.dataclass
class Gradients:
    """Every gradient the backward formulas produce, named after the notes."""

    dJ_dL: float
    dJ_ds: float
    dJ_do: torch.Tensor   # (B, q)
    dJ_dW2: torch.Tensor  # (q, h)
    dJ_dh: torch.Tensor   # (B, h)
    dJ_dz: torch.Tensor   # (B, h)
    dJ_dW1: torch.Tensor  # (h, d)


def forward(x, y, W1, W2, *, phi: str = "relu", lam: float = 0.0) -> ForwardCache:
    """Forward propagation, input layer to output layer, storing x, z, h, o."""
    act, _ = phi_and_derivative(phi)
    z = x @ W1.T          # (B, h)
    h = act(z)            # (B, h)
    o = h @ W2.T          # (B, q)
    L = F.cross_entropy(o, y)
    s = (lam / 2) * (W1.pow(2).sum() + W2.pow(2).sum())
    return ForwardCache(stored={"x": x, "z": z, "h": h, "o": o}, L=L, s=s, J=L + s)


def backward(cache: ForwardCache, y, W1, W2, *, phi: str = "relu",
             lam: float = 0.0) -> Gradients:
    """Backward propagation by the notes' seven formulas, output layer to input layer."""
    _, dphi = phi_and_derivative(phi)
    x, z, h, o = (cache.stored[k] for k in "xzho")
    B = x.shape[0]
    dJ_dL, dJ_ds = 1.0, 1.0                                        # step 1
    dJ_do = dJ_dL * (torch.softmax(o, dim=1)                      # step 2
                     - F.one_hot(y, o.shape[1]).to(o.dtype)) / B
    ds_dW1, ds_dW2 = lam * W1, lam * W2                            # step 3
    dJ_dW2 = dJ_do.T @ h + dJ_ds * ds_dW2                          # step 4 (uses h)
    dJ_dh = dJ_do @ W2                                             # step 5
    dJ_dz = dJ_dh * dphi(z)                                        # step 6 (uses z)
    dJ_dW1 = dJ_dz.T @ x + dJ_ds * ds_dW1                          # step 7 (uses x)
    return Gradients(dJ_dL, dJ_ds, dJ_do, dJ_dW2, dJ_dh, dJ_dz, dJ_dW1)


def autograd_gradients(x, y, W1, W2, *, phi: str = "relu",
                       lam: float = 0.0) -> dict[str, torch.Tensor]:
    """What torch.autograd computes on the same forward, keyed like ``Gradients``
    (``dJ_do``, ``dJ_dh``, ``dJ_dz``, ``dJ_dW1``, ``dJ_dW2``), for comparison."""
    W1 = W1.detach().requires_grad_(True)
    W2 = W2.detach().requires_grad_(True)
    cache = forward(x, y, W1, W2, phi=phi, lam=lam)
    wrt = {"dJ_do": cache.stored["o"], "dJ_dh": cache.stored["h"],
           "dJ_dz": cache.stored["z"], "dJ_dW1": W1, "dJ_dW2": W2}
    grads = torch.autograd.grad(cache.J, list(wrt.values()))
    return dict(zip(wrt, grads))


def max_formula_error(config, batch_size: int, *, seed: int = 0) -> float:
    """Claim C3 in one number: the largest |formula - autograd| over the five gradients
    (∂J/∂o, ∂J/∂h, ∂J/∂z, ∂J/∂W1, ∂J/∂W2) of ``config``'s network (a ``d2l_mlp`` config)
    on its example batch of ``batch_size``, in float64."""
    model = config.build(dtype=torch.float64, seed=seed)
    (x,), y = config.example_batch(batch_size, dtype=torch.float64, seed=seed)
    W1, W2 = model.W1.detach(), model.W2.detach()
    cache = forward(x, y, W1, W2, phi=config.phi, lam=config.lam)
    hand = backward(cache, y, W1, W2, phi=config.phi, lam=config.lam)
    auto = autograd_gradients(x, y, W1, W2, phi=config.phi, lam=config.lam)
    return max((getattr(hand, k) - g).abs().max().item() for k, g in auto.items())
