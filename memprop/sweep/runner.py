"""Run a sweep: expand the spec, skip trials already stored, run the rest in isolation,
store each result as it ends, and report each one to ``on_result`` (the CLI draws
its progress bar from that callback; the library prints nothing).

    summary = run_sweep(load_spec("experiments/quickstart.toml"))
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
from typing import Callable

from memprop.sweep.executor import Executor
from memprop.sweep.ray_executor import make_executor
from memprop.sweep.spec import SweepSpec
from memprop.sweep.store import ResultsStore, default_db_path
from memprop.sweep.trial import Trial

__all__ = ["run_sweep", "SweepSummary"]


@dataclasses.dataclass
class SweepSummary:
    db_path: pathlib.Path
    total: int                  # trials in the spec
    skipped: int                # already stored
    ran: int                    # finished in this run
    counts: dict[str, int]      # by status, this run
    interrupted: bool = False


def run_sweep(spec: SweepSpec, *, db_path=None, workers: int = 1, force: bool = False,
              executor: Executor | None = None, trials: list[Trial] | None = None,
              on_result: Callable[[Trial, dict], None] | None = None) -> SweepSummary:
    """Run every trial of ``spec`` not yet in the store (all of them with ``force``).

    Each result is committed when its trial ends; Ctrl-C stops the children, keeps every
    finished trial and returns with ``interrupted=True`` (rerun to resume)."""
    db_path = pathlib.Path(db_path) if db_path else default_db_path(spec.name)
    trials = spec.trials() if trials is None else trials
    executor = executor or make_executor(spec.run.executor, workers=workers)
    with ResultsStore(db_path) as store:
        store.lock("sweep")
        store.record_environment(spec)
        done = set() if force else store.keys()
        pending = [t for t in trials if t.key() not in done]
        counts: collections.Counter = collections.Counter()

        def finished(trial: Trial, result: dict) -> None:
            store.put(trial, result)
            counts[result.get("status", "crashed")] += 1
            if on_result is not None:
                on_result(trial, result)

        interrupted = False
        try:
            executor.run(pending, finished)
        except KeyboardInterrupt:
            interrupted = True
    return SweepSummary(db_path=db_path, total=len(trials), skipped=len(trials) - len(pending),
                        ran=sum(counts.values()), counts=dict(counts), interrupted=interrupted)
