"""memprop's allocator snapshot rendered by torch's own ``torch.cuda._memory_viz`` (on
CPU): the totals it renders are the simulator's, and ``memprop profile --snapshot``
writes one for a measurement and for a prediction."""

import base64
import json
import pickle
import re

import pytest
import torch.cuda._memory_viz as viz

from memprop.allocator import AllocatorConfig, AllocEvent, replay, replay_measurement, snapshot
from memprop.cli import main

MiB = 1 << 20

EVENTS = [AllocEvent("alloc", 0, 3 * MiB, "forward", "blocks.0", "addmm", "temporary"),
          AllocEvent("alloc", 1, 1000, "forward", "blocks.0.phi", "relu", "temporary"),
          AllocEvent("alloc", 2, 18 * MiB, "forward", "blocks.1", "addmm", "temporary"),
          AllocEvent("free", 0, phase="backward"),
          AllocEvent("alloc", 3, 5 * MiB, "backward", "blocks.1", "mm", "temporary")]


def _flame(snap) -> list[tuple[str, int]]:
    """``memory()``'s flamegraph lines (prefix, bytes), without the flamegraph script."""
    lines = viz.memory(snap, format_flamegraph=lambda text: text).splitlines()
    return [(line.rsplit(" ", 1)[0], int(line.rsplit(" ", 1)[1])) for line in lines]


def _trace_peaks(trace: list[dict]) -> tuple[int, int]:
    """(requested peak, reserved peak) recomputed from the trace entries alone."""
    requested = reserved = max_requested = max_reserved = 0
    for e in trace:
        sign = {"alloc": 1, "free_completed": -1, "segment_alloc": 1, "segment_map": 1,
                "segment_free": -1, "segment_unmap": -1}.get(e["action"], 0)
        if e["action"] in ("alloc", "free_completed"):
            requested += sign * e["size"]
        elif sign:
            reserved += sign * e["size"]
        max_requested, max_reserved = max(max_requested, requested), max(max_reserved, reserved)
    return max_requested, max_reserved


@pytest.mark.parametrize("expandable", [False, True])
def test_memory_viz_renders_the_simulators_figures(expandable):
    run = replay(EVENTS, AllocatorConfig(expandable_segments=expandable,
                                         capacity_bytes=1 << 30))
    a, r = run.allocator, run.report
    snap = snapshot(a)
    # by hand: 3 MiB (a 20 MiB segment, or page) + 1000 B (2 MiB, small pool) + 18 MiB.
    # Without expandable segments 18 MiB takes its own segment (20 + 2 + 18 MiB) and 5 MiB
    # reuses the first one's free 17 MiB: 40 MiB; with them the free 17 MiB grows by a
    # 20 MiB page to hold 18 MiB, and 5 MiB fits in the 19 MiB left: 2 x 20 + 2 MiB
    assert r.max_reserved_bytes == (42 if expandable else 40) * MiB
    summary = viz.segsum(snap)          # asserts its own accounting of every byte
    assert f"segments: {r.segments}\n" in summary
    assert f"total_reserved: {viz._format_size(a.reserved)}\n" in summary
    live = 1000 + 18 * MiB + 5 * MiB
    assert f"total_allocated: {viz._format_size(live)}\n" in summary
    flame = _flame(snap)
    assert sum(n for _, n in flame) == a.reserved == r.end_reserved_bytes
    frames = {p.split(";")[-1]: n for p, n in flame if p.startswith("stream_0;active_allocated")}
    assert frames == {"blocks.0.phi:1:relu [forward, temporary]": 1000, "<gaps>": 24,
                      "blocks.1:2:addmm [forward, temporary]": 18 * MiB,
                      "blocks.1:3:mm [backward, temporary]": 5 * MiB}
    trace = snap["device_traces"][0]
    assert _trace_peaks(trace) == (r.max_requested_bytes, r.max_reserved_bytes)
    text = viz.trace(snap)
    assert text.count("cudaMalloc(") == sum(t["action"] == "segment_alloc" for t in trace)
    assert text.count("\ndel ") == 1
    # the HTML viewers embed the pickled snapshot: it comes back unchanged
    for html in (viz.trace_plot(snap), viz.segment_plot(snap)):
        payload = json.loads(re.search(r"const local_files = (\[.*\])", html).group(1))
        assert pickle.loads(base64.b64decode(payload[0]["base64"])) == snap


def test_snapshot_records_the_oom():
    run = replay(EVENTS, AllocatorConfig(capacity_bytes=30 * MiB))
    snap = snapshot(run.allocator)
    assert snap["device_traces"][0][-1]["action"] == "oom"
    assert "raise OutOfMemoryError # 18.0MiB requested" in viz.trace(snap)
    assert run.report.oom.storage_id == 2 and run.report.oom.module == "blocks.1"


@pytest.mark.parametrize("estimate", [True, False])
def test_profile_snapshot_of_a_prediction_and_a_measurement(tmp_path, capsys, estimate):
    path = tmp_path / "step.pickle"
    argv = ["profile", "--set", "depth=3", "--set", "width=32", "--batch", "4",
            "--snapshot", str(path), "--alloc-conf", "expandable_segments:False"]
    assert main(argv + (["--estimate"] if estimate else ["--repeats", "1"])) == 0
    out = capsys.readouterr().out
    snap = pickle.loads(path.read_bytes())
    assert snap["memprop"]["simulated"] and snap["memprop"]["predicted"] == estimate
    report = snap["memprop"]["report"]
    assert f"max reserved 2.0 MiB ({report['max_reserved_bytes']} bytes)" in out
    # the snapshot's state is the simulator's end state, as memory_viz reads it
    assert sum(s["total_size"] for s in snap["segments"]) == report["end_reserved_bytes"]
    assert sum(s["allocated_size"] for s in snap["segments"]) == \
        report["end_allocated_bytes"]
    assert _trace_peaks(snap["device_traces"][0])[1] == report["max_reserved_bytes"]
    names = {f["name"] for s in snap["segments"] for b in s["blocks"] for f in b["frames"]}
    assert "(live before the step) [forward, parameter]" in names
    files = {f["filename"] for e in snap["device_traces"][0] for f in e["frames"]}
    assert {"blocks.0.linear", "blocks.2.phi"} <= files


def test_profile_snapshot_json_and_bad_values(tmp_path, capsys):
    path = tmp_path / "s.pickle"
    assert main(["profile", "--set", "depth=2", "--set", "width=16", "--batch", "2",
                 "--estimate", "--json", "--snapshot", str(path)]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)                                    # stdout stays JSON
    assert "allocator snapshot (simulated" in captured.err and path.is_file()
    for argv, says in (
            (["--snapshot", str(path), "--alloc-conf", "max_split_size_mb:3"],
             "--alloc-conf 'max_split_size_mb:3': max_split_size_mb = 3 is not allowed"),
            (["--snapshot", str(path), "--alloc-conf", "pinned:True"], "is not one of"),
            (["--alloc-conf", "expandable_segments:True"], "add --snapshot FILE.pickle"),
            (["--snapshot", str(tmp_path / "no" / "s.pickle")], "does not exist"),
            (["--snapshot", str(path), "--fsdp", "2"], "--snapshot does not take --fsdp"),
            (["--snapshot", str(path), "--device-memory", "lots"], "--device-memory")):
        assert main(["profile", *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_replay_of_a_prediction_is_stable(tmp_path):
    """Replaying the same estimate twice gives the same report and the same snapshot."""
    from memprop.models import model_config
    from memprop.workload import estimate

    e = estimate(model_config("mlp", depth=2, width=16), 2, flops=False, inference=False)
    first, second = replay_measurement(e), replay_measurement(e)
    assert first.report == second.report
    assert snapshot(first.allocator) == snapshot(second.allocator)
