"""memprop's planner against torch.compile's activation memory budget, side by side.

Three workloads: the zoo transformer (depth 8, d_model 256, heads 4, seq 128, batch 8),
an MLP (depth 32, width 512, batch 256) and a transformers model (``hf:gpt2``, 4 layers,
n_embd 128, 4 heads, seq 128, batch 8, ``use_cache=False`` (see WORKLOADS); random
weights: nothing is downloaded; its batch is a dict, half its rows left-padded, and its
loss ``model(**batch).loss``; every step below runs the workload's own
``cfg.loss(model, batch)``). For each, the (stored bytes, peak, recompute FLOPs,
step-time ratio) of
  * ``torch._functorch.config.activation_memory_budget`` r in BUDGETS, compiled with
    the ``aot_eager_decomp_partition`` backend (min-cut partitioner, eager kernels);
  * the same budgets compiled by ``inductor`` (fused kernels; stored bytes and time);
  * memprop's ``plan(metric="stored", objective="flops")`` at each of compile's stored
    bytes and ``plan(metric="peak", objective="flops")`` at each of compile's peaks (same
    bytes, same peak: who pays less recompute?), the default ``plan()`` (least predicted
    step time) at each of compile's peaks (who steps faster?), ``plan(metric="peak")``
    at fractions of the plain peak (down to
    below the single-level floor: multi-level), and the multi-level optimum;
  * the fixed strategies none, full, sqrt, selective, forward:- and remat:- (memprop's;
    the last two: one checkpoint around the whole forward, nothing kept; every saved
    tensor rebuilt on its own from the batch), and HF-style per-layer
    checkpointing: on the transformers model its own ``activation_checkpointing_enable()``
    (``gradient_checkpointing_enable()`` before transformers 5; non-reentrant
    ``torch.utils.checkpoint`` per layer; measured), on the zoo models memprop's ``full``
    (one checkpoint per block).

How things are counted, the same way for compile and memprop:
  * stored bytes: the distinct storages autograd saves, parameters and buffers apart
    (NOTE [ What counts as a stored intermediate ], memprop.saved) - for compiled steps
    through ``saved_tensors_hooks`` (the compiled function's ``save_for_backward``), for
    eager ones by ``measure_step`` (which also counts selective checkpointing's cache);
  * peaks: memprop's tensor-level peak of one whole step (forward with the loss,
    backward, SGD lr=0 step + ``zero_grad(set_to_none=True)``), as ``measure_step``
    defines ``peak_bytes``. Compiled steps are measured with
    ``LiveMemoryTracker(compiled=True)``, which lets the compiled graph run under the
    tracker and counts its aten ops (exact for aot_eager backends), after a warm-up
    step that compiles; the tracked step is repeated until one runs without compiling
    (entering the tracker recompiles once), as ``measure_step`` measures its second
    tracked step. Most memprop
    rows are simulated on a fake-tensor twin (``simulate_strategy``: equal to the byte on
    CPU); up to three plans a workload (memprop's stored and peak plans at compile's
    MEASURED_R point, the multi-level optimum) are measured for real to check it;
  * recompute FLOPs: backward FLOPs minus the plain eager step's, counted by memprop's
    ``FlopCounter`` (torch's formulas, plus CPU attention forward and backward with the
    CUDA kernels' formulas: torch's FlopCounterMode counts CPU attention as 0, which
    made compile's attention recompute look free). Matmuls, convolutions and attention
    count; pointwise ops (which compile's partitioner also recomputes) count 0 on both
    sides. A compiled step's backward is counted with ``FlopCounter`` around
    ``loss.backward()`` only: a compiled *forward* run under a dispatch mode without
    ``ignore_compile_internals`` makes dynamo skip the frame for good (eager after);
  * step times: medians of ROUNDS interleaved rounds in one process, as ratios to the
    plain eager step. The eager steps are timed together at the end (after a warm-up
    round). Each compile point is timed right after it is measured, interleaved with the
    plain eager step: ``torch._dynamo.reset()`` is needed so each point is partitioned
    at its own budget (without it a new model of the same class reuses the graph
    compiled for the last one), and it drops the compiled code of earlier points, which
    would recompile at whatever budget is current when called again.

``MEMPROP_BENCH_QUICK=1`` runs a small version (tiny sizes, three budgets, one round) to
check the benchmark end to end in a few minutes; its results are not the benchmark's.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings

import torch
import torch._dynamo
import torch._functorch.config as functorch_config
from torch._subclasses.fake_tensor import FakeTensorMode

from memprop.checkpoint import apply_strategy, parse_strategy
from memprop.checkpoint.planning.planner import plan
from memprop.checkpoint.planning.profile import early_stop_flops, profile_chain
from memprop.checkpoint.planning.searches import lowest_nested
from memprop.checkpoint.planning.simulate import simulate as simulate_strategy
from memprop.errors import BudgetError, StrategyError
from memprop.fake import fake_batch, fake_copy
from memprop.flops import FlopCounter
from memprop.measure import measure_step
from memprop.models import model_config
from memprop.saved import storage_keys
from memprop.tracker import LiveMemoryTracker
from memprop.units import format_bytes, format_flops
from memprop.workload import build_workload

QUICK = os.environ.get("MEMPROP_BENCH_QUICK", "") not in ("", "0")

TARGETS = """
Targets (issue 11): at every compile budget point r memprop's plan for the same stored
bytes and its plan for the same peak each pay no more recompute FLOPs than compile, and
memprop's lowest reachable stored bytes and peak are at or below compile's; below the
single-level floor a plan exists and fits; predicted peak = measured peak for every plan;
planning a 48-block transformer takes < 10 s (the FLOP rows: ``objective="flops"``).
Issue 21: at each compile point, the step time of memprop's default plan (``objective=
"time"``, "memprop time peak<=compile r") at compile's peak next to compile's graphs
(aot_eager, and inductor: fused kernels, same partition), and which is faster
(``faster``). Workloads: zoo transformer, MLP, hf:gpt2.
CPU, float32, SGD (lr 0), torch.compile backend aot_eager_decomp_partition (inductor
rows: stored bytes and time; its generated code allocates outside the dispatcher, so
its peak is not measured at tensor level, and its FLOPs are aot_eager's). Counted the
same way for both: stored bytes = distinct storages saved for backward (parameters
apart); peak = tensor-level peak of one whole step (compiled steps measured with
LiveMemoryTracker(compiled=True), which counts the compiled graph's aten ops); recompute
FLOPs = backward FLOPs minus the plain step's, by memprop's FlopCounter (torch's
formulas, CPU attention included); times = medians of interleaved rounds, ratios to the
plain eager step.
"""

BACKEND = "aot_eager_decomp_partition"
if QUICK:
    BUDGETS = (1.0, 0.5, 0.1)
    PEAK_FRACTIONS = (0.6,)
    WORKLOADS = {                      # name: (model, sizes, batch size)
        "transformer": ("transformer", dict(depth=4, d_model=64, heads=4, seq_len=32), 4),
        "mlp": ("mlp", dict(depth=8, width=64, d_in=64), 32),
        "hf:gpt2": ("hf:gpt2", dict(n_layer=2, n_embd=64, n_head=4, seq_len=32,
                                        use_cache=False), 4),
    }
    ROUNDS = 1
    INDUCTOR_BUDGETS: tuple = ()       # inductor compiles for minutes: not in the quick run
    PLANNING = (12, "150MiB")          # blocks, budget of the planning-time check
    MEASURED_R = 0.5                   # the compile point whose memprop plans are measured
else:
    BUDGETS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    PEAK_FRACTIONS = (0.8, 0.6, 0.5, 0.4)
    WORKLOADS = {
        "transformer": ("transformer", dict(depth=8, d_model=256, heads=4, seq_len=128), 8),
        "mlp": ("mlp", dict(depth=32, width=512, d_in=512), 256),
        "hf:gpt2": ("hf:gpt2", dict(n_layer=4, n_embd=128, n_head=4, seq_len=128,
                                        use_cache=False), 8),
    }
    ROUNDS = 3
    INDUCTOR_BUDGETS = BUDGETS
    PLANNING = (48, "600MiB")
    MEASURED_R = 0.3
# hf: use_cache=False, so that compile's graphs and the plain step carry no cache
# (memprop's strategies turn it off while applied: NOTE [ Checkpointing and KV caches ])
FIXED = ("none", "full", "sqrt", "selective", "forward:-", "remat:-")
MiB = 2 ** 20


def _progress(name: str, what: str, t0: float) -> None:
    print(f"   {name}: {what} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
          flush=True)


def _step(loss_fn, forward, model, data, opt, tracker=None):
    """One training step as ``measure_step`` runs it (memprop.measure ``_Step.run``):
    forward (the loss), backward, ``end_backward``, then SGD step + zero_grad, with the
    tracker's phases set as it sets them. ``forward``: the model or its compiled twin."""
    if tracker is not None:
        tracker.phase = "forward"
    loss = loss_fn(forward, data)
    if tracker is not None:
        tracker.phase = "backward"
    loss.backward()
    del loss
    if tracker is not None:
        tracker.end_backward()
        tracker.phase = "optimizer"
    opt.step()
    if tracker is not None:
        tracker.tag_optimizer_state()
    opt.zero_grad(set_to_none=True)


def _times(entries: dict, loss_fn, *, warmup: bool = True) -> dict:
    """Median step ms per entry: (forward callable, model, data), interleaved rounds;
    with ``warmup`` a first round is run and not counted."""
    opts = {k: torch.optim.SGD(model.parameters(), lr=0.0) for k, (_, model, _) in
            entries.items()}
    times = {k: [] for k in entries}
    for _ in range(ROUNDS + warmup):
        for key, (forward, model, data) in entries.items():
            t0 = time.perf_counter()
            _step(loss_fn, forward, model, data, opts[key])
            times[key].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v[int(warmup):]) for k, v in times.items()}


def _frames_compiled() -> int:
    return torch._dynamo.utils.counters["frames"]["ok"]


def _compiled_point(cfg, batch_size, r, plain_entry, backend: str = BACKEND) -> dict:
    """Compile's plan at budget r, compiled and measured: stored bytes, backward FLOPs,
    the step's tensor peak, graph breaks, and the step time against ``plain_entry`` (the
    plain eager model, timed interleaved with it). Under ``inductor`` the peak is None:
    its generated code allocates its buffers outside the dispatcher, where no tensor-level
    tracker sees them (the partition, and so the stored bytes, is the same min-cut)."""
    loss_fn = cfg.loss
    torch._dynamo.reset()
    breaks_before = dict(torch._dynamo.utils.counters["graph_break"])
    try:
        with functorch_config.patch(activation_memory_budget=r), warnings.catch_warnings():
            # the tracker's module scope uses global module hooks: they fire once more
            # for the OptimizedModule wrapper; harmless for bytes
            warnings.filterwarnings("ignore", message=".*global hooks on modules.*")
            model, data = build_workload(cfg, batch_size)
            compiled = torch.compile(model, backend=backend)   # shares model's parameters
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            _step(loss_fn, compiled, model, data, opt)         # compiles forward, backward
            skip = storage_keys([*model.parameters(), *model.buffers()])
            packed = {}

            def pack(t):
                key = t.untyped_storage()._cdata
                if key not in skip:
                    packed[key] = t.untyped_storage().nbytes()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_fn(compiled, data)
            with FlopCounter() as counter:      # the compiled backward runs via autograd
                loss.backward()
            del loss
            opt.zero_grad(set_to_none=True)
            peak = None
            for _ in range(3 if backend != "inductor" else 0):
                # SGD has no state to create: the first tracked step counts unless it
                # had to recompile
                compiles = _frames_compiled()
                tracker = LiveMemoryTracker(model, optimizer=opt, inputs=data,
                                            compiled=True)
                with tracker:
                    _step(loss_fn, compiled, model, data, opt, tracker)
                if _frames_compiled() == compiles:
                    peak = tracker.peak_bytes
                    break
            else:
                if backend != "inductor":
                    raise RuntimeError("the compiled step recompiles at every tracked step")
            # both have run already (the plain model measured, this one compiled)
            ms = _times({"plain": plain_entry, "compile": (compiled, model, data)}, loss_fn,
                        warmup=backend == "inductor")
    finally:
        torch._dynamo.reset()
    return dict(stored=sum(packed.values()), flops=counter.total, peak=peak,
                ratio=ms["compile"] / ms["plain"],
                graph_breaks={reason: n - breaks_before.get(reason, 0) for reason, n in
                              torch._dynamo.utils.counters["graph_break"].items()
                              if n > breaks_before.get(reason, 0)})


def _workload(name: str) -> tuple[list[dict], list[str]]:
    model_name, sizes, batch_size = WORKLOADS[name]
    cfg = model_config(model_name, **sizes)
    loss_fn = cfg.loss
    hf = model_name.startswith("hf:")
    rows, notes = [], []
    t0 = time.perf_counter()
    base_model, base_data = build_workload(cfg, batch_size)
    plain = measure_step(base_model, base_data, loss_fn=loss_fn, repeats=1,
                         inference=False, timing=False)
    models = {"none": (base_model, base_data)}   # strategy spec -> (model, data)
    plain_entry = (base_model, base_model, base_data)
    simulated = {}                               # strategy spec -> simulated Measurement
    mode = FakeTensorMode()             # plans are made and checked on a fake twin
    twin = (fake_copy(base_model, mode), fake_batch(base_data, mode))

    def real_model(strategy):
        """The real model with ``strategy`` applied (for timing; measured rows too)."""
        if strategy.spec not in models:
            model, data = build_workload(cfg, batch_size)
            apply_strategy(model, strategy, example_batch=data, loss_fn=loss_fn)
            models[strategy.spec] = (model, data)
        return models[strategy.spec]

    def add(method, spec, m, *, key=None, predicted=None, measured=False, ratio=None):
        """One row; ``key`` names its model in ``models`` (timed at the end)."""
        rows.append(dict(model=name, method=method, spec=spec, stored_bytes=m["stored"],
                         peak_bytes=m["peak"], predicted_peak_bytes=predicted,
                         recompute_flops=m["flops"] - plain.backward_flops,
                         measured=measured, key=key, step_ratio=ratio))

    def eager(method, strategy, predicted=None, measured=False):
        strategy = parse_strategy(strategy)
        model, data = real_model(strategy)
        if measured:     # the strategy is applied already: the spec is only the label
            m = measure_step(model, data, loss_fn=loss_fn, strategy=strategy.spec,
                             repeats=1, inference=False, timing=False)
        else:            # rows often share a plan: simulate each once
            if strategy.spec not in simulated:
                simulated[strategy.spec] = simulate_strategy(*twin, strategy,
                                                             loss_fn=loss_fn)
            m = simulated[strategy.spec]
        add(method, strategy.spec, dict(stored=m.saved_bytes, peak=m.peak_bytes,
                                        flops=m.backward_flops),
            key=strategy.spec, predicted=predicted, measured=measured)

    for spec in FIXED:
        eager("fixed", spec)
    if hf:        # transformers' own per-layer checkpointing, measured
        gc_model, gc_data = build_workload(cfg, batch_size)
        # gradient_checkpointing_enable is a deprecated alias of it in transformers 5
        enable = getattr(gc_model, "activation_checkpointing_enable", None) or \
            gc_model.gradient_checkpointing_enable
        enable()
        m = measure_step(gc_model, gc_data, loss_fn=loss_fn, repeats=1, inference=False,
                         timing=False)
        models["hf gc"] = (gc_model, gc_data)
        add("hf gradient checkpointing", f"{enable.__name__}()",
            dict(stored=m.saved_bytes, peak=m.peak_bytes, flops=m.backward_flops),
            key="hf gc", measured=True)

    _progress(name, "plain, fixed strategies", t0)
    compiled = {}
    for r in BUDGETS:
        try:
            c = _compiled_point(cfg, batch_size, r, plain_entry)
        except Exception as exc:       # noqa: BLE001 - reported, the benchmark goes on
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            notes.append(f"{name} r={r}: torch.compile failed: {type(exc).__name__}: "
                         f"{first}")
            continue
        compiled[r] = c
        _progress(name, f"compile r={r}: stored {_b(c['stored'])}, peak {_b(c['peak'])}", t0)
        add("compile", f"r={r}", c, ratio=round(c["ratio"], 3))
    breaks = {}
    for c in compiled.values():
        for reason, n in c["graph_breaks"].items():
            breaks.setdefault(reason.strip().splitlines()[0][:120], set()).add(n)
    for reason, counts in breaks.items():
        notes.append(f"{name}: torch.compile graph break ({'/'.join(map(str, sorted(counts)))}"
                     f" per compile point; each graph is partitioned at the budget): {reason}")

    for r in INDUCTOR_BUDGETS:   # the same partitions, compiled to fused kernels
        if r not in compiled:
            continue
        try:
            c = _compiled_point(cfg, batch_size, r, plain_entry, backend="inductor")
        except Exception as exc:       # noqa: BLE001 - reported, the benchmark goes on
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            notes.append(f"{name} r={r}: inductor failed: {type(exc).__name__}: {first}")
            continue
        # inductor's kernels run outside the dispatcher: FLOPs are the same partition's
        # (aot_eager's count at this r); the peak is not measured at tensor level
        c["flops"] = compiled[r]["flops"]
        _progress(name, f"inductor r={r}: stored {_b(c['stored'])}", t0)
        add("inductor", f"r={r}", c, ratio=round(c["ratio"], 3))

    plan_errors = {}
    for metric in ("stored", "peak"):        # memprop at compile's stored bytes and peak
        for r, c in compiled.items():
            try:   # the FLOP claim: least recompute at compile's bytes
                p = plan(*twin, c[metric], metric=metric, loss_fn=loss_fn,
                         objective="flops")
            except BudgetError as exc:
                plan_errors[metric, r] = str(exc).strip().splitlines()[0]
                continue
            eager(f"memprop {metric}<=compile r={r}", p.strategy, p.predicted_peak_bytes,
                  measured=r == MEASURED_R)
    for r, c in compiled.items():        # the default objective: least predicted time
        try:
            p = plan(*twin, c["peak"], loss_fn=loss_fn)
        except BudgetError as exc:
            plan_errors["time", r] = str(exc).strip().splitlines()[0]
            continue
        eager(f"memprop time peak<=compile r={r}", p.strategy, p.predicted_peak_bytes)
    _progress(name, "memprop at compile's stored bytes and peaks", t0)
    for fraction in PEAK_FRACTIONS:          # down to below the single-level floor
        try:
            p = plan(*twin, int(plain.peak_bytes * fraction), loss_fn=loss_fn)
        except BudgetError as exc:
            notes.append(f"{name}: no memprop plan peaks <= {fraction} x plain "
                         f"({_b(int(plain.peak_bytes * fraction))}): "
                         f"{str(exc).strip().splitlines()[0]}")
            continue
        eager(f"memprop peak<={fraction}", p.strategy, p.predicted_peak_bytes)
    with mode:
        costs, _ = profile_chain(*twin, loss_fn=loss_fn)
    deepest = lowest_nested(costs, early=early_stop_flops(*twin, loss_fn=loss_fn))
    try:
        predicted = simulate_strategy(*twin, deepest, loss_fn=loss_fn).peak_bytes
        eager("multi-level optimum", deepest, predicted, measured=True)
    except StrategyError as exc:      # nested segments need blocks called with one tensor
        notes.append(f"{name}: multi-level optimum {deepest.spec[:40]} not applicable: "
                     f"{str(exc).strip().splitlines()[0][:160]}")

    _progress(name, "plans at fractions of the peak, multi-level optimum", t0)
    keys = {row["key"] for row in rows if row["key"] is not None}
    ms = _times({k: (models[k][0], *models[k]) for k in ["none", *sorted(keys - {"none"})]},
                loss_fn)
    for row in rows:
        key = row.pop("key")
        if key is not None:
            row["step_ratio"] = round(ms[key] / ms["none"], 3)
    _faster(rows)
    _progress(name, "step times", t0)
    return rows, _verdicts(name, rows, plan_errors) + notes


def _faster(rows: list[dict]) -> None:
    """Each ``memprop time peak<=compile r`` row's ``faster``: which of memprop's plan
    (eager) and compile's graph at r (aot_eager, and inductor where it compiled) steps
    faster, by their step-time ratios to the same plain eager step."""
    by = {(x["method"], x["spec"]): x for x in rows}
    for row in rows:
        row.setdefault("faster", None)
        if not row["method"].startswith("memprop time peak<=compile r="):
            continue
        r = row["method"].rsplit("=", 1)[1]
        sides = {"memprop": row["step_ratio"]}
        for backend in ("compile", "inductor"):
            other = by.get((backend, f"r={r}"))
            if other is not None:
                sides["aot_eager" if backend == "compile" else backend] = other["step_ratio"]
        row["faster"] = min(sides, key=sides.__getitem__)


def _cmp(mine, theirs) -> str:
    return "<=" if mine <= theirs else ">"


def _b(n: int) -> str:
    return format_bytes(n, precision=2)


def _verdicts(name: str, rows: list[dict], plan_errors: dict) -> list[str]:
    out = []
    comps = {float(x["spec"][2:]): x for x in rows if x["method"] == "compile"}
    for metric, what in (("stored", "stores"), ("peak", "peaks at")):
        for r, comp in comps.items():
            mine = next((x for x in rows
                         if x["method"] == f"memprop {metric}<=compile r={r}"), None)
            if mine is None:
                out.append(f"{name} r={r} ({metric}): no memprop plan {what} <= "
                           f"{_b(comp[f'{metric}_bytes'])}, compile's "
                           f"({plan_errors.get((metric, r), 'not planned')})")
                continue
            out.append(f"{name} r={r} ({metric}): compile {what} "
                       f"{_b(comp[f'{metric}_bytes'])} for "
                       f"{format_flops(comp['recompute_flops'])} recompute; memprop "
                       f"{_b(mine[f'{metric}_bytes'])} for "
                       f"{format_flops(mine['recompute_flops'])} "
                       f"({_cmp(mine['recompute_flops'], comp['recompute_flops'])})")
    for r, comp in comps.items():      # seconds: the default (time) plan at compile's peak
        mine = next((x for x in rows
                     if x["method"] == f"memprop time peak<=compile r={r}"), None)
        ind = next((x for x in rows if x["method"] == "inductor" and x["spec"] == f"r={r}"),
                   None)
        theirs = f"compile aot_eager {comp['step_ratio']}x at {_b(comp['peak_bytes'])}" + (
            f", inductor {ind['step_ratio']}x" if ind is not None else "")
        if mine is None:
            out.append(f"{name} r={r} (time): {theirs}; no memprop plan "
                       f"({plan_errors.get(('time', r), 'not planned')})")
            continue
        out.append(f"{name} r={r} (time): {theirs}; memprop {mine['spec'][:40]} "
                   f"{mine['step_ratio']}x at {_b(mine['peak_bytes'])}: faster: "
                   f"{mine['faster']}")
    # memprop's plans and strategies (transformers' own checkpointing is not memprop's)
    ours = [x for x in rows
            if x["method"] not in ("compile", "inductor", "hf gradient checkpointing")]
    if comps:
        for metric in ("stored", "peak"):
            mine = min(ours, key=lambda x: (x[f"{metric}_bytes"], x["recompute_flops"]))
            theirs = min(comps.values(),
                         key=lambda x: (x[f"{metric}_bytes"], x["recompute_flops"]))
            out.append(f"{name}: lowest {metric}: memprop {_b(mine[f'{metric}_bytes'])} "
                       f"({mine['method']} {mine['spec'][:40]}), compile "
                       f"{_b(theirs[f'{metric}_bytes'])} ({theirs['spec']}) "
                       f"({_cmp(mine[f'{metric}_bytes'], theirs[f'{metric}_bytes'])})")
    else:
        out.append(f"{name}: no compile point ran: nothing to compare")
    checked = [x for x in rows if x["measured"] and x["predicted_peak_bytes"]]
    exact = all(x["predicted_peak_bytes"] == x["peak_bytes"] for x in checked)
    out.append(f"{name}: predicted peak = measured for the {len(checked)} plans measured "
               f"here ({', '.join(x['method'] for x in checked)}): {exact}")
    return out


def _planning_seconds() -> dict[str, float]:
    """Seconds to plan the PLANNING transformer on its fake twin (profile, DP,
    simulations; no timing), per objective: ``flops`` (the target's) and ``time`` (the
    default: also simulates the placement of plain segments and prices each candidate
    by the device's rates)."""
    depth, budget = PLANNING
    cfg = model_config("transformer", depth=depth, d_model=256, heads=4, seq_len=128)
    model, data = build_workload(cfg, 8)
    mode = FakeTensorMode()
    twin = (fake_copy(model, mode), fake_batch(data, mode))
    seconds = {}
    for objective in ("flops", "time"):
        t0 = time.perf_counter()
        plan(*twin, budget, objective=objective)
        seconds[objective] = round(time.perf_counter() - t0, 1)
    return seconds


def run() -> dict:
    rows, verdicts = [], []
    for name in WORKLOADS:
        r, v = _workload(name)
        rows += r
        verdicts += v
    seconds = _planning_seconds()
    depth, budget = PLANNING
    verdicts.append(f"planning a {depth}-block transformer at {budget} (on its fake twin): "
                    f"{seconds['flops']:.1f} s with objective=\"flops\" (target < 10 s for "
                    f"48 blocks), {seconds['time']:.1f} s with the default objective "
                    "(time: the placement of plain segments simulated too)")
    table = []                          # for display: MiB and GFLOP
    for row in rows:
        shown = dict(row)
        for key in ("stored_bytes", "peak_bytes", "predicted_peak_bytes"):
            value = shown.pop(key)
            shown[key.replace("_bytes", "_mib")] = None if value is None else round(
                value / MiB, 2)
        shown["recompute_gflop"] = round(shown.pop("recompute_flops") / 1e9, 3)
        shown["step_ratio"] = shown.pop("step_ratio")
        shown["measured"] = shown.pop("measured")
        shown["faster"] = shown.pop("faster")
        if len(shown["spec"]) > 40:        # op-level specs are long: whole in the JSON
            shown["spec"] = shown["spec"][:37] + "..."
        table.append(shown)
    return {"table": table, "rows": rows, "verdicts": verdicts, "quick": QUICK,
            "planning_seconds": seconds, "planning_blocks": depth}
