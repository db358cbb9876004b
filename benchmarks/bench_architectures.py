"""Every transformers architecture with a language-model head, checkpointed by every
strategy form: bitwise exact, refused, or silently wrong; and the estimate against the
measurement.

    python benchmarks/run.py architectures          # all of them (hours on 2 cores)
    MEMPROP_ARCHS=gpt2,llama python benchmarks/run.py architectures     # a few
    python benchmarks/bench_architectures.py gpt2 llama   # a few, printed, no results files
    python benchmarks/bench_architectures.py --report     # results/architectures.md from
                                                          # the log so far, running nothing

The model types are transformers' own: every key of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
and MODEL_FOR_MASKED_LM_MAPPING_NAMES (mixtures of experts, state-space and hybrid
models, multimodal models with a causal-LM head), each run with the head memprop picks
for ``hf:<type>`` (masked-LM where the type has one, else causal-LM). Each type runs
twice (VARIANTS): ``hf:<type>`` exactly as a user types it (memprop's tiny defaults,
nothing set), and ``hf:<type>`` sized here (3 layers, every dropout field of the config
at 0.1, 32 tokens, no KV cache). For each: the plain step, then each form of FORMS on a
fresh model with the same weights, the same left-padded batch and the same seed before
the step (the architecture's own dropout on); its loss and every gradient
``torch.equal`` to the plain step's ("exact"), or a ``StrategyError`` (``BudgetError``
for the budget: "refused", with its message), else "failed" (an exception, or gradients
that differ: silently wrong). ``budget`` is the planner's plan
(``memprop.checkpoint.plan``) for 60 % of the plain step's measured peak, or, where that
is below what any plan reaches (its ``BudgetError``), for the smallest feasible budget
the error names (noted in the row). For the plain step and each form that runs,
``estimate`` (fake tensors) is compared with ``measure``: stored bytes and tensor peak
equal, or the difference in bytes. A type whose plain step cannot run "does not build",
with why.

Each (type, variant) runs in its own process (``--one``), under a time limit, and
writes one JSON line per result as it goes, so a model that hangs or crashes the
interpreter loses only what it had left. Finished (type, variant) pairs are appended to
``results/architectures.jsonl`` (``MEMPROP_ARCH_LOG``) as they end, and a run skips the
pairs found there: an interrupted run resumes, and the report covers what has run
(``MEMPROP_ARCH_FRESH=1`` starts over). The variants run in VARIANTS order over all the
types, sized first.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter

TARGETS = """
Every transformers model type with a causal-LM or masked-LM head (transformers' own
mappings), built offline from a tiny config, checkpointed by every strategy form
(full, sqrt, selective, forward:-, remat:-, and a planned budget at 60 % of the plain
peak), dropout on and left padding: each form gives the plain step's loss and gradients
bitwise ("exact") or refuses with a StrategyError ("refused"); "failed" is an exception
or gradients that differ. The estimate on fake tensors equals the measured stored bytes
and tensor peak. Two variants per type: hf:<type> exactly as typed (memprop's tiny
defaults, KV cache as the architecture has it), and sized here (3 layers, dropout 0.1
in every dropout field, 32 tokens, use_cache=False).
Batch 4 (rows 1 and 3 left-padded), float32, SGD, CPU.
"""

NAMED_ONLY = True                # benchmarks/run.py runs it only when named: hours
FORMS = ("full", "sqrt", "selective", "forward:-", "remat:-", "budget")
VARIANTS = ("sized", "defaults")     # sized first: dropout on, the harder case
BATCH = 4
BUDGET_FRACTION = 0.6
SIZED = dict(layers=3, dropout=0.1, seq_len=32, pad=4)
MAX_PARAMS = 20_000_000          # a "tiny" config above this does not build (too large)
CACHE_OFF = "cache off"           # a row's reference: the plain step with use_cache=False
SEED = 7                         # torch.manual_seed before every step (dropout)
TIMEOUT_S = int(os.environ.get("MEMPROP_ARCH_TIMEOUT", 1200))   # per (type, variant)
FORM_TIMEOUT_S = int(os.environ.get("MEMPROP_ARCH_FORM_TIMEOUT", 300))
JOBS = int(os.environ.get("MEMPROP_ARCH_JOBS", 2))
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _quiet():
    warnings.simplefilter("ignore")
    import transformers
    transformers.logging.set_verbosity_error()


def architectures() -> list[str]:
    """Every model type with a causal-LM or masked-LM head, sorted (transformers' names)."""
    from transformers.models.auto import modeling_auto as auto
    return sorted(set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
                  | set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES))


# -- configs ------------------------------------------------------------------------------

_LAYER_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers",
                 "num_decoder_layers")


def _fields_of(config) -> set:
    return {config.attribute_map.get(k, k) for k in config.to_dict()} | set(config.attribute_map)


def _dropout_fields(config) -> list[str]:
    d = config.to_dict()
    return sorted(k for k, v in d.items() if not k.startswith("_")
                  and ("dropout" in k or "pdrop" in k) and isinstance(v, (int, float))
                  and not isinstance(v, bool))


def sized_fields(model_type: str) -> dict:
    """The sized variant's fields: 3 layers, every dropout field 0.1, 32 tokens, 4 padded,
    no KV cache (a plain step with one may differ from the cache-free step in the last
    bit; checkpointing turns it off, so the cache-free plain step is the exact reference,
    as in tests/test_hf.py); in the text sub-config for a composite config
    (``text_config.num_hidden_layers``)."""
    from memprop.models.hf import _default_config, _get, _sub_configs
    default = _default_config(model_type)
    fields = {"seq_len": SIZED["seq_len"], "pad": SIZED["pad"]}
    scopes = [("", default)] + [(f"{k}.", _get(default, k)) for k in _sub_configs(default)]
    layered = False
    for prefix, config in scopes:
        if "use_cache" in config.to_dict():   # every sub-config's (qwen3_5's text_config)
            fields[prefix + "use_cache"] = False   # the exact reference (test_hf's TINY)
        names = _fields_of(config)
        layer = next((f for f in _LAYER_FIELDS if f in names), None)
        if layer and not layered and (prefix == "" or "text" in prefix or "decoder" in prefix
                                      or len(scopes) == 2):
            fields[prefix + layer] = SIZED["layers"]
            layered = True
        for key in _dropout_fields(config):
            fields[prefix + key] = SIZED["dropout"]
    return fields


def config_for(model_type: str, variant: str):
    """The variant's ``hf:`` config. Sized: a dropout field the architecture refuses at
    0.1 (diffllama's attention_dropout, mpt's attn_pdrop typed int), named by the error
    building it, is left at its default."""
    from memprop import model_config
    if variant != "sized":
        return model_config(f"hf:{model_type}")
    fields = sized_fields(model_type)
    while True:
        cfg = model_config(f"hf:{model_type}", **fields)
        try:
            cfg.build(device="meta")
            return cfg
        except Exception as exc:   # noqa: BLE001
            named = [k for k in fields if "drop" in k and k.rpartition(".")[2] in str(exc)]
            if not named:
                return cfg             # not the dropout: the step says what fails
            del fields[named[0]]


# -- one step, compared -------------------------------------------------------------------

def _where(exc: BaseException) -> str:
    """The innermost frame, and the innermost memprop frame if another: where to look."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    short = lambda f: (f"{f.filename.split('site-packages/')[-1].split('/work/main/')[-1]}"  # noqa: E731
                       f":{f.lineno}")
    inner = frames[-1]
    ours = next((f for f in reversed(frames) if "/memprop/" in f.filename), None)
    return short(inner) + (f" (memprop: {short(ours)})" if ours and ours is not inner else "")


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"


def _refusal(exc: BaseException) -> bool:
    """memprop's own refusals: a strategy that cannot replay, a budget nothing meets, a
    plan that cannot be made on fake tensors (a forward reading tensor values)."""
    from memprop.errors import BudgetError, StrategyError
    from memprop.measure import DataDependentStepError
    return isinstance(exc, (StrategyError, BudgetError, DataDependentStepError))


class _Timeout(Exception):
    pass


def _alarm(seconds: int):
    def fire(signum, frame):
        raise _Timeout(f"no result within {seconds} s")
    signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)


def step(cfg, strategy=None, *, cache=True, plan_budget=None):
    """Loss and gradients of one forward + backward on a fresh model (weights by seed 0)
    and the config's example batch, ``torch.manual_seed(SEED)`` before the step.
    ``strategy``: applied first (a spec). ``plan_budget``: plan for that many bytes on a
    twin (same weights) and apply the plan; returns it too. The twin: planning runs the
    model, and a model that changes itself on its first call (big_bird swaps its
    attention modules, drawing their weights from the global RNG) would otherwise start
    the step in another state than the plain step's model. ``cache=False``: the KV cache
    off (a plain step)."""
    from memprop.checkpoint import apply_strategy, plan
    from memprop.checkpoint.forms.cache import cache_off
    model, batch = cfg.build(), cfg.example_batch(BATCH)
    model.train()
    found = None
    if plan_budget is not None:
        twin = cfg.build()
        twin.train()
        found = plan(twin, batch, plan_budget, loss_fn=cfg.loss)
        found.apply(model)
    elif strategy is not None:
        apply_strategy(model, strategy)
    if not cache:
        cache_off(model, warn=False)
    import torch
    torch.manual_seed(SEED)
    loss = cfg.loss(model, batch)
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.detach().clone()
             for n, p in model.named_parameters()}
    return loss.detach(), grads, found


def compare(reference, run) -> str | None:
    """None when ``run`` is bitwise ``reference`` (loss, every gradient, None alike), else
    what differs."""
    import torch
    (loss0, grads0), (loss1, grads1) = reference[:2], run[:2]
    differ = [n for n, g in grads0.items()
              if (g is None) != (grads1.get(n) is None)
              or (g is not None and not torch.equal(g, grads1[n]))]
    if torch.equal(loss0, loss1) and not differ:
        return None
    worst = max((float((grads0[n] - grads1[n]).abs().max()) for n in differ
                 if grads0[n] is not None and grads1.get(n) is not None
                 and grads0[n].shape == grads1[n].shape), default=0.0)
    losses = "equal" if torch.equal(loss0, loss1) else f"{float(loss0)!r} vs {float(loss1)!r}"
    return (f"loss {losses}; {len(differ)} of {len(grads0)} gradients differ"
            + (f" (max |diff| {worst:.3g}; first {differ[0]})" if differ else ""))


def bytes_check(cfg, spec: str, inference: bool) -> dict:
    """measure and estimate of one step under ``spec``: equal, or the differences."""
    from memprop import estimate, measure
    out = {}
    try:
        m = measure(cfg, BATCH, strategy=spec, timing=False, flops=False, inference=inference,
                    check_fits=False)
        out.update(measured_saved=m.saved_bytes, measured_peak=m.peak_bytes,
                   measured_inference_peak=m.inference_peak_bytes if inference else None)
    except Exception as exc:   # noqa: BLE001 - reported, not raised
        out.update(estimate="measure error", estimate_error=_message(exc),
                   estimate_where=_where(exc))
        return out
    try:
        # experts run one by one: predicted under the routing the measured step ran
        e = estimate(cfg, BATCH, strategy=spec, flops=False, inference=inference,
                     routing="batch")
    except Exception as exc:   # noqa: BLE001
        out.update(estimate="error", estimate_error=_message(exc), estimate_where=_where(exc))
        return out
    diff = {"saved": e.saved_bytes - m.saved_bytes, "peak": e.peak_bytes - m.peak_bytes}
    if inference:
        diff["inference_peak"] = e.inference_peak_bytes - m.inference_peak_bytes
    out.update(estimated_saved=e.saved_bytes, estimated_peak=e.peak_bytes,
               estimate="exact" if not any(diff.values()) else "differs",
               estimate_diff={k: v for k, v in diff.items() if v}, routing=e.routing)
    return out


def check(model_type: str, variant: str, emit=print, forms=FORMS) -> None:
    """Run one (type, variant): ``emit`` gets one dict per result (see the module
    docstring). In-process: the caller bounds the time."""
    _quiet()
    import torch

    from memprop.errors import BudgetError
    from memprop.models.hf import _default_config, _get, _sub_configs
    base = {"type": model_type, "variant": variant}
    t0 = time.perf_counter()

    def done(**row):
        emit({**base, "seconds": round(time.perf_counter() - t0, 1), **row})

    try:
        cfg = config_for(model_type, variant)
        base.update(task=cfg.task)
        fields = {**dict(cfg.options), **({"seq_len": cfg.seq_len, "pad": cfg.pad}
                                          if variant == "sized" else {})}
        try:                  # counted on the meta device: nothing allocated
            params = sum(p.numel() for p in cfg.build(device="meta").parameters())
        except Exception:     # noqa: BLE001 - a model that cannot init on meta: build it
            params = 0
        base.update(params=params)
        if params > MAX_PARAMS:
            raise RuntimeError(f"not tiny: {params / 1e6:.1f} M parameters under memprop's "
                               f"tiny config (limit {MAX_PARAMS / 1e6:.0f} M)")
        _alarm(FORM_TIMEOUT_S)
        plain = step(cfg)
        signal.alarm(0)
        if not torch.isfinite(plain[0]):
            raise RuntimeError(f"the plain step's loss is {float(plain[0])}")
    except Exception as exc:   # noqa: BLE001
        signal.alarm(0)
        done(form="none", status="does not build", reason=_message(exc), where=_where(exc),
             fields=_safe_fields(model_type, variant))
        return
    again = step(cfg)
    reproducible = compare(plain, again) is None
    default = _default_config(model_type)
    uses_cache = any(getattr(c, "use_cache", False) is True for c in
                     [default] + [_get(default, k) for k in _sub_configs(default)])
    plain_bytes = bytes_check(cfg, "none", inference=True)
    done(form="none", status="built", reproducible=reproducible, fields=fields,
         **plain_bytes)
    plain_peak = plain_bytes.get("measured_peak")
    for form in forms:
        t0 = time.perf_counter()
        row = {"form": form}
        try:
            _alarm(FORM_TIMEOUT_S)
            if form == "budget":
                if plain_peak is None:
                    from memprop import measure
                    plain_peak = measure(cfg, BATCH, timing=False, flops=False,
                                         inference=False, check_fits=False).peak_bytes
                budget = int(plain_peak * BUDGET_FRACTION)
                row.update(budget_bytes=budget, plain_peak=plain_peak)
                try:
                    run = step(cfg, plan_budget=budget)
                except BudgetError as exc:   # below what fits: the smallest budget it found
                    if not exc.smallest_feasible_bytes:
                        raise
                    row.update(budget_note=f"{BUDGET_FRACTION:.0%} of the plain peak is below "
                               f"the smallest feasible budget; the plan the error carries "
                               f"for that budget instead ({_message(exc)})")
                    budget = exc.smallest_feasible_bytes
                    row.update(budget_bytes=budget)
                    run = (*step(cfg, exc.plan.spec)[:2], exc.plan)
                row.update(spec=run[2].spec, predicted_peak=run[2].predicted_peak_bytes)
            else:
                run = step(cfg, form)
                row.update(spec=form)
            signal.alarm(0)
        except Exception as exc:   # noqa: BLE001
            signal.alarm(0)
            status = ("refused" if _refusal(exc) else "timeout" if isinstance(exc, _Timeout)
                      else "failed")
            row.update(status=status, reason=_message(exc), where=_where(exc),
                       exception=type(exc).__name__)
            done(**row)
            continue
        wrong = compare(plain, run)
        if wrong is None:
            row.update(status="exact")
        elif not reproducible:
            row.update(status="failed", reason="the plain step itself is not bitwise "
                       f"reproducible; {wrong}")
        else:
            row.update(status="failed", reason=f"silently wrong: {wrong}")
            if uses_cache:
                try:
                    if compare(step(cfg, cache=False), run) is None:
                        row.update(status="exact", reference=CACHE_OFF,
                                   reason=f"the plain step with the KV cache on differs: "
                                   f"{wrong}")
                except Exception:   # noqa: BLE001
                    pass
        try:
            _alarm(FORM_TIMEOUT_S)
            row.update(bytes_check(cfg, row["spec"], inference=False))
            signal.alarm(0)
        except _Timeout as exc:
            row.update(estimate="error", estimate_error=_message(exc))
        if form == "budget" and "measured_peak" in row:
            row["fits"] = row["measured_peak"] <= row["budget_bytes"]
        done(**row)


def _safe_fields(model_type, variant):
    try:
        return sized_fields(model_type) if variant == "sized" else {}
    except Exception:   # noqa: BLE001
        return {}


# -- the driver: one process per (type, variant) -------------------------------------------

def _run_one(model_type: str, variant: str, folder: str) -> list[dict]:
    path = pathlib.Path(folder) / f"{model_type}.{variant}.jsonl"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--one", model_type,
           variant, str(path)]
    t0 = time.perf_counter()
    error = None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S,
                              env={**os.environ, **ENV})
        if proc.returncode != 0:
            error = (f"the process ended with status {proc.returncode}: "
                     + " ".join(proc.stderr.split())[-400:])
    except subprocess.TimeoutExpired:
        error = f"timeout: no end within {TIMEOUT_S} s"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if error:
        seen = {r["form"] for r in rows}
        base = {"type": model_type, "variant": variant,
                "seconds": round(time.perf_counter() - t0, 1)}
        if "none" not in seen:
            rows.append({**base, "form": "none", "status": "does not build", "reason": error})
        else:
            rows += [{**base, "form": f, "status": "failed", "reason": error}
                     for f in FORMS if f not in seen]
    return rows


def _selected() -> list[str]:
    names = os.environ.get("MEMPROP_ARCHS", "")
    found = architectures()
    return [n for n in names.split(",") if n] if names else found


LOG = pathlib.Path(os.environ.get("MEMPROP_ARCH_LOG", pathlib.Path(__file__).resolve().parent
                                  / "results" / "architectures.jsonl"))


def _logged() -> list[dict]:
    """The rows of every (type, variant) finished by earlier runs (LOG), by this
    transformers version only; empty after ``MEMPROP_ARCH_FRESH=1``."""
    import transformers
    if os.environ.get("MEMPROP_ARCH_FRESH") == "1" or not LOG.exists():
        return []
    rows = [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]
    for r in rows:                       # logged before "timeout" had its own status
        if r["status"] == "failed" and r.get("exception") == "_Timeout":
            r["status"] = "timeout"
        old = "; equal to the plain step with the KV cache off (use_cache=False)"
        if r["status"] == "failed" and r.get("reason", "").endswith(old):   # before CACHE_OFF
            r.update(status="exact", reference=CACHE_OFF, reason=r["reason"].replace(
                "silently wrong: ", "the plain step with the KV cache on differs: ")[:-len(old)])
    return [r for r in rows if r.get("transformers") == transformers.__version__]


def result(rows: list[dict], selected: list[str]) -> dict:
    """The benchmark's result from ``rows`` (what ``run`` returns)."""
    import transformers
    from transformers.models.auto import modeling_auto as auto
    rows = sorted(rows, key=lambda r: (r["type"], VARIANTS.index(r["variant"]),
                                       (("none",) + FORMS).index(r["form"])))
    summary = summarise(rows, architectures(), selected)
    summary["mappings"] = {"causal-lm": len(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                           "masked-lm": len(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)}
    summary["transformers"] = transformers.__version__
    return {"table": rows, "summary": summary, "verdicts": verdicts(summary),
            "forms": list(FORMS), "variants": list(VARIANTS), "batch": BATCH,
            "budget_fraction": BUDGET_FRACTION, "sized": SIZED}


def run() -> dict:
    _quiet()
    import transformers
    selected = _selected()
    rows = [r for r in _logged() if r["type"] in selected]
    done = {(r["type"], r["variant"]) for r in rows}
    if os.environ.get("MEMPROP_ARCH_FRESH") == "1":
        LOG.unlink(missing_ok=True)
    LOG.parent.mkdir(exist_ok=True)
    pending = [(t, v) for v in VARIANTS for t in selected if (t, v) not in done]
    print(f"  {len(done)} (type, variant) pairs from {LOG.name}; {len(pending)} to run",
          flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, cf.ThreadPoolExecutor(JOBS) as pool, \
            open(LOG, "a") as log:
        jobs = {pool.submit(_run_one, t, v, folder): (t, v) for t, v in pending}
        for i, job in enumerate(cf.as_completed(jobs), 1):
            got = [{**r, "transformers": transformers.__version__} for r in job.result()]
            rows += got
            log.write("".join(json.dumps(r, default=str) + "\n" for r in got))
            log.flush()
            t, v = jobs[job]
            status = Counter(r["status"] for r in got)
            print(f"  [{i}/{len(jobs)}] {t} ({v}): {dict(status)}  "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    return result(rows, selected)


def summarise(rows: list[dict], found: list[str], selected: list[str]) -> dict:
    out = {"found": len(found), "run": len(selected), "variants": {}}
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        plain = {r["type"]: r for r in mine if r["form"] == "none"}
        built = sorted(t for t, r in plain.items() if r["status"] == "built")
        per_form = {}
        for form in ("none",) + FORMS:
            these = [r for r in mine if r["form"] == form and r["type"] in built]
            per_form[form] = {
                **({} if form == "none" else dict(Counter(r["status"] for r in these))),
                **({} if form == "none" else {"exact: cache off": sum(
                    r.get("reference") == CACHE_OFF for r in these)}),
                "estimate exact": sum(r.get("estimate") == "exact" for r in these),
                "estimate differs": sum(r.get("estimate") == "differs" for r in these),
                "estimate error": sum(r.get("estimate") in ("error", "measure error")
                                      for r in these)}
        out["variants"][variant] = {
            "ran": len(plain), "built": len(built), "does not build": len(plain) - len(built),
            "plain not reproducible": sorted(t for t in built if not plain[t].get("reproducible")),
            "forms": per_form,
            "all forms exact or refused": sum(
                all(r["status"] in ("exact", "refused") for r in mine
                    if r["type"] == t and r["form"] != "none") for t in built)}
    return out


def verdicts(summary: dict) -> list[str]:
    lines = [f"{summary['found']} model types with a causal-LM or masked-LM head; "
             f"{summary['run']} selected"]
    for variant, v in summary["variants"].items():
        forms = "; ".join(
            f"{f}: {c.get('exact', 0)} exact, {c.get('refused', 0)} refused, "
            f"{c.get('failed', 0)} failed"
            + (f", {c['timeout']} out of time" if c.get("timeout") else "")
            + (f" ({c['exact: cache off']} of the exact against the plain step with the KV "
               "cache off)" if c.get("exact: cache off") else "")
            for f, c in v["forms"].items() if f != "none")
        est = sum(c["estimate exact"] for c in v["forms"].values())
        est_all = sum(c["estimate exact"] + c["estimate differs"] + c["estimate error"]
                      for c in v["forms"].values())
        lines.append(f"{variant}: {v['ran']} of {summary['found']} types run so far; "
                     f"{v['built']} build, {v['does not build']} do not; {forms}; "
                     f"estimate exact in {est} of {est_all} steps compared")
    return lines


# -- the report ---------------------------------------------------------------------------

def _size(n) -> str:
    from memprop.units import format_bytes
    return ("+" if n > 0 else "-") + format_bytes(abs(n)).replace(" ", "")


def _cell(r: dict) -> str:
    status = r["status"]
    text = {"exact": "exact", "refused": "refused", "failed": "**FAILED**", "timeout": "timeout",
            "built": "runs", "does not build": "does not build"}[status]
    if r.get("reference") == CACHE_OFF:
        text += " (cache off)"
    if status == "failed":
        text += " (grads)" if "silently wrong" in r.get("reason", "") else (
            f" ({r.get('exception', 'timeout' if 'timeout' in r.get('reason', '') else '?')})")
    if r.get("budget_note"):
        text += " (at the smallest feasible budget)"
    if r.get("fits") is False:
        text += " **over budget**"
    est = r.get("estimate")
    if est == "exact":
        text += ", est ="
    elif est == "differs":
        text += ", est " + " ".join(f"{k} {_size(v)}" for k, v in r["estimate_diff"].items())
    elif est:
        text += ", est error"
    return text


def markdown(result: dict) -> str:
    s, rows = result["summary"], result["table"]
    lines = ["# benchmark: architectures", "", TARGETS.strip(), "",
             f"transformers {s['transformers']}: {s['found']} model types with a causal-LM "
             f"({s['mappings']['causal-lm']}) or masked-LM ({s['mappings']['masked-lm']}) "
             f"head; {s['run']} selected. Cells: exact / refused / **FAILED** (grads: silently "
             "wrong gradients; else the exception), then `est =` when the estimate equals "
             "the measured stored bytes and peak, else the estimate minus the measurement. "
             "`exact (cache off)`: bitwise the plain step with `use_cache=False`, which "
             "applying a strategy sets, with a warning, as transformers' own gradient "
             "checkpointing does (NOTE [ Checkpointing and KV caches ]); the plain step "
             "with the cache on differs from it in the last bits.",
             "", "## Counts", ""]
    head = ("| variant | built | does not build | form | exact | refused | failed | out of time "
            "| estimate exact | estimate differs | estimate error |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for variant, v in s["variants"].items():
        for form, c in v["forms"].items():
            lines.append(f"| {variant} | {v['built']} | {v['does not build']} | {form} | "
                         f"{c.get('exact', '') if form != 'none' else ''} | "
                         f"{c.get('refused', '') if form != 'none' else ''} | "
                         f"{c.get('failed', '') if form != 'none' else ''} | "
                         f"{c.get('timeout', '') if form != 'none' else ''} | "
                         f"{c['estimate exact']} | {c['estimate differs']} | "
                         f"{c['estimate error']} |")
    lines += [""] + [f"- {line}" for line in result.get("verdicts", [])]
    for variant in result["variants"]:
        v = s["variants"][variant]
        if v["plain not reproducible"]:
            lines.append(f"- {variant}: the plain step is not bitwise reproducible on "
                         f"{', '.join(v['plain not reproducible'])}")
    forms = ["none"] + result["forms"]
    for variant in result["variants"]:
        lines += ["", f"## Per architecture: {variant}", "",
                  "| type | task | " + " | ".join(forms) + " |",
                  "|" + "---|" * (len(forms) + 2)]
        by_type: dict = {}
        for r in rows:
            if r["variant"] == variant:
                by_type.setdefault(r["type"], {})[r["form"]] = r
        for t, rs in by_type.items():
            plain = rs.get("none", {})
            if plain.get("status") == "does not build":
                lines.append(f"| {t} | {plain.get('task', '')} | does not build (below) |"
                             + " |" * len(result["forms"]))
                continue
            lines.append(f"| {t} | {plain.get('task', '')} | "
                         + " | ".join(_cell(rs[f]) if f in rs else "" for f in forms) + " |")
    lines += ["", "## Does not build", "", "| type | variant | why | where |", "|---|---|---|---|"]
    for r in rows:
        if r["status"] == "does not build":
            lines.append(f"| {r['type']} | {r['variant']} | {_md(r.get('reason', ''))} | "
                         f"{_md(r.get('where', ''))} |")
    lines += ["", "## Failures", "", "| type | variant | form | what | where |",
              "|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "failed":
            lines.append(f"| {r['type']} | {r['variant']} | {r['form']} | "
                         f"{_md(r.get('reason', ''))} | {_md(r.get('where', ''))} |")
    lines += ["", "## Estimate errors and differences", "",
              "| type | variant | form | estimate | where |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("estimate") in ("error", "measure error", "differs"):
            what = (r.get("estimate_error") if r["estimate"] != "differs" else
                    ", ".join(f"{k} {_size(v)}" for k, v in r["estimate_diff"].items())
                    + (f" (routing: {r['routing']})" if r.get("routing") else ""))
            lines.append(f"| {r['type']} | {r['variant']} | {r['form']} | "
                         f"{r['estimate']}: {_md(what)} | {_md(r.get('estimate_where', ''))} |")
    over = [r for r in rows if r.get("fits") is False]
    if over:
        lines += ["", "## Plans over their budget", "",
                  "| type | variant | plan | budget | predicted peak | measured peak |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['type']} | {r['variant']} | {r['spec']} | {r['budget_bytes']} | "
                  f"{r['predicted_peak']} | {r['measured_peak']} |" for r in over]
    reasons: dict = {}
    for r in rows:
        if r["status"] == "refused":
            reasons.setdefault(r["reason"], []).append(f"{r['type']} {r['form']} ({r['variant']})")
    lines += ["", "## Refusals", "", "| reason | where |", "|---|---|"]
    for reason, where in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| {_md(reason)} | {len(where)}: {', '.join(where[:12])}"
                     + (" ..." if len(where) > 12 else "") + " |")
    lines += ["", "```", json.dumps(result.get("environment", {})), "```", ""]
    return "\n".join(lines)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _child(model_type: str, variant: str, path: str) -> int:
    out = open(path, "a")

    def emit(row):
        out.write(json.dumps(row, default=str) + "\n")
        out.flush()
    check(model_type, variant, emit=emit)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        sys.exit(_child(*sys.argv[2:5]))
    if sys.argv[1:2] == ["--report"]:
        _quiet()
        out = result(_logged(), architectures())
        (LOG.parent / "architectures.md").write_text(markdown(out))
        print("\n".join(out["verdicts"]))
        sys.exit(0)
    for name in sys.argv[1:]:          # a few types, printed
        for variant in VARIANTS:
            check(name, variant, emit=lambda r: print(json.dumps(
                {k: v for k, v in r.items() if k != "fields"}, default=str), flush=True))
