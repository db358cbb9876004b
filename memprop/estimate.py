"""Predict a training step's memory without allocating it (``memprop.workload.estimate``).

    m = estimate(model_config("mlp", depth=512, width=8192), 4096)   # a config, a batch size
    m.predicted, m.saved_bytes, m.peak_bytes       # True, bytes, bytes: nothing allocated
    m = estimate(model, (x, y), loss_fn=F.cross_entropy)   # your module, on a fake twin

NOTE [ One estimate for configs and modules ] (memprop.workload) says how.
"""

from memprop.workload import estimate

__all__ = ["estimate"]
