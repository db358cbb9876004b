"""What a plan costs in seconds on this device: the planner's time model.

    rates = calibrate(torch.device("cpu"), torch.float32)     # once per device, cached
    ms = predict_step_ms(rates, small_ms, small_work, full_work)

NOTE [ Pricing a plan in seconds ]
  The planner used to choose the plan of least recompute FLOPs; a user pays seconds. A
  step's time is its work priced at this device's rates plus what each op costs to
  dispatch: FLOPs (matmuls, attention, convolutions), bytes written (pointwise ops are
  memory-bound), and per aten call a fixed cost, which a form that runs ops through
  Python (a selective-checkpoint policy, ``remat:``'s recorder and replays) pays many
  times over. The last is the one no count predicts, so it is measured: each candidate
  plan is timed on the user's real model at ``SMALL_ROWS`` rows of the batch (a few
  steps, interleaved with the plain step, medians), where the work is small and the
  per-op costs dominate. The full batch adds work, priced at rates calibrated once per
  device, dtype and thread count (``calibrate``: a matmul for seconds per FLOP, a large
  add for seconds per byte):

      predicted ms (batch B) = measured ms (SMALL_ROWS rows)
                               + (FLOPs(B) - FLOPs(small)) * ms_per_flop
                               + (bytes(B) - bytes(small)) * ms_per_byte

  with FLOPs and bytes written over the step's forward and backward, counted on fake
  tensors by the simulation (NOTE [ A step's work ], memprop.flops). Nothing of the full
  step is allocated. A fake model (a config planned from the CLI) cannot be timed: its
  plans are priced by the rates alone, per-op costs at the plain dispatch cost, each
  checkpoint the form enters at one checkpoint's own cost (``checkpoints_of``,
  ``ms_per_checkpoint``: 0.1-0.25 ms here, forward and recompute, so nine checkpointed
  children cost more than one segment of the same FLOPs), plus
  what each call a form runs through Python costs more (``python_ops_of``: a selective
  policy sees every call of its blocks twice, in the forward and in the recompute, at
  ``ms_per_policy_op``, calibrated on ``ops:`` itself: 10 us a call here, three Python
  hops; hf:gpt2's ``ops:`` plans were priced below whole blocks they measured 0.1x of
  the step above), and the plan says so. The model ranks plans;
  ``benchmarks/results/planner.md`` measures how well it predicts.
  The candidates priced are the plans that fit from each search: the chain's placement
  of least recompute FLOPs, and, when that placement keeps op outputs (``ops:``), the
  placement of plain segments only (the DP without op-level options): an ``ops:``
  block re-runs its pointwise ops, and runs its forward, through a Python policy, so
  zero recompute FLOPs can cost more seconds than recomputing whole blocks (tiny
  Llama at 60 % of its peak: ``ops:`` kept every matmul for 1.70x the plain step where
  whole blocks cost less, measured); the placement of plain segments and blocks that
  checkpoint a part of themselves (``ops:0,1,2=@mlp``: no policy, NOTE [ Checkpointing
  a part of a block ], memprop.checkpoint.forms.oplevel), where each further child of a
  block costs one checkpoint's own cost in FLOPs (``checkpoint_flops``: tiny Mistral at
  60 % now checkpoints two whole blocks and a third's MLP alone, ``ops:0,1,2=@mlp``,
  1.13x the plain step against 1.15x with that block's two norms too, 60 interleaved
  rounds); ``remat:``'s fit; and ``full`` whenever a plan checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
import warnings

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from memprop.checkpoint.forms.oplevel import Ops, child_paths
from memprop.checkpoint.forms.remat import Remat
from memprop.checkpoint.forms.strategies import Selective, parse_strategy, remove_strategy
from memprop.checkpoint.forms.verify import discarding_grads
from memprop.checkpoint.forms.whole import Forward
from memprop.errors import StrategyError
from memprop.measure import Measurement

__all__ = ["Rates", "calibrate", "SMALL_ROWS", "first_rows", "work_of", "predict_ms",
           "python_ops_of", "checkpoints_of", "checkpoint_flops", "time_strategies"]

# rows of the batch each candidate is timed at (NOTE above): per-op costs, little work
SMALL_ROWS = 2


@dataclasses.dataclass(frozen=True)
class Rates:
    """This device's prices (NOTE [ Pricing a plan in seconds ]), in milliseconds."""

    ms_per_flop: float        # a large matmul's time per FLOP
    ms_per_byte: float        # a large pointwise add's time per byte written
    ms_per_op: float          # one small aten call's dispatch
    ms_per_python_op: float   # what an aten call costs more through a Python dispatch mode
    # what an aten call costs more each time a selective-checkpoint policy (``ops:``)
    # sees it, against a plain checkpoint of the same block: a policy call, a cache
    ms_per_policy_op: float = 0.0
    # one checkpoint's own cost, forward and recompute (torch's checkpoint frame, its
    # saved-tensor hooks, memprop's patch): what a plan of many small checkpoints pays
    ms_per_checkpoint: float = 0.0


def _median_ms(fn, repeats: int = 5) -> float:
    fn()                                                  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def _calibrate(device: str, dtype: torch.dtype, threads: int) -> Rates:
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    n = 512 if dev.type == "cpu" else 2048
    a = torch.randn(n, n, device=dev, dtype=dtype)
    big = torch.randn(1 << 22, device=dev, dtype=dtype)
    tiny = torch.randn(4, device=dev, dtype=dtype)

    def run(fn, reps):
        def go():
            for _ in range(reps):
                fn()
            sync()
        return _median_ms(go) / reps
    mm = run(lambda: torch.mm(a, a), 4)
    add = run(lambda: torch.add(big, big), 4)
    op = run(lambda: torch.add(tiny, tiny), 200)
    with _PassThrough():
        python_op = run(lambda: torch.add(tiny, tiny), 200)
    policy, checkpoint = _checkpoint_ms(dev, dtype, sync)
    return Rates(ms_per_flop=max(mm - op, 0.0) / (2 * n ** 3),
                 ms_per_byte=max(add - op, 0.0) / (big.numel() * big.element_size()),
                 ms_per_op=op, ms_per_python_op=max(python_op - op, 0.0),
                 ms_per_policy_op=policy, ms_per_checkpoint=checkpoint)


_CALLS = 50                 # tiny multiplications per block of the policy's calibration


class _Calls(nn.Module):
    """A block of ``calls`` tiny multiplications."""

    def __init__(self, calls: int):
        super().__init__()
        self.calls = calls

    def forward(self, x):
        for _ in range(self.calls):
            x = x * 1.0001
        return x


class _Chain(nn.Module):
    def __init__(self, device, dtype, blocks: int, calls: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, device=device, dtype=dtype))
        self.blocks = nn.ModuleList([_Calls(calls) for _ in range(blocks)])

    def forward(self, x):
        x = x * self.w
        for block in self.blocks:
            x = block(x)
        return x.sum()


_CHECKPOINTS = 20           # one-call blocks of the checkpoint's calibration


def _checkpoint_ms(dev: torch.device, dtype: torch.dtype, sync) -> tuple[float, float]:
    """(a selective policy's cost per call it sees, one plain checkpoint's cost): a
    chain of two blocks of ``_CALLS`` tiny multiplications stepped under ``ops:``
    (keeping every other one) and under ``full``, the difference per call seen (each
    call twice: forward and recompute); a chain of ``_CHECKPOINTS`` one-call blocks under
    ``full`` and plainly, the difference per block (its one recomputed call included)."""
    x = torch.randn(4, device=dev, dtype=dtype)

    def step_ms(model, spec: str) -> float:
        parse_strategy(spec).apply(model, blocks_attr="blocks")
        try:
            def go():
                model(x).backward()
                sync()
            return _median_ms(go, repeats=9)
        finally:
            remove_strategy(model)
    calls, many = _Chain(dev, dtype, 2, _CALLS), _Chain(dev, dtype, _CHECKPOINTS, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = max(step_ms(calls, "ops:mul#0") - step_ms(calls, "full"), 0.0)
        checkpoints = max(step_ms(many, "full") - step_ms(many, "none"), 0.0)
    return policy / (2 * 2 * _CALLS), checkpoints / _CHECKPOINTS


class _PassThrough(TorchDispatchMode):
    """A dispatch mode that only runs each call: the cost of one Python hop."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def calibrate(device: torch.device, dtype: torch.dtype) -> Rates:
    """This device's ``Rates`` for ``dtype`` at the current thread count, measured once
    per process (a 512x512 matmul, a 16 MiB add, a 4-element add, that add through a
    Python dispatch mode, and 200 tiny multiplications under ``ops:`` against ``full``;
    medians of 5 and 9)."""
    return _calibrate(str(device), dtype, torch.get_num_threads())


def first_rows(batch, rows: int = SMALL_ROWS):
    """``batch`` cut to its first ``rows`` rows: every tensor whose first dimension is
    the batch's (the first tensor's) is sliced, anything else is kept as it is."""
    size = next((t.shape[0] for t in tree_flatten(batch)[0]
                 if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return tree_map(lambda t: t[:rows] if isinstance(t, torch.Tensor) and t.dim() > 0
                    and t.shape[0] == size else t, batch)


def work_of(m: Measurement) -> tuple[int, int, int]:
    """(FLOPs, bytes written, aten calls) of a step's forward and backward
    (NOTE [ A step's work ], memprop.flops)."""
    ops = sum(n for n, _ in m.work.values())
    written = sum(b for _, b in m.work.values())
    return m.forward_flops + m.backward_flops, written, ops


def predict_ms(rates: Rates, full: Measurement, small: Measurement | None = None,
               small_ms: float | None = None, python_ops: tuple[float, float] = (0.0, 0.0),
               checkpoints: int = 0) -> float:
    """Predicted step time (ms) of the step ``full`` simulates: ``small_ms``, measured at
    the rows ``small`` simulates, plus the extra work priced at ``rates``; without a
    timing, the whole work priced at ``rates``, each op at the plain dispatch cost, the
    calls a form runs through Python (``python_ops_of``: through a dispatch mode,
    through a selective policy) at what each costs more, and each of its
    ``checkpoints`` (``checkpoints_of``) at one checkpoint's own cost."""
    flops, written, ops = work_of(full)
    if small is None or small_ms is None:
        hops, policy = python_ops
        return (flops * rates.ms_per_flop + written * rates.ms_per_byte
                + ops * rates.ms_per_op + hops * rates.ms_per_python_op
                + policy * rates.ms_per_policy_op + checkpoints * rates.ms_per_checkpoint)
    small_flops, small_written, _ = work_of(small)
    return (small_ms + (flops - small_flops) * rates.ms_per_flop
            + (written - small_written) * rates.ms_per_byte)


def python_ops_of(strategy, full: Measurement, plain: Measurement,
                  rebuild_ratio: float | None = None,
                  block_ops: tuple[int, ...] = ()) -> tuple[float, float]:
    """(calls through a Python dispatch mode, calls a selective policy sees) of a form's
    step (untimed, a fake model): ``remat:`` records every forward call and replays its
    rebuilds (``rebuild_ratio`` of them per forward call); a selective-checkpoint policy
    sees every call of the region it covers twice, in the forward and in the recompute
    (a kept call returns its cached output, still through the policy): each block's
    calls (``block_ops``, per block of the chain) for ``ops:``'s keyed blocks and
    ``selective``, the whole forward's for ``forward:``; without ``block_ops``, twice
    the calls recomputed. Plain checkpoints none, nor do checkpointed children
    (``ops:2=@mlp``)."""
    forward_ops = full.work.get("forward", (0, 0))[0]
    extra = full.work.get("backward", (0, 0))[0] - plain.work.get("backward", (0, 0))[0]
    if isinstance(strategy, Remat):
        return forward_ops * (1 + (rebuild_ratio or 0.0)), 0.0
    if isinstance(strategy, Forward):
        return 0.0, 2.0 * forward_ops
    if not isinstance(strategy, (Ops, Selective)) or isinstance(
            strategy, Ops) and not strategy.runs_policy:
        return 0.0, 0.0                        # no selective policy runs
    if not block_ops:
        return 0.0, 2.0 * max(extra, 0)
    if isinstance(strategy, Ops) and strategy.every is None:     # its keyed blocks
        return 0.0, 2.0 * sum(sum(block_ops[a:b + 1]) for a, b, keys in strategy.parts
                              if keys and not child_paths(keys))
    return 0.0, 2.0 * sum(block_ops)                             # every block


def checkpoints_of(strategy, n: int) -> int:
    """Checkpoints a form enters per step on a chain of ``n`` blocks: one per segment
    (a keyed ``ops:`` block, a plain range, each block under ``selective``), one per
    checkpointed child (``ops:2=@mlp``), one around the forward for ``forward:``, none
    for ``remat:`` (its recorder is priced per call) and the forms that recompute
    nothing."""
    if isinstance(strategy, Remat):
        return 0
    if isinstance(strategy, Forward):
        return 1
    try:
        segments = strategy.segments(n)
    except (NotImplementedError, StrategyError):
        return 0
    children = strategy.children(n) if isinstance(strategy, Ops) else []
    return len(segments) + sum(len(paths) for _, paths in children)


def checkpoint_flops(rates: Rates) -> float:
    """One checkpoint's own cost (``ms_per_checkpoint``) in FLOPs at ``rates``: what the
    planner's placement of checkpointed children charges a block's second and later
    children (``searches.child_options``), so that it checkpoints the MLP alone and
    leaves the norms out where the budget allows (tiny Mistral: about 2e7 FLOPs, a third
    of one MLP's recompute; each child checkpoint also re-runs its ops)."""
    return rates.ms_per_checkpoint / rates.ms_per_flop if rates.ms_per_flop > 0 else 0.0


def time_strategies(model, batch, loss_fn, strategies: dict, *, rounds: int = 5,
                    seconds: float = 0.0, max_rounds: int | None = None,
                    apply_kwargs: dict | None = None) -> dict:
    """Median ms of one forward and backward of ``loss_fn(model, batch)`` under each of
    ``strategies`` (name -> ``Strategy`` or spec), applied in turn round by round
    (``rounds`` rounds after one warm-up round; then more rounds while the timed steps
    add up to less than ``seconds``, up to ``max_rounds``: short steps are timed more
    often, so a shared machine's jitter weighs less): its noise falls on every
    candidate alike. The parameters' gradients are dropped as they arrive
    (``discarding_grads``: timing never holds them) and the ones held before are put
    back afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = bool(params) and params[0].device.type == "cuda"
    times: dict = {name: [] for name in strategies}
    most = max(rounds, max_rounds or rounds)
    timed_s, round_ = 0.0, 0
    with discarding_grads(model):
        while round_ <= rounds or timed_s < seconds and round_ <= most:
            for name, strategy in strategies.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    parse_strategy(strategy).apply(model, **(apply_kwargs or {}))
                try:
                    start = time.perf_counter()
                    loss_fn(model, batch).backward()
                    if cuda:
                        torch.cuda.synchronize(params[0].device)
                    if round_:                       # the first round warms up
                        elapsed = time.perf_counter() - start
                        times[name].append(elapsed * 1e3)
                        timed_s += elapsed
                finally:
                    remove_strategy(model)
            round_ += 1
    return {name: statistics.median(t) for name, t in times.items()}
