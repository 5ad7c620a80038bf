"""The run locks of one run or erasure: ``--output``'s and ``--state``'s ``lock.RunLock`` taken in
order, renewed together by one daemon thread, checked and released together; and the command-line
options that set them (driver.py and extractor.forget share them)."""

from __future__ import annotations

import argparse
import logging
import threading
from datetime import datetime
from typing import Callable

from extractor.storage.lock import DEFAULT_LEASE_S, MIN_LEASE_S, RunLock, utc_now
from extractor.storage.s3 import S3Location, S3Settings


def add_lock_options(parser: argparse.ArgumentParser, who: str) -> None:
    """--lock-lease, --break-lock and --no-lock (driver.py and forget share them); ``who``: "this run"
    or the like."""
    parser.add_argument("--lock-lease", type=_lease, default=DEFAULT_LEASE_S, metavar="SECONDS",
                        help=f"lease of the run lock {who} holds on --output (and --state): another run is "
                             f"refused while it holds; renewed every third of it; a lock not renewed for that long "
                             f"(its holder died) is taken over; at least {MIN_LEASE_S:g}")
    parser.add_argument("--break-lock", action="store_true",
                        help="take the run lock over even if its lease still holds (only when that run is dead: "
                             "two runs writing one prefix delete each other's files)")
    parser.add_argument("--no-lock", action="store_true",
                        help="take no run lock (an S3-compatible store that ignores conditional writes): nothing "
                             "stops a second run on the same prefix; the log and the manifest say so")


def _lease(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= MIN_LEASE_S:  # NaN too
        raise argparse.ArgumentTypeError(f"must be at least {MIN_LEASE_S:g} second, got {text!r}")
    return value


class Renewer:
    """A daemon thread renewing ``locks`` every ``interval`` seconds until ``stop()``."""

    def __init__(self, locks: list[RunLock], interval: float):
        self.locks, self.interval = locks, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="run-lock-renewer", daemon=True)

    def start(self) -> "Renewer":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for lock in self.locks:
                try:
                    lock.renew()
                except Exception as exc:  # renew logs its own failures; never let the thread die silently
                    lock.logger.warning("run lock %s: renewal failed: %r", lock.uri, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


class RunLocks:
    """The locks of one run, taken in order (``--output`` first, then ``--state``), renewed
    together, checked together, released in reverse order."""

    def __init__(self, locks: list[RunLock], break_lock: bool = False, disabled: bool = False):
        self.locks, self.break_lock, self.disabled = locks, break_lock, disabled
        self._renewer: Renewer | None = None

    @classmethod
    def for_run(cls, client, settings: S3Settings, output: S3Location, state: S3Location | None, *, run_id: str,
                mode: str, lease_s: float = DEFAULT_LEASE_S, break_lock: bool = False, no_lock: bool = False,
                logger: logging.Logger | None = None, clock: Callable[[], datetime] = utc_now) -> "RunLocks":
        places = [("--output", output)] + ([("--state", state)] if state is not None else [])
        if no_lock:
            (logger or logging.getLogger("extractor")).warning(
                "--no-lock: this run takes no run lock on %s; another run on the same prefix can delete its "
                "files, and it theirs (no mutual exclusion)", " and ".join(loc.uri for _, loc in places))
            return cls([], disabled=True)
        return cls([RunLock(client, settings, location, run_id=run_id, what=what, mode=mode, lease_s=lease_s,
                            logger=logger, clock=clock) for what, location in places], break_lock)

    def acquire(self) -> "RunLocks":
        """All of them, or none: a lock refused releases those already taken."""
        taken = []
        try:
            for lock in self.locks:
                lock.acquire(self.break_lock)
                taken.append(lock)
        except BaseException:
            for lock in reversed(taken):
                lock.release()
            raise
        return self

    def start_renewing(self) -> None:
        if self._renewer is None and self.locks:
            self._renewer = Renewer(self.locks, min(lock.lease_s for lock in self.locks) / 3).start()

    def check(self) -> None:
        for lock in self.locks:
            lock.check()

    def raise_if_lost(self) -> None:
        """Before each write of the driver's (OutputWriter's guard): free, so it runs before every
        file; between ``check`` points it stops the run once the renewer found a lock lost."""
        for lock in self.locks:
            lock.raise_if_lost()

    def release(self) -> None:
        if self._renewer is not None:
            self._renewer.stop()
        for lock in reversed(self.locks):
            lock.release()

    def as_manifest(self) -> dict:
        if self.disabled:
            return {"none": "--no-lock: no mutual exclusion with other runs"}
        return {lock.what.lstrip("-"): lock.as_manifest() for lock in self.locks}
