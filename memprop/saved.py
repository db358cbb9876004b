"""Record every tensor autograd stores for backward during a forward pass.

    with SavedTensorRecorder(model, inputs=batch_inputs) as rec:
        loss = model.objective(model(x), y)
        rec.add_root(loss)            # names the grad_fn that saved each tensor
    rec.saved_bytes, rec.frame(), rec.per_module()

NOTE [ What counts as a stored intermediate ]
  * A stored intermediate is a tensor that reaches the pack hook of
    ``torch.autograd.graph.saved_tensors_hooks`` while the recorder is active: exactly
    what autograd keeps for backward.
  * Deduplicated by storage: a ReLU output that is also the next Linear's saved input
    counts once, and a view (``W.t()``) counts as the storage it views.
  * Its size is ``untyped_storage().nbytes()``: the whole storage, what the allocator
    holds, even when the saved tensor views only part of it.
  * Kind: ``parameter`` / ``buffer`` (the model's own storages: autograd saves weights
    too, but they would exist anyway, so they are counted apart), ``input`` (storages of
    the batch), ``activation`` (everything else). ``saved_bytes`` = activation + input.
  * Attributed to the module (fully qualified name) running when the storage was first
    saved, and to the op (``grad_fn`` name) that saved it first; the op names come from
    a walk of the autograd graph (``add_root``) that reads each node's raw saved
    tensors without unpacking them.
  * Under non-reentrant checkpointing, tensors saved inside a checkpointed region are
    packed by the checkpoint's own hooks; only the checkpoint's inputs reach an outer
    hook, and those are exactly what is retained. The same rule measures both modes.
    ``torch.utils.checkpoint`` keeps its *keyword* arguments in a closure, past every
    hook (transformers' own gradient checkpointing passes masks and rotary cos/sin so):
    the graph walk (``add_root``) finds each checkpoint's frame and records the tensors
    of its keyword arguments too (op ``checkpoint:kwargs``), so stored bytes count
    everything a checkpoint keeps alive. (memprop's strategies pass every tensor
    positionally: NOTE [ How a segment is checkpointed without changing the model ].)
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Iterable

import pandas as pd
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from memprop._module_scope import ModuleScope

__all__ = ["SavedRecord", "SavedTensorRecorder", "KINDS", "report_stored", "batch_tensors"]

KINDS = ("activation", "input", "parameter", "buffer")


@dataclasses.dataclass
class SavedRecord:
    """One distinct storage autograd saved. ``nbytes``: storage bytes (see NOTE)."""

    order: int               # 0-based order of first saving
    module: str              # fully qualified name of the module running ("" = top level)
    op: str                  # grad_fn name of the first node that saved it ("?" = not walked)
    shape: tuple[int, ...]   # shape of the first tensor saved from this storage
    dtype: str
    kind: str                # one of KINDS
    nbytes: int
    saves: int = 1           # how many times autograd saved (a view of) this storage
    op_seq: int | None = dataclasses.field(default=None, repr=False)  # sequence_nr of `op`


# Instruments that want to hear of tensors stored for backward *outside* autograd's
# pack hooks (selective checkpointing keeps its saved op outputs in a cache of its own).
_STORE_OBSERVERS: list = []


def report_stored(tensor: torch.Tensor, op: str) -> None:
    """Tell active recorders and trackers that ``tensor`` is kept for backward by ``op``
    without passing through a pack hook (see memprop.checkpoint.forms.selective)."""
    for observer in _STORE_OBSERVERS:
        observer.observe_stored(tensor, op)


class _Packed:
    """What the pack hook hands autograd: the tensor itself plus its record."""

    __slots__ = ("tensor", "record")

    def __init__(self, tensor: torch.Tensor, record: SavedRecord):
        self.tensor, self.record = tensor, record


def _closure(fn) -> dict:
    """A function's closure variables by name (empty cells and non-functions: none)."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    out = {}
    for name, cell in zip(code.co_freevars if code else (), cells):
        try:
            out[name] = cell.cell_contents
        except ValueError:     # an empty cell
            pass
    return out


def storage_key(t: torch.Tensor) -> int:
    """Identity of the StorageImpl behind ``t`` (stable while the storage lives)."""
    return t.untyped_storage()._cdata


def batch_tensors(batch) -> list[torch.Tensor]:
    """Every tensor in a batch of any structure (tuple, dict, nested; a mapping that is
    not a dict, as transformers' ``BatchEncoding``, as its dict)."""
    return [t for t in tree_flatten(_plain_structure(batch))[0] if isinstance(t, torch.Tensor)]


def _plain_structure(batch):
    """``batch`` with mappings that are not dicts turned into dicts, so pytree sees in."""
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        return {k: _plain_structure(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_plain_structure(v) for v in batch)
    return batch


def storage_keys(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {storage_key(t) for t in tensors if isinstance(t, torch.Tensor)}


class SavedTensorRecorder:
    """Context manager recording the distinct storages autograd saves (see NOTE above).

    ``model`` (optional) names modules and marks parameter / buffer storages;
    ``inputs`` marks the batch's storages as kind ``input``."""

    def __init__(self, model: nn.Module | None = None, *, inputs: Iterable = ()):
        self.model = model
        self.records: list[SavedRecord] = []
        self._by_key: dict[int, tuple[weakref.ref, SavedRecord]] = {}
        self._params: set[int] = set()
        self._buffers: set[int] = set()
        if model is not None:
            self._params = storage_keys(model.parameters())
            self._buffers = storage_keys(model.buffers())
        self._inputs = storage_keys(inputs)
        self._scope = ModuleScope(model)
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None   # while entered

    # -- hooks -------------------------------------------------------------------
    def _kind(self, t: torch.Tensor, key: int) -> str:
        if key in self._params:
            return "parameter"
        if key in self._buffers:
            return "buffer"
        if key in self._inputs:
            return "input"
        if self.model is None and t.is_leaf and t.requires_grad:
            return "parameter"
        return "activation"

    def _pack(self, t: torch.Tensor) -> _Packed:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._by_key.get(key)
        if entry is not None and entry[0]() is not None:
            record = entry[1]
            record.saves += 1
        else:
            record = SavedRecord(
                order=len(self.records),
                module=self._scope.current,
                op="?", shape=tuple(t.shape), dtype=str(t.dtype).replace("torch.", ""),
                kind=self._kind(t, key), nbytes=storage.nbytes())
            self.records.append(record)
            self._by_key[key] = (weakref.ref(storage), record)
        return _Packed(t, record)

    def observe_stored(self, t: torch.Tensor, op: str) -> None:
        record = self._pack(t).record
        if record.op == "?":
            record.op = op

    @staticmethod
    def _unpack(packed: _Packed) -> torch.Tensor:
        return packed.tensor

    def _record_checkpoint_kwargs(self, unpack_hook, frames: set) -> None:
        """Record the tensors a non-reentrant checkpoint keeps in its closure (NOTE)."""
        frame = _closure(unpack_hook).get("frame")
        if frame is None or id(frame) in frames:
            return
        frames.add(id(frame))
        cells = _closure(getattr(frame, "recompute_fn", None))
        fn = cells.get("fn")          # a functools.partial carries keywords too (transformers)
        kept = [cells.get("kwargs"), getattr(fn, "args", None), getattr(fn, "keywords", None)]
        for t in tree_flatten(kept)[0]:
            if isinstance(t, torch.Tensor):
                record = self._pack(t).record
                if record.op == "?":
                    record.op = "checkpoint:kwargs"

    def __enter__(self) -> "SavedTensorRecorder":
        self._scope.__enter__()
        _STORE_OBSERVERS.append(self)
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        hooks.__enter__()
        self._hooks = hooks
        return self

    def __exit__(self, *exc) -> None:
        assert self._hooks is not None, "SavedTensorRecorder.__exit__ without __enter__"
        self._hooks.__exit__(*exc)
        _STORE_OBSERVERS.remove(self)
        self._scope.__exit__(*exc)

    # -- op attribution ----------------------------------------------------------
    def add_root(self, *roots: torch.Tensor) -> None:
        """Walk the autograd graph behind ``roots`` (before backward frees it) and name
        the ``grad_fn`` that saved each recorded storage: the node created first (lowest
        sequence number) among those that saved it.

        The walk reads each node's raw saved tensors and keeps only those this recorder
        packed (their ``unpack_hook`` is ours); it unpacks nothing, so another hook's
        tensors (a checkpoint's, an offload's) are never recomputed or moved by it."""
        seen: set = set()
        frames: set = set()
        stack = [r.grad_fn for r in roots if isinstance(r, torch.Tensor)]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            name, seq = node.name(), node._sequence_nr()
            for attr in dir(node):
                if not attr.startswith("_raw_saved_"):
                    continue
                try:
                    raw = getattr(node, attr)
                except RuntimeError:   # freed by an earlier backward
                    continue
                for item in raw if isinstance(raw, (list, tuple)) else (raw,):
                    hook = getattr(item, "unpack_hook", None)
                    if hook is not None and hook != self._unpack:
                        self._record_checkpoint_kwargs(hook, frames)
                    packed = getattr(item, "data", None) if hook == self._unpack else None
                    if isinstance(packed, _Packed):
                        record = packed.record
                        if record.op_seq is None or seq < record.op_seq:
                            record.op, record.op_seq = name, seq
            stack.extend(fn for fn, _ in node.next_functions)

    # -- results -----------------------------------------------------------------
    def bytes_of(self, *kinds: str) -> int:
        return sum(r.nbytes for r in self.records if r.kind in kinds)

    @property
    def saved_bytes(self) -> int:
        """Bytes of distinct stored intermediates: activations + inputs (NOTE above)."""
        return self.bytes_of("activation", "input")

    @property
    def saved_count(self) -> int:
        return sum(r.kind in ("activation", "input") for r in self.records)

    @property
    def param_saved_bytes(self) -> int:
        """Bytes of parameter and buffer storages autograd saved (counted apart)."""
        return self.bytes_of("parameter", "buffer")

    def frame(self) -> pd.DataFrame:
        """One row per distinct saved storage, in order of first saving."""
        rows = [dict(order=r.order, module=r.module, op=r.op, shape=str(tuple(r.shape)),
                     dtype=r.dtype, kind=r.kind, saved_bytes=r.nbytes, saves=r.saves)
                for r in self.records]
        return pd.DataFrame(rows, columns=["order", "module", "op", "shape", "dtype", "kind",
                                           "saved_bytes", "saves"])

    def per_module(self) -> pd.DataFrame:
        """Per module (in order of first saving): stored bytes by kind and counts."""
        return per_module_table(self.frame())


def per_module_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Group a ``SavedTensorRecorder.frame()`` by module: bytes per kind, count, total."""
    cols = ["module", *(f"{k}_bytes" for k in KINDS), "saved_count", "saved_bytes"]
    if frame.empty:
        return pd.DataFrame(columns=cols)
    table = frame.pivot_table(index="module", columns="kind", values="saved_bytes",
                              aggfunc="sum", fill_value=0, sort=False)
    table = table.reindex(columns=list(KINDS), fill_value=0)
    table.columns = [f"{k}_bytes" for k in table.columns]
    stored = frame[frame.kind.isin(["activation", "input"])]
    table["saved_count"] = stored.groupby("module", sort=False).size()
    table["saved_count"] = table["saved_count"].fillna(0).astype(int)
    table["saved_bytes"] = table["activation_bytes"] + table["input_bytes"]
    first = frame.groupby("module", sort=False)["order"].min()
    table = table.loc[first.sort_values().index]
    return table.reset_index()[cols]
