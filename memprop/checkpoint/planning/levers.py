"""What sets a step's peak, and the levers beyond checkpointing that lower it.

    rows = levers(model, batch, strategy)     # simulated, each with its predicted peak
    StepInBackward("sgd", lr=0.1).apply(model)  # the lever memprop applies

NOTE [ What sets the peak ]
  The peak's composition is the tracker's row at the step's largest live total
  (``Measurement.timeline``): parameters, gradients, optimizer state, activations
  (held for backward), temporaries, the batch. When parameters, gradients and optimizer
  state make up most of it, no checkpointing plan can lower it much; the levers are:
    * optimizer step in backward: each parameter is updated by its own optimizer in a
      ``register_post_accumulate_grad_hook`` and its gradient freed at once, so the
      gradients of the whole model are never alive together (``StepInBackward``;
      predicted by simulating the step with it applied);
    * bf16 autocast: activations saved in half the bytes (predicted by simulating the
      step under ``torch.autocast``; apply with ``amp="bf16"`` in ``measure_step``);
    * CPU offload of saved tensors (``offload`` strategy): on CUDA the activations held
      for backward leave device memory; on a CPU run it moves nothing.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
from torch import nn

from memprop.checkpoint.forms.strategies import NoCheckpoint, Strategy
from memprop.checkpoint.planning.simulate import simulate
from memprop.measure import Measurement, bytes_at_peak, make_optimizer
from memprop.models import training_loss
from memprop.units import format_bytes

__all__ = ["StepInBackward", "peak_composition", "levers", "Lever", "describe_levers",
           "lever_table"]

_STATIC = ("parameter", "gradient", "optimizer")


def peak_composition(m: Measurement) -> dict[str, int]:
    """Bytes by category at the step's peak (NOTE [ What sets the peak ]); a
    ``ValueError`` for a measurement that does not say."""
    parts = bytes_at_peak(m)
    if not parts:
        raise ValueError("this measurement has no timeline and no bytes by category at its "
                         "peak")
    return parts


class StepInBackward:
    """Optimizer step inside backward: one optimizer per parameter, stepped in its
    post-accumulate-grad hook, which then frees the gradient (the recipe of the PyTorch
    tutorial "How to save memory by fusing the optimizer step into the backward pass").
    ``apply(model)`` registers the hooks; ``remove(model)`` takes them away."""

    def __init__(self, optimizer: str = "sgd", *, lr: float = 0.0):
        self.optimizer, self.lr = optimizer, lr
        self._handles: list = []

    def apply(self, model: nn.Module, **_) -> nn.Module:
        for p in model.parameters():
            if p.requires_grad:
                opt = make_optimizer(self.optimizer, [p], lr=self.lr)

                def hook(param, opt=opt):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                self._handles.append(p.register_post_accumulate_grad_hook(hook))
        return model

    def remove(self, model: nn.Module | None = None) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclasses.dataclass(frozen=True)
class Lever:
    name: str
    predicted_peak_bytes: int | None
    applies: str            # how memprop applies it
    note: str = ""


def levers(model: nn.Module, batch, strategy: Strategy | None = None, *,
           optimizer: str = "sgd", loss_fn=training_loss,
           amp: str | None = None) -> tuple[dict, list[Lever]]:
    """(peak composition with ``strategy``, the levers with their predicted peaks), for
    the step under ``amp`` (None: full precision; under autocast, bf16 autocast is not
    offered as a lever)."""
    strategy = strategy or NoCheckpoint()
    base = simulate(model, batch, strategy, optimizer=optimizer, loss_fn=loss_fn, amp=amp,
                    flops=False)
    fused = simulate(model, batch, strategy, optimizer=optimizer, loss_fn=loss_fn, amp=amp,
                     flops=False, step_in_backward=True)
    on_cuda = any(p.device.type == "cuda" for p in model.parameters())
    composition = peak_composition(base)
    rows = [
        Lever("optimizer step in backward", fused.peak_bytes,
              "memprop.checkpoint.planning.levers.StepInBackward(optimizer).apply(model)",
              "gradients freed as each parameter is updated"),
    ]
    if amp is None:
        half = simulate(model, batch, strategy, optimizer=optimizer, loss_fn=loss_fn,
                        amp="bf16", flops=False)
        rows.append(Lever("bf16 autocast", half.peak_bytes,
                          "measure_step(..., amp='bf16'); --amp bf16",
                          "activations and temporaries in half the bytes"))
    rows += [
        Lever("CPU offload of saved tensors",
              base.peak_bytes - composition.get("activation", 0) if on_cuda else None,
              "strategy 'offload' (torch.autograd.graph.save_on_cpu)",
              "device memory only" if on_cuda else "a CPU run moves nothing"),
    ]
    return composition, rows


def describe_levers(peak_bytes: int, composition: dict, rows: list[Lever]) -> list[str]:
    """Lines for ``Plan.describe``: what sets the peak and, when parameters, gradients
    and optimizer state do, the levers with their predicted peaks."""
    static = sum(composition.get(c, 0) for c in _STATIC)
    parts = ", ".join(f"{c} {format_bytes(v)}" for c, v in composition.items() if v)
    lines = [f"  at the peak: {parts}"]
    if static * 2 < peak_bytes:
        return lines
    lines.append(f"  parameters, gradients and optimizer state set the peak "
                 f"({format_bytes(static)} of {format_bytes(peak_bytes)}); checkpointing "
                 "cannot lower that part. Levers:")
    for lever in rows:
        effect = ("no prediction" if lever.predicted_peak_bytes is None else
                  f"predicted peak {format_bytes(lever.predicted_peak_bytes)}")
        lines.append(f"    {lever.name}: {effect} ({lever.note}); {lever.applies}")
    return lines


def lever_table(rows: list[Lever]) -> pd.DataFrame:
    return pd.DataFrame([dataclasses.asdict(r) for r in rows])

