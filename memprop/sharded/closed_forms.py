"""What the published closed forms say a rank holds, next to memprop's prediction.

    zero_model_state_bytes(6_738_415_616, stage=3, shards=64)     # ZeRO-3, bytes per rank
    megatron_activation_bytes(seq_len=4096, batch=1, hidden=4096, heads=32, layers=32)
    closed_forms(config, 1, FSDPConfig(world_size=64), dtype=torch.bfloat16)

These are predictions by formula, from a model's sizes alone: they run nothing. They are
shown beside memprop's fake-tensor prediction (``memprop fit``, ``memprop plan --fsdp``),
labelled "closed form", so a reader sees what each leaves out; memprop's figure is the
one its tests check against real ranks.

NOTE [ What the closed forms leave out ]
  ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", section 5) counts model states only: parameters, gradients and
  optimizer state, 2 + 2 + K bytes per parameter (K = 12 for mixed-precision Adam: fp32
  master weights, momentum, variance). No activations, no batch or sequence length, no
  all-gather or reduce-scatter buffers, no temporaries (an optimizer's scratch, the
  loss's logits). Megatron's activation formula (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", section 4) counts what one
  GPT-style layer stores for backward in 16-bit with dropout masks, a 4h GeLU MLP and
  attention that materialises its a x s x s scores (34 s b h + 5 a s^2 b bytes; memprop
  shows the 34 s b h without the scores beside it, as fused attention stores none); it
  leaves out the embedding, the
  final norm, the logits and the loss (s x b x vocab values: large at vocab 32000), the
  working set of the layer being recomputed, and any architecture that differs (Llama:
  SwiGLU MLP of its own width, RMSNorm, no dropout, grouped key-value heads). Neither
  says where in the step the peak falls.
"""

from __future__ import annotations

import dataclasses

import torch

from memprop.errors import ConfigError
from memprop.sharded.config import FSDPConfig

__all__ = ["zero_model_state_bytes", "megatron_activation_bytes", "transformer_dims",
           "closed_forms", "ClosedForms"]

ZERO_STAGES = (0, 1, 2, 3)


def zero_model_state_bytes(params: int, *, stage: int, shards: int, tp: int = 1,
                           param_bytes: float = 2, grad_bytes: float = 2,
                           optimizer_bytes: float = 12) -> int:
    """ZeRO's model-state bytes per rank (NOTE [ What the closed forms leave out ]):
    ``params`` parameters in all, split ``tp`` ways by tensor parallelism, the rest
    partitioned over ``shards`` data-parallel ranks as the stage says (Rajbhandari et al.
    2020, Figure 1, with Psi = params / tp):

      stage 0 (plain data parallel)   (2 + 2 + K) Psi
      stage 1 (optimizer state)        2 Psi + 2 Psi + K Psi / N
      stage 2 (+ gradients)            2 Psi + (2 + K) Psi / N
      stage 3 (+ parameters)           (2 + 2 + K) Psi / N

    The 2, 2 and K are ``param_bytes``, ``grad_bytes`` and ``optimizer_bytes`` per
    parameter (defaults: mixed-precision Adam, K = 12). Bytes, rounded down."""
    if stage not in ZERO_STAGES:
        raise ConfigError(f"memprop.sharded.closed_forms: ZeRO stage {stage!r} is not "
                          f"allowed; choose one of: {', '.join(map(str, ZERO_STAGES))}")
    psi = params / tp
    p, g, k = param_bytes * psi, grad_bytes * psi, optimizer_bytes * psi
    divided = {0: (p, g, k, 1), 1: (p, g, 0, k), 2: (p, 0, 0, g + k), 3: (0, 0, 0, p + g + k)}
    kept_p, kept_g, kept_k, parted = divided[stage]
    if stage == 0:
        return int(p + g + k)
    return int(kept_p + kept_g + kept_k + parted / shards)


def megatron_activation_bytes(*, seq_len: int, batch: int, hidden: int, heads: int,
                              layers: int, tp: int = 1, sequence_parallel: bool = False,
                              recompute: str = "none", attention_scores: bool = True) -> int:
    """Megatron's activation bytes per rank of ``layers`` transformer layers (Korthikanti
    et al. 2022, equations 1-2 and section 4.3; NOTE [ What the closed forms leave
    out ]), with s = ``seq_len``, b = ``batch`` (micro-batch per rank), h = ``hidden``,
    a = ``heads``, t = ``tp``, per layer:

      no recompute, no TP               s b h (34 + 5 a s / h)
      TP, no sequence parallelism       s b h (10 + 24/t + 5 a s / (h t))
      TP and sequence parallelism       s b h (34 + 5 a s / h) / t
      full recompute                    2 s b h (each layer's 16-bit input; / t with SP)

    The 5 a s / h term is attention's s x s scores (softmax output, dropout mask and
    output); ``attention_scores=False`` drops it, as for fused attention (FlashAttention,
    torch's fused ``scaled_dot_product_attention`` kernels), which stores none: 34 s b h
    per layer. Bytes, rounded down."""
    if recompute not in ("none", "full"):
        raise ConfigError(f"memprop.sharded.closed_forms: recompute {recompute!r} is not "
                          "allowed; choose one of: none, full")
    s, b, h, a, t = seq_len, batch, hidden, heads if attention_scores else 0, tp
    if recompute == "full":
        per_layer = 2 * s * b * h / (t if sequence_parallel else 1)
    elif sequence_parallel or t == 1:
        per_layer = s * b * h * (34 + 5 * a * s / h) / t
    else:
        per_layer = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    return int(per_layer * layers)


def transformer_dims(config) -> dict[str, int] | None:
    """(seq_len, hidden, heads, layers) of a transformer config, for the Megatron form:
    the zoo ``transformer`` or an ``hf:`` decoder with ``hidden_size``,
    ``num_attention_heads`` and ``num_hidden_layers``; None for other models."""
    fields = config.fields()
    if {"d_model", "heads", "depth", "seq_len"} <= fields.keys():
        return dict(seq_len=fields["seq_len"], hidden=fields["d_model"],
                    heads=fields["heads"], layers=fields["depth"])
    hf_config = getattr(config, "hf_config", None)
    if hf_config is None or "seq_len" not in fields:
        return None
    cfg = hf_config()
    names = ("hidden_size", "num_attention_heads", "num_hidden_layers")
    if not all(isinstance(getattr(cfg, n, None), int) for n in names):
        return None
    return dict(seq_len=fields["seq_len"], hidden=cfg.hidden_size,
                heads=cfg.num_attention_heads, layers=cfg.num_hidden_layers)


@dataclasses.dataclass(frozen=True)
class ClosedForms:
    """One rank's figures by formula (bytes): ZeRO-3's model states at the paper's
    mixed-precision Adam (``zero3_paper_bytes``: 2+2+12 per parameter) and at this run's
    own bytes per parameter (``zero3_bytes``); Megatron's activations at the micro-batch
    without recompute (``megatron_none_bytes``: 34 s b h per layer, attention storing
    no s x s scores, as torch's fused attention and FlashAttention do;
    ``megatron_scores_bytes``: the paper's, with them) and with full recompute (None for
    a model without transformer sizes)."""

    params: int
    bytes_per_param: float                    # this run's: parameter + gradient + optimizer
    zero3_paper_bytes: int
    zero3_bytes: int
    megatron_none_bytes: int | None
    megatron_scores_bytes: int | None
    megatron_full_bytes: int | None

    def peak(self, recompute: str) -> int | None:
        """ZeRO-3 (this run's bytes) plus Megatron's activations: the closed forms'
        per-rank total, which the peak would be if nothing else were live."""
        act = self.megatron_none_bytes if recompute == "none" else self.megatron_full_bytes
        return None if act is None else self.zero3_bytes + act


# optimizer state per parameter, in units of the parameter's own bytes (memprop.measure's
# optimizers keep their state in the parameter's dtype)
OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2}


def closed_forms(config, batch_size: int, fsdp: FSDPConfig, *, optimizer: str = "adam",
                 dtype=torch.float32) -> ClosedForms:
    """The closed forms for ``config`` at ``batch_size`` examples per rank under
    ``fsdp``: ZeRO-3 over the ``shard`` ranks and Megatron's activations at TP degree
    ``fsdp.tp`` (no sequence parallelism: memprop's TP has none). Parameters are counted
    on a fake build (nothing allocated)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        params = sum(p.numel() for p in config.build(dtype=dtype).parameters())
    size = torch.empty((), dtype=dtype).element_size()
    if optimizer not in OPTIMIZER_STATES:
        raise ConfigError(f"memprop.sharded.closed_forms: optimizer {optimizer!r} is not "
                          f"allowed; choose one of: {', '.join(OPTIMIZER_STATES)}")
    states = OPTIMIZER_STATES[optimizer]
    per_param = size * (2 + states)
    zero = dict(params=params, stage=3, shards=fsdp.shard, tp=fsdp.tp)
    dims = transformer_dims(config)
    act: dict[tuple[str, bool], int | None] = {
        k: None for k in (("none", False), ("none", True), ("full", False))}
    if dims is not None:
        for recompute, scores in act:
            act[recompute, scores] = megatron_activation_bytes(
                seq_len=dims["seq_len"], batch=batch_size, hidden=dims["hidden"],
                heads=dims["heads"], layers=dims["layers"], tp=fsdp.tp,
                recompute=recompute, attention_scores=scores)
    return ClosedForms(params=params, bytes_per_param=per_param,
                       zero3_paper_bytes=zero_model_state_bytes(**zero),
                       zero3_bytes=zero_model_state_bytes(param_bytes=size, grad_bytes=size,
                                                          optimizer_bytes=size * states,
                                                          **zero),
                       megatron_none_bytes=act["none", False],
                       megatron_scores_bytes=act["none", True],
                       megatron_full_bytes=act["full", False])
