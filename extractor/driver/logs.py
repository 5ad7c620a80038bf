"""Logging to stderr and to logs/<UTC timestamp>.log, shipping that file to S3, and timing stages."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone

from extractor.storage.s3 import S3Location, S3Settings, describe_s3_error, put_bytes

LOGGER_NAME = "extractor"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def utc_run_id(now: datetime | None = None) -> str:
    """``20261121T093015Z``: sortable, safe in keys and file names."""
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


class _OneLineFormatter(logging.Formatter):
    """stderr gets one line per record; the traceback goes to the log file only."""

    def format(self, record):
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text = saved


class ConsoleHandler(logging.StreamHandler):
    """stderr, one line per record. While a progress bar is drawn (``bar``, a tqdm), the
    progress lines are the bar's: they go to the log file only, and other lines print above it."""

    def __init__(self, stream=None):
        super().__init__(stream if stream is not None else sys.stderr)
        self.bar = None

    def is_terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def emit(self, record):
        bar = self.bar
        if bar is None:
            return super().emit(record)
        if getattr(record, "progress", False):
            return None
        try:
            bar.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)
        return None


def setup_logging(log_dir: str, run_id: str) -> tuple[logging.Logger, str]:
    """The 'extractor' logger, writing to stderr and ``<log_dir>/<run_id>.log``; returns (logger, path)."""
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"{run_id}.log")
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler, formatter in ((ConsoleHandler(sys.stderr), _OneLineFormatter(FORMAT)),
                               (logging.FileHandler(path, encoding="utf-8"), logging.Formatter(FORMAT))):
        formatter.converter = time.gmtime  # UTC, like the file name and the manifest
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger, path


class LogShipper:
    """Uploads the local log file to ``<log location>/<run_id>.log``, replacing the last upload.

    Called at start, after each stage, at the end, on failure and by the progress thread
    while a stage runs; an upload that fails is counted, reported once in the log, tried again
    at the next call and never fails the run by itself.
    """

    def __init__(self, client, settings: S3Settings, location: S3Location, path: str, logger: logging.Logger):
        self.client = client
        self.settings = settings
        self.location = location
        self.path = path
        self.logger = logger
        self.key = location.key(os.path.basename(path))
        self._warned = False
        self._lock = threading.Lock()   # the progress thread ships too
        self._shipped_size: int | None = None
        self.uploads = 0
        self.failures = 0

    @property
    def uri(self) -> str:
        return f"s3://{self.location.bucket}/{self.key}"

    def ship(self, only_if_changed: bool = False) -> bool:
        """Upload the log; with ``only_if_changed``, only when it grew since the last upload."""
        for handler in self.logger.handlers:
            handler.flush()
        with self._lock:
            try:
                with open(self.path, "rb") as handle:
                    body = handle.read()
                if only_if_changed and len(body) == self._shipped_size:
                    return True
                put_bytes(self.client, self.settings, self.location.bucket, self.key, body, "text/plain")
                self._shipped_size = len(body)
                self.uploads += 1
                return True
            except Exception as exc:  # the log must never be the reason a run fails
                self.failures += 1
                warning = None if self._warned else describe_s3_error(exc, f"could not upload the log to {self.uri}")
                self._warned = True
        if warning:  # outside the lock: the warning may itself be shipped
            self.logger.warning(warning)
        return False

    def as_manifest(self) -> dict:
        return {"uri": self.uri, "uploads": self.uploads, "upload_failures": self.failures}


class Stages:
    """Times each stage, logs its start and end, and ships the log to S3 after it."""

    def __init__(self, logger: logging.Logger, ship=None):
        self.logger = logger
        self.ship = ship or (lambda: None)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        self.logger.info("stage %s: start", name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.logger.info("stage %s: done in %.1f s", name, self.seconds[name])
        self.ship()
