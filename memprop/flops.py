"""Count the FLOPs of the ops that run, with PyTorch's own per-op formulas.

``FlopCounter`` is ``torch.utils.flop_counter.FlopCounterMode`` without its per-module
breakdown: the same registry of formulas (``flop_registry``: a multiply-add counts 2),
the same decomposition of ops it has no formula for, the same totals. FlopCounterMode
tracks modules by wrapping every module's inputs and outputs in an autograd Function;
on a chain of thousands of blocks, freeing that graph recurses once per wrapper and
overflows the C stack (a depth-20000 MLP segfaulted). Totals are all memprop reports,
so it needs none of that.

NOTE [ Attention FLOPs on CPU ]
  torch's registry has formulas for the CUDA attention kernels (flash, efficient,
  cuDNN) but none for ``_scaled_dot_product_flash_attention_for_cpu`` and its backward,
  so FlopCounterMode counts CPU attention as free - and a plan that recomputes
  attention (as compile's partitioner does) would look free too. ``FlopCounter`` counts
  the CPU kernels with the same formulas torch uses for the CUDA ones
  (``sdpa_flop_count``: QKᵀ and AV, 2 FLOPs a multiply-add; causal masks not
  discounted), so CPU and CUDA count attention alike.

NOTE [ A step's work ]
  Beside FLOPs the counter tallies what a step's time also depends on: ``ops``, the aten
  calls that run (each costs a dispatch however small), and ``written``, the bytes of
  their outputs (what memory-bound pointwise ops cost). Views write nothing and are not
  counted. The planner's time model (memprop.checkpoint.planning.timing) prices a plan's
  recompute by these three numbers.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["FlopCounter", "FORMULAS"]


def _cpu_sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def _grouped_mm(mat_a, mat_b, *args, out_val=None, **kwargs) -> int:
    """Mixture-of-experts GEMMs (transformers' grouped experts): each output element
    sums over a's last dimension once, whatever the groups; with two 2-d operands the
    groups split that dimension instead (weight gradients: (G, M, N) out of K total)."""
    if mat_a.dim() == 2 and mat_b.dim() == 2:
        return 2 * mat_a.shape[0] * mat_a.shape[1] * mat_b.shape[1]
    return 2 * out_val.numel() * mat_a.shape[-1]


# torch's formulas, plus CPU attention (NOTE [ Attention FLOPs on CPU ]) and grouped
# GEMMs (torch has no formula for them: experts' FLOPs counted 0, their recompute free)
FORMULAS = {**flop_registry,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                _cpu_sdpa_backward,
            torch.ops.aten._grouped_mm: _grouped_mm}

# ops that only read metadata (fake tensors dispatch them too)
METADATA_QUERIES = {
    torch.ops.aten.is_contiguous.default, torch.ops.aten.is_contiguous.memory_format,
    torch.ops.aten.is_strides_like_format.default,
    torch.ops.aten.is_non_overlapping_and_dense.default, torch.ops.aten.size.default,
    torch.ops.aten.sym_size.default, torch.ops.aten.stride.default,
    torch.ops.aten.sym_stride.default, torch.ops.aten.storage_offset.default,
    torch.ops.aten.sym_storage_offset.default, torch.ops.aten.numel.default,
    torch.ops.aten.sym_numel.default, torch.ops.aten.dim.default, torch.ops.prim.layout.default,
}


class FlopCounter(TorchDispatchMode):
    """``with FlopCounter() as fc: ...``; then ``fc.total`` FLOPs (see module docstring),
    ``fc.ops`` aten calls run (after decomposition, metadata queries and views apart)
    and ``fc.written`` bytes their outputs hold (NOTE [ A step's work ])."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.ops = 0
        self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA_QUERIES:
            return NotImplemented
        if func not in FORMULAS and func is not torch.ops.prim.device.default:  # as torch
            with self:                        # count the ops it is made of
                out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
        out = func(*args, **kwargs)
        formula = FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        if not func.is_view:
            self.ops += 1
            self.written += sum(t.numel() * t.element_size()
                                for t in (out if isinstance(out, (tuple, list)) else (out,))
                                if isinstance(t, torch.Tensor))
        return out
