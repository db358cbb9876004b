"""The live-memory timeline as a Chrome trace (the JSON "Trace Event Format" that
chrome://tracing and https://ui.perfetto.dev open), to view next to a profiler trace.

One counter track per category (``"ph": "C"``, one event per op, ``args = {"bytes": n}``),
one row of ops (``"ph": "X"``, the op's name, with its ``module``, ``phase`` and
``op_index`` in ``args``) and one row of phases. Counter events carry only numbers: both
viewers draw every argument of a counter event as a series.

The timeline has no clock, so time is the op index: op ``i`` starts at ``i`` µs and
lasts 1 µs (``otherData.time_axis`` says so in the file).
"""

from __future__ import annotations

__all__ = ["timeline_trace"]

_PID, _OPS_TID, _PHASES_TID = 1, 1, 2


def _categories(timeline) -> list[str]:
    return [c[: -len("_bytes")] for c in timeline.columns
            if c.endswith("_bytes") and c != "total_bytes"]


def timeline_trace(timeline, *, label: str = "one training step") -> dict:
    """The trace of a ``LiveMemoryTracker.timeline()`` frame (op_index, phase, module, op,
    ``<category>_bytes``..., total_bytes) as a JSON-ready dict."""
    events: list[dict] = [
        {"ph": "M", "pid": _PID, "name": "process_name", "args": {"name": f"memprop: {label}"}},
        {"ph": "M", "pid": _PID, "tid": _OPS_TID, "name": "thread_name", "args": {"name": "ops"}},
        {"ph": "M", "pid": _PID, "tid": _PHASES_TID, "name": "thread_name",
         "args": {"name": "phases"}},
    ]
    categories = _categories(timeline)
    for row in timeline.itertuples(index=False):
        ts = int(row.op_index)
        module = row.module if isinstance(row.module, str) else ""
        events.append({"ph": "X", "pid": _PID, "tid": _OPS_TID, "ts": ts, "dur": 1,
                       "name": str(row.op), "cat": str(row.phase),
                       "args": {"module": module, "phase": str(row.phase), "op_index": ts}})
        for cat in categories:
            events.append({"ph": "C", "pid": _PID, "ts": ts, "name": f"{cat} bytes",
                           "args": {"bytes": int(getattr(row, f"{cat}_bytes"))}})
        events.append({"ph": "C", "pid": _PID, "ts": ts, "name": "total bytes",
                       "args": {"bytes": int(row.total_bytes)}})
    if len(timeline):
        runs = (timeline.phase != timeline.phase.shift()).cumsum()
        for _, part in timeline.groupby(runs, sort=False):
            start, end = int(part.op_index.iloc[0]), int(part.op_index.iloc[-1])
            events.append({"ph": "X", "pid": _PID, "tid": _PHASES_TID, "ts": start,
                           "dur": end - start + 1, "name": str(part.phase.iloc[0]),
                           "cat": "phase", "args": {"ops": len(part)}})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"source": "memprop", "what": label,
                          "time_axis": "op index: op i at i µs, not wall-clock time",
                          "categories": categories}}
