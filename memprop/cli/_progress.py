"""Progress for people at a terminal: a spinner for one slow call, a bar for a sweep.

Both draw on stderr only when it is a terminal (``isatty``), so piped or redirected
output stays clean; the library never draws, it only calls back (``on_result``,
``progress``).
"""

from __future__ import annotations

import collections
import sys
import threading
import time

__all__ = ["Spinner", "SweepBar", "interactive"]

_FRAMES = "|/-\\"
_WIDTH = 100


def interactive(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class Spinner:
    """``with Spinner("measuring"):`` shows ``measuring |  3.2 s`` until the block ends;
    ``spinner.say(text)`` changes the text. Silent unless ``stream`` is a terminal."""

    def __init__(self, text: str, *, stream=None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = interactive(self.stream) if enabled is None else enabled
        self.text, self._stop = text, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        self.text = text

    def _draw(self, frame: str) -> None:
        line = f"\r{self.text} {frame} {time.monotonic() - self._start:5.1f} s"
        with self._lock:
            self.stream.write(line[:_WIDTH].ljust(_WIDTH))
            self.stream.flush()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(0.1):
            self._draw(_FRAMES[i % len(_FRAMES)])
            i += 1

    def clear(self) -> None:
        """Erase the spinner's line (call before printing to the same terminal)."""
        if self.enabled:
            with self._lock:
                self.stream.write("\r" + " " * _WIDTH + "\r")
                self.stream.flush()

    def __enter__(self):
        self._start = time.monotonic()
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self.clear()


class SweepBar:
    """A one-line bar for a sweep: done/total, counts by status, elapsed time and ETA.
    ``update`` is the ``on_result`` callback ``run_sweep`` takes."""

    def __init__(self, total: int, *, stream=None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = interactive(self.stream) if enabled is None else enabled
        self.total, self.done = total, 0
        self.counts: collections.Counter = collections.Counter()
        self.start = time.monotonic()

    def line(self, label: str = "") -> str:
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        counts = " ".join(f"{k} {n}" for k, n in sorted(self.counts.items()))
        eta_text = f"ETA {eta:.0f} s" if eta == eta else "ETA -"
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {counts} | "
                f"{elapsed:.0f} s elapsed, {eta_text} | {label}")

    def update(self, trial, result: dict) -> None:
        self.done += 1
        self.counts[result.get("status", "crashed")] += 1
        if self.enabled:
            self.stream.write("\r" + self.line(trial.label())[:150].ljust(150))
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()
