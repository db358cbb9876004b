"""Factories for your own models: `--model my_models:tiny_lm` (run from experiments/, or
put this folder on PYTHONPATH). A factory returns an nn.Module, or a Workload when the
model needs inputs that are not float tensors of one shape (token ids here)."""

import torch
from torch import nn

from memprop.models import Workload


class TinyLM(nn.Module):
    """Token ids -> embedding -> `depth` residual MLP blocks -> logits over the vocabulary."""

    def __init__(self, vocab: int = 1000, d: int = 128, depth: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            for _ in range(depth))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):                       # (B, T) int64 -> (B, T, vocab)
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def tiny_lm(vocab: int = 1000, d: int = 128, depth: int = 4, seq_len: int = 64):
    """A next-token language model with its own batches (token ids) and loss."""
    def batch(batch_size: int, gen: torch.Generator):
        ids = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=gen)
        return {"ids": ids[:, :-1], "targets": ids[:, 1:]}

    def loss(model, b):
        logits = model(b["ids"])
        return nn.functional.cross_entropy(logits.reshape(-1, vocab), b["targets"].reshape(-1))

    return Workload(model=TinyLM(vocab, d, depth), batch=batch, loss=loss)
