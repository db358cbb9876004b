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
by its own name or the standard one (``hidden_size`` for GPT-2's ``n_embd``), or a field
of a sub-config by a dotted name (``text_config.num_hidden_layers`` for gemma3); unknown
fields raise ``ConfigError``. Unless set, the config is tiny so a step is fast on CPU:
SMALL_DEFAULTS below (2 layers, hidden 64, 4 heads, vocabulary 512), and every field
tied to those sizes follows them (key/value heads, head_dim, experts, decoder layers,
sub-configs, layer patterns: NOTE [ A tiny config that stays consistent ]); a field the
user sets is kept as set.

transformers is an optional extra: ``pip install memprop[hf]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import sys
import weakref
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    FakeTensor,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import _disable_current_modes

from memprop.errors import ConfigError, MemPropError
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
# accepted by every config, not in to_dict(); their private spellings (what a config
# object reads back) are passed as them: transformers >= 5.25 ignores a private keyword
_CONFIG_KWARGS = ("attn_implementation", "experts_implementation")
_PUBLIC_KWARGS = {"_attn_implementation": "attn_implementation",
                  "_experts_implementation": "experts_implementation"}


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
            or _get(config, key, _MISSING) is not _MISSING)


_MISSING = object()


def _get(config, key: str, missing=None):
    """``getattr`` that also survives the attributes transformers refuses to read (a
    per-layer attribute of a heterogeneous config raises a RuntimeError)."""
    try:
        return getattr(config, key, missing)
    except Exception:   # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError
        return missing


def _no_init_weights():
    """transformers' context that skips weight initialisation (5.x keeps it in
    ``transformers.initialization``, 4.x in ``transformers.modeling_utils``)."""
    import importlib
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            found = getattr(importlib.import_module(where), "no_init_weights", None)
        except ImportError:
            continue
        if found is not None:
            return found()
    return contextlib.nullcontext()


def _not_built(model_type: str, exc: BaseException) -> ConfigError:
    """One line saying transformers could not make hf:<type> as memprop sized it."""
    return ConfigError(f"memprop.models: transformers could not build hf:{model_type} with "
                       f"memprop's tiny config: {type(exc).__name__}: "
                       f"{' '.join(str(exc).split())[:300]}; set its sizes yourself "
                       "(--set FIELD=VALUE, model_config(..., FIELD=VALUE))")


def _default_config(model_type: str):
    """``AutoConfig.for_model(model_type)``, or a ConfigError saying transformers' own
    default config of that type does not validate."""
    try:
        return _transformers().AutoConfig.for_model(model_type)
    except Exception as exc:   # noqa: BLE001 - transformers' validators raise many kinds
        raise ConfigError(f"memprop.models: transformers cannot make the default config of "
                          f"hf:{model_type}: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}") from None


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
        default = _default_config(self.model_type)
        allowed = sorted(k for k in {*default.to_dict(), *default.attribute_map, *_CONFIG_KWARGS}
                         if not k.startswith("_"))
        keys = [key for key, _ in self.options]
        for key in keys:
            last = key.rpartition(".")[2]
            public = _PUBLIC_KWARGS.get(last, last)
            if public in _PUBLIC_KWARGS.values() and "." in key:
                # transformers sets these on the top-level config, which hands them to
                # every sub-config (a sub-config's own would be overwritten: dropped)
                raise ConfigError(f"memprop.models: set {public!r} at the top level "
                                  f"(--set {public}=...), not as {key!r}: transformers "
                                  "applies it to every sub-config")
            if public != key and public in keys:
                raise ConfigError(f"memprop.models: {key!r} and {public!r} are the same "
                                  f"setting; give {public!r} only")
        for key, _ in self.options:
            if not _has_field(default, key):
                head, _, rest = key.partition(".")
                sub = _get(default, head) if rest and head in _sub_configs(default) else None
                if sub is not None and _has_field(sub, rest.partition(".")[0]):
                    continue                     # text_config.num_hidden_layers
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
        """The transformers config: the options, and every field they leave unset derived
        tiny and consistent from them (NOTE [ A tiny config that stays consistent ])."""
        transformers = _transformers()
        default = _default_config(self.model_type)
        own = lambda key: _PUBLIC_KWARGS.get(key, default.attribute_map.get(key, key))  # noqa: E731
        user = _nest({own(k): v for k, v in self.options})
        values = _derive(default, user, seq_len=self.seq_len, image_size=self.image_size)
        values["num_labels"] = self.num_labels
        if _has_field(default, "image_size") and "image_size" not in user:
            values["image_size"] = self.image_size
        if (self.task in ("sequence-classification", "masked-lm") and "pad_token_id" not in user
                and _get(default, "pad_token_id") is None):
            # the batch pads with 0 then: decoders find each row's last token by it, and
            # encoders (esm) number positions after it
            values["pad_token_id"] = 0
        if (_get(default, "is_encoder_decoder") and "decoder_start_token_id" not in user
                and _get(default, "decoder_start_token_id") is None):
            # an encoder-decoder shifts the labels right from this token (t5's own
            # default config has none, and its loss then fails): the pad token, as T5's
            # checkpoints set it
            pad = values.get("pad_token_id", _get(default, "pad_token_id"))
            values["decoder_start_token_id"] = pad if isinstance(pad, int) else 0
        try:
            return transformers.AutoConfig.for_model(self.model_type, **values)
        except Exception as exc:   # noqa: BLE001 - transformers' validators raise many kinds
            raise _not_built(self.model_type, exc) from None

    def _build(self) -> nn.Module:
        auto = getattr(_transformers(), TASKS[self.task][0])
        config = self.hf_config()
        try:
            return auto.from_config(config)
        except MemPropError:
            raise
        except DataDependentOutputException:
            pass                   # a weight init that reads values: fake tensors have none
        except Exception as exc:   # noqa: BLE001 - any failure of transformers' own code
            raise _not_built(self.model_type, exc) from None
        # On fake tensors (an estimate) the weights' values are never read: build without
        # initialising them (vit's trunc_normal_ init reads a value, as .item()). Skipping
        # the init skips its tying too (transformers ties after loading a checkpoint):
        # tie here, or the twin holds two embeddings where the real model holds one
        try:
            with _no_init_weights():
                model = auto.from_config(config)
            if hasattr(model, "tie_weights"):
                model.tie_weights()
            return model
        except Exception as exc:   # noqa: BLE001
            raise _not_built(self.model_type, exc) from None

    def _batch(self, batch_size, gen, dtype) -> dict:
        config = self.hf_config()
        task = self.task
        if task == "image-classification":
            channels = getattr(config, "num_channels", 3)
            return {"pixel_values": torch.randn(batch_size, channels, self.image_size,
                                                self.image_size, generator=gen, dtype=dtype),
                    "labels": torch.randint(0, self.num_labels, (batch_size,), generator=gen)}
        text = config.get_text_config()
        pad_id = _get(text, "pad_token_id")
        pad_id = pad_id if isinstance(pad_id, int) else 0
        ids = torch.randint(1, text.vocab_size, (batch_size, self.seq_len), generator=gen)
        ids[ids == pad_id] = 1 if pad_id != 1 else 2    # real tokens are never the pad id
        mask = torch.ones(batch_size, self.seq_len, dtype=torch.long)
        mask[1::2, :self.pad] = 0        # odd rows left-padded (B, T)
        ids[1::2, :self.pad] = pad_id
        if task == "sequence-classification":
            labels = torch.randint(0, self.num_labels, (batch_size,), generator=gen)
            eos = _get(text, "eos_token_id")
            if _get(config, "is_encoder_decoder") and isinstance(eos, int):
                ids[ids == eos] = 1 if eos != 1 else 2
                ids[:, -1] = eos          # an encoder-decoder classifies at each row's <eos>
        else:                            # the model shifts causal labels itself
            labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def padded_rows(self, batch_size: int) -> int:
        return batch_size // 2 if self.pad else 0

    def loss(self, model, batch) -> torch.Tensor:
        all_ones = self.padded_rows(_rows(batch)) == 0
        with eager_masks(batch, all_ones=all_ones) as decided:
            loss = model(**batch).loss
        _decide_alike_in_backward(loss, batch, all_ones, decided)
        return loss

    def forward(self, model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with eager_masks(batch, all_ones=self.padded_rows(_rows(batch)) == 0):
            return model(**inputs)


# NOTE [ A tiny config that stays consistent ]
#   SMALL_DEFAULTS shrinks the standard sizes (layers, hidden, heads, intermediate,
#   vocabulary), but an architecture's config holds many more sizes tied to them, and
#   left at the full model's values they contradict the tiny ones: mistral's 8 key/value
#   heads under 4 heads (the first forward crashed), gemma's head_dim 256, blenderbot's
#   decoder_layers (its cache had 2 layers, its decoder 8), gemma3's text and vision
#   sub-configs (2.7 B parameters), qwen2_moe's 60 experts, a hybrid's 2 layers with no
#   attention layer among them. ``_derive`` sets every field the user did not set from
#   the sizes in effect (the user's, else the tiny ones), by these rules, in order:
#     1. the standard sizes: SMALL_DEFAULTS; heads that do not divide the hidden size
#        become its largest divisor below them
#     2. key/value heads: the same kind of attention under the tiny head count (all the
#        heads for multi-head, one for multi-query, else the largest proper divisor);
#        heads the user set keep the default key/value heads when they divide them
#     3. head_dim, where the config has one (None included: some models cannot read
#        None): hidden / heads, times the default's ratio to that where it stays whole
#     4. experts: at most 4 routed, 2 per token, 1 shared, 1 group; leading dense
#        layers fewer than the layers, so one layer routes
#     5. vocabularies beyond the tiny one (entity, per-layer inputs) shrink to it;
#        special token ids past it move inside it; a missing mask token gets one
#     6. windows (sliding, chunked, local attention) at most seq_len / 2, so they bite;
#        recurrent state sizes at most 16; a state-space mixer keeps heads x head size
#        = its inner size (mamba2: expand x hidden), head size at most 16; a vision
#        sub-config's images are the workload's image_size where its patches tile them
#     7. sizes tied to a standard size: a field named like a size whose default is a
#        whole multiple or fraction of a standard size's default follows it
#        (decoder_layers = layers, decoder_attention_heads = heads, qk_rope_head_dim
#        and rotary_dim with head_dim, moe_intermediate_size = intermediate / 4,
#        attention_hidden_size = 2 x hidden); counts of some of the layers stay below
#        the layer count; periods and steps at most the layer count, offsets within
#     8. sub-configs (text_config, vision_config, ...): the same rules, recursively;
#        ``text_config.num_hidden_layers=3`` sets a field of one
#     9. layer patterns: a per-layer list the config does not derive to the layer count
#        by itself (layer_types, mlp_layer_types, attention_layers, ...) is cut to it,
#        keeping every kind of layer the full model has (one attention layer in a
#        hybrid, one sparse layer in a mixture of experts); index lists keep the layers
#        that exist
#   What the rules cannot reach stays the architecture's own and may still fail to
#   build; ``benchmarks/bench_architectures.py`` lists, per transformers model type with
#   a language-model head, whether it builds and why not.

_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv",
             "num_query_groups")
_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
            "num_routed_experts", "n_experts", "zero_expert_num")
_TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "moe_top_k",
          "num_selected_experts", "experts_per_token")
_SHARED_EXPERTS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
_EXPERT_GROUPS = ("n_group", "num_expert_group", "moe_n_group", "topk_group")
_DENSE_FIRST = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index")
_WINDOWS = ("sliding_window", "sliding_window_size", "attention_chunk_size", "window_size",
            "local_attention", "attention_window")
_NOT_SIZES = ("vocab", "position", "token", "index", "image", "patch", "kernel", "window",
              "chunk", "conv", "bucket", "label", "max_", "seq", "length", "ctx", "stride",
              "pool", "cache", "sample", "frame", "batch", "num_channels", "group", "mel",
              "block_size", "random", "state", "bins")
_SIZE_HINTS = ("size", "dim", "width", "rank", "channels", "d_model", "embd", "hidden")
_PERIODS = ("_period", "_step", "_interval", "_freq", "every_n_layers", "_pattern")


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _family(name: str) -> str | None:
    """Which standard size a config field named ``name`` is measured in, if any."""
    n = name.lower()
    if n.startswith("_") or n.endswith(("_id", "_ids", "_eps", "_scale", "_factor")):
        return None
    if "head_dim" in n or "headdim" in n or "head_size" in n or "d_head" in n or (
            "rotary_dim" in n or n in ("kv_channels", "dim_head", "d_kv")):
        return "head_dim"
    if any(s in n for s in _NOT_SIZES):
        return None
    if "heads" in n:
        return "heads"
    if "layers" in n or n in ("num_blocks", "n_blocks"):
        return "layers"
    if "intermediate" in n or "ffn" in n or n in ("d_ff", "dim_ff", "n_inner", "d_inner",
                                                  "ff_dim", "dff"):
        return "intermediate"
    if any(s in n for s in _SIZE_HINTS):
        return "hidden"
    return None


def _sub_configs(config) -> list[str]:
    """Names of ``config``'s sub-configs (text_config, vision_config, ...) it holds."""
    return [k for k in (getattr(config, "sub_configs", None) or {})
            if hasattr(_get(config, k), "to_dict")]


def _nest(options: dict) -> dict:
    """``{"text_config.num_hidden_layers": 3}`` -> ``{"text_config": {...: 3}}``."""
    out: dict = {}
    for key, value in options.items():
        head, dot, rest = key.partition(".")
        if dot:
            got = out.get(head)
            inner = got if isinstance(got, dict) else {}
            out[head] = {**inner, **_nest({rest: value})}
        else:
            out[key] = value
    return out


def _cut(pattern, n: int) -> list:
    """The first ``n`` entries of a per-layer ``pattern``, with every kind it has: kinds
    missing from the cut replace, from the end, entries whose kind occurs twice."""
    out = list(pattern[:n])
    i = n - 1
    for kind in dict.fromkeys(pattern):
        if kind in out:
            continue
        while i >= 0 and out.count(out[i]) < 2:
            i -= 1
        if i < 0:
            break
        out[i] = kind
        i -= 1
    return out


def _kv_heads(was: int | None, was_heads: int | None, heads: int, *, heads_set: bool) -> int:
    """Key/value heads under ``heads`` query heads, of the default's kind of attention."""
    if heads_set and was and was <= heads and heads % was == 0:
        return was                                   # the user's heads fit the default
    if was is None or was_heads is None or was >= was_heads:
        return heads                                 # multi-head
    if was == 1:
        return 1                                     # multi-query
    return max(k for k in range(1, heads) if heads % k == 0) if heads > 1 else 1   # grouped


def _derive(default, user: dict, *, seq_len: int, image_size: int = 32,
            top: bool = True) -> dict:
    """The keyword arguments of a tiny, consistent config like ``default``: ``user``'s
    fields (own names; sub-configs as dicts) and every other field derived from them
    (NOTE [ A tiny config that stays consistent ])."""
    d = default.to_dict()
    own = lambda key: default.attribute_map.get(key, key)  # noqa: E731
    subs = _sub_configs(default)
    fields = {k for k in d if not k.startswith("_")} - set(subs)
    values: dict = {}

    def now(key):
        key = own(key)
        return user[key] if key in user else values[key] if key in values else d.get(key)

    def put(key, value, *, replace=False):
        key = own(key)
        if key in fields and key not in user and (replace or key not in values):
            values[key] = value

    def first(names):
        return next((own(k) for k in names if own(k) in fields), None)

    # 1. the standard sizes
    for key, size in SMALL_DEFAULTS.items():
        if top or key != "patch_size":
            put(key, size)
    hidden, heads = _int(now("hidden_size")), _int(now("num_attention_heads"))
    if hidden and heads and hidden % heads and own("num_attention_heads") not in user:
        heads = max(k for k in range(1, heads + 1) if hidden % k == 0)
        put("num_attention_heads", heads, replace=True)
    d_hidden, d_heads = _int(d.get(own("hidden_size"))), _int(d.get(own("num_attention_heads")))

    # 2. key/value heads (other pairs, swa_num_key_value_heads, ... after rule 7)
    kv_key = first(_KV_HEADS)
    if kv_key and heads and _int(user.get(kv_key)) and heads % user[kv_key] \
            and own("num_attention_heads") not in user:
        heads = user[kv_key]
        put("num_attention_heads", heads, replace=True)
    if kv_key and heads and kv_key not in user:
        put(kv_key, _kv_heads(_int(d.get(kv_key)), d_heads, heads,
                              heads_set=own("num_attention_heads") in user))

    # 3. head_dim
    d_head_dim = _int(d.get(own("head_dim"))) or (d_hidden // d_heads if d_hidden and d_heads
                                                     else None)
    head_dim: int | None
    if hidden and heads:
        head_dim = hidden // heads
        if d_head_dim and d_hidden and d_heads:
            scaled = Fraction(head_dim * d_head_dim * d_heads, d_hidden)
            head_dim = int(scaled) if scaled.denominator == 1 and scaled >= 1 else head_dim
        put("head_dim", head_dim)
    head_dim = _int(now("head_dim")) or (hidden // heads if hidden and heads else None)

    # layers: the standard field, else the most common layer count among the fields
    d_layers = _int(d.get(own("num_hidden_layers")))
    counts = [v for k, v in d.items() if _family(k) == "layers" and _int(v)]
    if d_layers is None and counts:
        d_layers = max(set(counts), key=counts.count)
    layers = _int(now("num_hidden_layers")) if own("num_hidden_layers") in fields else next(
        (_int(v) for k, v in user.items() if _family(k) == "layers" and _int(v)
         and d.get(k) == d_layers), None)     # prophetnet: num_decoder_layers=3 sets all
    layers = layers or SMALL_DEFAULTS["num_hidden_layers"]

    # 4. experts
    moe = first(_TOP_K) is not None or "moe_intermediate_size" in fields
    for names, most in ((_EXPERTS, 4), (_TOP_K, 2), (_SHARED_EXPERTS, 1), (_EXPERT_GROUPS, 1)):
        for key in names:                    # None: dots1's default cannot build without
            value = d.get(own(key))
            if (_int(value) and value > most) or (value is None and moe and own(key) in fields
                                                  and names is not _EXPERT_GROUPS):
                put(key, most)
    for key in _DENSE_FIRST:
        if _int(d.get(own(key))) and d[own(key)] >= layers:
            put(key, max(layers - 1, 0))

    # 5. vocabularies and special tokens
    vocab = _int(now("vocab_size"))
    if vocab:
        for key in fields:
            if "vocab" in key and key != own("vocab_size") and (_int(d[key]) or 0) > vocab:
                put(key, vocab)
        for key in _TOKEN_IDS:
            if (_int(d.get(key)) or 0) >= vocab:
                put(key, vocab - 1)
        if "mask_token_id" in fields and d["mask_token_id"] is None:
            put("mask_token_id", vocab - 1)   # a masked LM (esm) reads its mask token

    # 6. windows, recurrent states
    half = max(2, seq_len // 2)
    for key in _WINDOWS:
        value = d.get(own(key))
        if _int(value) and value > half:
            put(key, half)
        elif isinstance(value, list) and value and all(_int(v) for v in value):
            put(key, [min(v, half) for v in value])
    for key in fields:
        n = key.lower()
        if "state" in n and any(s in n for s in ("size", "d_state", "dim")) and (
                _int(d[key]) or 0) > 16:
            put(key, 16)

    patch = _int(now("patch_size"))                       # a vision sub-config's images
    if not top and patch and image_size % patch == 0 and (
            _int(d.get("image_size")) or 0) > image_size:
        put("image_size", image_size)

    # state-space heads: heads x head size = the inner size (expand x hidden, or d_ssm)
    _ssm_heads(d, fields, now, put, first, hidden, d_hidden)

    # 7. sizes tied to a standard size; periods and offsets
    bases = {"layers": (d_layers, layers), "hidden": (d_hidden, hidden),
             "heads": (d_heads, heads), "head_dim": (d_head_dim, head_dim),
             "intermediate": (_int(d.get(own("intermediate_size"))),
                              _int(now("intermediate_size")))}
    for key in sorted(fields - set(values) - set(user)):
        value, family = _int(d[key]), _family(key)
        if value and family == "intermediate" and not bases[family][0]:
            put(key, min(value, SMALL_DEFAULTS["intermediate_size"]))   # encoder_ffn_dim
            continue
        if not value or family is None:
            continue
        was, new = bases[family]
        if not was or not new:                           # both sizes known
            continue
        if family == "layers":
            if value >= was:
                put(key, new)                            # all the layers (decoder_layers)
            elif new <= value:
                put(key, max(new - 1, 0))                # some of the layers
            continue
        scaled = new * Fraction(value, was)
        rotary = "rotary" in key and scaled % 2
        if scaled.denominator == 1 and scaled >= (4 if family == "hidden" else 1) and not rotary:
            put(key, int(scaled))
        elif family == "intermediate" and value > new:
            put(key, new)
    for kv_key in sorted(fields):            # other pairs: swa_num_key_value_heads, ...
        heads_key = kv_key.replace("key_value", "attention")
        n = _int(now(heads_key))
        if "key_value_heads" in kv_key and heads_key in fields and n and kv_key not in user:
            put(kv_key, _kv_heads(_int(d[kv_key]), _int(d[heads_key]), n,
                                  heads_set=heads_key in user), replace=True)
    for key in sorted(fields):
        value = _int(d[key])
        if value and key.endswith(_PERIODS) and value > layers:
            put(key, layers)
    for key in sorted(fields):
        value = _int(d[key])
        if value is not None and key.endswith("_offset"):
            period = _int(now(key[:-len("offset")] + "period")) or layers
            if value >= period:
                put(key, value % period)

    kwargs = {**values, **{k: v for k, v in user.items() if k not in subs}}
    # 8. sub-configs
    for key in subs:
        given = user.get(key, {})
        if not isinstance(given, dict):
            kwargs[key] = given                          # the user's own config object
            continue
        sub = _get(default, key)
        sub_user = {sub.attribute_map.get(k, k): v for k, v in given.items()}
        kwargs[key] = {"model_type": sub.model_type,
                       **_derive(sub, sub_user, seq_len=seq_len, image_size=image_size,
                                 top=False)}

    # 9. layer patterns
    if d_layers and d_layers > layers:
        patterns = _layer_patterns(default, d, kwargs, set(user) | set(values), d_layers,
                                   layers)
        if patterns and _make(default, {**kwargs, **patterns}) is not None:
            kwargs.update(patterns)
    return kwargs


_SSM_HEADS = ("mamba_n_heads", "mamba_num_heads", "n_mamba_heads", "num_heads")
_SSM_HEAD_DIMS = ("mamba_d_head", "mamba_head_dim", "mamba_headdim", "head_dim")
_SSM_GROUPS = ("mamba_n_groups", "mamba_ngroups", "n_groups")


def _ssm_heads(d, fields, now, put, first, hidden, d_hidden) -> None:
    """Rule 6 for state-space mixers (mamba2, bamba, falcon_h1, nemotron_h, zamba2):
    where the default's heads x head size is its inner size (``expand`` x hidden, or
    ``mamba_d_ssm``), the tiny one keeps that product: head size at most 16, heads the
    rest; groups divide the heads."""
    n_key, dim_key = first(_SSM_HEADS), first(_SSM_HEAD_DIMS)
    if n_key is None or dim_key is None or not hidden or not d_hidden:
        return
    if n_key == "num_heads" and "num_attention_heads" in fields:
        return                                           # attention heads, not a mixer's
    n, dim = _int(d.get(n_key)), _int(d.get(dim_key))
    expand = _int(now(first(("mamba_expand", "expand")) or "")) or 0
    d_expand = _int(d.get(first(("mamba_expand", "expand")) or "")) or 0
    inner_key = "mamba_d_ssm" if "mamba_d_ssm" in fields else None
    if not n or not dim:
        return
    if inner_key and _int(d[inner_key]) == n * dim:
        scaled = Fraction(d[inner_key] * hidden, d_hidden)
        if scaled.denominator != 1:
            return
        inner = int(scaled)
        put(inner_key, inner)
    elif d_expand and n * dim == d_expand * d_hidden and expand:
        inner = expand * hidden
    else:
        return
    size = min(dim, 16)
    while inner % size:
        size //= 2
    put(dim_key, size)
    put(n_key, inner // size)
    heads = _int(now(n_key)) or 1
    for key in _SSM_GROUPS:
        groups = _int(d.get(key))
        if key in fields and groups and heads % groups:
            put(key, math.gcd(heads, groups))


def _make(default, kwargs):
    """A config of ``default``'s class from ``kwargs``, or None where it does not validate."""
    try:
        return type(default)(**kwargs)
    except Exception:   # noqa: BLE001 - transformers' validators raise many kinds
        return None


def _layer_patterns(default, d: dict, kwargs: dict, taken: set, d_layers: int,
                    layers: int) -> dict:
    """Rule 9: per-layer lists cut to ``layers`` keeping every kind; index lists kept to
    the layers that exist; [kinds, repeat] pairs repeated to the layer count."""
    made = _make(default, kwargs)
    out = {}
    for key, was in d.items():
        if key in taken or key.startswith("_") or not isinstance(was, (list, tuple)) or not was:
            continue
        got = _get(made, key) if made is not None else None
        if all(isinstance(v, (str, int, float, bool)) for v in was):
            if len(was) == d_layers:                     # one entry per layer
                want = _cut(was, layers)
                if (not isinstance(got, (list, tuple)) or len(got) != layers
                        or not set(want) <= set(got)):
                    out[key] = type(was)(want)
            elif all(isinstance(v, str) for v in was) and layers < len(was) < d_layers:
                if got is None or list(got) == list(was):    # a repeating pattern
                    out[key] = type(was)(_cut(was, layers))
            elif all(_int(v) is not None and 0 <= v < d_layers for v in was):
                have = got if isinstance(got, (list, tuple)) else was   # layer indices
                if any(v >= layers for v in have):
                    out[key] = type(was)([v for v in have if v < layers] or [layers - 1])
        elif all(isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], (list, tuple))
                 and _int(v[1]) for v in was):           # [[kinds, repeat], ...]
            if sum(len(k) * n for k, n in was) == d_layers:
                pairs = [[list(k), max(1, n * layers // d_layers)] for k, n in was]
                if sum(len(k) * n for k, n in pairs) == layers:
                    out[key] = pairs
    return out


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
#   padded position, as the batch's is), and restores them in ``finally``. A mask the
#   model makes itself is not the batch's: an encoder-decoder's decoder attends every
#   position of its own input (bart: ``torch.ones`` when no decoder_attention_mask is
#   given), so while the fake batch runs a torch-function mode notes the tensors
#   ``torch.ones`` makes, a wrapper of ``_preprocess_mask_arguments`` notes which mask
#   each prepared padding mask came from, and a mask made by ``torch.ones`` stands in as
#   all ones (the estimate of hf:bart counted a decoder mask per layer that the eager run
#   skips). Any other mask is taken to be the batch's. The stand-in is made with every
#   dispatch mode off, so a live-memory tracker does not see it made (it showed 4 rows,
#   ones/lift_fresh/select/fill_, that the eager run never runs). The skip test's own
#   ops on it (alias, sum, eq, item) the tracker still sees, as it sees them on the real
#   batch's mask, but the stand-in is a storage it has not counted: for those 4 rows a
#   prediction holds the mask's bytes more than the real run (B x T bools: 128 bytes at
#   batch 2, seq 64; at the start of forward, below the peak). Checked row by row
#   against real gloo ranks in tests/test_sharded_parallel.py (``_same_rows``).
#   Residual: recurrent-attention models (mamba2, kimi-linear) trim their mask through
#   ``create_recurrent_attention_mask``, imported into each model module; on fake
#   tensors they keep a mask the eager run drops when the batch is unpadded (pad > 0,
#   the default, pads half the rows and agrees).
def _with_real_mask(original, all_ones: bool, prepared: dict):
    def decide(padding_mask=None, *args, **kwargs):
        if isinstance(padding_mask, FakeTensor):
            ref, ones = prepared.get(id(padding_mask), (None, all_ones))
            ones = ones if ref is not None and ref() is padding_mask else all_ones
            with _disable_current_modes():    # a stand-in: no tracker counts it
                real = torch.ones(padding_mask.shape, dtype=torch.bool)
                if not ones:
                    real[..., 0] = False
            with unset_fake_temporarily():
                return original(real, *args, **kwargs)
        return original(padding_mask, *args, **kwargs)
    return decide


def _noting_prepared(original, all_ones: bool, made_ones: dict, prepared: dict,
                     decided: list, replay: list | None):
    """``_preprocess_mask_arguments``, noting for the padding mask it returns whether it
    is all ones: made by ``torch.ones`` (in ``made_ones``), else as the batch's; each
    answer is appended to ``decided``. ``replay``: the answers of the forward, in order
    (a recompute in backward makes the same calls)."""
    def prepare(config, inputs_embeds, attention_mask, *args, **kwargs):
        out = original(config, inputs_embeds, attention_mask, *args, **kwargs)
        mask = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if isinstance(mask, FakeTensor):
            if replay is not None:
                ones = replay[len(decided) % len(replay)] if replay else all_ones
            else:
                ref = made_ones.get(id(attention_mask))
                ones = ref is not None and ref() is attention_mask or all_ones
            decided.append(ones)
            prepared[id(mask)] = (weakref.ref(mask), ones)
        return out
    return prepare


class _OnesMade(torch.overrides.TorchFunctionMode):
    """Notes the fake tensors ``torch.ones`` makes, by weak reference: holding them would
    keep them alive, and the tracker would count them."""

    def __init__(self, made: dict):
        super().__init__()
        self.made = made

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ones and isinstance(out, FakeTensor):
            self.made[id(out)] = weakref.ref(out)
        return out


_SKIP_TESTS = ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa")
_PREPARE = "_preprocess_mask_arguments"


@contextlib.contextmanager
def eager_masks(batch, *, all_ones: bool, replay: list | None = None):
    """While a fake batch runs, transformers decides masks as eagerly (NOTE above).
    Yields the list of its answers for the padding masks prepared (whether all ones), in
    order, or None when the batch is not fake; ``replay``: give these answers again."""
    masking_utils = sys.modules.get("transformers.masking_utils")
    fake = masking_utils is not None and any(
        isinstance(t, FakeTensor) for t in (batch.values() if isinstance(batch, dict) else ()))
    if not fake:
        yield None
        return
    saved = {n: getattr(masking_utils, n) for n in (*_SKIP_TESTS, _PREPARE)
             if hasattr(masking_utils, n)}
    made_ones: dict = {}
    prepared: dict = {}
    decided: list = []
    try:
        for name, original in saved.items():
            setattr(masking_utils, name,
                    _noting_prepared(original, all_ones, made_ones, prepared, decided, replay)
                    if name == _PREPARE else _with_real_mask(original, all_ones, prepared))
        with _OnesMade(made_ones) if replay is None else contextlib.nullcontext():
            yield decided
    finally:
        for name, original in saved.items():
            setattr(masking_utils, name, original)


def _decide_alike_in_backward(loss, batch, all_ones: bool, decided: list | None) -> None:
    """A strategy that reruns the whole forward in backward (``forward:``) rebuilds the
    masks there, outside ``eager_masks``: where the forward took a mask the model made
    (all ones) for another than the batch's, the rebuild would decide otherwise and the
    recompute would not match the forward. So backward runs under ``eager_masks`` too,
    replaying the forward's answers, and restores transformers when it ends."""
    if not decided or all(ones == all_ones for ones in decided) or not loss.requires_grad:
        return

    def enter(grad):
        scope = eager_masks(batch, all_ones=all_ones, replay=list(decided))
        scope.__enter__()
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: scope.__exit__(None, None, None))
        return grad
    loss.register_hook(enter)
