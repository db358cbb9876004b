"""The model zoo: built-in workloads and user factories, by name.

    cfg = model_config("mlp", depth=16, width=1024)   # validated, frozen
    model = cfg.build()                               # deterministic weights
    inputs, targets = cfg.example_batch(64)
    loss = model.objective(model(*inputs), targets)
"""

from __future__ import annotations

import dataclasses
import difflib

from memprop.errors import ConfigError
from memprop.models.base import PHIS, Batch, ModelConfig, ZooModel, inference_forward, training_loss
from memprop.models.convnet import ConvNetConfig
from memprop.models.d2l import D2LConfig
from memprop.models.hf import PREFIX as HF_PREFIX
from memprop.models.hf import HFConfig, hf_config
from memprop.models.mlp import MLPConfig
from memprop.models.transformer import TransformerConfig
from memprop.models.user import UserModelConfig, Workload, load_factory

__all__ = ["MODELS", "model_config", "ModelConfig", "ZooModel", "Batch", "PHIS",
           "D2LConfig", "MLPConfig", "TransformerConfig", "ConvNetConfig", "UserModelConfig",
           "HFConfig",
           "Workload", "load_factory", "training_loss", "inference_forward"]

MODELS: dict[str, type[ModelConfig]] = {
    c.name: c for c in (D2LConfig, MLPConfig, TransformerConfig, ConvNetConfig)
}


def model_config(name: str, **fields) -> ModelConfig:
    """A validated config for a built-in model, ``hf:<model_type>`` (a transformers
    architecture, memprop.models.hf) or ``package.module:factory``.

    Unknown fields raise a ``ConfigError`` listing the fields the model has."""
    if name.startswith(HF_PREFIX):
        return hf_config(name, **fields)
    if ":" in name:
        fields.setdefault("factory", name)
        cls: type[ModelConfig] = UserModelConfig
    elif name in MODELS:
        cls = MODELS[name]
    else:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"memprop.models: unknown model {name!r}{hint}; choose one of: "
                          f"{', '.join(MODELS)}, 'hf:<model_type>' or 'package.module:factory'")
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in fields:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"memprop.models: {cls.name} has no field {key!r}{hint}; "
                              f"its fields are: {', '.join(allowed)}")
    return cls(**fields)
