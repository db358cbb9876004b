"""What every memprop model provides, and the validation its configs share.

A *workload* is a model plus a way to make an example batch and a loss, so that "one
training step" is defined for every model:

    inputs, targets = config.example_batch(batch_size)
    loss = model.objective(model(*inputs), targets)

Each zoo model keeps its repeated layers in ``model.blocks`` (an ``nn.ModuleList``):
that chain is what checkpointing strategies and the planner segment.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from memprop.errors import ConfigError
from memprop.fake import conversions_a_fake_build_survives

__all__ = ["Batch", "ModelConfig", "ZooModel", "PHIS", "make_phi", "training_loss",
           "inference_forward"]

Batch = tuple[tuple[torch.Tensor, ...], Any]
"""``(inputs, targets)``: positional inputs of ``model.forward``, and what
``model.objective`` compares the output with (a tensor, or ``None``)."""



def training_loss(model, batch: Batch):
    """The scalar one training step differentiates: ``model.objective(model(*x), y)``."""
    inputs, targets = batch
    return model.objective(model(*inputs), targets)


def inference_forward(model, batch: Batch):
    """The forward pass of prediction alone: ``model(*x)`` (no loss, no targets)."""
    inputs, _ = batch
    return model(*inputs)


# The element-wise non-linearities φ the zoo offers. NOTE [ What each φ saves ]:
# autograd saves the *output* of relu, tanh and sigmoid (φ' is computed from φ(z)),
# but the *input* of gelu. memprop.predict relies on this for its closed forms.
PHIS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def make_phi(name: str) -> nn.Module:
    return PHIS[name]()


class ZooModel(nn.Module):
    """Base of the built-in models: ``forward`` plus ``objective`` and ``blocks``."""

    blocks: nn.ModuleList

    def objective(self, output: torch.Tensor, targets: Any) -> torch.Tensor:
        """The scalar a training step differentiates (cross-entropy by default)."""
        return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]),
                                           targets.reshape(-1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Base of the frozen, keyword-only model configs. Subclasses set ``name``,
    validate in ``_validate`` (called from ``__post_init__``) and implement
    ``build`` and ``example_batch``."""

    @property
    def name(self) -> str:
        """The model's name in specs and rows; subclasses set it as a class attribute
        (``name = "mlp"``) or, like ``hf:<model_type>``, as a property."""
        return "model"

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:  # pragma: no cover - overridden
        pass

    # -- validation helpers: each names the model, the field, the value and what is allowed
    def _fail(self, field: str, allowed: str) -> None:
        value = getattr(self, field)
        raise ConfigError(
            f"memprop.models: {self.name}.{field} = {value!r} is not allowed; "
            f"{field} must be {allowed}"
        )

    def _int_at_least(self, field: str, low: int) -> None:
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self._fail(field, f"an integer >= {low}")

    def _float_range(self, field: str, low: float, high: float, *, high_open=False) -> None:
        value = getattr(self, field)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and low <= value and (value < high if high_open else value <= high)
        if not ok:
            self._fail(field, f"a number in [{low}, {high}{')' if high_open else ']'}")

    def _choice(self, field: str, options) -> None:
        if getattr(self, field) not in options:
            self._fail(field, "one of: " + ", ".join(map(str, options)))

    def build(self, *, dtype: torch.dtype = torch.float32, device="cpu",
              seed: int = 0) -> nn.Module:
        """The model with deterministic weights (``seed``), on ``device`` in ``dtype``.

        Parameters are created in place (default dtype and device set while building),
        never converted afterwards: no second copy of the weights, and it works under
        ``FakeTensorMode``, whose tensors cannot be swapped by ``Module.to``."""
        previous = torch.get_default_dtype()
        try:
            with torch.random.fork_rng(devices=[]), torch.device(device):
                torch.manual_seed(seed)
                torch.set_default_dtype(dtype)
                with conversions_a_fake_build_survives():
                    model = self._build()
        finally:
            torch.set_default_dtype(previous)
        return model

    def _build(self) -> nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    def example_batch(self, batch_size: int, *, dtype: torch.dtype = torch.float32,
                      device="cpu", seed: int = 0) -> Any:
        """A deterministic random batch of ``batch_size`` examples: a ``Batch`` for the
        built-in models, a workload's own structure otherwise (a dict for ``hf:``)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"memprop.models: batch size {batch_size!r} is not allowed; "
                              "it must be an integer >= 1")
        gen = torch.Generator().manual_seed(seed)
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return tree_map(move, self._batch(batch_size, gen, dtype))

    def _batch(self, batch_size: int, gen: torch.Generator, dtype: torch.dtype) -> Any:
        raise NotImplementedError  # pragma: no cover

    # -- the workload contract: how one step of this config's batches is computed.
    # Measurement, estimate, checkpoint planning and sweeps call these, never
    # ``model.objective`` directly, so a workload may use any batch structure.
    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The scalar one training step differentiates, on a batch of this config."""
        return training_loss(model, batch)

    def forward(self, model: nn.Module, batch):
        """The forward pass of prediction alone (claim C4), on a batch of this config."""
        return inference_forward(model, batch)

    def fields(self) -> dict[str, Any]:
        """The config's fields as a plain dict (for result rows and specs)."""
        return dataclasses.asdict(self)

    def row_fields(self) -> dict[str, Any]:
        """``model`` and every field as ``cfg_<field>``: how result rows name the config."""
        return {"model": self.name, **{f"cfg_{k}": v for k, v in self.fields().items()}}
