"""The README is true: every `$ memprop ...` session it shows runs here and prints what
it shows, and every Python block runs, in order, in one namespace, as a reader would
paste them.

NOTE [ What a README session must match ]
  Each line the README shows after a ``$ memprop`` command must appear in the command's
  output (stdout and stderr), in the same order, with runs of spaces read as one. What
  depends on the machine is not compared as written: durations (``370 ms``, ``1.22 s``)
  match any duration, and the process's resident set any size (it counts libraries and
  pools: memprop says so where it prints it). A line ending in ``...`` matches any line
  that starts with what precedes it. Byte counts, FLOPs and tensor counts are compared
  exactly. A command that starts with ``cd DIR &&`` runs in DIR.
"""

import contextlib
import io
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from memprop.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

_DURATION = re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|µs|us|s|min)\b")
_RESIDENT = re.compile(r"(process resident set\s+)\d+(?:\.\d+)? [KMGT]?i?B")


def blocks(text: str) -> list[tuple[int, str, str]]:
    """Fenced blocks of ``text``: (line number of the fence, language, body)."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```") and len(lines[i]) > 3:
            lang, start, body = lines[i][3:].strip(), i + 1, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append((start, lang, "\n".join(body)))
        i += 1
    return out


def sessions(body: str) -> list[tuple[str, list[str]]]:
    """``$ command`` (continuation lines joined) and the lines shown after it."""
    out: list = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            out.append((command, []))
        elif out:
            out[-1][1].append(line)
        i += 1
    return out


def normal(line: str) -> str:
    line = _RESIDENT.sub(r"\1<size>", line)
    return " ".join(_DURATION.sub("<time>", line).split())


def run_cli(command: str, capsys) -> str:
    """The output of a README command, run in-process as the shell would run it."""
    folder = ROOT
    if command.startswith("cd "):
        where, _, command = command[3:].partition("&&")
        folder = ROOT / where.strip()
    argv = shlex.split(command)
    assert argv[0] == "memprop", command
    cwd, path = os.getcwd(), list(sys.path)
    os.chdir(folder)
    try:
        code = main(argv[1:])
    finally:
        os.chdir(cwd)
        sys.path[:] = path
    out = capsys.readouterr()
    assert code == 0, f"{command}\n{out.err[-2000:]}"
    return out.out, out.err


def assert_shown(shown: list[str], output: tuple[str, str], where: str) -> None:
    """NOTE [ What a README session must match ]: stdout in order; a line found only on
    stderr (a warning) may come anywhere."""
    got = [normal(line) for line in output[0].splitlines()]
    err = [normal(line) for line in output[1].splitlines()]
    at = 0
    for line in shown:
        want = normal(line)
        if not want:
            continue
        prefix = want.endswith("...")
        want = want.rstrip(". ") if prefix else want
        matches = lambda g, want=want, prefix=prefix: (  # noqa: E731
            g == want or (prefix and g.startswith(want)))
        for j in range(at, len(got)):
            if matches(got[j]):
                at = j + 1
                break
        else:
            if any(matches(g) for g in err):
                continue
            near = [g for g in got + err if g[:20] == want[:20]]
            raise AssertionError(f"{where}: the README shows\n  {line.strip()}\nbut the "
                                 f"command printed {'instead' if near else 'no such line'}"
                                 + "".join(f"\n  {g}" for g in near[:3]))


SESSIONS = [(f"README.md:{line}", command, shown)
            for line, lang, body in blocks(README.read_text()) if lang == "text"
            for command, shown in sessions(body)]
SLOW = ("--estimate", "plan ", "depth=8")


@pytest.mark.parametrize("where,command,shown", [
    pytest.param(w, c, s, marks=[pytest.mark.slow] if any(k in c for k in SLOW) else [],
                 id=w) for w, c, s in SESSIONS])
def test_readme_session_prints_what_it_shows(where, command, shown, capsys):
    assert_shown(shown, run_cli(command, capsys), f"{where}: {command}")


def test_readme_has_sessions_and_python():
    langs = [lang for _, lang, _ in blocks(README.read_text())]
    assert len(SESSIONS) >= 6 and langs.count("python") >= 4


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    """Every Python block, pasted in order into one interpreter, runs; a ``# -> value``
    comment is what the line's expression evaluates to."""
    import memprop.sweep
    db = tmp_path / "results.sqlite"
    _small_results(db)
    real = memprop.sweep.load_results
    # the README's library block reads the store `make demo` writes (reports/demo/); here
    # a small sweep stands in for it, so the test runs on a fresh clone
    monkeypatch.setattr(memprop.sweep, "load_results",
                        lambda path, **kw: real(db if "reports/" in str(path) else path, **kw))
    scope: dict = {}
    for line, lang, body in blocks(README.read_text()):
        if lang != "python":
            continue
        code = compile(body, f"README.md:{line}", "exec")
        exec(code, scope)                               # noqa: S102 - the README's own code
        for expr, value in _claims(body):
            assert repr(eval(expr, scope)) == value, f"README.md:{line}: {expr}"  # noqa: S307


def _claims(body: str) -> list[tuple[str, str]]:
    """``expr   # -> value`` lines of a block."""
    out = []
    for line in body.splitlines():
        code, sep, value = line.partition("# ->")
        if sep and code.strip():
            out.append((code.strip(), value.strip()))
    return out


def _small_results(db: Path) -> None:
    from memprop.sweep import load_spec, run_sweep
    spec = db.parent / "s.toml"
    spec.write_text('name = "readme"\n[model]\nname = "mlp"\ndepth = 2\nwidth = 32\n'
                    'd_in = 16\n[grid]\nbatch = [4]\n[run]\nrepeats = 1\n')
    with contextlib.redirect_stdout(io.StringIO()):
        run_sweep(load_spec(spec), db_path=db)
