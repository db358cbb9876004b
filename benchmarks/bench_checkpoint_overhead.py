"""What one checkpoint costs beyond its recompute: memprop's against torch's own.

    python benchmarks/run.py checkpoint_overhead

A chain of 20 blocks (Linear + Tanh), each checkpointed on its own: ``plain`` (no
checkpoint), ``torch`` (``torch.utils.checkpoint``, non-reentrant, around each block)
and ``memprop`` (``full``: the same checkpoint plus memprop's bookkeeping - RNG kept,
buffers and objects a block changes - and its held output). Each block ends with Tanh,
whose saved result is the block's output, so memprop's recompute skips the block's
Linear and Tanh (NOTE [ A segment's output needs no recompute ], forms.tail) and pays
for it by running the forward and the recompute through a Python dispatch mode: the
worst case of that trade where tensors are tiny, a win where the Linear costs more
(blocks ending in a residual add or a matmul, as transformer blocks and their MLPs do,
are not recorded after their first forward). The planner prices a checkpoint's own
cost (``Rates.ms_per_checkpoint``, NOTE [ Pricing a plan in seconds ]). Two sizes;
step times: interleaved rounds, medians.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memprop.checkpoint import apply_strategy

TARGETS = """
No target yet (issue 21: a plan's seconds): what a checkpoint adds to the plain step,
in ms per checkpoint, for memprop's `full` (bookkeeping, and a recorded forward whose
recompute skips the Linear and Tanh it holds the output of) and for torch's own
checkpoint (recomputes both), side by side in one run. 20 blocks of Linear(width) +
Tanh, float32, CPU, forward + backward.
"""

BLOCKS, ROUNDS, STEPS = 20, 7, 30
SIZES = ((16, 4), (256, 256))           # (width, batch)


class _TorchCheckpointed(nn.Module):
    """Each block in ``torch.utils.checkpoint`` (non-reentrant), nothing else."""

    def __init__(self, blocks: nn.Sequential):
        super().__init__()
        self.blocks = blocks

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x


def _models(width: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    plain = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh())
                            for _ in range(BLOCKS)])
    ours = copy.deepcopy(plain)
    apply_strategy(ours, "full")
    return {"plain": plain, "torch": _TorchCheckpointed(copy.deepcopy(plain)),
            "memprop": ours}


def _ms_per_step(model: nn.Module, x: torch.Tensor) -> float:
    def step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(STEPS):
        step()
    return (time.perf_counter() - t0) / STEPS * 1e3


def run() -> dict:
    rows = []
    for width, batch in SIZES:
        models = _models(width)
        x = torch.randn(batch, width)          # the parameters build the graph
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(ROUNDS):                 # interleaved: the noise hits all alike
            for key, model in models.items():
                times[key].append(_ms_per_step(model, x))
        med = {k: statistics.median(v) for k, v in times.items()}
        for key, ms in med.items():
            rows.append({"width": width, "batch": batch, "form": key,
                         "ms_per_step": round(ms, 3),
                         "ratio_to_plain": round(ms / med["plain"], 3),
                         "ms_per_checkpoint_over_plain": round((ms - med["plain"]) / BLOCKS, 4)})
    verdicts = []
    for width, batch in SIZES:
        by = {r["form"]: r for r in rows if r["width"] == width}
        ours, theirs = (by[k]["ms_per_checkpoint_over_plain"] for k in ("memprop", "torch"))
        verdicts.append(f"width {width}, batch {batch}: memprop {ours:.3f} ms per checkpoint "
                        f"over plain, torch's checkpoint {theirs:.3f} ms "
                        f"({ours / theirs:.2f}x)" if theirs > 0 else
                        f"width {width}, batch {batch}: memprop {ours:.3f} ms per "
                        f"checkpoint over plain, torch's checkpoint {theirs:.3f} ms (no ratio)")
    return {"table": rows, "verdicts": verdicts, "rounds": ROUNDS, "steps_per_round": STEPS}
