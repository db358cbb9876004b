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
    assert f"unknown strategy '{given}' (did you mean '{guess}'?); choose one of: none, " in err


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
