"""``transformer``: a stack of pre-norm GPT-style blocks on token sequences.

    tokens (B, T) -> embed + position (B, T, C) -> [x + attn(ln(x)); x + mlp(ln(x))] × depth
                  -> ln -> lm head (B, T, vocab) -> next-token cross-entropy

Layer costs are deliberately uneven: attention stores O(T²·heads) per example when its
scores are materialised, the MLP O(T·4C); the planner has to weigh them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from memprop.models.base import Batch, ModelConfig, ZooModel

__all__ = ["TransformerConfig", "Transformer"]


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        # -1: the heads this module holds (all, or heads/tp of them under tensor
        # parallelism, NOTE [ The fused qkv projection ], memprop.sharded.tensor_parallel)
        q, k, v = self.qkv(x).chunk(3, dim=2)
        q, k, v = (t.view(B, T, -1, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(  # (B, heads, T, C/heads)
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(ZooModel):
    def __init__(self, cfg: "TransformerConfig"):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, cfg.d_model) / math.sqrt(cfg.d_model))
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.d_model, cfg.heads, cfg.dropout) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, tokens):  # (B, T) -> (B, T, vocab)
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig(ModelConfig):
    name = "transformer"
    depth: int = 4
    d_model: int = 128
    heads: int = 4
    seq_len: int = 64
    vocab: int = 256
    dropout: float = 0.0

    def _validate(self):
        for f in ("depth", "d_model", "heads", "seq_len"):
            self._int_at_least(f, 1)
        self._int_at_least("vocab", 2)
        self._float_range("dropout", 0.0, 1.0, high_open=True)
        if self.d_model % self.heads:
            divisors = [h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]
            self._fail("heads", f"a divisor of d_model = {self.d_model} (e.g. one of "
                       f"{', '.join(map(str, divisors))})")

    def _build(self) -> Transformer:
        return Transformer(self)

    def _batch(self, batch_size, gen, dtype) -> Batch:
        # next-token prediction on random tokens: targets are the inputs shifted by one
        seq = torch.randint(0, self.vocab, (batch_size, self.seq_len + 1), generator=gen)
        return (seq[:, :-1].contiguous(),), seq[:, 1:].contiguous()
