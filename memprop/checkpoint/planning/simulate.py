"""One simulated step: a strategy applied to a fake twin of the model, the whole
training step run on fake tensors under memprop's tracker. Every search of the planner
checks its candidates here, and the levers are weighed here; on CPU the predicted peak
equals the measured one to the byte (the tracker counts tensor storages either way).
"""

from __future__ import annotations

import warnings

from memprop.checkpoint.forms.strategies import Blocks, Strategy, remove_strategy
from memprop.fake import fake_target
from memprop.measure import Measurement, measure_step
from memprop.models import training_loss
from memprop.routing import routed

__all__ = ["simulate"]


def simulate(model, batch, strategy, *, blocks_attr=None, blocks=None, check_fn=None,
             optimizer="sgd", loss_fn=training_loss, amp: str | None = None,
             warm: bool = False, flops: bool = True,
             step_in_backward: bool = False) -> Measurement:
    """A predicted ``Measurement`` of one step of ``model`` with ``strategy`` applied (a
    ``Strategy``, or checkpointed ``segments`` ``[(first, last), ...]`` of the chain), on
    fake tensors: the model itself if already fake, else a fake twin (no memory of the
    step used). ``blocks_attr``, ``blocks``, ``check_fn``: the chain, as ``find_blocks``
    takes them. ``amp``: the step under autocast, as ``measure_step(amp=...)`` runs it.
    ``warm``: see ``measure_step`` (only for a fake model that has run its forward
    already). ``flops``: count the step's FLOPs too. ``step_in_backward``: the optimizer
    steps each parameter as its gradient is ready (``levers.StepInBackward``)."""
    from memprop.checkpoint.planning.levers import StepInBackward  # levers weighs with this

    if not isinstance(strategy, Strategy):
        strategy = Blocks(tuple(strategy))
    mode, target, target_batch = fake_target(model, batch)
    fused = StepInBackward(optimizer) if step_in_backward else None
    with mode, routed(target):        # experts run one by one (memprop.routing)
        with warnings.catch_warnings():     # the twin's KV cache: the user is told at apply
            warnings.filterwarnings("ignore", message=".*use_cache=True is incompatible")
            strategy.apply(target, blocks_attr=blocks_attr, blocks=blocks, check_fn=check_fn)
        if fused is not None:
            fused.apply(target)
        try:
            return measure_step(target, target_batch, optimizer=optimizer, loss_fn=loss_fn,
                                timing=False, inference=False, predicted=True, amp=amp,
                                flops=flops, warm=warm and target is model)
        finally:
            if fused is not None:
                fused.remove()
            remove_strategy(target)
