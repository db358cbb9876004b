"""What a report reads from a results store, and how it picks the trials each claim needs.

Every selection is written down here once, so that the figures and the claim verdicts
look at the same rows.
"""

from __future__ import annotations

import dataclasses
import pathlib

import pandas as pd

from memprop.sweep.store import ResultsStore, resolve_source

__all__ = ["ReportData", "load_report_data", "config_of"]


def config_of(row):
    """The model config a result row was measured with (None if it cannot be rebuilt)."""
    fields = {}
    for k, v in row.items():
        if not k.startswith("cfg_") or (not isinstance(v, (tuple, list)) and pd.isna(v)):
            continue
        v = v.item() if hasattr(v, "item") else v            # numpy scalar -> Python
        if isinstance(v, float) and v.is_integer() and k not in ("cfg_lam", "cfg_dropout"):
            v = int(v)
        fields[k[4:]] = v
    try:
        from memprop.models import model_config
        return model_config(row["model"], **fields)
    except Exception:  # noqa: BLE001 - a user model may not rebuild here
        return None


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

    def main_model(self) -> tuple[str | None, pd.DataFrame]:
        """The model with the most measured trials, and those trials restricted to its most
        common setting of every model field other than depth (so one line is one setup)."""
        ok = self.ok
        if ok.empty:
            return None, ok
        model = ok.model.value_counts().idxmax()
        rows = ok[ok.model == model]
        others = [c for c in rows.columns if c.startswith("cfg_") and c != "cfg_depth"
                  and rows[c].notna().any()]
        if others:
            keys = rows[others].astype(str).agg("|".join, axis=1)
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
    results = store.results()
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
