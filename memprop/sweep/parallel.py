"""A spec's ``[parallel]`` table: trials of a sharded step (FSDP2, HSDP, tensor
parallelism; memprop.sharded), each rank measured or predicted.

    [parallel]
    world_size = [1, 2, 4, 8, 64]   # every rank: replicate x shard x tp (or fsdp = [...])
    tp = 1                          # tensor-parallel degree (zoo transformer, hf: Llama)
    replicate = 1                   # HSDP: replicas of each shard group
    reshard_after_forward = true    # ZeRO-3 (true) or ZeRO-2 (false)
    mixed_precision = "none"        # or "bf16": bf16 parameters, fp32 reduction
    offload = false                 # FSDP2's CPUOffloadPolicy
    estimate = true                 # predict on a fake process group (default false:
                                    #   spawn world_size gloo processes)

Any value may be a list: the trials are the product of these lists and the [grid]'s
(``batch`` is then the batch per rank). ``fsdp`` is ``world_size``'s other name (as
``memprop profile --fsdp N``); FSDP2 is always on (tensor parallelism alone is
``memprop profile --tp M``). A sharded trial runs on CPU ranks, without autocast and
without a memory budget; the spec refuses ``[run] amp``, ``device = "cuda"``,
``budget`` and a ``[frontier]`` beside ``[parallel]``, and a ``tp`` that a model has no
plan for or that does not divide its heads, before any trial runs.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from torch._subclasses.fake_tensor import FakeTensorMode

from memprop.errors import ConfigError
from memprop.sharded.config import MIXED_PRECISION, FSDPConfig
from memprop.sharded.tensor_parallel import tp_plan
from memprop.sweep.spec_values import SpecError, choice, int_value, list_value, unknown_key

__all__ = ["Parallel", "PARALLEL_KEYS", "MAX_REAL_RANKS", "parse_parallel",
           "check_tensor_parallel"]

PARALLEL_KEYS = ("world_size", "fsdp", "tp", "replicate", "reshard_after_forward",
                 "mixed_precision", "offload", "estimate")
# a real trial starts one process per rank on one machine (on Ray: one node, NOTE
# [ A sharded trial on Ray ], memprop.sweep.ray_executor); more is a prediction's job
MAX_REAL_RANKS = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class Parallel:
    """How one trial is sharded: an ``FSDPConfig`` (memprop.sharded.config) and whether
    its ranks are ``predicted`` on a fake process group or run as real processes."""

    world_size: int
    tp: int = 1
    replicate: int = 1
    reshard_after_forward: bool = True
    mixed_precision: str | None = None
    offload: bool = False
    predicted: bool = False

    def fsdp(self) -> FSDPConfig:
        return FSDPConfig(world_size=self.world_size, tp=self.tp, replicate=self.replicate,
                          reshard_after_forward=self.reshard_after_forward,
                          mixed_precision=self.mixed_precision, offload=self.offload)

    def describe(self) -> str:
        how = "predicted" if self.predicted else "measured"
        return f"{self.fsdp().describe()} ({how})"


def _bool(path, key, value) -> bool:
    if not isinstance(value, bool):
        raise SpecError(path, key, f"{value!r} is not allowed; write true or false")
    return value


def _values(path, key: str, raw) -> tuple:
    """A key's values: a list (its grid) or one value."""
    return list_value(path, key, raw) if isinstance(raw, list) else (raw,)


def parse_parallel(path, raw, run: dict, *, frontier: bool, grid: dict) -> tuple[Parallel, ...]:
    """The ``[parallel]`` table of a spec as the product of its lists, each value and
    each combination checked (an ``FSDPConfig`` is built for each); ``SpecError`` naming
    the key, the value and what is allowed."""
    if not isinstance(raw, dict):
        raise SpecError(path, "parallel", "must be a table: [parallel]")
    for key in raw:
        if key not in PARALLEL_KEYS:
            raise unknown_key(path, "parallel.", key, PARALLEL_KEYS)
    if "world_size" in raw and "fsdp" in raw:
        raise SpecError(path, "parallel.fsdp", "is world_size's other name; give one of "
                        "world_size and fsdp, not both")
    size_key = "fsdp" if "fsdp" in raw else "world_size"
    if size_key not in raw:
        raise SpecError(path, "parallel.world_size", "missing; list the ranks, e.g. "
                        "world_size = [2, 4, 8]")
    _refuse_single_device(path, run, frontier=frontier, grid=grid)
    k = "parallel."
    sizes = tuple(int_value(path, k + size_key, v, 1, "a number of ranks, an integer")
                  for v in _values(path, k + size_key, raw[size_key]))
    axes: dict[str, tuple[Any, ...]] = {
        "world_size": sizes,
        "tp": tuple(int_value(path, k + "tp", v, 1, "a tensor-parallel degree, an integer")
                    for v in _values(path, k + "tp", raw.get("tp", 1))),
        "replicate": tuple(int_value(path, k + "replicate", v, 1, "a number of replicas, "
                                     "an integer")
                           for v in _values(path, k + "replicate", raw.get("replicate", 1))),
        "reshard_after_forward": tuple(
            _bool(path, k + "reshard_after_forward", v)
            for v in _values(path, k + "reshard_after_forward",
                             raw.get("reshard_after_forward", True))),
        "mixed_precision": tuple(
            None if choice(path, k + "mixed_precision", v, ("none", *MIXED_PRECISION)) == "none"
            else v for v in _values(path, k + "mixed_precision",
                                    raw.get("mixed_precision", "none"))),
        "offload": tuple(_bool(path, k + "offload", v)
                         for v in _values(path, k + "offload", raw.get("offload", False))),
        "predicted": tuple(_bool(path, k + "estimate", v)
                           for v in _values(path, k + "estimate", raw.get("estimate", False))),
    }
    points = [Parallel(**dict(zip(axes, values))) for values in itertools.product(*axes.values())]
    for p in points:
        try:
            p.fsdp()
        except ConfigError as exc:
            raise SpecError(path, f"{k}{size_key}", f"{size_key} = {p.world_size} with tp = "
                            f"{p.tp}, replicate = {p.replicate}: "
                            + str(exc).replace("memprop.sharded: ", "")) from None
        if not p.predicted and p.world_size > MAX_REAL_RANKS:
            raise SpecError(path, f"{k}{size_key}", f"{p.world_size} real ranks is more than "
                            f"the {MAX_REAL_RANKS} processes a trial starts on one machine; "
                            "add estimate = true to predict them on a fake process group")
    return tuple(points)


def check_tensor_parallel(path, pairs) -> None:
    """Each (model config, tp > 1) of the spec has a tensor-parallel plan that ``tp``
    divides evenly (``tp_plan``, built on fake tensors: nothing allocated); else a
    ``SpecError`` at ``parallel.tp`` naming the model and the degree."""
    distinct = {(repr(config), tp): (config, tp) for config, tp in pairs}
    for config, tp in distinct.values():
        try:
            with FakeTensorMode():
                tp_plan(config.build(), tp)
        except ConfigError as exc:
            raise SpecError(path, "parallel.tp", f"tp = {tp} with model {config.name}: "
                            + str(exc).replace("memprop.sharded: ", "")) from None


def _refuse_single_device(path, run: dict, *, frontier: bool, grid: dict) -> None:
    """What a sharded trial does not take (module docstring), named by its key."""
    if run.get("device") != "cpu":
        raise SpecError(path, "run.device", f"{run.get('device')!r} is not allowed with "
                        "[parallel]: sharded trials run on CPU ranks (gloo); use \"cpu\"")
    if run.get("amp") is not None or any(a is not None for a in grid.get("amp", ())):
        raise SpecError(path, "run.amp" if run.get("amp") else "grid.amp", "autocast is not "
                        "allowed with [parallel]; use [parallel] mixed_precision = \"bf16\"")
    if run.get("budget") is not None:
        raise SpecError(path, "run.budget", "a memory budget is not allowed with [parallel]: "
                        "sharded trials run without one; remove it")
    if frontier:
        raise SpecError(path, "frontier", "a frontier is not allowed with [parallel]: it "
                        "walks single-device trials; put it in a spec of its own")
