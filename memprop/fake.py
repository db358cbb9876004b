"""Fake-tensor twins of real models and batches: same shapes, dtypes and storage sizes,
no data, no memory. Used to predict a step (memprop.estimate) and to check a
checkpointing plan (memprop.checkpoint.planning.planner) without running it. Where a fake op
allocates otherwise than the kernel does, a rule here allocates as the kernel does
(NOTE [ Fake grouped GEMMs allocate what the kernel allocates ], NOTE [ CPU losses keep
their elementwise buffer ], NOTE [ oneDNN RNN workspaces, measured ]).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

__all__ = ["is_fake", "fake_mode_of", "fake_copy", "fake_batch", "grouped_mm_output",
           "KernelStorages", "fake_target", "conversions_a_fake_build_survives"]


# NOTE [ Fake grouped GEMMs allocate what the kernel allocates ]
#   Mixture-of-experts layers in transformers (``experts_implementation="grouped_mm"``,
#   the default of every ``@use_experts_implementation`` model: Mixtral, Qwen2-MoE,
#   OLMoE, DeepSeek-V3, ...) run each expert projection as one ``aten._grouped_mm``
#   over all (token, expert) pairs, sorted by expert, with the per-expert boundaries in
#   an int32 ``offs`` tensor. torch's meta kernel for it (torch/_meta_registrations.py)
#   implements the CUDA fast path's checks only: it refuses float32 and float16 inputs
#   ("Expected inputs of BF16 type"), which every real kernel accepts (the CPU kernel
#   and the CUDA fallback loop over the groups with ``mm_out``), and on a build without
#   CUDA it allocates the output contiguous, where the kernel
#   (``create_grouped_gemm_output_tensor``, aten/src/ATen/native/GroupedMMUtils.h) pads
#   the row stride to 16 bytes on every build but ROCm. So a fake step of a float32 MoE
#   model failed, and a bf16 one would have been off by the padding. The fake-tensor
#   rule registered below (``grouped_mm_output``) checks the inputs as the kernel does
#   (``_grouped_mm_validate_inputs``) and allocates the output exactly as the kernel
#   does: same sizes, strides and storage bytes. Its shape is fixed by the operands:
#   the number of (token, expert) pairs, never how they split among the experts, so
#   the bytes of a grouped-GEMM MoE step do not depend on the routing (NOTE [ MoE
#   routing and the estimate ], memprop.measure).
#   The rule applies to fake tensors only (FakeTensorMode's op implementations, which
#   run before meta kernels); real and meta tensors are untouched. It is registered
#   when memprop.fake is imported, so the estimate and the planner's fake twins both
#   have it.

def grouped_mm_output(mat_a: torch.Tensor, mat_b: torch.Tensor, offs=None, bias=None,
                      out_dtype=None) -> torch.Tensor:
    """The output ``aten._grouped_mm(mat_a, mat_b, offs, bias, out_dtype)`` allocates,
    allocated with ``mat_a.new_empty_strided`` (NOTE [ Fake grouped GEMMs allocate what
    the kernel allocates ])."""
    allowed = (torch.float32, torch.bfloat16, torch.float16)
    for name, mat in (("mat_a", mat_a), ("mat_b", mat_b)):
        # torch._check calls the message only on failure, within this iteration; the
        # default arguments bind this iteration's values all the same (ruff B023)
        torch._check(mat.dtype in allowed, lambda name=name, mat=mat: f"Expected {name} to be "
                     f"Float32, BFloat16 or Float16 matrix, got {mat.dtype}")
        torch._check(mat.dim() in (2, 3), lambda name=name: f"{name} has to be 2 or 3d")
        end = mat.dim() - 1
        align = 16 // mat.element_size()
        mat_size, mat_stride = mat.shape, mat.stride()
        if mat_stride[end - 1] == 1 and mat_stride[end] >= max(1, mat_size[end - 1]):
            torch._check(mat_stride[end] % align == 0,
                         lambda: "strides should be multiple of 16 bytes")
        elif mat_stride[end] == 1 and mat_stride[end - 1] >= max(1, mat_size[end]):
            torch._check(mat_stride[end - 1] % align == 0,
                         lambda: "strides should be multiple of 16 bytes")
        else:
            torch._check(False, lambda mat_size=mat_size, mat_stride=mat_stride:
                         f"Invalid strides/sizes, got {list(mat_stride)} for "
                         f"strides and {list(mat_size)} for sizes")
    a2, b2 = mat_a.dim() == 2, mat_b.dim() == 2
    if not a2 or not b2:
        torch._check(mat_a.size(-1) == mat_b.size(-2),
                     lambda: "contraction dimension of mat_a and mat_b must match")
    torch._check((offs is not None) == (a2 or b2), lambda: "Have to provide offsets if there "
                 "is a 2d matrix, or no offset if both matrices are 3d")
    if offs is not None:
        torch._check(offs.dim() == 1, lambda: "offs has to be 1D")
        torch._check(offs.dtype == torch.int32, lambda: "Offsets have to be int32")
    torch._check(bias is None, lambda: "Bias not supported yet")
    dtype = out_dtype or mat_a.dtype
    torch._check(dtype == mat_a.dtype,
                 lambda: "Grouped gemm output dtype must match `mat_a` dtype")
    if a2:
        if b2:
            size = [offs.size(0), mat_a.size(0), mat_b.size(1)]
        else:
            torch._check(offs.size(0) == mat_b.size(0), lambda: "matrix batch sizes have to match")
            size = [mat_a.size(0), mat_b.size(-1)]
    elif b2:
        torch._check(offs.size(0) == mat_a.size(0), lambda: "matrix batch sizes have to match")
        size = [mat_a.size(1), mat_b.size(1)]
    else:
        torch._check(mat_a.size(0) == mat_b.size(0), lambda: "batched dimension has to match")
        size = [mat_a.size(0), mat_a.size(1), mat_b.size(-1)]
    if torch.version.hip:
        return mat_a.new_empty(size, dtype=dtype)
    align = 16 // dtype.itemsize
    padded = (size[-1] + align - 1) // align * align
    stride = [padded, 1] if a2 != b2 else [size[1] * padded, padded, 1]
    return mat_a.new_empty_strided(size, stride, dtype=dtype)


def _register_fake_rules() -> None:
    from torch._subclasses import fake_impls

    op = torch.ops.aten._grouped_mm.default
    if op in fake_impls.op_implementations_dict:      # torch has one of its own: keep it
        return

    def fake_grouped_mm(fake_mode, func, mat_a, mat_b, offs=None, bias=None, out_dtype=None):
        return grouped_mm_output(mat_a, mat_b, offs, bias, out_dtype)

    fake_impls.register_op_impl(op)(fake_grouped_mm)


if hasattr(torch.ops.aten, "_grouped_mm"):
    _register_fake_rules()


# NOTE [ oneDNN RNN workspaces, measured ]
#   On CPU, nn.LSTM runs each layer as ``aten.mkldnn_rnn_layer`` (nn.GRU, measured, runs
#   other kernels that the fake tensors size right), whose
#   fourth output is a oneDNN workspace that autograd saves for backward. Its size is
#   oneDNN's choice (it depends on the kernel oneDNN picks for this CPU, not only on the
#   shapes): for (seq 50, batch 32, input 64, hidden 128), float32, 12,554,240 bytes here,
#   where torch's meta kernel returns 0 bytes. A user's 3-layer LSTM step measured a
#   44.8 MB peak that the estimate put at 7.1 MB. So the fake rule below measures it: it
#   runs the real kernel once per distinct call (shapes, dtypes, flags) on zeros of the
#   same shapes, outside the fake mode, reads the workspace's bytes and gives the fake
#   call a workspace of exactly that size (the other outputs as the meta kernel has
#   them). The estimate then holds for this machine's oneDNN; that one layer's forward
#   is really allocated once while predicting (a layer, not the step).

_RNN_OUTPUTS: dict = {}


def _rnn_layer_outputs(args) -> list[tuple | None]:
    """(sizes, strides, dtype, storage bytes) of each output the real CPU
    ``mkldnn_rnn_layer`` returns for ``args`` (fake tensors and flags), measured once per
    signature (NOTE above)."""
    key = (torch.is_grad_enabled(),) + tuple(
        (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else
        (tuple(a) if isinstance(a, list) else a) for a in args)
    if key not in _RNN_OUTPUTS:
        # grad mode as the call's: the kernel keeps its workspace only where autograd
        # may need it (the zeros require no gradient, so nothing is recorded)
        with unset_fake_temporarily():
            real = [torch.zeros(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor) else a
                    for a in args]
            outs = torch.ops.aten.mkldnn_rnn_layer.default(*real)
            _RNN_OUTPUTS[key] = [None if o is None else (tuple(o.shape), o.stride(), o.dtype,
                                                         o.untyped_storage().nbytes())
                                 for o in outs]
    return _RNN_OUTPUTS[key]


def _register_rnn_rule() -> None:
    from torch._subclasses import fake_impls

    op = torch.ops.aten.mkldnn_rnn_layer.default
    if op in fake_impls.op_implementations_dict:      # torch has one of its own: keep it
        return

    def fake_rnn_layer(fake_mode, func, *args, **kwargs):
        if kwargs or args[0].device.type != "cpu":
            raise NotImplementedError        # the meta kernel's answer (not measured)
        outs: list = []
        for made in _rnn_layer_outputs(args):
            if made is None:
                outs.append(None)
                continue
            size, stride, dtype, nbytes = made
            storage = args[0].new_empty(nbytes, dtype=torch.uint8)
            outs.append(storage.view(dtype).as_strided(size, stride) if size else
                        storage.view(dtype).as_strided((), ()))
        return tuple(outs)

    fake_impls.register_op_impl(op)(fake_rnn_layer)


if hasattr(torch.ops.aten, "mkldnn_rnn_layer"):
    _register_rnn_rule()


# NOTE [ CPU losses keep their elementwise buffer ]
#   On CPU, torch's mse_loss, smooth_l1_loss (beta > 0), binary_cross_entropy and
#   soft_margin_loss, reduced ("mean" or "sum"), return the 0-dim loss in a storage the
#   size of the elementwise loss: F.mse_loss of two (16, 5) float32 tensors is a 0-dim
#   tensor over 320 bytes (measured, torch 2.13; huber_loss, l1_loss, cross_entropy,
#   nll_loss, kl_div and binary_cross_entropy_with_logits return 4 bytes). That storage
#   lives as long as the loss, through backward. FakeTensorMode runs these ops as their
#   Python decompositions (torch._decomp), whose result is 4 bytes, so an estimate was
#   numel x itemsize - 4 bytes below the measured peak (316 B for that batch).
#   ``KernelStorages``, a dispatch mode the estimate runs under (below the tracker, above
#   the fake tensors), gives such a fake CPU result the kernel's storage: a 0-dim view of
#   numel x itemsize bytes. Other devices keep the decomposition's (not measured here).

_SMOOTH_L1 = torch.ops.aten.smooth_l1_loss.default
_BUFFERED_CPU_LOSSES = (torch.ops.aten.mse_loss.default, _SMOOTH_L1,
                        torch.ops.aten.binary_cross_entropy.default,
                        torch.ops.aten.soft_margin_loss.default)


class KernelStorages(TorchDispatchMode):
    """Fake results sized as the kernel sizes them (NOTE [ CPU losses keep their
    elementwise buffer ]); every other op passes through unchanged."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in _BUFFERED_CPU_LOSSES or not isinstance(out, FakeTensor) or (
                out.device.type != "cpu" or out.dim() != 0):
            return out                        # reduction "none" has the elementwise shape
        beta = kwargs.get("beta", args[3] if len(args) > 3 else 1.0)
        if func is _SMOOTH_L1 and beta == 0:
            return out                        # the kernel runs l1_loss: 4 bytes
        numel = torch.broadcast_shapes(args[0].shape, args[1].shape).numel()
        return out.new_empty(numel).as_strided((), ())


# NOTE [ A model that converts itself while it is built ]
#   Some architectures call ``Module.to`` on a submodule inside ``__init__`` (inkling's
#   key/value projection: ``nn.Conv1d(...).to(dtype=torch.float32)``; deepseek_v4's and
#   hy_v4's hyper-connections). ``Module._apply`` swaps each fake parameter with its
#   converted copy (``torch.utils.swap_tensors``), and the swap fails on any fake
#   tensor, which its mode holds a weak reference to ("_apply(): Couldn't swap
#   Conv1d.weight"), even when the conversion changes nothing. So the real model built
#   and its fake twin did not: the estimate raised. While a model is built, ``Module.to``
#   on a module holding fake tensors converts by replacement instead: each parameter
#   becomes a new ``Parameter`` of the converted tensor (the same one where nothing
#   changes), each buffer its converted tensor, one conversion per tensor however many
#   submodules share it - what ``Module.to`` does to real tensors, by other means.
#   Real modules run torch's own.

def _convert_fake(module: nn.Module, *args, **kwargs) -> nn.Module:
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)

    def convert(t: torch.Tensor) -> torch.Tensor:
        floating = t.is_floating_point() or t.is_complex()
        with torch.no_grad():
            return t.to(device, dtype if floating else None, non_blocking,
                        memory_format=memory_format or torch.preserve_format)

    done: dict[int, torch.Tensor] = {}
    for m in module.modules():
        tables: tuple[tuple[dict, bool], ...] = ((m._parameters, True), (m._buffers, False))
        for table, wrap in tables:
            for key, t in table.items():
                if t is None:
                    continue
                if id(t) not in done:
                    new = convert(t)
                    done[id(t)] = t if new is t else (
                        nn.Parameter(new, requires_grad=t.requires_grad) if wrap else new)
                table[key] = done[id(t)]
    return module


_building = threading.local()           # depth of conversions_a_fake_build_survives
_torch_to = nn.Module.to


def _to(module, *args, **kwargs):
    """``Module.to``, by replacement on a module holding fake tensors while one is built."""
    if getattr(_building, "depth", 0) and any(isinstance(t, FakeTensor) for t in
                                              itertools.chain(module.parameters(),
                                                              module.buffers())):
        return _convert_fake(module, *args, **kwargs)
    return _torch_to(module, *args, **kwargs)


@contextlib.contextmanager
def conversions_a_fake_build_survives():
    """While building a model (in this thread): ``Module.to`` on fake tensors converts
    by replacement (NOTE [ A model that converts itself while it is built ]). The
    wrapper is installed once and stays: outside a build it is torch's own, so threads
    entering and leaving in any order never leave another's patch behind."""
    nn.Module.to = _to   # type: ignore[method-assign]
    _building.depth = getattr(_building, "depth", 0) + 1
    try:
        yield
    finally:
        _building.depth -= 1


def is_fake(model_or_tensor) -> bool:
    if isinstance(model_or_tensor, nn.Module):
        return any(isinstance(p, FakeTensor) for p in model_or_tensor.parameters())
    return isinstance(model_or_tensor, FakeTensor)


def fake_mode_of(model: nn.Module) -> FakeTensorMode | None:
    for p in model.parameters():
        if isinstance(p, FakeTensor):
            return p.fake_mode
    return None


def fake_copy(model: nn.Module, mode: FakeTensorMode, *,
              keep_strategy: bool = False) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake tensors of ``mode``.

    ``deepcopy`` is seeded with the fake twins, so no real weight is ever copied.
    Checkpointing patches (instance ``forward`` attributes) are not carried over: copy
    the plain model. ``keep_strategy=True`` copies them too, as ``deepcopy`` copies a
    checkpointed model (NOTE [ A strategy travels with the model ],
    memprop.checkpoint.forms.patch): the twin runs the strategy the model runs (what
    ``estimate(model, batch)`` predicts). Works inside ``mode`` or outside it."""
    memo = {}
    with unset_fake_temporarily():           # the real model is read, never faked in place
        for t in [*model.parameters(), *model.buffers()]:
            fake = mode.from_tensor(t.detach())
            memo[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) \
                if isinstance(t, nn.Parameter) else fake
        clone = copy.deepcopy(model, memo)
    if not keep_strategy:
        for module in clone.modules():   # never carry a strategy's patches over
            for key in ("forward", "_memprop_forward", "_memprop_applied"):
                module.__dict__.pop(key, None)
    return clone


def fake_batch(batch, mode: FakeTensorMode):
    """``batch`` with every tensor a fake tensor of ``mode`` (inside ``mode`` or outside)."""
    with unset_fake_temporarily():
        return tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t,
                        batch)


def fake_target(model: nn.Module, batch):
    """(fake mode, model, batch) on fake tensors: the model itself if already fake,
    else a fake copy (no memory used)."""
    given = fake_mode_of(model)
    mode = given or FakeTensorMode()
    if given:
        return mode, model, batch
    return mode, fake_copy(model, mode), fake_batch(batch, mode)
