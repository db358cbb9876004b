"""Experiment specs (TOML) and the trials they expand to, validated before anything runs.

    name = "depth_batch"                  # letters, digits, _ and -
    description = "claim C5: ..."
    [model]                               # or [[model]] tables, one per model
    name = "mlp"                          # a built-in model or package.module:factory
    width = 256                           # fixed fields of the model config
    [model.grid]                          # optional: a grid of this model only, with
    depth = [2, 4]                        #   the [grid] table's other keys (NOTE below)
    [grid]                                # lists; the sweep is their product
    depth = [2, 4, 8]                     # any model field
    batch = [16, 64]                      # and batch, strategy, dtype, optimizer, amp
    strategy = ["none", "sqrt"]
    [run]
    dtype = "float32"; device = "cpu"; optimizer = "sgd"
    repeats = 3; warmup = 1; timeout = 300; seed = 0
    threads = 1                           # torch threads per trial (default: cores / workers)
    amp = "bf16"                          # optional: autocast (bf16 or fp16)
    budget = "1.5GiB"                     # optional: a memory limit the runtime enforces
    budget_mode = "tensor"                # live tensor bytes (default) or "process" (the OS)
    estimate = true                       # also predict each trial on fake tensors
    executor = "ray"                      # optional: trials as Ray tasks (default "local")
    [parallel]                            # optional: sharded trials (memprop.sweep.parallel)
    world_size = [2, 4, 8]; tp = 1; estimate = true
    [frontier]                            # optional (memprop frontier): the OOM frontier
    budget = "512MiB"; depths = [4, 8]; strategies = ["none", "sqrt"]
    batch_step = 16; max_batch = 65536

Every error names the file, the key path, the bad value and what is allowed
(``SpecError``); no trial starts until the whole spec, and every model config it
expands to, has been checked.

NOTE [ Models with their own grids ]
  One spec can hold models that do not share fields: the quickstart sweeps an MLP's
  depth and also runs the notes' network (``d2l_mlp``, which has no depth) so that its
  report judges every claim. A ``[model.grid]`` table (after ``[[model]]``: the grid of
  that model) lists that model's own values; a key it shares with ``[grid]`` replaces
  the shared values for that model, the others are kept. The frontier walks only the
  models that have its field (``depth`` by default), and refuses a spec where none has.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import pathlib
import re
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from memprop.budget import BUDGET_MODES
from memprop.checkpoint import parse_strategy
from memprop.dtypes import DTYPES
from memprop.errors import ConfigError, MemPropError
from memprop.measure import AMP_MODES, OPTIMIZERS
from memprop.models import MODELS, model_config
from memprop.sweep.parallel import Parallel, check_tensor_parallel, parse_parallel
from memprop.sweep.ray_executor import EXECUTORS
from memprop.sweep.spec_values import SpecError
from memprop.sweep.spec_values import choice as _choice
from memprop.sweep.spec_values import int_value as _int
from memprop.sweep.spec_values import list_value as _list
from memprop.sweep.spec_values import unknown_key as _unknown
from memprop.sweep.trial import Trial
from memprop.units import parse_size

__all__ = ["SpecError", "Trial", "SweepSpec", "RunOptions", "FrontierOptions", "load_spec",
           "parse_spec"]

DEVICES = ("cpu", "cuda")
_TOP = ("name", "description", "model", "grid", "run", "frontier", "parallel")
_RUN = ("dtype", "device", "optimizer", "repeats", "warmup", "timeout", "seed", "budget",
        "budget_mode", "threads", "amp", "estimate", "executor")
_GRID_EXTRA = ("batch", "strategy", "dtype", "optimizer", "amp")
_FRONTIER = ("budget", "depths", "strategies", "batch_step", "max_batch", "field")


@dataclasses.dataclass(frozen=True)
class FrontierOptions:
    budget_bytes: int
    depths: tuple[int, ...]
    strategies: tuple[str, ...]
    batch_step: int = 8
    max_batch: int = 1 << 16
    field: str = "depth"           # the model field the frontier walks


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """A spec's ``[run]`` table: how every trial runs (validated by ``parse_spec``)."""

    dtype: str = "float32"
    device: str = "cpu"
    optimizer: str = "sgd"
    repeats: int = 3
    warmup: int = 1
    timeout: float = 600.0          # seconds
    seed: int = 0
    budget: int | None = None       # bytes
    budget_mode: str = "tensor"
    threads: int = 0                # 0: the executor's share of the cores
    amp: str | None = None
    estimate: bool = True
    batch: int = 32
    executor: str = "local"         # where trials run: local processes or Ray tasks


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str
    path: str
    description: str
    models: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    grid: tuple[tuple[str, tuple], ...]
    run: RunOptions
    frontier: FrontierOptions | None = None
    model_grids: tuple[tuple[tuple[str, tuple], ...], ...] = ()   # per model, or ()
    parallel: tuple[Parallel, ...] = ()   # [parallel]: each trial once per point, or ()

    def grid_of(self, index: int) -> tuple[tuple[str, tuple], ...]:
        """The grid of ``models[index]``: ``[grid]`` with its own ``[model.grid]`` (NOTE
        [ Models with their own grids ])."""
        own = dict(self.model_grids[index]) if index < len(self.model_grids) else {}
        shared = [(k, own.pop(k, v)) for k, v in self.grid]
        return tuple(shared + list(own.items()))

    def frontier_models(self) -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
        """The models the frontier walks: those with its field (NOTE [ Models with their
        own grids ])."""
        opts = self.frontier
        if opts is None:
            return []
        return [(name, fixed) for name, fixed in self.models
                if _has_field(name, dict(fixed), opts.field, opts.depths[0] if opts.depths
                              else 1)]

    def trial(self, model: str, fields: dict[str, Any], **point) -> Trial:
        """The trial of ``model`` with ``fields`` at one grid point (``batch``,
        ``strategy``, ``dtype``, ``optimizer``; the rest from ``[run]``); ``point`` may
        also override any other ``Trial`` field (the frontier's ``mode``, say)."""
        run = self.run
        defaults = dict(batch=run.batch, strategy="none", dtype=run.dtype, device=run.device,
                        optimizer=run.optimizer, repeats=run.repeats, warmup=run.warmup,
                        timeout_s=run.timeout, seed=run.seed, budget_bytes=run.budget,
                        budget_mode=run.budget_mode, threads=run.threads, amp=run.amp,
                        estimate=run.estimate)
        return Trial(spec=self.name, model=model, model_fields=tuple(sorted(fields.items())),
                     **{**defaults, **point})

    def trials(self) -> list[Trial]:
        """The grid's product, in a stable order, one ``Trial`` each."""
        out = []
        for i, (model, fixed) in enumerate(self.models):
            grid = self.grid_of(i)
            keys = [k for k, _ in grid]
            for values in itertools.product(*(v for _, v in grid)):
                point = dict(zip(keys, values))
                fields = {**dict(fixed), **{k: v for k, v in point.items()
                                            if k not in _GRID_EXTRA}}
                extra = {k: v for k, v in point.items() if k in _GRID_EXTRA}
                out += [self.trial(model, fields, **extra, **(
                    {"parallel": p} if p is not None else {}))
                        for p in (self.parallel or (None,))]
        return out


# -- validation helpers ----------------------------------------------------------------

def _size(path, key, value) -> int:
    """A budget's bytes: a positive size, as the CLI's --budget takes."""
    try:
        parse_size(value)
    except ValueError:
        raise SpecError(path, key, f"{value!r} is not a size; write e.g. \"512MiB\" or "
                        "\"1.5GiB\"") from None
    try:
        return parse_size(value, positive=True)
    except ValueError as exc:
        raise SpecError(path, key, str(exc).replace("memprop.units: ", "")) from None


def _strategy(path, key, value) -> str:
    if not isinstance(value, str):
        raise SpecError(path, key, f"{value!r} is not a strategy string, e.g. \"sqrt\"")
    try:
        spec = parse_strategy(value).spec      # checks budget:SIZE's size too
        return value if value.startswith("budget:") else spec   # the size as written
    except MemPropError as exc:
        raise SpecError(path, key, str(exc).replace("memprop.checkpoint: ", "")) from None


# -- loading ---------------------------------------------------------------------------

def load_spec(path) -> SweepSpec:
    """Read and validate a TOML spec file; raises ``SpecError``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SpecError(path, "(file)", "no such spec file; see experiments/*.toml")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(path, "(syntax)", f"not valid TOML: {exc}") from None
    return parse_spec(data, path=path)


def parse_spec(data: dict, *, path="<spec>") -> SweepSpec:
    """Validate a spec's parsed TOML (see module docstring)."""
    for key in data:
        if key not in _TOP:
            raise _unknown(path, "", key, _TOP)
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise SpecError(path, "name", f"{name!r} is not allowed; give the experiment a name of "
                        "letters, digits, _ and - (it names its results folder)")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpecError(path, "description", f"{description!r} is not a string")

    run: dict[str, Any] = {"dtype": "float32", "device": "cpu", "optimizer": "sgd",
                           "repeats": 3, "warmup": 1, "timeout": 600, "seed": 0,
                           "budget": None, "estimate": True, "batch": 32,
                           "budget_mode": "tensor", "threads": 0, "amp": None}
    raw_run = data.get("run", {})
    if not isinstance(raw_run, dict):
        raise SpecError(path, "run", "must be a table: [run]")
    for key, value in raw_run.items():
        if key not in _RUN:
            raise _unknown(path, "run.", key, _RUN)
        k = f"run.{key}"
        if key == "dtype":
            run[key] = _choice(path, k, value, DTYPES)
        elif key == "device":
            run[key] = _choice(path, k, value, DEVICES)
            if value == "cuda":
                import torch
                if not torch.cuda.is_available():
                    raise SpecError(path, k, f"'cuda' is not available: torch {torch.__version__} "
                                    "sees no CUDA device on this machine; use device = \"cpu\"")
        elif key == "optimizer":
            run[key] = _choice(path, k, value, OPTIMIZERS)
        elif key in ("repeats", "warmup", "seed", "threads"):
            run[key] = _int(path, k, value, 1 if key in ("repeats", "threads") else 0)
        elif key == "budget_mode":
            run[key] = _choice(path, k, value, BUDGET_MODES)
        elif key == "amp":
            run[key] = _choice(path, k, value, AMP_MODES)
        elif key == "executor":
            run[key] = _choice(path, k, value, EXECUTORS)
        elif key == "timeout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise SpecError(path, k, f"{value!r} is not allowed; it must be a number of "
                                "seconds > 0")
            run[key] = float(value)
        elif key == "budget":
            run[key] = _size(path, k, value)
        elif key == "estimate":
            if not isinstance(value, bool):
                raise SpecError(path, k, f"{value!r} is not allowed; write true or false")
            run[key] = value

    raw_models = data.get("model")
    if raw_models is None:
        raise SpecError(path, "model", "missing; add a [model] table with name = \"mlp\" "
                        f"(one of {', '.join(MODELS)} or package.module:factory)")
    raw_models = raw_models if isinstance(raw_models, list) else [raw_models]
    models = []
    for i, m in enumerate(raw_models):
        where = "model" if len(raw_models) == 1 else f"model[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise SpecError(path, f"{where}.name", "missing; name the model, e.g. name = \"mlp\"")
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in m.items()
                  if k not in ("name", "grid")}
        own = _grid(path, f"{where}.grid", m.get("grid", {}))
        models.append((m["name"], fields, where, own))

    raw_grid = data.get("grid", {})
    grid = _grid(path, "grid", raw_grid)
    if "batch" not in raw_grid:
        raise SpecError(path, "grid.batch", "missing; list the batch sizes, e.g. batch = [16, 64]")

    frontier = None
    if "frontier" in data:
        frontier = _parse_frontier(path, data["frontier"], run)
    parallel: tuple[Parallel, ...] = ()
    if "parallel" in data:
        grids = [dict(grid)] + [dict(own) for *_, own in models]
        parallel = parse_parallel(path, data["parallel"], run, frontier=frontier is not None,
                                  grid={"amp": tuple(a for g in grids for a in g.get("amp", ()))})

    spec = SweepSpec(name=name, path=str(path), description=description,
                     models=tuple((n, tuple(sorted(f.items()))) for n, f, _, _ in models),
                     grid=tuple(grid), run=RunOptions(**run), frontier=frontier,
                     model_grids=tuple(tuple(own) for *_, own in models), parallel=parallel)
    _check_configs(path, spec, models)
    if any(p.tp > 1 for p in parallel):          # each model's plan, before any trial runs
        check_tensor_parallel(path, ((t.config(), t.parallel.tp) for t in spec.trials()
                                     if t.parallel is not None and t.parallel.tp > 1))
    return spec


def _grid(path, where: str, raw_grid) -> list[tuple[str, tuple]]:
    """A ``[grid]`` (or ``[model.grid]``) table, each list validated by its key."""
    if not isinstance(raw_grid, dict):
        raise SpecError(path, where, f"must be a table: [{where}]")
    grid = []
    for key, values in raw_grid.items():
        k = f"{where}.{key}"
        values = _list(path, k, values)
        if key == "batch":
            values = tuple(_int(path, k, v, 1, "a batch size, an integer") for v in values)
        elif key == "strategy":
            values = tuple(_strategy(path, k, v) for v in values)
        elif key == "dtype":
            values = tuple(_choice(path, k, v, DTYPES) for v in values)
        elif key == "optimizer":
            values = tuple(_choice(path, k, v, OPTIMIZERS) for v in values)
        elif key == "amp":            # "none": full precision
            values = tuple(None if _choice(path, k, v, ("none", *AMP_MODES)) == "none" else v
                           for v in values)
        grid.append((key, values))
    return grid


def _parse_frontier(path, raw, run) -> FrontierOptions:
    if not isinstance(raw, dict):
        raise SpecError(path, "frontier", "must be a table: [frontier]")
    for key in raw:
        if key not in _FRONTIER:
            raise _unknown(path, "frontier.", key, _FRONTIER)
    if "budget" not in raw and run["budget"] is None:
        raise SpecError(path, "frontier.budget", "missing; the frontier needs a memory "
                        "budget, e.g. budget = \"512MiB\"")
    budget = _size(path, "frontier.budget", raw["budget"]) if "budget" in raw else run["budget"]
    depths = tuple(_int(path, "frontier.depths", d, 1) for d in
                   _list(path, "frontier.depths", raw.get("depths", [])))
    strategies = tuple(_strategy(path, "frontier.strategies", s) for s in
                       _list(path, "frontier.strategies", raw.get("strategies", ["none"])))
    step = _int(path, "frontier.batch_step", raw.get("batch_step", 8), 1)
    top = _int(path, "frontier.max_batch", raw.get("max_batch", 1 << 16), step)
    field = raw.get("field", "depth")
    if not isinstance(field, str):
        raise SpecError(path, "frontier.field", f"{field!r} is not a model field name")
    return FrontierOptions(budget, depths, strategies, step, top, field)


def _has_field(name: str, fields: dict, field: str, value) -> bool:
    """Whether model ``name`` with ``fields`` takes ``field`` (its config builds with it)."""
    try:
        model_config(name, **{**fields, field: value})
    except ConfigError:
        return False
    return True


def _check_configs(path, spec: SweepSpec, models) -> None:
    """Build every model config the spec expands to, naming the key of a bad value."""
    walks = spec.frontier is not None and len(models) > 1 and [
        _has_field(name, fields, spec.frontier.field, (spec.frontier.depths or (1,))[0])
        for name, fields, *_ in models]
    if walks is not False and not any(walks):
        walks = False                    # none has the field: the first model says why
    for i, (name, fields, where, _) in enumerate(models):
        grid = dict(spec.grid_of(i))
        if ":" not in name and name not in MODELS:
            close = difflib.get_close_matches(name, MODELS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(path, f"{where}.name", f"unknown model {name!r}{hint}; choose one "
                            f"of: {', '.join(MODELS)}, or package.module:factory")
        own = dict(spec.model_grids[i]) if i < len(spec.model_grids) else {}
        checks = [(f"{where}.grid" if k in own else "grid", k, v) for k, v in grid.items()
                  if k not in _GRID_EXTRA]
        if spec.frontier is not None and (walks is False or walks[i]):
            checks.append(("frontier", spec.frontier.field, spec.frontier.depths))
        varied = {k: prefix for prefix, k, _ in checks}      # key -> where it is set
        first = {k: v[0] for _, k, v in checks if v}
        try:                                  # the fixed fields, with each grid's first value
            model_config(name, **{**fields, **first})
        except ConfigError as exc:
            raise SpecError(path, _culprit(exc, where, fields, varied), _short(exc)) from None
        for prefix, key, values in checks:    # then every value of every grid
            for value in values:
                try:
                    model_config(name, **{**fields, **first, key: value})
                except ConfigError as exc:
                    raise SpecError(path, f"{prefix}.{key}", _short(exc)) from None


def _culprit(exc: ConfigError, where: str, fields: dict, varied: dict) -> str:
    text = str(exc)
    for key in fields:
        if f"'{key}'" in text or f".{key} " in text:
            return f"{where}.{key}"
    for key, prefix in varied.items():
        if f"'{key}'" in text or f".{key} " in text:
            return f"{prefix}.{key}"
    return where


def _short(exc: Exception) -> str:
    return str(exc).replace("memprop.models: ", "")
