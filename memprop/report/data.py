"""What a report reads from a results store, and how it picks the trials each claim needs.

Every selection is written down here once, so that the figures and the claim verdicts
look at the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pandas as pd

from memprop.errors import MemPropError
from memprop.sweep.store import ResultsStore, resolve_source
from memprop.sweep.trial import Trial

__all__ = ["ReportData", "load_report_data", "mark_unmeasured", "NOT_MEASURED_IN_FIT_MODE"]

# A frontier probe ("fit" mode) runs one step to see whether it fits: it counts no FLOPs
# and runs no inference pass, so those fields are "not measured", not zero.
NOT_MEASURED_IN_FIT_MODE = ("forward_flops", "backward_flops", "inference_peak_bytes",
                            "inference_saved_bytes")


def mark_unmeasured(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` with what a frontier probe never measured as NaN, not 0."""
    if results.empty or "mode" not in results:
        return results
    fit = results["mode"] == "fit"
    return results.assign(**{col: results[col].astype(float).where(~fit, np.nan)
                             for col in NOT_MEASURED_IN_FIT_MODE if col in results})


@dataclasses.dataclass
class ReportData:
    name: str
    db_path: pathlib.Path
    results: pd.DataFrame          # one row per trial (ResultsStore.results)
    frontier: pd.DataFrame         # one row per (depth, strategy)
    environment: dict[str, str]
    description: str = ""
    stale: int = 0                 # stored trials not in the spec's current grid (not shown)
    _store: ResultsStore | None = dataclasses.field(default=None, repr=False)

    @property
    def ok(self) -> pd.DataFrame:
        """Trials that finished and were measured in full (not frontier probes)."""
        r = self.results
        if r.empty or "saved_bytes" not in r:
            return pd.DataFrame(columns=["key", "model", "strategy", "batch", "status",
                                         "saved_bytes", "peak_bytes"])
        return r[(r.status == "ok") & (r["mode"] == "measure")]

    def frame(self, key: str, name: str) -> pd.DataFrame | None:
        return self._store.frame(key, name) if self._store is not None else None

    def config(self, key: str):
        """The model config of trial ``key``, rebuilt exactly from the trial's stored
        config (JSON keeps 4 and 4.0 apart); None if it cannot be rebuilt here (a user
        factory that is not importable)."""
        if self._store is None:
            return None
        row = self._store.db.execute("SELECT config FROM trials WHERE key = ?",
                                     (key,)).fetchone()
        if row is None:
            return None
        try:
            return Trial.from_dict(json.loads(row[0])).config()
        except (MemPropError, TypeError):     # a factory not importable, an older row
            return None

    def main_model(self) -> tuple[str | None, pd.DataFrame]:
        """The model with the most measured trials, and those trials restricted to its most
        common setting of every model field other than depth (so one line is one setup)."""
        ok = self.ok
        if ok.empty:
            return None, ok
        model = ok.model.value_counts().idxmax()
        rows = ok[ok.model == model]
        others = [c for c in rows.columns if (c.startswith("cfg_") and c != "cfg_depth"
                                              or c in ("amp", "dtype", "optimizer"))
                  and rows[c].notna().any()]
        if others:
            keys = rows[others].map(str).agg("|".join, axis=1)
            rows = rows[keys == keys.value_counts().idxmax()]
        return model, rows

    def plain(self) -> pd.DataFrame:
        """Measured trials of the main model without checkpointing."""
        _, rows = self.main_model()
        return rows[rows.strategy == "none"] if not rows.empty else rows

    def missing(self) -> dict[str, int]:
        """Trials that did not finish, by status."""
        r = self.results
        if r.empty:
            return {}
        return r[r.status != "ok"].status.value_counts().to_dict()


def load_report_data(source) -> ReportData:
    """The store of a spec (.toml, its default database) or a database path (.sqlite)."""
    path, spec = resolve_source(source)
    description = spec.description if spec is not None else ""
    current = {t.key() for t in spec.trials()} if spec is not None else None
    store = ResultsStore(path)
    results = mark_unmeasured(store.results())
    stale = 0
    if current is not None and not results.empty:   # a spec: its current grid + frontier probes
        keep = results.key.isin(current) | (results["mode"] == "fit")
        stale = int((~keep).sum())
        results = results[keep].reset_index(drop=True)
    environment = store.environment()
    name = environment.get("spec_name") or (results.spec.iloc[0] if not results.empty
                                            else path.parent.name)
    return ReportData(name=name, db_path=path, results=results, frontier=store.frontier(),
                      environment=environment,
                      description=description or environment.get("spec_description", ""),
                      stale=stale, _store=store)
