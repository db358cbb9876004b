"""A deep model's per-rank prediction from the same model at 3, 4 and 5 layers.

    s = predict(LLAMA_7B, 1, world_size=512, layers="extrapolate")
    s.extrapolated_from      # (3, 4, 5), or None where the whole model was predicted

NOTE [ Predicting a deep model from three shallow ones ]
  A predicted rank runs the whole model on fake tensors (memprop.sharded.prediction):
  for a 7B Llama (32 layers, seq 4096) at 512 ranks that is five rank layouts of
  several seconds each on this machine, most of it FakeTensorMode's dispatch, layer by
  layer. The layers of such a model are alike: each adds the same parameters, shards,
  gradients, optimizer state and stored activations to every figure, and the
  all-gather buffers, logits and temporaries around them do not change with depth. So
  past the first few layers each figure ``f`` of a rank is linear in the layer count
  ``L``: ``f(L) = f(5) + (L - 5) * (f(5) - f(4))``. Not from 2 layers: measured on the
  zoo transformer under FSDP2 at 4 ranks, the temporaries at the peak are 2939528,
  3006472 and 3006472 bytes at 2, 3 and 4 layers (a 2-layer model's backward prefetch
  overlaps otherwise).
  ``layers="extrapolate"`` predicts a model of more than 12 layers (3 + 4 + 5: a
  shallower one costs less to predict whole) at 3, 4 and 5 layers (same widths, same
  rank layouts, same strategy) and extrapolates every byte figure of every predicted
  rank: peak and stored bytes, each phase's peak, each category at the peak, live bytes
  before the step, the first step's peak, the gathered parameters. It does so only
  where the model shows it is linear: every figure's second difference
  ``f(5) - 2 f(4) + f(3)`` is zero, and the peak lies in the same phase at 3, 4, 5 and
  (by the extrapolated phase peaks) at ``L`` layers. Otherwise, or where the layer
  count or the strategy is not uniform across layers (``sqrt``, ``blocks:``, ``ops:i=``
  name blocks by index), the whole model is predicted and ``extrapolated_from`` is None;
  ``extrapolation_refused`` says why. An extrapolated rank has no timeline and no
  per-storage rows (the shallow models' would be of another model); its ``meta``
  names the depths it came from, and its ``composition_at_peak`` holds each category's
  bytes at the peak, extrapolated the same way (lines that add up to the peak at 3, 4
  and 5 layers add up to it at any depth): what the rank planner and the sweep rows
  read. Linear at 3, 4 and 5 is checked, not
  proven for every depth: tests/test_sharded_layers.py checks the extrapolated figures
  equal the whole model's prediction, to the byte, on the zoo transformer and a Llama
  under FSDP2 with and without resharding, HSDP and tensor parallelism, plain and
  checkpointed, and benchmarks/bench_sharded_scale.py on the 7B Llama at 8, 64 and 512
  ranks, with and without tensor parallelism.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from memprop.measure import Measurement, bytes_at_peak
from memprop.models import model_config

__all__ = ["DEPTHS", "layer_count", "with_layers", "uniform_strategy", "extrapolate_rank",
           "NotLinear"]

DEPTHS = (3, 4, 5)                      # the shallow models a deep one is predicted from
_UNIFORM = ("none", "full", "selective")  # strategies that treat every layer alike
_INT_FIELDS = ("saved_bytes", "saved_count", "param_saved_bytes", "peak_bytes",
               "start_bytes", "first_step_peak_bytes", "budget_peak_bytes")
# dict figures, each read from a shallow measurement (which has a timeline: its bytes by
# category at the peak are read from it)
_DICT_FIELDS = {"peak_by_phase": lambda m: m.peak_by_phase,
                "peak_by_category": lambda m: m.peak_by_category,
                "composition_at_peak": bytes_at_peak}
_META_FIELDS = ("gathered_bytes_at_peak", "gathered_peak_bytes")


class NotLinear(Exception):
    """A figure of the shallow models is not linear in their layer count."""


def layer_count(config) -> tuple[str, int] | None:
    """(field, layers) of a config whose layers are one uniform stack, or None: the zoo's
    ``depth``; an ``hf:`` config's top-level ``num_hidden_layers`` (not a composite
    model's, nor one with a per-layer pattern the user set)."""
    fields = config.fields()
    if "depth" in fields and isinstance(fields["depth"], int):
        return "depth", fields["depth"]
    if not hasattr(config, "hf_config"):
        return None
    options = dict(getattr(config, "options", ()))
    if any("." in k or k.endswith(("layer_types", "_pattern")) for k in options):
        return None
    hf = config.hf_config()
    layers = getattr(hf, "num_hidden_layers", None)
    if not isinstance(layers, int) or hf.sub_configs:
        return None
    return "num_hidden_layers", layers


def with_layers(config, field: str, layers: int):
    """``config`` with ``layers`` layers, every other field as it is."""
    return model_config(config.name, **{**config.fields(), field: layers})


def uniform_strategy(spec: str) -> bool:
    """Whether ``spec`` treats every layer alike (so its figures grow by one layer's)."""
    return spec in _UNIFORM


def _line(values: list[int], name: str, layers: int) -> int:
    a, b, c = values
    if c - 2 * b + a:
        raise NotLinear(f"{name} is {a}, {b}, {c} bytes at {', '.join(map(str, DEPTHS))} "
                        "layers, not a line")
    return c + (layers - DEPTHS[-1]) * (c - b)


def _largest(peaks: dict[str, int]) -> str:
    return max(peaks, key=lambda k: peaks[k])


def extrapolate_rank(shallow: list[Measurement], layers: int) -> Measurement:
    """One rank's figures at ``layers`` layers from its predictions at ``DEPTHS``
    (NOTE [ Predicting a deep model from three shallow ones ]); ``NotLinear`` where a
    figure is not a line or the peak's phase would change."""
    last = shallow[-1]
    ints: dict[str, Any] = {f: _line([getattr(m, f) for m in shallow], f, layers)
                            for f in _INT_FIELDS}
    dicts: dict[str, Any] = {}
    for f, read in _DICT_FIELDS.items():
        values = [read(m) for m in shallow]
        dicts[f] = {k: _line([v.get(k, 0) for v in values], f"{f}[{k}]", layers)
                    for k in sorted(set().union(*values))}
    phases = [_largest(m.peak_by_phase) for m in shallow]
    at_depth = _largest(dicts["peak_by_phase"])
    if len({*phases, at_depth}) > 1:
        raise NotLinear(f"the peak moves between phases ({', '.join(phases)} at "
                        f"{', '.join(map(str, DEPTHS))} layers, {at_depth} at {layers})")
    if ints["peak_bytes"] != dicts["peak_by_phase"][at_depth]:
        raise NotLinear("the peak is not its phase's peak")
    meta = {**last.meta}
    for f in _META_FIELDS:
        if f in last.meta and last.meta[f] is not None:
            meta[f] = _line([m.meta[f] for m in shallow], f, layers)
    meta.update(extrapolated_from=DEPTHS, layers=layers)
    return dataclasses.replace(
        last, **ints, **dicts, meta=meta, timeline=None,
        saved=pd.DataFrame(columns=last.saved.columns), work={},
        allocations=last.allocations.iloc[0:0])

