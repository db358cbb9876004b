"""``hf:<model_type>``: any transformers architecture, built offline with random weights.

    cfg = model_config("hf:gpt2", n_layer=4, seq_len=128)   # nothing is downloaded
    model = cfg.build()                                     # AutoModelFor<Task>.from_config
    batch = cfg.example_batch(8)      # {"input_ids", "attention_mask", "labels"}
    loss = cfg.loss(model, batch)     # model(**batch).loss

Workload fields (memprop's own; documented defaults):
    task        causal-lm | masked-lm | sequence-classification | image-classification;
                "" picks one per architecture: masked-lm for encoders with an MLM head
                (bert), else causal-lm (gpt2, llama), else image-classification (vit),
                else sequence-classification
    seq_len     tokens per example (64)
    pad         left-padded positions in every odd-numbered row of the example batch
                (default seq_len // 8): the attention mask has zeros there, labels -100
    image_size  pixels per side of ``pixel_values`` for vision models (32)
    num_labels  classes of the classification tasks (2)
Every other field is a transformers config field (``n_layer``, ``hidden_size``, ...),
by its own name or the standard one (``hidden_size`` for GPT-2's ``n_embd``); unknown
fields raise ``ConfigError``. Unless set, the config is tiny so a step is fast on CPU:
SMALL_DEFAULTS below (2 layers, hidden 64, 4 heads, vocabulary 512).

transformers is an optional extra: ``pip install memprop[hf]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import sys
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from memprop.errors import ConfigError
from memprop.models.base import ModelConfig


__all__ = ["HFConfig", "hf_config", "TASKS", "SMALL_DEFAULTS", "eager_masks"]

PREFIX = "hf:"

# task -> (AutoModel class name, names mapping that says an architecture has that head)
TASKS = {
    "masked-lm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "image-classification": ("AutoModelForImageClassification",
                             "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    "sequence-classification": ("AutoModelForSequenceClassification",
                                "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
}

# standard config names (transformers maps them through ``attribute_map``) -> tiny values
SMALL_DEFAULTS = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                  "intermediate_size": 128, "vocab_size": 512, "patch_size": 8}

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_WORKLOAD = ("task", "seq_len", "pad", "image_size", "num_labels")
_CONFIG_KWARGS = ("attn_implementation",)   # accepted by every config, not in to_dict()


def _transformers():
    """transformers, imported on first use of an ``hf:`` model: it is an optional extra,
    and importing it takes seconds that every other memprop user would pay."""
    try:
        import transformers
        import transformers.masking_utils  # noqa: F401 - patched by eager_masks
    except ImportError:
        raise ConfigError("memprop.models: hf:<model_type> models need transformers, which "
                          "is not installed; pip install memprop[hf]") from None
    return transformers


def hf_config(name: str, **fields) -> "HFConfig":
    """``model_config("hf:<model_type>", ...)``: workload fields apart, the rest goes to
    the transformers config (checked against it)."""
    workload = {k: fields.pop(k) for k in _WORKLOAD if k in fields}
    return HFConfig(model_type=name[len(PREFIX):], **workload,
                    options=tuple(sorted(fields.items())))


def _has_field(config, key: str) -> bool:
    return (key in _CONFIG_KWARGS or key in config.attribute_map or key in config.to_dict()
            or hasattr(config, key))


@dataclasses.dataclass(frozen=True, kw_only=True)
class HFConfig(ModelConfig):
    """A transformers architecture by ``model_type``; see the module docstring."""

    model_type: str
    task: str = ""
    seq_len: int = 64
    pad: int | None = None                      # None: seq_len // 8
    image_size: int = 32
    num_labels: int = 2
    options: tuple[tuple[str, Any], ...] = ()   # transformers config fields

    @property
    def name(self) -> str:
        return PREFIX + self.model_type

    def _validate(self):
        transformers = _transformers()
        types = list(transformers.CONFIG_MAPPING.keys())
        if self.model_type not in types:
            close = difflib.get_close_matches(self.model_type, types, n=3)
            raise ConfigError(f"memprop.models: transformers {transformers.__version__} has no "
                              f"model type {self.model_type!r}"
                              + (f" (did you mean {', '.join(map(repr, close))}?)" if close
                                 else "") + "; write hf:<model_type>, e.g. hf:gpt2, hf:llama")
        for f in ("seq_len", "image_size"):
            self._int_at_least(f, 1)
        if self.pad is None:
            object.__setattr__(self, "pad", self.seq_len // 8)
        self._int_at_least("pad", 0)
        self._int_at_least("num_labels", 2)
        if self.pad >= self.seq_len:
            self._fail("pad", f"an integer in [0, seq_len = {self.seq_len})")
        if self.task:
            self._choice("task", self.supported_tasks())
        elif not self.supported_tasks():
            raise ConfigError(f"memprop.models: {self.name} has none of the heads memprop "
                              f"drives ({', '.join(TASKS)}); choose another model type")
        else:   # "" means the architecture's default: record which, so rows name it
            object.__setattr__(self, "task", self.supported_tasks()[0])
        default = transformers.AutoConfig.for_model(self.model_type)
        allowed = sorted(k for k in {*default.to_dict(), *default.attribute_map, *_CONFIG_KWARGS}
                         if not k.startswith("_"))
        for key, _ in self.options:
            if not _has_field(default, key):
                close = difflib.get_close_matches(key, allowed + list(_WORKLOAD), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"memprop.models: {self.name} has no field {key!r}{hint}; "
                                  f"its workload fields are {', '.join(_WORKLOAD)} and its "
                                  f"transformers config fields: {', '.join(allowed)}")

    def supported_tasks(self) -> list[str]:
        auto = _transformers().models.auto.modeling_auto
        return [t for t, (_, names) in TASKS.items() if self.model_type in getattr(auto, names)]

    def fields(self) -> dict[str, Any]:
        """Workload and transformers fields in one flat dict: ``model_config(self.name,
        **self.fields())`` rebuilds this config (how result rows name it)."""
        return {**{k: getattr(self, k) for k in _WORKLOAD}, **dict(self.options)}

    def hf_config(self):
        """The transformers config: SMALL_DEFAULTS, the workload's sizes, the options."""
        transformers = _transformers()
        default = transformers.AutoConfig.for_model(self.model_type)
        own = lambda key: default.attribute_map.get(key, key)  # noqa: E731
        set_by_user = {own(k) for k, _ in self.options}
        values = {own(k): v for k, v in SMALL_DEFAULTS.items()
                  if _has_field(default, k) and own(k) not in set_by_user}
        values["num_labels"] = self.num_labels
        if _has_field(default, "image_size"):
            values["image_size"] = self.image_size
        if self.task == "sequence-classification" and default.pad_token_id is None:
            values["pad_token_id"] = 0   # decoders find each row's last token by it
        values.update({own(k): v for k, v in self.options})
        _key_value_heads(default, values, set_by_user, own)
        vocab = values.get(own("vocab_size"))
        for key in _TOKEN_IDS:     # special tokens of the full vocabulary, out of a tiny one
            value = getattr(default, key, None)
            if vocab and key not in set_by_user and isinstance(value, int) and value >= vocab:
                values[key] = vocab - 1
        return transformers.AutoConfig.for_model(self.model_type, **values)

    def _build(self) -> nn.Module:
        auto = getattr(_transformers(), TASKS[self.task][0])
        return auto.from_config(self.hf_config())

    def _batch(self, batch_size, gen, dtype) -> dict:
        config = self.hf_config()
        task = self.task
        if task == "image-classification":
            channels = getattr(config, "num_channels", 3)
            return {"pixel_values": torch.randn(batch_size, channels, self.image_size,
                                                self.image_size, generator=gen, dtype=dtype),
                    "labels": torch.randint(0, self.num_labels, (batch_size,), generator=gen)}
        pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        ids = torch.randint(1, config.vocab_size, (batch_size, self.seq_len), generator=gen)
        ids[ids == pad_id] = 1 if pad_id != 1 else 2    # real tokens are never the pad id
        mask = torch.ones(batch_size, self.seq_len, dtype=torch.long)
        mask[1::2, :self.pad] = 0        # odd rows left-padded (B, T)
        ids[1::2, :self.pad] = pad_id
        if task == "sequence-classification":
            labels = torch.randint(0, self.num_labels, (batch_size,), generator=gen)
        else:                            # the model shifts causal labels itself
            labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def padded_rows(self, batch_size: int) -> int:
        return batch_size // 2 if self.pad else 0

    def loss(self, model, batch) -> torch.Tensor:
        with eager_masks(batch, all_ones=self.padded_rows(_rows(batch)) == 0):
            return model(**batch).loss

    def forward(self, model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with eager_masks(batch, all_ones=self.padded_rows(_rows(batch)) == 0):
            return model(**inputs)


def _key_value_heads(default, values: dict, set_by_user: set, own) -> None:
    """Grouped-query attention under the tiny head count: ``num_key_value_heads`` must
    divide ``num_attention_heads``. Unless the user set it, keep the architecture's kind
    of attention: as many as the heads (multi-head), one (multi-query), else the largest
    proper divisor of the heads (grouped: 2 of 4). Mistral's own 8 of 32 under memprop's
    4 heads crashed the first forward (issue 19)."""
    kv_key = own("num_key_value_heads")
    heads = values.get(own("num_attention_heads"))
    kv = getattr(default, "num_key_value_heads", None)
    if kv_key in set_by_user or not isinstance(kv, int) or not isinstance(heads, int):
        return
    if kv <= heads and heads % kv == 0 and own("num_attention_heads") in set_by_user:
        return                                   # the user's heads fit the default
    full = getattr(default, "num_attention_heads", None)
    if kv == full:
        values[kv_key] = heads
    elif kv == 1:
        values[kv_key] = 1
    else:
        values[kv_key] = max(d for d in range(1, heads) if heads % d == 0) if heads > 1 else 1


def _rows(batch: dict) -> int:
    return next(iter(batch.values())).shape[0]


# NOTE [ transformers masks on fake tensors ]
#   Before building an attention mask, transformers' masking_utils asks whether sdpa can
#   skip it (``_ignore_causal_mask_sdpa``: is every position attended, so is_causal
#   does?; ``_ignore_bidirectional_mask_sdpa`` likewise). Both first ask
#   ``is_tracing(padding_mask)``, which is true for a FakeTensor: on fake tensors the
#   mask is never skipped, and an estimate on an unpadded batch materialises a mask the
#   eager run never makes (+2.1 % stored bytes on the Llama; +4.2 % on the
#   2-layer default). A fake tensor's values cannot be read, but the workload knows the
#   one fact these tests depend on: whether its attention mask is all ones. While a fake
#   batch runs, ``eager_masks`` replaces the two tests in masking_utils with versions
#   that ask the original a real stand-in mask of the same shape (all ones, or with a
#   padded position, as the batch's is), and restores them in ``finally``. Residual:
#   recurrent-attention models (mamba2, kimi-linear) trim their mask through
#   ``create_recurrent_attention_mask``, imported into each model module; on fake
#   tensors they keep a mask the eager run drops when the batch is unpadded (pad > 0,
#   the default, pads half the rows and agrees).
def _with_real_mask(original, all_ones: bool):
    def decide(padding_mask=None, *args, **kwargs):
        if isinstance(padding_mask, FakeTensor):
            with unset_fake_temporarily():
                real = torch.ones(padding_mask.shape, dtype=torch.bool)
                if not all_ones:
                    real[..., 0] = False
                return original(real, *args, **kwargs)
        return original(padding_mask, *args, **kwargs)
    return decide


_SKIP_TESTS = ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa")


@contextlib.contextmanager
def eager_masks(batch, *, all_ones: bool):
    """While a fake batch runs, transformers decides masks as eagerly (NOTE above)."""
    masking_utils = sys.modules.get("transformers.masking_utils")
    fake = masking_utils is not None and any(
        isinstance(t, FakeTensor) for t in (batch.values() if isinstance(batch, dict) else ()))
    if not fake:
        yield
        return
    saved = {n: getattr(masking_utils, n) for n in _SKIP_TESTS if hasattr(masking_utils, n)}
    try:
        for name, original in saved.items():
            setattr(masking_utils, name, _with_real_mask(original, all_ones))
        yield
    finally:
        for name, original in saved.items():
            setattr(masking_utils, name, original)
