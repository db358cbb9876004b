"""``mlp``: a deep multilayer perceptron, ``depth`` hidden layers of ``width`` units.

    x (B, d_in) -> [Linear(width) -> φ] × depth -> Linear(d_out) -> cross-entropy

Each hidden layer (Linear + φ) is one block of the chain that checkpointing segments.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from memprop.models.base import PHIS, Batch, ModelConfig, ZooModel, make_phi

__all__ = ["MLPConfig", "MLP"]


class MLPBlock(nn.Module):
    def __init__(self, d_in: int, d_out: int, phi: str, bias: bool):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=bias)
        self.phi = make_phi(phi)

    def forward(self, x):  # (B, d_in) -> (B, d_out)
        return self.phi(self.linear(x))


class MLP(ZooModel):
    def __init__(self, cfg: "MLPConfig"):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.d_in] + [cfg.width] * cfg.depth
        self.blocks = nn.ModuleList(
            MLPBlock(widths[i], widths[i + 1], cfg.phi, cfg.bias) for i in range(cfg.depth))
        self.head = nn.Linear(cfg.width, cfg.d_out, bias=cfg.bias)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLPConfig(ModelConfig):
    name = "mlp"
    depth: int = 8
    width: int = 512
    d_in: int = 512
    d_out: int = 10
    phi: str = "relu"
    bias: bool = True

    def _validate(self):
        for f in ("depth", "width", "d_in"):
            self._int_at_least(f, 1)
        self._int_at_least("d_out", 2)
        self._choice("phi", list(PHIS))
        self._choice("bias", [True, False])

    def _build(self) -> MLP:
        return MLP(self)

    def _batch(self, batch_size, gen, dtype) -> Batch:
        x = torch.randn(batch_size, self.d_in, generator=gen, dtype=dtype)
        y = torch.randint(0, self.d_out, (batch_size,), generator=gen)
        return (x,), y
