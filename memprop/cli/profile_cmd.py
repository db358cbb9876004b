"""``memprop profile``: measure (or, with --estimate, predict) one training step of a
zoo model, a transformers model (``hf:gpt2``) or a ``package.module:factory`` and show
where its memory goes."""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import sys

from memprop.cli._common import (
    DTYPE_NAMES,
    MODEL_NAMES,
    OPTIMIZER_NAMES,
    add_command,
    check_output_file,
    json_ready,
    parse_dtype,
    positive_int,
    render_table,
)
from memprop.cli._progress import Spinner
from memprop.cli._snapshot import add_snapshot_options, snapshot_request, write_profile_snapshot
from memprop.errors import ConfigError
from memprop.units import format_bytes, format_flops, format_ms, format_ratio


def parse_assignments(pairs: list[str]) -> dict:
    """``["depth=16", "phi=gelu"]`` -> ``{"depth": 16, "phi": "gelu"}`` (Python literals)."""
    fields = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"memprop profile: --set {pair!r} is not KEY=VALUE, "
                              "e.g. --set depth=16")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        fields[key.strip()] = value
    return fields


def config_from_args(args):
    """The model config the options name (a ConfigError naming the option otherwise)."""
    from memprop.models import model_config

    fields = parse_assignments(args.set)
    if ":" in args.model and not args.model.startswith("hf:"):
        try:   # a factory returning a workload builds its own batch: no shape needed
            shape = tuple(int(n) for n in (args.input_shape or "").split(",") if n.strip())
        except ValueError:
            raise ConfigError(f"memprop profile: --input-shape {args.input_shape!r} is not "
                              "a comma-separated list of integers, e.g. 3,32,32") from None
        return model_config(args.model, input_shape=shape, blocks_attr=args.blocks_attr,
                            kwargs=tuple(sorted(fields.items())))
    return model_config(args.model, **fields)


@contextlib.contextmanager
def factory_errors(args, command: str):
    """A user factory that cannot be called with these options, or whose module does not
    take an input of ``--input-shape``, fails inside torch (TypeError, RuntimeError):
    say which option to change instead of showing torch's traceback (nor the one torch's
    fake-tensor logger prints when the shapes fail on fake tensors first)."""
    if ":" not in args.model or args.model.startswith("hf:"):
        yield
        return
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        yield
    except (TypeError, RuntimeError) as exc:
        first = " ".join(str(exc).split())[:300]
        raise ConfigError(
            f"memprop {command}: factory {args.model!r} does not run with --input-shape "
            f"{args.input_shape} and --set {' '.join(args.set or []) or '(none)'}: "
            f"{type(exc).__name__}: {first}; pass the factory's arguments with --set KEY=VALUE "
            "and one example's shape with --input-shape") from None
    finally:
        fake_log.setLevel(level)


MODULE_ROWS = 20      # rows of the per-module table shown by default (--modules)
TOP_LEVEL = "(top level)"   # the module name of what the model saves outside submodules


def module_rows(text: str) -> int | None:
    """``--modules``: a number of rows (1 or more), or ``all`` (None: no bound)."""
    if text.strip().lower() == "all":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} rows, or all") from None


def _repeat_key(name: str) -> str:
    """``blocks.7.mlp.0`` -> ``blocks.*.mlp.0``: the first number (the block's) starred,
    so a block's own numbered children (``mlp.0``, ``mlp.2``) stay apart."""
    parts = name.split(".")
    first = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return name if first is None else ".".join(parts[:first] + ["*"] + parts[first + 1:])


def fold_repeats(table):
    """A per-module table (memprop.saved.per_module_table) with the modules that differ
    only in their block's number (``blocks.0.attn`` ... ``blocks.47.attn``) summed into
    one row (``blocks.*.attn``), which ``modules`` counts; in order of first saving."""
    key = table.module.map(_repeat_key)
    groups = table.drop(columns="module").groupby(key.values, sort=False)
    folded = groups.sum()
    folded.insert(0, "modules", groups.size())
    return folded.rename_axis("module").reset_index()


def bound_modules(table, rows: int | None):
    """(shown, left out) of a per-module table for people. Past ``rows`` rows, numbered
    repeats are folded (``fold_repeats``); if still longer, the ``rows`` rows storing
    most for backward are shown (ties: most bytes of every kind, then the first to save),
    in order of saving. ``rows`` None: every module as it is. The top-level row (module
    "": the model's own code outside any submodule, e.g. its loss) is named
    ``(top level)``."""
    table = table.assign(module=table.module.fillna("").replace("", TOP_LEVEL))
    if rows is None or len(table) <= rows:
        return table, table.iloc[:0]
    table = fold_repeats(table)
    if len(table) <= rows:
        return table, table.iloc[:0]
    every_kind = table[[c for c in table.columns if c.endswith("_bytes")
                        and c != "saved_bytes"]].sum(axis=1)
    ranked = table.assign(_all=every_kind).sort_values(["saved_bytes", "_all"],
                                                       ascending=False, kind="stable")
    keep = table.index.isin(ranked.index[:rows])
    return table[keep], table[~keep]


def render_modules(table, rows: int | None = MODULE_ROWS) -> list[str]:
    """The per-module table as lines: at most ``rows`` rows (repeats folded, then the
    largest), one line summing the rest, and what ``(top level)`` means if shown."""
    shown, rest = bound_modules(table, rows)
    how = ["in order of saving"]
    if "modules" in shown.columns:
        how.append(f"{len(table)} modules; a row with * sums one module over the numbered "
                   "blocks, 'modules' counts them")
    if len(rest):
        how.append(f"the {len(shown)} rows storing most")
    lines = [f"Stored for backward, per module ({'; '.join(how)}):", render_table(shown)]
    if len(rest):
        lines.append(f"  ... and {len(rest)} more rows ({rest.modules.sum()} modules) storing "
                     f"{format_bytes(rest.saved_bytes.sum())} in {rest.saved_count.sum()} "
                     f"tensors (parameters saved too: {format_bytes(rest.parameter_bytes.sum())})")
    if "modules" in shown.columns:
        lines.append("  --modules all shows every module on its own row")
    if (shown.module == TOP_LEVEL).any():
        lines.append(f"  {TOP_LEVEL}: saved by the model's own code outside any submodule, "
                     "e.g. its loss")
    return lines


def render_profile(m, config, *, closed_form: dict | None = None,
                   modules: int | None = MODULE_ROWS, timing: dict | None = None) -> str:
    """A Measurement as text for people; the per-module table bounded to ``modules`` rows
    (None: every module); ``timing``: whether its times are usable (``gather_profile``)."""
    label = "PREDICTED on fake tensors (nothing allocated)" if m.predicted else "measured"
    sizes = ", ".join(f"{k}={v}" for k, v in config.fields().items())
    peaks = ", ".join(f"{k} {format_bytes(v)}" for k, v in m.peak_by_phase.items())
    lines = [
        f"{config.name} ({sizes})",
        f"batch {m.batch_size}, {m.dtype}"
        f"{f' (autocast {m.amp})' if m.amp else ''}, {m.device}, strategy {m.strategy}, "
        f"optimizer {m.optimizer}: {label}",
        "",
        f"  stored for backward   {format_bytes(m.saved_bytes)} in {m.saved_count} tensors "
        f"(parameters saved too, counted apart: {format_bytes(m.param_saved_bytes)})",
    ]
    if closed_form is not None:
        verdict = "equal" if closed_form["saved_bytes"] == m.saved_bytes else "DIFFERENT"
        lines.append(f"  closed-form predicted {format_bytes(closed_form['saved_bytes'])} "
                     f"({closed_form['saved_bytes']} bytes; {verdict} to the byte)")
    lines += [
        f"  tensor-level peak     {format_bytes(m.peak_bytes)} (by phase: {peaks}); "
        f"live before the step {format_bytes(m.start_bytes)}",
    ]
    if m.routing:       # mixture of experts (NOTE [ MoE routing and the estimate ])
        lines.append(f"  expert routing        {m.routing}")
    if m.capacity_routing_peak_bytes is not None:     # memprop.routing
        more = m.capacity_routing_peak_bytes - m.peak_bytes
        lines.append(f"  capacity bound        peak {format_bytes(m.capacity_routing_peak_bytes)} "
                     f"({'+' if more >= 0 else '-'}{format_bytes(abs(more))}) with every "
                     "token routed to the same k experts (each receives every token)")
    if m.predicted and m.amp == "fp16":    # NOTE [ fp16's inf check on fake tensors ]
        lines.append("  fp16 loss scaling     assumes the GradScaler finds no inf or NaN "
                     "gradient: the optimizer step is taken, as in every healthy step")
    if m.inference_peak_bytes:
        lines.append(f"  inference peak        {format_bytes(m.inference_peak_bytes)} "
                     f"(eval, no_grad; stores {format_bytes(m.inference_saved_bytes)}): "
                     f"training needs {format_ratio(m.peak_bytes / m.inference_peak_bytes)}x")
    if m.device_peak_bytes is not None:
        if m.device.startswith("cuda"):
            lines.append(f"  device peak           {format_bytes(m.device_peak_bytes)} "
                         "(CUDA max_memory_allocated)")
        else:   # not a tensor figure: the whole process, libraries and allocator pools too
            lines.append(f"  process resident set  {format_bytes(m.device_peak_bytes)} "
                         "(high-water mark of this process: torch, libraries and all)")
    if m.step_ms is not None:
        lines.append(f"  time (median of {m.repeats})  forward {format_ms(m.forward_ms)}, backward "
                     f"{format_ms(m.backward_ms)}, optimizer {format_ms(m.optimizer_ms)}, "
                     f"step {format_ms(m.step_ms)}")
        if timing and timing["timing_noisy"]:   # NOTE [ When a step's times are unusable ]
            lines.append(f"  times UNUSABLE        {timing['timing_noisy_reason']}; rerun "
                         "on a quiet machine")
    if m.forward_flops:
        lines.append(f"  FLOPs                 forward {format_flops(m.forward_flops)}, "
                     f"backward {format_flops(m.backward_flops)} "
                     f"(backward/forward {format_ratio(m.backward_flops / m.forward_flops)})")
    lines += ["", *render_modules(m.saved_per_module, modules)]
    return "\n".join(lines)


def add_model_options(p) -> None:
    """The options that name a workload (shared by profile and plan)."""
    p.add_argument("--model", default="mlp",
                   help=f"one of {', '.join(MODEL_NAMES)}; hf:<model_type>, any transformers "
                        "architecture built offline from its config with random weights "
                        "(e.g. hf:gpt2, hf:llama; needs transformers: pip install "
                        "memprop[hf]); or package.module:factory, your own function "
                        "returning an nn.Module (with --input-shape)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a model field, repeatable: --set depth=16 --set width=1024; for "
                        "hf: models a transformers config field, e.g. --set n_layer=12 "
                        "(default: the model's own sizes)")
    p.add_argument("--input-shape", help="factory models: one example's shape, e.g. 3,32,32 "
                   "(default: none; required for a factory)")
    p.add_argument("--blocks-attr", help="factory models: attribute holding the block chain "
                   "(default: found by class)")
    p.add_argument("--batch", type=positive_int, default=32, help="batch size (examples)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                   help="parameter and input dtype")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZER_NAMES,
                   help="optimizer whose state the step holds")


def add_parser(sub) -> None:
    p = add_command(sub, "profile", help="measure (or --estimate) one training step",
                    doc=__doc__)
    add_model_options(p)
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="mixed precision: forward under torch.autocast with float32 master "
                        "weights (fp16 adds a GradScaler) (default: off)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--strategy", default="none", help="checkpointing strategy, e.g. sqrt, "
                   "full, every:2, budget:1GiB")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed steps (median reported)")
    p.add_argument("--estimate", action="store_true",
                   help="predict on fake tensors: no memory allocated, no times")
    p.add_argument("--routing", choices=("batch", "uniform", "capacity"), default=None,
                   help="with --estimate, mixture-of-experts layers whose experts run one by "
                        "one: the routing predicted (batch: the example batch's own, read "
                        "from one real forward of the model built for real; uniform: an "
                        "even split; capacity: every token to the same experts) (default: "
                        "uniform; the capacity bound's peak is printed beside it)")
    p.add_argument("--timeline", metavar="FILE.csv", help="write the live-memory timeline "
                   "as CSV, one row per op (default: not written)")
    p.add_argument("--trace", metavar="FILE.json", help="write the live-memory timeline as a "
                   "Chrome trace for chrome://tracing or ui.perfetto.dev (default: not written)")
    p.add_argument("--modules", type=module_rows, default=MODULE_ROWS, metavar="N|all",
                   help="rows of the per-module table: past N, a module repeated in "
                        "every numbered block is summed in one row (blocks.*.attn), then "
                        "the N rows storing most are shown and the rest summed in one "
                        "line; all: every module on its own row")
    add_snapshot_options(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    p.add_argument("--fsdp", type=positive_int, default=None, metavar="N",
                   help="shard with FSDP2 over N ranks (every block, then the root) and "
                        "report each rank: with --estimate predicted on a fake process "
                        "group (any N); without, measured in N real processes (gloo, CPU; "
                        f"N <= {MAX_REAL_RANKS}); with --replicate/--tp, N ranks in all; "
                        "--batch is per rank (default: one device)")
    p.add_argument("--fsdp-reshard", choices=("on", "off"), default="on",
                   help="with --fsdp: free each block's gathered parameters after forward "
                        "(on, ZeRO-3) or keep them to backward (off, ZeRO-2)")
    p.add_argument("--fsdp-mixed-precision", choices=("bf16",), default=None,
                   help="with --fsdp: bf16 parameters, fp32 gradient reduction (FSDP2's "
                        "MixedPrecisionPolicy) (default: the parameters' dtype)")
    p.add_argument("--fsdp-offload", action="store_true",
                   help="with --fsdp: FSDP2's CPUOffloadPolicy (on CPU ranks the host is "
                        "the device: the bytes do not change)")
    p.add_argument("--replicate", type=positive_int, default=None, metavar="R",
                   help="with --fsdp N: HSDP, R replicas of N/R shards (a 2-D mesh); "
                        "R divides N")
    p.add_argument("--tp", type=positive_int, default=None, metavar="M",
                   help="tensor parallelism over M ranks (colwise/rowwise plans; the zoo "
                        "transformer and hf: Llama-family models); with --fsdp N, FSDP2 "
                        "over N/M (a 2-D mesh), else M ranks in all")
    add_layers_argument(p)
    p.set_defaults(func=profile_command)


MAX_REAL_RANKS = 8      # --fsdp without --estimate: processes started on this machine


def add_layers_argument(p) -> None:
    """``--layers``: how a sharded prediction treats a deep model's layers."""
    p.add_argument("--layers", choices=("extrapolate", "all"), default="extrapolate",
                   help="sharded predictions: predict a model of more than 12 layers from "
                        "the same model at 3, 4 and 5 layers where every figure is linear "
                        "in depth (checked; else every layer is run) (extrapolate, the "
                        "default), or run every layer (all)")


def parallel_config(args):
    """The ``FSDPConfig`` of ``--fsdp N`` (N ranks in all), ``--replicate R``, ``--tp M``
    and the ``--fsdp-*`` knobs; ``ConfigError`` naming the flag for a bad combination."""
    from memprop.sharded import FSDPConfig

    if args.fsdp is None:                 # --tp M alone: tensor parallelism, M ranks
        knobs = [flag for flag, on in (("--replicate", args.replicate is not None),
                                       ("--fsdp-reshard off", args.fsdp_reshard == "off"),
                                       ("--fsdp-mixed-precision", args.fsdp_mixed_precision),
                                       ("--fsdp-offload", args.fsdp_offload)) if on]
        if knobs:
            alone = (f"; --tp {args.tp} alone runs tensor parallelism without FSDP2"
                     if args.tp else "")
            raise ConfigError(f"memprop profile: {', '.join(knobs)} needs --fsdp N (the "
                              f"world size, N ranks){alone}")
        return FSDPConfig(world_size=args.tp, tp=args.tp, fsdp=False)
    replicate, tp = args.replicate or 1, args.tp or 1
    if args.fsdp % (replicate * tp):
        raise ConfigError(f"memprop profile: --fsdp {args.fsdp} (the world size) is not "
                          f"divisible by --replicate {replicate} x --tp {tp} = "
                          f"{replicate * tp}; the world size is replicate x shard x tp, so "
                          f"use a multiple of {replicate * tp}")
    return FSDPConfig(world_size=args.fsdp, replicate=replicate, tp=tp,
                      reshard_after_forward=args.fsdp_reshard == "on",
                      mixed_precision=args.fsdp_mixed_precision, offload=args.fsdp_offload)


def gather_sharded(config, args):
    """The ``ShardedMeasurement`` ``--fsdp N`` asks for: predicted with --estimate,
    else measured in N processes (memprop.sharded)."""
    from memprop.sharded import RankJob, measure_jobs, predict_job

    refused = [opt for opt, on in (("--amp", args.amp), ("--timeline", args.timeline),
                                   ("--trace", args.trace),
                                   ("--device", args.device != "cpu")) if on]
    if refused:
        raise ConfigError(f"memprop profile: --fsdp does not take {', '.join(refused)} yet; "
                          "sharded steps run on CPU ranks, in bf16 with "
                          "--fsdp-mixed-precision bf16")
    fsdp = parallel_config(args)
    if not args.estimate and fsdp.world_size > MAX_REAL_RANKS:
        raise ConfigError(f"memprop profile: {fsdp.world_size} ranks without --estimate would "
                          f"start {fsdp.world_size} processes here; measure at most "
                          f"{MAX_REAL_RANKS}, or add --estimate to predict every rank on a "
                          "fake process group")
    job = RankJob(config=config, batch_size=args.batch, fsdp=fsdp, optimizer=args.optimizer,
                  strategy=args.strategy, dtype=parse_dtype(args.dtype))
    return predict_job(job, layers=args.layers) if args.estimate else measure_jobs([job])[0]


def sharded_command(args) -> int:
    from memprop.sharded.render import render_sharded

    what = "predicting every rank" if args.estimate else "measuring every rank"
    with Spinner(what):
        config = config_from_args(args)
        result = gather_sharded(config, args)
    if args.json:
        row = {**result.to_json(), **config.row_fields()}
        print(json.dumps({k: json_ready(v) if not isinstance(v, (list, dict)) else v
                          for k, v in row.items()}, indent=2, default=str))
        return 0
    print(render_sharded(result, config, batch_size=args.batch))
    return 0


def gather_profile(config, args):
    """(Measurement, closed-form prediction or None, timing) for the options in ``args``;
    timing (None for an estimate) says whether the times are usable: ``timing_noisy``,
    why not and the load read while measuring (memprop.sweep.worker.timing_noise)."""
    from memprop.models import D2LConfig, MLPConfig
    from memprop.predict import predict_saved_bytes
    from memprop.sweep.worker import CpuLoad, timing_noise

    dtype = parse_dtype(args.dtype)
    common = dict(dtype=dtype, device=args.device, strategy=args.strategy,
                  optimizer=args.optimizer, amp=args.amp)
    with factory_errors(args, "profile"):
        if args.estimate:
            from memprop.workload import estimate
            result = estimate(config, args.batch, routing=args.routing, **common)
        else:
            from memprop.workload import measure
            with CpuLoad() as load:
                result = measure(config, args.batch, repeats=args.repeats, **common)
    timing = None
    if not args.estimate:
        why = timing_noise(result.timing_spread, device=result.device, **load.row())
        timing = dict(timing_noisy=why is not None, timing_noisy_reason=why, **load.row())
    closed = None
    # the closed forms are for a plain step in one dtype: under autocast the step also
    # stores half-precision copies, which they do not describe
    if isinstance(config, (D2LConfig, MLPConfig)) and args.strategy == "none" \
            and args.amp is None:
        closed = predict_saved_bytes(config, args.batch, dtype=dtype)
    return result, closed, timing


def profile_command(args) -> int:
    snapshot = snapshot_request(args)          # --snapshot: checked before measuring
    if args.fsdp is not None or args.tp is not None or args.replicate is not None:
        return sharded_command(args)
    # output paths first: a typo must not cost a measurement
    timeline = args.timeline and check_output_file(args.timeline, "--timeline", "profile")
    trace = args.trace and check_output_file(args.trace, "--trace", "profile")
    if args.routing is not None and not args.estimate:
        raise ConfigError(f"memprop profile: --routing {args.routing} chooses the routing "
                          "an --estimate predicts; a measured step runs the batch's own "
                          "routing: add --estimate or leave --routing out")
    with Spinner("predicting on fake tensors" if args.estimate else "measuring one step"):
        config = config_from_args(args)
        result, closed, timing = gather_profile(config, args)
    if timeline:
        result.timeline.to_csv(timeline, index=False)
    if trace:
        from memprop.report.trace import timeline_trace
        label = f"{config.name} batch {args.batch}, strategy {args.strategy}"
        trace.write_text(json.dumps(timeline_trace(result.timeline, label=label)))
    written = snapshot and write_profile_snapshot(
        result, snapshot, label=f"{config.name} batch {args.batch}, strategy {args.strategy}")
    if args.json:
        row = {k: json_ready(v) for k, v in result.summary().items()}
        if closed is not None:
            row["closed_form_saved_bytes"] = closed["saved_bytes"]
        row.update(timing or {})
        print(json.dumps(row, indent=2, default=str))
        if written:
            print(written, file=sys.stderr)    # stdout stays JSON
        return 0
    print(render_profile(result, config, closed_form=closed, modules=args.modules,
                         timing=timing))
    if args.routing is not None and result.capacity_routing_peak_bytes is None:
        print(f"note: --routing {args.routing} changed nothing: no expert in this step "
              "reads its routing to size what it allocates")
    for path, what in ((timeline, "timeline (CSV)"), (trace, "Chrome trace")):
        if path:
            print(f"{what}: {len(result.timeline)} ops written to {path}")
    if written:
        print(written)
    return 0
