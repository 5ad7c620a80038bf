"""Live progress of the driver's long stages, from what Spark already tracks.

A background thread on the driver reads, once a second, the counters of the stage being
tracked (accumulators the executors add to, or Spark's task counts) and

- every ``interval`` seconds logs one line such as
  ``featurize: 41,200 / 90,000 images (45.8 %), 212 failed, 27.1 images/s over the last 30 s,
  ETA 00:30:02; tasks 161 / 352 done, 16 running``;
- at most every ``ship_interval`` seconds, and only when the log grew, ships the log to S3;
- when the console is a terminal, draws a tqdm bar instead of printing those lines there.

PySpark sends an accumulator's updates to the driver when a task ends, so the image counts
move a partition (256 images by default) at a time. Nothing here imports pyspark: the
counters and the task counts are plain callables, and the thread's work is ``poll(now)``.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from extractor.driver.logs import ConsoleHandler

TICK_S = 1.0


@dataclass
class Tracked:
    """One stage as the reporter sees it. ``done``/``failed``: counts since the stage began
    (``done`` None: the group's tasks done, for a stage of one task per unit); ``group``: its
    Spark job group, for the task counts (None: no task counts)."""

    name: str
    total: int
    done: Callable[[], int] | None
    unit: str = "images"
    failed: Callable[[], int] | None = None
    group: str | None = None


def format_eta(seconds: float | None) -> str:
    """``00:30:02``; ``unknown`` before any progress."""
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(tracked: Tracked, done: int, failed: int | None, rate: float, window_s: float,
                  eta_s: float | None, tasks: tuple[int, int, int] | None) -> str:
    """The log line; ``rate``: units/s over the last ``window_s`` s; ``tasks``: (done, running, total)."""
    share = 100.0 * done / tracked.total if tracked.total else 100.0
    parts = [f"{tracked.name}: {done:,} / {tracked.total:,} {tracked.unit} ({share:.1f} %)"]
    if failed is not None:
        parts.append(f"{failed:,} failed")
    parts.append(f"{rate:.1f} {tracked.unit}/s over the last {window_s:.0f} s")
    parts.append(f"ETA {format_eta(eta_s)}")
    line = ", ".join(parts)
    if tasks is not None:
        line += f"; tasks {tasks[0]:,} / {tasks[2]:,} done, {tasks[1]:,} running"
    return line


class ProgressReporter:
    """The driver's progress thread. ``interval``: seconds between progress lines (0: none);
    ``shipper``: an object with ``ship(only_if_changed)`` (the LogShipper), called at most every
    ``ship_interval`` s (0: never from here); ``tasks``: group -> (done, running, total) or None;
    ``bar``: draw a tqdm bar on the logger's console handler (None: when that is a terminal)."""

    def __init__(self, logger: logging.Logger, *, interval: float = 30, shipper=None, ship_interval: float = 60,
                 tasks: Callable[[str], tuple[int, int, int] | None] | None = None, bar: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval = interval
        self.shipper = shipper if ship_interval > 0 else None
        self.ship_interval = ship_interval
        self.tasks = tasks
        self.clock = clock
        self.console = next((h for h in logger.handlers if isinstance(h, ConsoleHandler)), None)
        self.bar_enabled = (self.console is not None and self.console.is_terminal()) if bar is None \
            else bar and self.console is not None
        self._lock = threading.Lock()
        self._tracked: Tracked | None = None
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lines = 0
        now = clock()
        self._last_ship = now

    # --- the thread ---------------------------------------------------------------------------

    def start(self) -> "ProgressReporter":
        if self.interval > 0 or self.shipper is not None or self.bar_enabled:
            self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "ProgressReporter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.poll(self.clock())
            except Exception as exc:  # progress is a view of the run: it never ends one
                self.logger.warning("progress reporting stopped: %s: %s", type(exc).__name__, exc)
                return

    # --- one stage ----------------------------------------------------------------------------

    @contextmanager
    def track(self, tracked: Tracked):
        """Report ``tracked`` while the block runs; a last line (and bar update) when it ends."""
        now = self.clock()
        with self._lock:
            self._tracked = tracked
            self._started, self._next_line = now, now + self.interval
            self._window = [(now, 0)]
            self._bar = self._open_bar(tracked)
        try:
            yield
        finally:
            with self._lock:
                finished, self._tracked = self._tracked, None
                bar, self._bar = self._bar, None
            if self.interval > 0:
                self._report(finished, self.clock())
            if bar is not None:
                bar.n = min(self._done(finished), finished.total)
                bar.close()
                self.console.bar = None

    def poll(self, now: float) -> None:
        """What the thread does each tick: bar, a progress line when due, the log when due."""
        with self._lock:
            tracked = self._tracked
            if tracked is not None:
                if self._bar is not None:
                    self._bar.n = min(self._done(tracked), tracked.total)
                    self._bar.refresh()
                if self.interval > 0 and now >= self._next_line:
                    self._next_line = now + self.interval
                    self._report(tracked, now)
        if self.shipper is not None and now - self._last_ship >= self.ship_interval:
            self._last_ship = now
            self.shipper.ship(only_if_changed=True)

    def _done(self, tracked: Tracked) -> int:
        if tracked.done is not None:
            return tracked.done()
        counts = self.tasks(tracked.group) if self.tasks is not None and tracked.group else None
        return counts[0] if counts else 0

    def _report(self, tracked: Tracked, now: float) -> None:
        done = min(self._done(tracked), tracked.total)  # a retried task adds twice to an accumulator
        failed = min(tracked.failed(), done) if tracked.failed is not None else None
        since, before = self._window[-1]
        window_s = max(now - since, 1e-9)
        rate = max(done - before, 0) / window_s
        elapsed = now - self._started
        # The ETA from the whole stage's rate: steadier than the last interval's.
        eta = (tracked.total - done) * elapsed / done if done and elapsed > 0 else None
        tasks = self.tasks(tracked.group) if self.tasks is not None and tracked.group else None
        self._window.append((now, done))
        self.lines += 1
        self.logger.info("%s", progress_line(tracked, done, failed, rate, window_s, eta, tasks),
                         extra={"progress": True})

    def _open_bar(self, tracked: Tracked):
        if not self.bar_enabled:
            return None
        from tqdm import tqdm

        bar = tqdm(total=tracked.total, desc=tracked.name, unit=f" {tracked.unit}", unit_scale=False,
                   file=self.console.stream, dynamic_ncols=True, leave=True, mininterval=0.5)
        self.console.bar = bar
        return bar


class NoProgress:
    """What the stages call when nobody reports: tracks nothing."""

    @contextmanager
    def track(self, tracked: Tracked):
        yield
