"""Tensor parallelism: ``parallelize_module`` with colwise/rowwise plans (Megatron's
split of attention and MLP) for the zoo transformer and ``hf:`` Llama-family models.

    apply_tp(model, tp_mesh(mesh))          # before fully_shard, as torchtitan does

Plans (``tp_plan``), per block:
  zoo ``transformer``  attn.qkv fused colwise (``FusedQKVColwise``), attn.proj rowwise,
                       mlp.0 colwise, mlp.2 rowwise
  hf Llama family      self_attn.{q,k,v}_proj colwise, self_attn.o_proj rowwise,
                       mlp.{gate,up}_proj colwise, mlp.down_proj rowwise
Everything else (embeddings, norms, the head) stays whole on every tensor-parallel
rank, its input and output replicated; no sequence parallelism, no loss parallelism.
Each rank runs ``heads / tp`` heads and ``1 / tp`` of the MLP's hidden units; the
attention modules find their local head count from the tensors (``view(..., -1,
head_dim)``), so nothing else changes. Degrees that do not divide the heads (and the
key-value heads, the MLP width) are refused: every rank then holds the same shapes.

NOTE [ Tensor-parallel weights without a scatter ]
  ``parallelize_module(..., src_data_rank=None)``: every rank built the same weights
  from the same seed (NOTE [ One rank, two passes ], memprop.sharded.step), so each
  takes its own slice of its own copy; no collective runs while sharding (the default,
  ``src_data_rank=0``, scatters rank 0's weights), and a real and a predicted rank
  start their step with the same tensors alive.

NOTE [ The fused qkv projection ]
  The zoo transformer computes q, k and v with one Linear of 3*C outputs, split in
  three. A plain colwise split would give rank 0 all of q and part of k. So
  ``FusedQKVColwise`` gives rank m the m-th of ``tp`` slices of each of q, k and v
  (its heads), side by side: its local weight is ``(3*C/tp, C)``, and the module's
  ``chunk(3)`` of the local output is this rank's q, k and v. The DTensor says
  ``Shard(0)`` of a ``(3*C, C)`` weight: its global rows are those of the unsharded
  model permuted (rank-major), the same network with its rows renumbered; what each
  rank holds, computes and stores is exactly Megatron's split.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from memprop.errors import ConfigError
from memprop.models.transformer import Transformer

__all__ = ["apply_tp", "tp_plan", "tp_local_shapes", "FusedQKVColwise"]


class FusedQKVColwise(ColwiseParallel):
    """Colwise for a Linear whose outputs are ``[q; k; v]`` (NOTE [ The fused qkv
    projection ])."""

    def _partition_linear_fn(self, name, module, device_mesh):
        n, m = device_mesh.size(), device_mesh.get_local_rank()
        for pname, param in module.named_parameters():
            local = torch.cat([part.chunk(n, 0)[m] for part in param.detach().chunk(3, 0)])
            dist = DTensor.from_local(local, device_mesh, [Shard(0)], run_check=False,
                                      shape=param.shape, stride=param.stride())
            module.register_parameter(pname, nn.Parameter(dist, param.requires_grad))


def _zoo_plan(model: Transformer, tp: int) -> dict[str, ParallelStyle]:
    cfg = model.cfg
    if cfg.heads % tp:
        raise ConfigError(f"memprop.sharded: tp = {tp} does not divide the transformer's "
                          f"heads = {cfg.heads}; choose a divisor of {cfg.heads}")
    plan: dict[str, ParallelStyle] = {}
    for i in range(len(model.blocks)):
        plan.update({f"blocks.{i}.attn.qkv": FusedQKVColwise(),
                     f"blocks.{i}.attn.proj": RowwiseParallel(),
                     f"blocks.{i}.mlp.0": ColwiseParallel(),
                     f"blocks.{i}.mlp.2": RowwiseParallel()})
    return plan


# module name patterns of the Llama family (llama, mistral, qwen2, ...) -> style class
_LLAMA: dict[str, type[ColwiseParallel] | type[RowwiseParallel]] = {
    "*.self_attn.q_proj": ColwiseParallel, "*.self_attn.k_proj": ColwiseParallel,
    "*.self_attn.v_proj": ColwiseParallel, "*.self_attn.o_proj": RowwiseParallel,
    "*.mlp.gate_proj": ColwiseParallel, "*.mlp.up_proj": ColwiseParallel,
    "*.mlp.down_proj": RowwiseParallel}


def _llama_plan(model: nn.Module, tp: int) -> dict[str, ParallelStyle]:
    config = getattr(model, "config", None)
    counts = {key: getattr(config, key, None) for key in
              ("num_attention_heads", "num_key_value_heads", "intermediate_size")}
    bad = {k: v for k, v in counts.items() if isinstance(v, int) and v % tp}
    if bad:
        raise ConfigError(f"memprop.sharded: tp = {tp} does not divide the model's "
                          + ", ".join(f"{k} = {v}" for k, v in bad.items())
                          + "; choose a degree that divides each")
    plan: dict[str, ParallelStyle] = {}
    for name, module in model.named_modules():
        for pattern, style in _LLAMA.items():
            if fnmatch.fnmatch(name, pattern) and isinstance(module, nn.Linear):
                plan[name] = style()
    return plan


def tp_plan(model: nn.Module, tp: int) -> dict[str, ParallelStyle]:
    """Module name -> parallel style for ``model`` at degree ``tp`` (the module's
    docstring); ``ConfigError`` for a model without a plan or a degree that does not
    divide its heads."""
    plan = _zoo_plan(model, tp) if isinstance(model, Transformer) else _llama_plan(model, tp)
    if not plan:
        raise ConfigError(f"memprop.sharded: no tensor-parallel plan for "
                          f"{type(model).__name__}; tp > 1 takes the zoo transformer or an "
                          "hf: Llama-family model (q/k/v/o_proj, gate/up/down_proj)")
    return plan


def apply_tp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """``parallelize_module`` of ``model`` over the 1-D tensor-parallel ``mesh`` with
    ``tp_plan`` (NOTE [ Tensor-parallel weights without a scatter ])."""
    return parallelize_module(model, mesh, tp_plan(model, mesh.size()), src_data_rank=None)


def tp_local_shapes(model: nn.Module, tp: int) -> list[tuple[int, ...]]:
    """The shape of each parameter (registration order) on every tensor-parallel rank:
    colwise splits dim 0 (weight and bias), rowwise dim 1 of the weight (its bias
    whole). ``tp_plan`` refuses uneven degrees, so every rank has these shapes."""
    styles = tp_plan(model, tp) if tp > 1 else {}
    shapes, seen = [], set()
    for mname, module in model.named_modules():
        style = styles.get(mname)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:                   # tied: counted once, as parameters() does
                continue
            seen.add(id(p))
            shape = list(p.shape)
            if isinstance(style, ColwiseParallel):          # FusedQKVColwise too
                shape[0] //= tp
            elif isinstance(style, RowwiseParallel) and pname == "weight":
                shape[1] //= tp
            shapes.append(tuple(shape))
    return shapes
