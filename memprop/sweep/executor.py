"""Executors run trials somewhere and report each result as it finishes.

The interface is one method, ``run(trials, on_result)``, so a cluster engine can stand in
for the local pool. ``LocalProcessExecutor`` runs every trial as its own child process:
its own memory limit, a clean resident-set peak, a fresh allocator, and isolation from
crashes. By default children are forked from a fork server that has imported torch and
memprop once (and never allocated a tensor, started a thread or touched CUDA), so a
trial starts in milliseconds instead of re-importing torch; ``start="subprocess"`` runs
``python -m memprop.sweep.worker`` instead, as a cluster engine would.

A child killed by a signal or exiting without a result becomes status ``crashed`` (with
its signal or exit code); one past its timeout is killed and becomes ``timeout``.
Children start their own session, so Ctrl-C reaches only the parent, which stops them
and keeps every finished trial.

NOTE [ No trial outlives its sweep ]
  A child asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``): a
  subprocess's parent is the sweep; a forked child's parent is the fork server, which
  exits when the sweep's end of its pipe closes - also when the sweep is SIGKILLed. Each
  trial's scratch folder (``memprop-trial-*`` in the temp folder) holds an ``owner`` file
  with the sweep's pid; a sweep removes every such folder whose owner is dead before it
  starts, so a killed sweep leaks nothing past the next run.
"""

from __future__ import annotations

import ctypes
import glob
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Protocol

import torch

from memprop.sweep import worker
from memprop.sweep.budget import CHILD_ENV, tune_malloc
from memprop.sweep.trial import Trial

__all__ = ["Executor", "LocalProcessExecutor", "default_threads", "clean_stale_trials"]

_PR_SET_PDEATHSIG = 1
_TRIAL_PREFIX = "memprop-trial-"

OnResult = Callable[[Trial, dict], None]


class Executor(Protocol):
    def run(self, trials: list[Trial], on_result: OnResult) -> None:
        """Run ``trials``; call ``on_result(trial, result)`` as each one ends."""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def default_threads(workers: int) -> int:
    """Torch threads per trial when a spec sets none: the cores shared among the workers,
    so that ``workers x threads`` never exceeds them."""
    return max(1, (os.cpu_count() or 1) // workers)


def _die_with_parent() -> None:
    """NOTE [ No trial outlives its sweep ]: SIGKILL this process when its parent dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):   # not Linux: the sweep's finally still kills us
        return


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_UNOWNED_STALE_S = 24 * 3600   # a folder with no owner file (memprop < 0.2): a day old


def clean_stale_trials() -> int:
    """Remove the scratch folders of trials whose sweep is dead; returns how many.
    A folder without an owner file is removed only once it is a day old: it may belong
    to a running sweep of an older memprop."""
    removed = 0
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), _TRIAL_PREFIX + "*")):
        try:
            with open(os.path.join(folder, "owner")) as f:
                stale = not _pid_alive(int(f.read().split()[0]))
        except (OSError, ValueError, IndexError):
            try:
                stale = time.time() - os.path.getmtime(folder) > _UNOWNED_STALE_S
            except OSError:
                stale = False
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def _forked_trial(trial_path: str, result_path: str, log_path: str, threads: int,
                  path: list[str], sweep_pid: int) -> None:
    """Body of a forked trial process."""
    os.setsid()                                   # out of the terminal's Ctrl-C
    _die_with_parent()
    if not _pid_alive(sweep_pid):                 # the sweep died before we could ask
        os._exit(1)
    sys.path[:] = path                            # user factories import as in the parent
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    tune_malloc()
    torch.set_num_threads(threads)
    code = worker.main([trial_path, result_path])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Child:
    """A running trial: forked or a subprocess, with its scratch folder."""

    def __init__(self, trial: Trial, executor: "LocalProcessExecutor"):
        self.trial, self.started = trial, time.monotonic()
        self.workdir = tempfile.TemporaryDirectory(prefix=_TRIAL_PREFIX)
        with open(os.path.join(self.workdir.name, "owner"), "w") as f:
            f.write(f"{os.getpid()}\n")
        threads = trial.threads or executor.threads
        self.trial_path = os.path.join(self.workdir.name, "trial.json")
        self.result_path = os.path.join(self.workdir.name, "result.json")
        self.log_path = os.path.join(self.workdir.name, "log.txt")
        with open(self.trial_path, "w") as f:
            json.dump(trial.to_dict(), f)
        # a worker process: a Popen, or a forkserver Process (self.proc.exitcode)
        self.proc: subprocess.Popen | multiprocessing.process.BaseProcess
        if executor.start == "subprocess":
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen(
                    [executor.python, "-m", "memprop.sweep.worker", self.trial_path,
                     self.result_path], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    env={**executor.env, "OMP_NUM_THREADS": str(threads)},
                    start_new_session=True, preexec_fn=_die_with_parent)
        else:
            process = executor.context.Process(
                target=_forked_trial, daemon=False,
                args=(self.trial_path, self.result_path, self.log_path, threads,
                      list(sys.path), os.getpid()))
            process.start()
            self.proc = process

    def returncode(self):
        if isinstance(self.proc, subprocess.Popen):
            return self.proc.poll()
        return self.proc.exitcode

    def kill(self) -> None:
        """SIGKILL the trial: its process and what it started (a sharded trial's ranks,
        memprop.sweep.sharded_trial), its whole process group once it leads one (its
        ``setsid``); before that it has started nothing, and only it is killed."""
        pid = self.proc.pid
        if self.returncode() is None and pid is not None:
            try:
                leads = os.getpgid(pid) == pid
            except ProcessLookupError:
                leads = False
            if leads:
                os.killpg(pid, signal.SIGKILL)
            else:
                self.proc.kill()
        if isinstance(self.proc, subprocess.Popen):
            self.proc.wait()
        else:
            self.proc.join()

    def result(self) -> dict:
        rc, elapsed = self.returncode(), time.monotonic() - self.started
        if rc == 0 and os.path.exists(self.result_path):
            with open(self.result_path) as f:
                return json.load(f)
        with open(self.log_path) as f:
            tail = f.read()[-1500:].strip()
        how = f"killed by {_signal_name(-rc)}" if rc < 0 else f"exited with code {rc}"
        return {"status": "crashed", "exit_code": rc,
                "signal": _signal_name(-rc) if rc < 0 else None,
                "error": f"the trial's process {how}" + (f": {tail}" if tail else ""),
                "duration_s": round(elapsed, 3)}

    def close(self) -> None:
        self.workdir.cleanup()


class LocalProcessExecutor:
    """Run trials in child processes, ``workers`` at a time (1 keeps timings clean)."""

    def __init__(self, workers: int = 1, *, start: str = "fork-server",
                 python: str = sys.executable, poll_s: float = 0.02):
        if workers < 1:
            raise ValueError(f"memprop.sweep: workers must be >= 1, got {workers}")
        if start not in ("fork-server", "subprocess"):
            raise ValueError("memprop.sweep: start must be fork-server or subprocess, "
                             f"got {start!r}")
        if start == "fork-server" and "forkserver" not in multiprocessing.get_all_start_methods():
            start = "subprocess"
        self.workers, self.start, self.python, self.poll_s = workers, start, python, poll_s
        self.threads = default_threads(workers)   # for trials whose spec sets none
        self.env = {**os.environ, **CHILD_ENV,
                    "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        if start == "fork-server":
            self.context = multiprocessing.get_context("forkserver")
            self.context.set_forkserver_preload(["memprop.sweep.worker", "torch", "pandas"])

    def run(self, trials: list[Trial], on_result: OnResult) -> None:
        clean_stale_trials()
        queue = list(trials)
        running: list[_Child] = []
        try:
            while queue or running:
                while queue and len(running) < self.workers:
                    running.append(_Child(queue.pop(0), self))
                for child in list(running):
                    if child.returncode() is None:
                        if time.monotonic() - child.started <= child.trial.timeout_s:
                            continue
                        child.kill()
                        result = {"status": "timeout", "duration_s": round(
                            time.monotonic() - child.started, 3), "error":
                            f"killed after its timeout of {child.trial.timeout_s:g} s"}
                    else:
                        result = child.result()
                    running.remove(child)
                    child.close()
                    on_result(child.trial, result)
                time.sleep(self.poll_s)
        finally:
            for child in running:              # interrupted: stop the children
                child.kill()
                child.close()
