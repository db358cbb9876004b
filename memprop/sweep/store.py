"""The results store: one embedded SQLite database per experiment.

One row per trial, keyed by ``Trial.key()`` (a hash of the trial's full config with the
memprop and torch versions), committed the moment the trial ends (WAL mode), so a
killed sweep loses no finished trial. The trial's config and its result are kept as
JSON; ``load_results`` flattens them into one pandas row per trial. An ``environment``
table records where the results were measured.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import io
import json
import os
import pathlib
import platform
import sqlite3
import subprocess
import zlib

import pandas as pd

from memprop._version import __version__
from memprop.errors import ConfigError, MemPropError
from memprop.sweep.spec import load_spec

__all__ = ["ResultsStore", "StoreError", "load_results", "resolve_source", "default_db_path",
           "unpack_frame"]


class StoreError(MemPropError):
    """The results database cannot be written (disk full, locked by another sweep)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    result TEXT NOT NULL,
    finished_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS frames (
    key TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (key, name)
);
CREATE TABLE IF NOT EXISTS environment (name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS frontier (
    spec TEXT, point_key TEXT, field TEXT, depth INTEGER, strategy TEXT,
    budget_bytes INTEGER, budget_mode TEXT,
    predicted_batch INTEGER, confirmed_batch INTEGER, first_oom_batch INTEGER,
    real_trials INTEGER, probe_trials_doubling INTEGER, predicted_peak_bytes INTEGER,
    predicted_flops INTEGER,
    PRIMARY KEY (spec, point_key)
);
"""
_FRONTIER_COLUMNS = ("spec", "point_key", "field", "depth", "strategy", "budget_bytes",
                     "budget_mode", "predicted_batch", "confirmed_batch", "first_oom_batch",
                     "real_trials", "probe_trials_doubling", "predicted_peak_bytes",
                     "predicted_flops")


def default_db_path(spec_name: str, root="reports") -> pathlib.Path:
    return pathlib.Path(root) / spec_name / "results.sqlite"


def unpack_frame(data: str | None) -> pd.DataFrame | None:
    """Inverse of the worker's frame packing (hex of zlib-compressed CSV)."""
    if not data:
        return None
    return pd.read_csv(io.StringIO(zlib.decompress(bytes.fromhex(data)).decode()))


def _environment() -> dict[str, str]:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5,
                                cwd=pathlib.Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"memprop_version": __version__, "git_commit": commit or "unknown",
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "cpu_model": cpu, "cpu_count": str(os.cpu_count()),
            "ram_bytes": str(psutil.virtual_memory().total),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


class ResultsStore:
    """SQLite results of one experiment (see module docstring)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        columns = [r[1] for r in self.db.execute("PRAGMA table_info(frontier)")]
        if columns and "predicted_flops" not in columns:   # older: derived data, rebuilt
            self.db.execute("DROP TABLE frontier")
        self.db.executescript(_SCHEMA)
        self.db.commit()
        self._lock_file = None

    @contextlib.contextmanager
    def _writing(self):
        """One transaction; a full disk becomes a ``StoreError`` (rows committed before
        stay intact: each trial is its own transaction)."""
        try:
            with self.db:
                yield
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if "full" in text or "disk i/o" in text:
                raise StoreError(f"memprop.sweep: cannot write {self.path}: {exc}; every "
                                 "trial stored before is intact; free disk space and rerun "
                                 "to resume") from None
            raise

    def lock(self, what: str = "sweep") -> "ResultsStore":
        """Claim this database for one writer (a sweep or frontier) until ``close``: a
        second one refuses at once, naming the first, instead of running trials twice."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        f = open(lock_path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise StoreError(f"memprop.sweep: {self.path} is being written by {holder}; wait "
                             "for it to finish (a rerun then resumes), or give this run "
                             "another --db") from None
        f.seek(0)
        f.truncate()
        f.write(f"memprop {what} (pid {os.getpid()}, since "
                f"{datetime.datetime.now().isoformat(timespec='seconds')})")
        f.flush()
        self._lock_file = f
        return self

    def close(self) -> None:
        self.db.close()
        if self._lock_file is not None:
            self._lock_file.close()     # releases the flock
            self._lock_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def record_environment(self, spec=None) -> None:
        """Record where results are measured (and, given a spec, its name and description)."""
        values = _environment()
        if spec is not None:
            values.update(spec_name=spec.name, spec_description=spec.description,
                          spec_path=spec.path)
        with self._writing():
            self.db.executemany("INSERT OR REPLACE INTO environment VALUES (?, ?)",
                                values.items())

    def environment(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT name, value FROM environment"))

    def keys(self) -> set[str]:
        return {k for (k,) in self.db.execute("SELECT key FROM trials")}

    def put(self, trial, result: dict) -> None:
        """Store one finished trial, committed at once."""
        frames = {name: result.pop(name) for name in ("timeline", "saved") if result.get(name)}
        key = trial.key()
        with self._writing():
            self.db.execute(
                "INSERT OR REPLACE INTO trials VALUES (?, ?, ?, ?, ?, ?)",
                (key, trial.spec, result.get("status", "crashed"),
                 json.dumps(trial.to_dict(), default=str), json.dumps(result, default=str),
                 datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")))
            self.db.execute("DELETE FROM frames WHERE key = ?", (key,))
            self.db.executemany("INSERT INTO frames VALUES (?, ?, ?)",
                                [(key, n, d) for n, d in frames.items()])

    def frame(self, key: str, name: str) -> pd.DataFrame | None:
        row = self.db.execute("SELECT data FROM frames WHERE key = ? AND name = ?",
                              (key, name)).fetchone()
        return unpack_frame(row[0]) if row else None

    def get(self, key: str) -> dict | None:
        """The stored result of the trial with ``key`` (status included), or None."""
        row = self.db.execute("SELECT status, result FROM trials WHERE key = ?",
                              (key,)).fetchone()
        return None if row is None else {**json.loads(row[1]), "status": row[0]}

    def put_frontier(self, row: dict) -> None:
        cols = _FRONTIER_COLUMNS
        with self._writing():
            marks = ", ".join("?" * len(cols))
            self.db.execute(f"INSERT OR REPLACE INTO frontier VALUES ({marks})",
                            [row.get(c) for c in cols])

    def frontier(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM frontier ORDER BY strategy, depth", self.db)

    def results(self) -> pd.DataFrame:
        """One row per trial: key, status, the config's fields (``cfg_*`` for the model's;
        a sharded trial's ``world_size``, ``tp``, ... ``predicted``, memprop.sweep.parallel),
        then every result field."""
        rows = []
        for key, status, config, result, finished in self.db.execute(
                "SELECT key, status, config, result, finished_at FROM trials"):
            config, result = json.loads(config), json.loads(result)
            row = {"key": key, "status": status, "finished_at": finished}
            row.update({k: v for k, v in config.items() if k not in ("model_fields", "parallel")})
            row.update(config.get("parallel") or {})
            row.update({f"cfg_{k}": tuple(v) if isinstance(v, list) else v
                        for k, v in config["model_fields"].items()})
            row.update({k: tuple(v) if isinstance(v, list) else v
                        for k, v in result.items() if k not in row or k == "status"})
            rows.append(row)
        frame = pd.DataFrame(rows)
        if not frame.empty:
            sharded = ["world_size"] if "world_size" in frame else []
            frame = frame.sort_values(["model", "strategy", "batch"] + sorted(
                c for c in frame.columns if c.startswith("cfg_")) + sharded
            ).reset_index(drop=True)
        return frame


def resolve_source(source):
    """(database path, spec or None) for a spec (.toml: its default store) or a database;
    a clear error, and no empty database created, when the store does not exist."""
    path, spec = pathlib.Path(source), None
    if path.suffix == ".toml":
        spec = load_spec(path)
        path = default_db_path(spec.name)
    if not path.is_file():
        demo = pathlib.Path("reports/demo/results.sqlite")
        hint = (f" (make demo wrote {demo})" if spec is not None
                and spec.name == "quickstart" and demo.is_file() else "")
        raise ConfigError(f"memprop: no results database at {path}; run 'memprop sweep SPEC' "
                          "first" + hint)
    return path, spec


def load_results(source) -> pd.DataFrame:
    """The results of a store (a .sqlite path, or a spec whose default store is used),
    as a DataFrame: the one call to get a sweep into pandas."""
    path, _ = resolve_source(source)
    with ResultsStore(path) as store:
        return store.results()
