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
    spec.write_text('name = "g"\n[model]\nname = "mlp"\n[grid]\nbatch = [2]\n[run]\ndevice = "cuda"\n')
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
