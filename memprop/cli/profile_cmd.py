"""``memprop profile``: measure (or, with --estimate, predict) one training step of a
zoo model or a ``package.module:factory`` and show where its memory goes."""

from __future__ import annotations

import ast
import json
import math

from memprop.cli._common import parse_dtype, render_table
from memprop.errors import ConfigError
from memprop.estimate import estimate
from memprop.measure import OPTIMIZERS, Measurement, measure
from memprop.models import MODELS, D2LConfig, MLPConfig, model_config
from memprop.predict import predict_saved_bytes
from memprop.units import format_bytes


def parse_assignments(pairs: list[str]) -> dict:
    """``["depth=16", "phi=gelu"]`` -> ``{"depth": 16, "phi": "gelu"}`` (Python literals)."""
    fields = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"memprop profile: --set {pair!r} is not KEY=VALUE, e.g. --set depth=16")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        fields[key.strip()] = value
    return fields


def config_from_args(args):
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


def render_profile(m: Measurement, config, *, closed_form: dict | None = None) -> str:
    label = "PREDICTED on fake tensors (nothing allocated)" if m.predicted else "measured"
    sizes = ", ".join(f"{k}={v}" for k, v in config.fields().items())
    peaks = ", ".join(f"{k} {format_bytes(v)}" for k, v in m.peak_by_phase.items())
    lines = [
        f"{config.name} ({sizes})",
        f"batch {m.batch_size}, {m.dtype}, {m.device}, strategy {m.strategy}, "
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
    if m.inference_peak_bytes:
        lines.append(f"  inference peak        {format_bytes(m.inference_peak_bytes)} "
                     f"(eval, no_grad; stores {format_bytes(m.inference_saved_bytes)}): "
                     f"training needs {m.peak_bytes / m.inference_peak_bytes:.2f}x")
    if m.device_peak_bytes is not None:
        what = ("CUDA max_memory_allocated" if m.device.startswith("cuda")
                else "process resident-set high-water")
        lines.append(f"  device peak           {format_bytes(m.device_peak_bytes)} ({what})")
    if m.step_ms is not None:
        lines.append(f"  time (median of {m.repeats})  forward {m.forward_ms:.2f} ms, backward "
                     f"{m.backward_ms:.2f} ms, optimizer {m.optimizer_ms:.2f} ms, "
                     f"step {m.step_ms:.2f} ms")
    if m.forward_flops:
        lines.append(f"  FLOPs                 forward {m.forward_flops / 1e9:.3f} GFLOP, "
                     f"backward {m.backward_flops / 1e9:.3f} GFLOP "
                     f"(backward/forward {m.backward_flops / m.forward_flops:.2f})")
    lines += ["", "Stored for backward, per module (in order of saving):",
              render_table(m.saved_per_module)]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure (or --estimate) one training step",
                       description=__doc__)
    p.add_argument("--model", default="mlp",
                   help=f"one of {', '.join(MODELS)}, or package.module:factory (default mlp)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a model size, repeatable: --set depth=16 --set width=1024")
    p.add_argument("--input-shape", help="factory models: one example's shape, e.g. 3,32,32")
    p.add_argument("--blocks-attr", help="factory models: attribute holding the block chain")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--strategy", default="none", help="checkpointing strategy (default none)")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    p.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--estimate", action="store_true",
                   help="predict on fake tensors: no memory allocated, no times")
    p.add_argument("--timeline", metavar="FILE.csv", help="write the live-memory timeline")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=profile_command)


def profile_command(args) -> int:
    config = config_from_args(args)
    dtype = parse_dtype(args.dtype)
    common = dict(dtype=dtype, device=args.device, strategy=args.strategy,
                  optimizer=args.optimizer)
    if args.estimate:
        result = estimate(config, args.batch, **common)
    else:
        result = measure(config, args.batch, repeats=args.repeats, **common)
    if args.timeline:
        result.timeline.to_csv(args.timeline, index=False)
    closed = None
    if isinstance(config, (D2LConfig, MLPConfig)) and args.strategy == "none":
        closed = predict_saved_bytes(config, args.batch, dtype=dtype)
    if args.json:
        row = {k: (None if isinstance(v, float) and math.isnan(v) else v)
               for k, v in result.summary().items()}
        if closed is not None:
            row["closed_form_saved_bytes"] = closed["saved_bytes"]
        print(json.dumps(row, indent=2, default=str))
    else:
        print(render_profile(result, config, closed_form=closed))
        if args.timeline:
            print(f"\ntimeline: {len(result.timeline)} ops written to {args.timeline}")
    return 0
