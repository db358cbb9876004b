"""Predict a training step's memory without allocating it (``memprop.workload.estimate``).

    m = estimate(model_config("mlp", depth=512, width=8192), batch_size=4096)
    m.predicted, m.saved_bytes, m.peak_bytes       # True, bytes, bytes: nothing allocated
"""

from memprop.workload import estimate

__all__ = ["estimate"]
