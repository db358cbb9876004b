"""Issue 24's smaller things, each as a new user meets it on the command line: a value
that looks like an option, a budget of nothing, a misspelt strategy, the --model help,
the per-module table of a deep model, and times taken while the machine was busy."""

import pytest

from memprop.cli import main


def _one_error_line(capsys, argv) -> str:
    """Run ``argv``; it must fail as every user error does: exit 2, one line, no traceback."""
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.endswith("\n"), (argv, err)
    assert "Traceback" not in out + err, argv
    return err


@pytest.mark.parametrize("argv, expected", [
    # a negative-looking value is the option's value: its own check names it
    (["plan", "--budget", "-5MiB"], "argument --budget: size '-5MiB' is negative; write a "
                                    "positive size, e.g. 512MiB or 1.5GiB"),
    (["plan", "--budget", "-.5GiB"], "size '-.5GiB' is negative"),
    (["profile", "--repeats", "-1"], "argument --repeats: -1 is not allowed; use 1 or more"),
    (["backprop", "--batch", "-3"], "argument --batch: -3 is not allowed; use 1 or more"),
])
def test_a_negative_looking_value_is_read_as_the_value(capsys, argv, expected):
    err = _one_error_line(capsys, argv)
    assert expected in err and "expected one argument" not in err


def test_an_unknown_option_is_still_an_unknown_option(capsys):
    err = _one_error_line(capsys, ["plan", "--budget", "1GiB", "--bugdet", "2GiB"])
    assert "unrecognized arguments: --bugdet 2GiB" in err


@pytest.mark.parametrize("size, bytes_", [("0", 0), ("0.1", 0), ("0.4B", 0)])
def test_a_budget_of_nothing_is_refused_by_plan_and_by_the_strategy_alike(capsys, size, bytes_):
    why = f"size '{size}' is not positive ({bytes_} bytes); write a positive size, e.g. 512MiB"
    assert why in _one_error_line(capsys, ["plan", "--budget", size])
    # the planner never runs: refused while the strategy is read, before any model is built
    err = _one_error_line(capsys, ["profile", "--strategy", f"budget:{size}"])
    assert f"memprop.checkpoint: bad strategy 'budget:{size}': {why}" in err
    err = _one_error_line(capsys, ["profile", "--strategy", "budget:-5MiB"])
    assert "bad strategy 'budget:-5MiB': size '-5MiB' is negative" in err


def test_a_budget_strategy_of_nothing_is_refused_in_python():
    from memprop.checkpoint import parse_strategy
    from memprop.errors import StrategyError
    with pytest.raises(StrategyError, match=r"'budget:0': size '0' is not positive"):
        parse_strategy("budget:0")
    assert parse_strategy("budget:1KiB").budget_bytes == 1024      # 1 byte and up plan
    assert parse_strategy("budget:1").budget_bytes == 1


@pytest.mark.parametrize("given, guess", [
    ("sqr", "sqrt"), ("ful", "full"), ("segment:4", "segments:4"), ("evry:2", "every:2"),
    ("every:x", "every:K"), ("budget:", "budget:SIZE"), ("remat", "remat:OPS"),
    ("nest:0-3", "nested:0-3"), ("sqrt:2", "sqrt"),
])
def test_a_misspelt_strategy_gets_a_did_you_mean(capsys, given, guess):
    err = _one_error_line(capsys, ["profile", "--strategy", given])
    assert f"unknown strategy '{given}'; choose one of: none, " in err
    assert err.endswith(f"budget:1.5GiB); did you mean '{guess}'?\n")


def test_a_strategy_like_nothing_gets_no_guess(capsys):
    err = _one_error_line(capsys, ["profile", "--strategy", "zzz"])
    assert "unknown strategy 'zzz'; choose one of:" in err and "did you mean" not in err


def test_model_help_names_every_kind_of_model(capsys):
    for command in ("profile", "plan"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--model MODEL one of d2l_mlp, mlp, transformer, convnet; hf:<model_type>" in text
        assert "e.g. hf:gpt2, hf:llama" in text and "package.module:factory" in text
        assert "--set n_layer=12" in text


# -- the per-module table of `memprop profile`: bounded, every row named -------------

def _deep_transformer_table(depth=48):
    """The per-module table of a transformer ``depth`` blocks deep, on fake tensors."""
    from memprop.models import model_config
    from memprop.workload import estimate
    m = estimate(model_config("transformer", depth=depth, d_model=32, heads=2, seq_len=16,
                              vocab=64), 2)
    return m, m.saved_per_module


def test_the_per_module_table_of_48_blocks_is_bounded_and_sums_to_the_whole(capsys):
    from memprop.cli.profile_cmd import MODULE_ROWS, bound_modules, render_modules
    m, table = _deep_transformer_table()
    assert len(table) == 48 * 8 + 4          # embed, 8 modules a block, ln_f, head, top level
    shown, rest = bound_modules(table, MODULE_ROWS)
    assert rest.empty and shown.module.tolist() == [
        "embed", "blocks.*.ln1", "blocks.*.attn.qkv", "blocks.*.attn", "blocks.*.attn.proj",
        "blocks.*.ln2", "blocks.*.mlp.0", "blocks.*.mlp.1", "blocks.*.mlp.2", "ln_f", "head",
        "(top level)"]
    assert shown.modules.tolist() == [1] + [48] * 8 + [1, 1, 1]
    lines = "\n".join(render_modules(table)).splitlines()
    assert len(lines) == 2 + 12 + 2                # title, header, 12 rows, 2 notes
    assert lines[0] == ("Stored for backward, per module (in order of saving; 388 modules; "
                        "a row with * sums one module over the numbered blocks, 'modules' "
                        "counts them):")
    # a folded row is the sum of its blocks' rows: attn keeps q·kᵀ's inputs and the
    # softmax, 3 saves a block
    from memprop.cli.profile_cmd import fold_repeats
    folded = fold_repeats(table).set_index("module")
    attn = table[table.module.str.fullmatch(r"blocks\.\d+\.attn")]
    assert folded.loc["blocks.*.attn", "saved_bytes"] == attn.saved_bytes.sum()
    assert folded.loc["blocks.*.attn", "saved_count"] == 3 * 48
    assert folded.saved_bytes.sum() == table.saved_bytes.sum() == m.saved_bytes
    # the last row is named: what the model saves outside its submodules (the loss)
    assert table.module.iloc[-1] == ""
    assert lines[-3].strip().startswith("(top level)")
    assert lines[-2] == "  --modules all shows every module on its own row"
    assert lines[-1] == ("  (top level): saved by the model's own code outside any "
                         "submodule, e.g. its loss")


def test_past_the_bound_the_largest_rows_and_one_line_for_the_rest():
    from memprop.cli.profile_cmd import bound_modules, render_modules
    from memprop.units import format_bytes
    m, table = _deep_transformer_table()
    shown, rest = bound_modules(table, 3)
    assert len(shown) == 3 and len(shown) + len(rest) == 12      # 12 rows once folded
    # the three storing most: mlp.1 (GELU's input), mlp.2 (its output), attn
    assert set(shown.module) == {"blocks.*.mlp.1", "blocks.*.mlp.2", "blocks.*.attn"}
    assert shown.saved_bytes.min() >= rest.saved_bytes.max()
    assert shown.saved_bytes.sum() + rest.saved_bytes.sum() == m.saved_bytes
    lines = "\n".join(render_modules(table, 3)).splitlines()
    assert lines[0].endswith("the 3 rows storing most):")
    assert [line.split()[0] for line in lines[2:5]] == [
        "blocks.*.attn", "blocks.*.mlp.1", "blocks.*.mlp.2"]     # order of saving
    assert lines[5] == (f"  ... and 9 more rows ({48 * 5 + 4} modules) storing "
                        f"{format_bytes(rest.saved_bytes.sum())} in "
                        f"{rest.saved_count.sum()} tensors (parameters saved too: "
                        f"{format_bytes(rest.parameter_bytes.sum())})")
    # --modules all: every module on its own row, none folded, none left out
    shown, rest = bound_modules(table, None)
    assert len(shown) == len(table) and rest.empty and "modules" not in shown.columns


def test_profile_modules_option(capsys):
    args = ["profile", "--model", "transformer", "--set", "depth=24", "--set", "d_model=32",
            "--set", "heads=2", "--set", "seq_len=16", "--batch", "2", "--estimate"]
    assert main(args) == 0
    default = capsys.readouterr().out.splitlines()
    assert main([*args, "--modules", "all"]) == 0
    every = capsys.readouterr().out.splitlines()
    assert len(every) - len(default) == 24 * 8 - 8 - 1     # 8 rows for 192, the all-hint gone
    assert any(line.split()[:1] == ["blocks.23.mlp.2"] for line in every)
    assert every[-2].strip().startswith("(top level)") and "(top level):" in every[-1]
    for bad in ("0", "many"):
        err = _one_error_line(capsys, [*args, "--modules", bad])
        assert "argument --modules:" in err and "rows, or all" in err


def test_after_make_demo_a_missing_quickstart_store_points_to_the_demo(tmp_path, monkeypatch,
                                                                     capsys):
    # make demo writes reports/demo/results.sqlite; the README's `memprop results
    # experiments/quickstart.toml` looks in reports/quickstart/: the error says where
    import shutil
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "experiments", tmp_path / "experiments",   # another test file
                    ignore=shutil.ignore_patterns("__pycache__"))   # may be writing it
    (tmp_path / "reports" / "demo").mkdir(parents=True)
    (tmp_path / "reports" / "demo" / "results.sqlite").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert main(["results", "experiments/quickstart.toml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("(make demo wrote reports/demo/results.sqlite)")
