"""Progress of long stages, on a terminal and in log files alike.

On a terminal (stderr is a TTY) a stage draws a tqdm bar. Anywhere else (a log file, a pipe, a
scheduler, CI) it writes one line on stderr when it starts, at least every `interval` seconds
while it runs (30 s; RECSYS_CCL_PROGRESS_SECONDS sets another), and when it ends:

    train epoch 2/20: 1,234,567/16,000,000 interactions (7.7%), 15,234/s, ETA 0:16:12, loss 3.2345

A stage without a count (one long library call) reports through `heartbeat`. The innermost
stage running is what an interrupted command names (`current_stage`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["Progress", "current_stage", "heartbeat", "interrupted_stage", "log_interval",
           "reset"]

_active: list[Callable[[], str]] = []  # descriptions of the stages running, innermost last
_lock = threading.Lock()


def log_interval() -> float:
    """Seconds between progress lines in a log (RECSYS_CCL_PROGRESS_SECONDS, default 30)."""
    try:
        return max(0.0, float(os.environ.get("RECSYS_CCL_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def current_stage() -> str | None:
    """What is running now (the innermost stage), e.g. 'train epoch 2/20: 1,234/16,000
    interactions'; None outside any stage."""
    with _lock:
        return _active[-1]() if _active else None


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of one stage of `total` units (None: unknown).

    initial: units done before this process (a resumed stage). update(n, **info) adds n units
    done; info values (strings, numbers, or callables returning
    one) are shown after the rate. A callable is evaluated only when a line or the bar is
    drawn, so a value that costs something to read (a loss on a GPU: a host sync) is read at
    log intervals only. enabled=False: silent (but still the current stage)."""

    def __init__(self, stage: str, total: int | None, unit: str = "it", *,
                 enabled: bool = True, stream: TextIO | None = None,
                 interval: float | None = None, initial: int = 0):
        self.stage, self.total, self.unit = stage, total, unit
        self.done = self._initial = initial
        self._info: dict[str, Any] = {}
        self._stream = stream if stream is not None else sys.stderr
        self._interval = log_interval() if interval is None else interval
        self._t0 = time.perf_counter()
        self._last_line = self._t0
        self._last_refresh = self._t0
        self._enabled = enabled
        self._bar = None
        self._closed = False
        with _lock:  # first: an interrupt from here on names this stage
            _active.append(self.describe)
        if enabled and _is_terminal(self._stream):
            self._bar = tqdm(total=total, desc=stage, unit=unit, unit_scale=True, leave=False,
                             file=self._stream, dynamic_ncols=True, initial=initial)
        elif enabled:
            self._write(self._line())

    # -- what is shown --

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def _values(self) -> dict[str, str]:
        out = {}
        for key, value in self._info.items():
            v = value() if callable(value) else value
            out[key] = f"{v:.4f}" if isinstance(v, float) else str(v)
        return out

    def describe(self) -> str:
        """'<stage>: done/total unit' (cheap: no info values)."""
        if self.total is None:
            return f"{self.stage}: {self.done:,} {self.unit}"
        return f"{self.stage}: {self.done:,}/{self.total:,} {self.unit}"

    def _line(self) -> str:
        elapsed = self.elapsed
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        parts = [self.describe()]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.1f}%)"
        parts.append(f"{rate:,.0f}/s" if rate >= 10 else f"{rate:.2f}/s")
        if self.total is not None and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        parts += [f"{k} {v}" for k, v in self._values().items()]
        return ", ".join(parts)

    def _write(self, line: str) -> None:
        print(line, file=self._stream, flush=True)

    # -- updates --

    def update(self, n: int = 1, **info: Any) -> None:
        self.done += n
        self._info.update(info)
        if not self._enabled:
            return
        now = time.perf_counter()
        if self._bar is not None:
            self._bar.update(n)
            if now - self._last_refresh >= 1.0 and self._info:
                self._bar.set_postfix(self._values(), refresh=False)
                self._last_refresh = now
        elif now - self._last_line >= self._interval:
            self._write(self._line())
            self._last_line = now

    def close(self) -> None:
        """The stage ended (a last line in a log, the bar removed on a terminal)."""
        if self._closed:
            return
        self._closed = True
        with _lock:
            if self.describe in _active:
                _active.remove(self.describe)
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            self._write(self._line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # interrupted or failed: leave the stage named for the error message
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            with _lock:
                if self.describe in _active:
                    _active.remove(self.describe)
                _interrupted.append(self.describe())


_interrupted: list[str] = []  # stages an exception left, innermost first


def interrupted_stage() -> str | None:
    """The innermost stage an exception (an interrupt) left, or else the one still running
    (an interrupt between a stage's start and its `with` block), if any."""
    with _lock:
        if _interrupted:
            return _interrupted[0]
        return _active[-1]() if _active else None


def reset() -> None:
    """Forget every stage (a new command starts in this process)."""
    with _lock:
        _active.clear()
        _interrupted.clear()


@contextlib.contextmanager
def heartbeat(stage: str, *, enabled: bool = True, stream: TextIO | None = None,
              interval: float | None = None) -> Iterator[None]:
    """A stage without a count (one long library call): 'still running' lines at least every
    `interval` seconds, from a background thread so that a call holding the main thread
    still reports, then a line when it ends. A stage shorter than the interval prints
    nothing (a failing one leaves its error as the only line); interval 0 prints a line at
    the start too."""
    stream = stream if stream is not None else sys.stderr
    interval = log_interval() if interval is None else interval
    t0 = time.perf_counter()
    done = threading.Event()
    printed = threading.Event()
    describe = lambda: f"{stage} (running {_duration(time.perf_counter() - t0)})"

    def beat() -> None:
        while not done.wait(max(interval, 0.05)):
            print(describe(), file=stream, flush=True)
            printed.set()

    with _lock:  # first: an interrupt from here on names this stage
        _active.append(describe)
    if enabled and interval == 0:
        print(stage, file=stream, flush=True)
        printed.set()
    thread = threading.Thread(target=beat, name="progress-heartbeat", daemon=True)
    if enabled:
        thread.start()
    try:
        yield
    except BaseException:
        with _lock:
            _interrupted.append(describe())
        raise
    finally:
        done.set()
        with _lock:
            if describe in _active:
                _active.remove(describe)
        if enabled:
            thread.join()
    if printed.is_set():
        print(f"{stage}: done in {_duration(time.perf_counter() - t0)}", file=stream,
              flush=True)
