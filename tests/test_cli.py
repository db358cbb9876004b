import json
import subprocess
import sys

from memprop import __version__
from memprop.cli import main


def test_version_and_help(capsys):
    assert main([]) == 0
    assert "backprop" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "memprop", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"memprop {__version__}"


def test_backprop_command_prints_walkthrough(capsys):
    assert main(["backprop", "--d", "10", "--h", "6", "--q", "3", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "stored: 200 B (200 bytes) = B·(d + 2h + q)·4 = 2·(10 + 12 + 3)·4" in out
    assert "∂J/∂z = ∂J/∂h ⊙ φ′(z)" in out


def test_bad_option_is_a_clear_error(capsys):
    assert main(["backprop", "--phi", "gelu"]) == 2
    assert "phi must be one of: relu, tanh, sigmoid" in capsys.readouterr().err
    assert main(["backprop", "--dtype", "float8"]) == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_profile_json_estimate_and_timeline(tmp_path, capsys):
    import json

    import pandas as pd
    timeline = tmp_path / "tl.csv"
    assert main(["profile", "--set", "depth=3", "--set", "width=32", "--batch", "4",
                 "--repeats", "1", "--json", "--timeline", str(timeline)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["saved_bytes"] == row["closed_form_saved_bytes"]
    assert pd.read_csv(timeline).total_bytes.max() == row["peak_bytes"]
    assert main(["profile", "--model", "transformer", "--set", "depth=2", "--batch", "2",
                 "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTED on fake tensors" in out and "blocks.1.attn" in out


def test_profile_bad_inputs(capsys):
    assert main(["profile", "--set", "depth"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err
    assert main(["profile", "--set", "depht=3"]) == 2
    assert "did you mean 'depth'" in capsys.readouterr().err
    assert main(["profile", "--model", "os.path:join"]) == 2
    assert "needs --input-shape" in capsys.readouterr().err


def test_unavailable_device_is_a_clear_error(capsys, tmp_path):
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["profile", "--device", "cuda", "--batch", "2"]) == 2
    assert "sees no CUDA device; use --device cpu" in capsys.readouterr().err
    spec = tmp_path / "s.toml"
    spec.write_text('name = "g"\n[model]\nname = "mlp"\n[grid]\nbatch = [2]\n'
                    '[run]\ndevice = "cuda"\n')
    assert main(["sweep", str(spec), "--db", str(tmp_path / "x.sqlite")]) == 2
    assert "run.device: 'cuda' is not available" in capsys.readouterr().err


def test_sequential_factory_from_the_current_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "seqmodels.py").write_text(
        "import torch\n"
        "def net():\n"
        "    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8),"
        " torch.nn.Tanh()) for _ in range(4)])\n")
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "--model", "seqmodels:net", "--input-shape", "8", "--batch", "4",
                 "--strategy", "segments:2", "--repeats", "1", "--json"]) == 0
    import json
    row = json.loads(capsys.readouterr().out)
    # segment 1 (blocks 0-1) keeps its input x; blocks 2-3 run plainly: each Linear saves
    # its input, each tanh its output (shared with the next Linear): x, h1, h2, h3 = 4 · 4·8·4
    assert row["saved_bytes"] == 4 * (4 * 8 * 4)


# -- bad input: one line on stderr, exit 2, no traceback, nothing written -------------

def _store_with_trials(path, n=3):
    """A results database holding ``n`` finished trials (no measuring needed)."""
    from memprop.sweep.store import ResultsStore
    from memprop.sweep.trial import Trial

    with ResultsStore(path) as store:
        for batch in range(1, n + 1):
            store.put(Trial(spec="t", model="mlp", model_fields=(("depth", 2),), batch=batch),
                      {"status": "ok", "saved_bytes": 1024 * batch, "peak_bytes": 4096 * batch,
                       "step_ms": 1.23456, "mode": "measure"})
    return path


def _bad_inputs(tmp):
    """(argv, text the one error line must contain, paths that must not be created)."""
    (tmp / "folder").mkdir()
    (tmp / "not.sqlite").write_text("hello, I am not a database\n")
    (tmp / "empty.sqlite").write_bytes(b"")
    (tmp / "existing.txt").write_text("keep me\n")
    db = _store_with_trials(tmp / "results.sqlite")
    from memprop.sweep.store import ResultsStore
    ResultsStore(tmp / "none.sqlite").close()          # a database with no trials
    spec = tmp / "s.toml"
    spec.write_text('name = "s"\n[model]\nname = "mlp"\n[grid]\nbatch = [2]\n')
    t = str(tmp)
    return [
        (["plan", "--budget", "12 potatoes"], "cannot read '12 potatoes' as a size", []),
        (["plan", "--budget=-5MiB"], "size '-5MiB' is negative", []),
        (["profile", "--timeline", f"{t}/folder"], "is a folder; give a file name", []),
        (["profile", "--timeline", f"{t}/missing/tl.csv"], "folder", [f"{t}/missing"]),
        (["profile", "--trace", f"{t}/missing/tl.json"], "does not exist", [f"{t}/missing"]),
        (["profile", "--timeline", "/proc/memprop-tl.csv"], "is read-only", []),
        (["report", str(db), "-o", "/proc/memprop-report"], "is read-only", []),
        (["results", f"{t}/not.sqlite"], "is not a SQLite results database", []),
        (["report", f"{t}/not.sqlite"], "is not a SQLite results database", [f"{t}/figures"]),
        (["sweep", str(spec), "--db", f"{t}/not.sqlite"], "is not a SQLite results database",
         []),
        (["results", f"{t}/folder"], "is a folder, not a results database", []),
        (["sweep", str(spec), "--db", f"{t}/folder"], "is a folder, not a results database",
         [f"{t}/folder/results.sqlite"]),
        (["report", str(db), "-o", f"{t}/existing.txt"], "is an existing file, not a folder", []),
        (["results", str(db), "--csv", f"{t}/folder"], "is a folder; give a file name", []),
        (["report", str(db), "--dpi", "0"], "--dpi: 0 is not allowed; use 1 or more", []),
        (["results", f"{t}/empty.sqlite"], "is an empty file, not a results database", []),
        (["profile", "--repeats", "0"], "--repeats: 0 is not allowed", []),
        (["profile", "--repeats", "-1"], "--repeats: -1 is not allowed", []),
        (["profile", "--model", "torch.nn:Linear", "--input-shape", "8"],
         "missing 2 required positional arguments", []),
        (["profile", "--model", "torch.nn:Linear", "--input-shape", "8", "--set",
          "in_features=4", "--set", "out_features=2", "--batch", "2"],
         "does not run with --input-shape 8 and --set in_features=4 out_features=2", []),
        (["report", f"{t}/none.sqlite"], "holds no trials", [f"{t}/figures", f"{t}/report.md"]),
    ]


def test_every_bad_input_is_one_clear_line(tmp_path, capsys):
    import pathlib

    cases = _bad_inputs(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for argv, expected, absent in cases:
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.endswith("\n"), (argv, err)
        assert expected in err, (argv, err)
        assert "Traceback" not in err + out, argv
        for path in absent:
            assert not pathlib.Path(path).exists(), (argv, path)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before        # nothing written, nothing changed (the empty file stays empty)


def test_results_into_a_closed_pipe_is_one_line(tmp_path):
    db = _store_with_trials(tmp_path / "r.sqlite", n=3000)  # ~400 KB: more than a pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "memprop", "results", str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()        # like `| head -1`: read one line, then close the pipe
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 2
    assert err.count("\n") == 1 and "broken pipe" in err and "Traceback" not in err, err


def test_building_the_parser_imports_no_heavy_module():
    code = ("import sys, memprop.cli; memprop.cli.build_parser(); "
            "print(' '.join(m for m in ('torch', 'pandas', 'matplotlib', 'memprop.measure') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == ""


def test_the_parser_offers_the_library_names():
    from memprop.cli._common import DTYPE_NAMES, MODEL_NAMES, OPTIMIZER_NAMES
    from memprop.dtypes import DTYPES
    from memprop.measure import OPTIMIZERS
    from memprop.models import MODELS
    assert MODEL_NAMES == tuple(MODELS) and OPTIMIZER_NAMES == OPTIMIZERS
    assert DTYPE_NAMES == tuple(DTYPES)


def test_help_shows_defaults_and_no_rest_markup(capsys):
    for command in ("profile", "plan", "sweep", "frontier", "results", "report", "backprop"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "``" not in out, command
        assert "(default:" in out, command
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "list the trials stored" in top and "the largest batch that fits" in top


def test_profile_trace_is_a_chrome_trace_of_the_timeline(tmp_path, capsys):
    import json

    import pandas as pd
    trace_path, csv_path = tmp_path / "step.json", tmp_path / "step.csv"
    assert main(["profile", "--set", "depth=3", "--set", "width=32", "--batch", "4",
                 "--repeats", "1", "--trace", str(trace_path), "--timeline", str(csv_path)]) == 0
    assert "Chrome trace: " in capsys.readouterr().out
    trace, timeline = json.loads(trace_path.read_text()), pd.read_csv(csv_path)
    events = trace["traceEvents"]
    assert {e["ph"] for e in events} == {"M", "X", "C"}
    for e in events:                      # what chrome://tracing and Perfetto require
        assert isinstance(e["name"], str) and isinstance(e["pid"], int)
        if e["ph"] in ("X", "C"):
            assert isinstance(e["ts"], int) and e["ts"] >= 0
        if e["ph"] == "C":                # counter arguments must all be numbers
            assert all(isinstance(v, int) for v in e["args"].values())
    ops = [e for e in events if e["ph"] == "X" and e["tid"] == 1]
    assert [e["name"] for e in ops] == timeline.op.tolist()
    assert [e["args"]["module"] for e in ops] == timeline.module.fillna("").tolist()
    for column in [c for c in timeline.columns if c.endswith("_bytes")]:
        name = column.replace("_bytes", " bytes")
        series = [(e["ts"], e["args"]["bytes"]) for e in events
                  if e["ph"] == "C" and e["name"] == name]
        assert series == list(zip(timeline.op_index, timeline[column])), column
    phases = [e["name"] for e in events if e["ph"] == "X" and e["tid"] == 2]
    assert phases == ["forward", "backward", "optimizer"]


def test_numbers_for_people():
    from memprop.units import (
        format_bytes,
        format_flops,
        format_ms,
        format_number,
        format_ratio,
        format_value,
    )
    assert format_flops(158_364_034_000_000) == "158.4 TFLOP"
    assert format_flops(7_516_192_768) == "7.516 GFLOP"
    assert format_flops(0) == "0 FLOP" and format_flops(float("nan")) == "-"
    assert format_ms(0.012345) == "0.0123 ms" and format_ms(12.345) == "12.3 ms"
    assert format_ms(1234.5) == "1.23 s" and format_ms(None) == "-"
    assert format_ratio(0.87431) == "0.874" and format_ratio(1.9137) == "1.91"
    assert format_number(1024.0) == "1024" and format_number(3) == "3"
    assert format_bytes(None) == "-" and format_bytes(float("nan")) == "-"
    assert format_value("recompute_vs_forward", 0.0) == "0"
    assert format_value("step_ms", 2.0) == "2.00 ms"
    assert format_value("duration_s", 0.5) == "500 ms"


def test_readme_imports_work():
    import memprop
    from memprop.checkpoint import Plan, apply_strategy, plan, remove_strategy  # noqa: F401
    assert memprop.plan is plan and memprop.Plan is Plan


class _Stream:
    """A stream that says whether it is a terminal, and keeps what is written."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_progress_draws_on_a_terminal_only():
    import time

    from memprop.cli._progress import Spinner, SweepBar
    from memprop.sweep.trial import Trial
    for tty in (True, False):
        stream = _Stream(tty)
        with Spinner("measuring one step", stream=stream):
            time.sleep(0.35)
        bar = SweepBar(2, stream=stream)
        trial = Trial(spec="t", model="mlp", model_fields=(("depth", 2),), batch=4)
        bar.update(trial, {"status": "ok"})
        bar.update(trial, {"status": "oom"})
        bar.close()
        assert (bar.done, dict(bar.counts)) == (2, {"ok": 1, "oom": 1})
        if tty:
            assert "measuring one step |" in stream.text or "measuring one step /" in stream.text
            assert "2/2 ok 1 oom 1" in stream.text and stream.text.endswith("\n")
        else:
            assert stream.text == ""


def test_the_package_loads_its_public_names_on_use():
    code = ("import sys, memprop; names = [getattr(memprop, n) for n in memprop.__all__]; "
            "print(memprop.sweep.load_results is memprop.load_results, "
            "memprop.measure.__module__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "memprop.workload", "True"]


def test_results_and_plan_as_json(tmp_path, capsys):
    import json
    db = _store_with_trials(tmp_path / "r.sqlite", n=2)
    assert main(["results", str(db), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(t["batch"], t["saved_bytes"], t["step_ms"]) for t in rows["trials"]] == [
        (1, 1024, 1.23456), (2, 2048, 1.23456)]
    assert rows["frontier"] == []
    assert main(["plan", "--set", "depth=8", "--set", "width=64", "--set", "d_in=64",
                 "--batch", "64", "--budget", "1GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["budget_bytes"] == 2**30 and plan["blocks"] == 8 and plan["error"] is None
    by = {row["strategy"]: row for row in plan["strategies"]}
    assert by["none"]["recompute_flops"] == 0 and by["none"]["fits"] is True
    # sqrt on 8 blocks: recompute the forward of the checkpointed blocks, in raw FLOPs
    assert by["sqrt"]["recompute_flops"] > 0
    assert plan["plan"]["spec"] == "none"          # 1 GiB fits without checkpointing
    assert main(["plan", "--set", "depth=8", "--set", "width=64", "--batch", "64",
                 "--budget", "1KiB", "--json"]) == 2
    failed = json.loads(capsys.readouterr().out)
    assert failed["plan"] is None and "1.0 KiB" in failed["error"]


def test_frontier_as_json_equals_the_stored_frontier(tmp_path, capsys):
    import json

    from memprop.sweep.store import ResultsStore
    spec = tmp_path / "f.toml"
    spec.write_text('name = "f"\n[model]\nname = "mlp"\nwidth = 64\nd_in = 64\n'
                    '[grid]\nbatch = [2]\n[run]\nrepeats = 1\n'
                    '[frontier]\nbudget = "4MiB"\ndepths = [2]\nstrategies = ["none"]\n'
                    'batch_step = 512\nmax_batch = 8192\n')
    db = tmp_path / "new" / "r.sqlite"
    assert main(["frontier", str(spec), "--db", str(db), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (point,) = out["points"]
    with ResultsStore(db) as store:
        (row,) = store.frontier().to_dict(orient="records")
    assert (point["depth"], point["confirmed_batch"], point["first_oom_batch"]) == (
        row["depth"], row["confirmed_batch"], row["first_oom_batch"])
    assert point["first_oom_batch"] == point["confirmed_batch"] + 512


def test_plan_metric_stored_fits_the_bytes_stored_for_backward(capsys):
    args = ["plan", "--model", "transformer", "--set", "depth=4", "--set", "d_model=64",
            "--set", "heads=4", "--set", "seq_len=32", "--batch", "8", "--budget", "1MiB"]
    assert main([*args, "--metric", "stored", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "stored" and out["plan"]["predicted_saved_bytes"] <= 2**20
    fits = {row["strategy"]: row["fits"] for row in out["strategies"]}
    assert fits["full"] and not fits["none"]          # judged on stored bytes, not the peak
    assert main([*args, "--metric", "peak", "--json"]) == 2  # no plan's peak fits 1 MiB
    capsys.readouterr()
    # --no-whole-forward keeps to the chain: never forward:KEYS, never cheaper
    assert main([*args, "--metric", "stored", "--no-whole-forward", "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)["plan"]
    assert not chain["spec"].startswith("forward:")
    assert chain["recompute_flops"] >= out["plan"]["recompute_flops"]
