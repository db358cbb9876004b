"""Track the live memory of a training loop you already have: no zoo, no step function.

    with memprop.track(model, optimizer) as t:
        for x, y in loader:
            loss = loss_fn(model(x), y)      # your forward, under autocast if you like
            loss.backward()
            optimizer.step(); optimizer.zero_grad()
    t.peak_bytes, t.peak_by_phase(), t.timeline(), t.stored_bytes, t.steps()

It is the ``LiveMemoryTracker`` (same categories, same timeline, same peak; NOTE [ What
counts as live memory ], memprop.tracker) with the phase learnt from the loop instead of
set by hand:

NOTE [ How track learns the phase ]
  * forward: the model's forward pre-hook (``inference`` when grad mode is off);
  * backward: an op that runs while autograd's engine executes a node
    (``torch._C._current_autograd_node()``), the first one of each backward pass;
  * optimizer: the optimizer's step pre-hook (``register_step_pre_hook``); its post-hook
    tags the optimizer's state. A forward or optimizer phase after a backward first ends
    that backward (activations still tagged become temporaries).
  A step is counted from one forward (with grad) to the next; ``steps()`` gives each
  step's peak and the activation bytes held when its backward began: what that step
  stored for backward (``stored_bytes`` is the largest of them).
"""

from __future__ import annotations

import torch
from torch import nn

from memprop.tracker import CATEGORIES, LiveMemoryTracker

__all__ = ["track", "TrainingLoopTracker"]

_ACTIVATION = CATEGORIES.index("activation")


class TrainingLoopTracker(LiveMemoryTracker):
    """A ``LiveMemoryTracker`` that learns its phase from the loop (see NOTE)."""

    model: nn.Module                          # always one here: its hooks tell the phase

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 inputs=(), device=None, limit_bytes: int | None = None):
        super().__init__(model, optimizer=optimizer, inputs=inputs, device=device,
                         limit_bytes=limit_bytes)
        self._loop_hooks: list = []
        self._steps: list[dict] = []          # per step: first row, row backward began

    # -- phase changes learnt from the loop ------------------------------------------
    def _switch(self, phase: str) -> None:
        if self._phase == phase:
            return
        if self._phase == "backward":
            self.end_backward()
        if phase == "forward":
            self._steps.append({"start": len(self._rows), "backward": None})
        elif phase == "backward" and self._steps and self._steps[-1]["backward"] is None:
            self._steps[-1]["backward"] = len(self._rows)
        self.phase = phase

    def _on_forward(self, module, args) -> None:
        self._switch("forward" if torch.is_grad_enabled() else "inference")

    def _on_op(self, func, out) -> None:
        if self._phase != "backward" and torch._C._current_autograd_node() is not None:
            self._switch("backward")
        super()._on_op(func, out)

    def _on_step_pre(self, optimizer, args, kwargs) -> None:
        self._switch("optimizer")

    def _on_step_post(self, optimizer, args, kwargs) -> None:
        self.tag_optimizer_state()

    def __enter__(self) -> "TrainingLoopTracker":
        self._phase = "setup"
        super().__enter__()
        self._loop_hooks = [self.model.register_forward_pre_hook(self._on_forward)]
        if self.optimizer is not None:
            self._loop_hooks += [self.optimizer.register_step_pre_hook(self._on_step_pre),
                                 self.optimizer.register_step_post_hook(self._on_step_post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._loop_hooks:
            h.remove()
        self._loop_hooks = []
        if self._phase == "backward":
            self.end_backward()
        super().__exit__(*exc)

    # -- results ----------------------------------------------------------------------
    def steps(self) -> list[dict]:
        """Per training step: ``peak_bytes`` and ``stored_bytes`` (activation bytes held
        when its backward began; 0 if it never ran backward)."""
        out = []
        for i, step in enumerate(self._steps):
            end = self._steps[i + 1]["start"] if i + 1 < len(self._steps) else len(self._rows)
            rows = self._rows[step["start"]:end]
            stored = 0
            if step["backward"] is not None:
                stored = self._rows[step["backward"]][4 + _ACTIVATION]
            out.append({"step": i, "peak_bytes": max((r[-1] for r in rows), default=0),
                        "stored_bytes": stored})
        return out

    @property
    def stored_bytes(self) -> int:
        """The most bytes any tracked step held for backward (see ``steps``)."""
        return max((s["stored_bytes"] for s in self.steps()), default=0)


def track(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, inputs=(),
          device=None, limit_bytes: int | None = None) -> TrainingLoopTracker:
    """Track the live memory of your own training loop (see module docstring).

    ``inputs``: tensors (any structure) to count as the batch rather than temporaries;
    ``device``: count only that device's storages; ``limit_bytes``: a tensor budget
    (NOTE [ What a tensor budget means ], memprop.budget)."""
    return TrainingLoopTracker(model, optimizer, inputs=inputs, device=device,
                               limit_bytes=limit_bytes)
