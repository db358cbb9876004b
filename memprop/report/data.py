"""What a report reads from a results store, and how it picks the trials each claim needs.

Every selection is written down here once, so that the figures and the claim verdicts
look at the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np
import pandas as pd

from memprop.errors import MemPropError
from memprop.sweep.store import ResultsStore, resolve_source
from memprop.sweep.trial import Trial

__all__ = ["ReportData", "load_report_data", "mark_unmeasured", "NOT_MEASURED_IN_FIT_MODE",
           "DEPTH", "depth_field", "single_device"]

# NOTE [ The depth axis ]
# Workloads name their layer count differently: the zoo's ``depth``, transformers'
# ``num_hidden_layers`` (``n_layer`` for GPT-2, ``text_config.num_hidden_layers`` for a
# sub-config), ``num_layers``, ``n_layers``, ``encoder_layers`` ... The report finds that
# field once, here (``depth_field``), and copies it into one column, ``DEPTH``, which every
# figure and claim reads; ``ReportData.depth_name`` keeps the user's name for labels.
# Preference: the field the frontier walked, else a field the trials vary, else any.
DEPTH = "depth"
_DEPTH_NAME = re.compile(r"^(depth|(num_|n_)?(hidden_|encoder_|decoder_)?layers?"
                         r"|(num_|n_)?blocks)$")

# A frontier probe ("fit" mode) runs one step to see whether it fits: it counts no FLOPs
# and runs no inference pass, so those fields are "not measured", not zero.
NOT_MEASURED_IN_FIT_MODE = ("forward_flops", "backward_flops", "inference_peak_bytes",
                            "inference_saved_bytes")


def single_device(results: pd.DataFrame) -> pd.DataFrame:
    """The trials of one device: without the sharded ones (a spec's ``[parallel]``,
    whose ``world_size`` is set; memprop.sweep.parallel), which the sharded figure reads
    (``ReportData.parallel``) and no single-device figure or claim does."""
    if "world_size" not in results:
        return results
    return results[results.world_size.isna()]


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
    depth_name: str | None = None  # the model field of the depth axis (NOTE [ The depth axis ])
    _store: ResultsStore | None = dataclasses.field(default=None, repr=False)

    @property
    def has_depth(self) -> bool:
        return self.depth_name is not None and DEPTH in self.results

    def depth_label(self) -> str:
        """The depth axis's label: ``depth (hidden layers)`` for the zoo's field, else the
        field's own name, ``layers (num_hidden_layers)``."""
        if self.depth_name in (None, "depth"):
            return "depth (hidden layers)" if self.depth_name else "depth"
        return f"layers ({self.depth_name})"

    def depth_word(self, value) -> str:
        """One depth for people: ``depth 4`` or ``num_hidden_layers 4``."""
        return f"{self.depth_name or 'depth'} {int(value)}"

    @property
    def ok(self) -> pd.DataFrame:
        """Trials of one device that finished and were measured in full (not frontier
        probes, not sharded trials)."""
        r = single_device(self.results)
        if r.empty or "saved_bytes" not in r:
            return pd.DataFrame(columns=["key", "model", "strategy", "batch", "status",
                                         "saved_bytes", "peak_bytes"])
        return r[(r.status == "ok") & (r["mode"] == "measure")]

    @property
    def parallel(self) -> pd.DataFrame:
        """Sharded trials that finished (a spec's ``[parallel]``): one row each, every
        rank's figures in it (memprop.sharded.row)."""
        r = self.results
        if r.empty or "world_size" not in r or "peak_bytes" not in r:
            return r.iloc[:0]
        return r[r.world_size.notna() & (r.status == "ok")]

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
        depth = f"cfg_{self.depth_name}"
        others = [c for c in rows.columns if (c.startswith("cfg_") and c != depth
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


def _depth_names(results: pd.DataFrame) -> list[str]:
    return [c[len("cfg_"):] for c in results.columns
            if c.startswith("cfg_") and _DEPTH_NAME.match(c[len("cfg_"):].rsplit(".", 1)[-1])
            and pd.to_numeric(results[c], errors="coerce").notna().any()]


def depth_field(results: pd.DataFrame, frontier_field: str | None = None) -> str | None:
    """The model field that counts layers (NOTE [ The depth axis ]): its name without the
    ``cfg_`` prefix, or None when no stored field looks like one."""
    names = _depth_names(results) if not results.empty else []
    if frontier_field in names:
        return frontier_field
    varied = [n for n in names if results[f"cfg_{n}"].nunique() > 1]
    pool = varied or names
    return pool[0] if pool else None


def with_depth(results: pd.DataFrame, name: str | None) -> pd.DataFrame:
    """``results`` with the depth field copied into the ``DEPTH`` column; a trial whose
    model calls its layer count otherwise (two models in one store) has its own field
    there, NaN where it has none."""
    if name is None or results.empty:
        return results.drop(columns=[DEPTH], errors="ignore")
    depth = pd.to_numeric(results[f"cfg_{name}"], errors="coerce")
    for other in _depth_names(results):
        depth = depth.fillna(pd.to_numeric(results[f"cfg_{other}"], errors="coerce"))
    return results.assign(**{DEPTH: depth})


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
    frontier = store.frontier()
    depth_name = depth_field(results, frontier.field.iloc[0] if not frontier.empty else None)
    results = with_depth(results, depth_name)
    environment = store.environment()
    name = environment.get("spec_name") or (results.spec.iloc[0] if not results.empty
                                            else path.parent.name)
    return ReportData(name=name, db_path=path, results=results, frontier=frontier,
                      environment=environment,
                      description=description or environment.get("spec_description", ""),
                      stale=stale, depth_name=depth_name, _store=store)
