"""Run a sweep: expand the spec, skip trials already stored, run the rest in isolation,
store each result as it ends, and show progress.

    summary = run_sweep(load_spec("experiments/quickstart.toml"))
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import sys
import time
from typing import Callable

from memprop.sweep.executor import Executor
from memprop.sweep.ray_executor import make_executor
from memprop.sweep.spec import SweepSpec
from memprop.sweep.trial import Trial
from memprop.sweep.store import ResultsStore, default_db_path

__all__ = ["run_sweep", "SweepSummary", "Progress"]


@dataclasses.dataclass
class SweepSummary:
    db_path: pathlib.Path
    total: int                  # trials in the spec
    skipped: int                # already stored
    ran: int                    # finished in this run
    counts: dict[str, int]      # by status, this run
    interrupted: bool = False


class Progress:
    """A one-line progress bar on a stream: done/total, ETA, and counts by status."""

    def __init__(self, total: int, *, stream=sys.stderr, enabled: bool = True):
        self.total, self.stream, self.enabled = total, stream, enabled
        self.done, self.counts, self.start = 0, collections.Counter(), time.monotonic()

    def update(self, trial: Trial, status: str) -> None:
        self.done += 1
        self.counts[status] += 1
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        counts = " ".join(f"{k} {self.counts[k]}" for k in ("ok", "oom", "error", "crashed",
                                                             "timeout") if self.counts[k])
        line = (f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{counts} | {elapsed:4.0f}s elapsed, ETA {eta:4.0f}s | {trial.label()[:60]}")
        self.stream.write(line.ljust(150)[:150])
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


def run_sweep(spec: SweepSpec, *, db_path=None, workers: int = 1, force: bool = False,
              executor: Executor | None = None, trials: list[Trial] | None = None,
              progress: bool = True,
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
        bar = Progress(len(pending), enabled=progress)

        def finished(trial: Trial, result: dict) -> None:
            store.put(trial, result)
            bar.update(trial, result.get("status", "crashed"))
            if on_result is not None:
                on_result(trial, result)

        interrupted = False
        try:
            executor.run(pending, finished)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
    return SweepSummary(db_path=db_path, total=len(trials), skipped=len(trials) - len(pending),
                        ran=bar.done, counts=dict(bar.counts), interrupted=interrupted)
