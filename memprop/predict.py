"""Closed-form predictions of what autograd stores, from the shapes alone.

For the built-in ``d2l_mlp`` and ``mlp`` (cross-entropy objective) the stored set
follows from which tensors each op saves (NOTE [ What each φ saves ] in
memprop.models.base) and from sharing: φ's output is also the next Linear's saved
input, so it is one storage. With B the batch, s the item size of the dtype:

  mlp, depth L, width w, input d, outputs q:
    input       B·d·s (x, saved by the first Linear)  +  B·8 (int64 targets)
    activation  L·B·w·s (φ outputs = next Linear's inputs)
                + L·B·w·s more if φ = gelu (it saves its input z too)
                + B·q·s (log-softmax output, read by the NLL backward)
                + s (the NLL's 0-dim total weight)
    parameter   (L-1)·w·w·s + q·w·s (each Linear whose input needs grad saves Wᵀ;
                 the first one's input is data, so its weight is not saved)

  d2l_mlp (d, h, q, φ ∈ relu/tanh/sigmoid):
    input       B·d·s + B·8;   activation B·h·s + B·q·s + s
    parameter   (h·d + q·h)·s  (W2 by the output matmul, W1 and W2 by s = λ/2 ‖W‖²)

So stored bytes are affine in B (for fixed depth) and in L (for fixed batch): the slope
in depth is B·w·s per layer (2·B·w·s with gelu), the claim C5 makes.
"""

from __future__ import annotations

import torch

from memprop.errors import ConfigError
from memprop.models import D2LConfig, MLPConfig

__all__ = ["predict_saved_bytes"]

_TARGET_ITEMSIZE = 8  # class targets are int64


def predict_saved_bytes(config, batch_size: int, *, dtype=torch.float32) -> dict[str, int]:
    """Predicted stored bytes by kind (``input``, ``activation``, ``parameter``) and the
    total ``saved_bytes`` (= input + activation), for ``d2l_mlp`` and ``mlp``."""
    s = torch.empty((), dtype=dtype).element_size()
    B = batch_size
    if isinstance(config, MLPConfig):
        L, w, q = config.depth, config.width, config.d_out
        per_layer = (2 if config.phi == "gelu" else 1) * B * w * s
        pred = dict(input=B * config.d_in * s + B * _TARGET_ITEMSIZE,
                    activation=L * per_layer + B * q * s + s,
                    parameter=(L - 1) * w * w * s + q * w * s)
    elif isinstance(config, D2LConfig):
        d, h, q = config.d, config.h, config.q
        pred = dict(input=B * d * s + B * _TARGET_ITEMSIZE,
                    activation=B * h * s + B * q * s + s,
                    parameter=(h * d + q * h) * s)
    else:
        raise ConfigError(f"memprop.predict: no closed form for model {config.name!r}; "
                          "closed forms exist for d2l_mlp and mlp; use memprop.estimate "
                          "for any model")
    pred["saved_bytes"] = pred["input"] + pred["activation"]
    return pred
