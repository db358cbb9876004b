"""``d2l_mlp``: the notes' network exactly (Dive into Deep Learning, §5.3).

One hidden layer, no bias terms, element-wise φ, L2-regularised objective:

    z = W1 x           (h)        W1: (h, d)
    h = φ(z)           (h)
    o = W2 h           (q)        W2: (q, h)
    L = l(o, y)                   cross-entropy, averaged over the minibatch
    s = (λ/2)(‖W1‖²_F + ‖W2‖²_F)
    J = L + s

For a minibatch the vectors become rows: X is (B, d), Z and H are (B, h), O is (B, q).
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
from torch import nn

from memprop.models.base import PHIS, Batch, ModelConfig, ZooModel, make_phi

__all__ = ["D2LConfig", "D2LMLP"]


class _Hidden(nn.Module):
    """h = φ(W1 x)."""

    def __init__(self, d: int, h: int, phi: str):
        super().__init__()
        self.linear = nn.Linear(d, h, bias=False)
        self.phi = make_phi(phi)

    def forward(self, x):
        return self.phi(self.linear(x))


class D2LMLP(ZooModel):
    def __init__(self, cfg: "D2LConfig"):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList([_Hidden(cfg.d, cfg.h, cfg.phi),
                                     nn.Linear(cfg.h, cfg.q, bias=False)])

    @property
    def W1(self) -> torch.Tensor:  # (h, d)
        return cast(_Hidden, self.blocks[0]).linear.weight     # blocks as built above

    @property
    def W2(self) -> torch.Tensor:  # (q, h)
        return cast(nn.Linear, self.blocks[1]).weight

    def forward(self, x):  # (B, d) -> (B, q)
        for block in self.blocks:
            x = block(x)
        return x

    def objective(self, output, targets):
        """J = L + s, with L the mean cross-entropy and s = (λ/2)(‖W1‖²_F + ‖W2‖²_F)."""
        L = nn.functional.cross_entropy(output, targets)
        s = (self.cfg.lam / 2) * (self.W1.pow(2).sum() + self.W2.pow(2).sum())
        return L + s


@dataclasses.dataclass(frozen=True, kw_only=True)
class D2LConfig(ModelConfig):
    """Sizes of the notes' network: input d, hidden h, outputs (classes) q, L2 weight λ."""

    name = "d2l_mlp"
    d: int = 784
    h: int = 256
    q: int = 10
    phi: str = "relu"
    lam: float = 1e-3

    def _validate(self):
        for f in ("d", "h"):
            self._int_at_least(f, 1)
        self._int_at_least("q", 2)
        self._choice("phi", [p for p in PHIS if p != "gelu"])
        self._float_range("lam", 0.0, 1e6)

    def _build(self) -> D2LMLP:
        return D2LMLP(self)

    def _batch(self, batch_size, gen, dtype) -> Batch:
        x = torch.randn(batch_size, self.d, generator=gen, dtype=dtype)
        y = torch.randint(0, self.q, (batch_size,), generator=gen)
        return (x,), y
