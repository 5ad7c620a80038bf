"""Logging to stderr and to logs/<UTC timestamp>.log, shipping that file to S3, and timing stages."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone

from .s3 import S3Location, S3Settings, describe_s3_error, put_bytes

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
    for handler, formatter in ((logging.StreamHandler(sys.stderr), _OneLineFormatter(FORMAT)),
                               (logging.FileHandler(path, encoding="utf-8"), logging.Formatter(FORMAT))):
        formatter.converter = time.gmtime  # UTC, like the file name and the manifest
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger, path


class LogShipper:
    """Uploads the local log file to ``<log location>/<run_id>.log``, replacing the last upload.

    Called at start, after each stage, at the end and on failure; an upload that fails is
    reported once in the log and never fails the run by itself.
    """

    def __init__(self, client, settings: S3Settings, location: S3Location, path: str, logger: logging.Logger):
        self.client = client
        self.settings = settings
        self.location = location
        self.path = path
        self.logger = logger
        self.key = location.key(os.path.basename(path))
        self._warned = False

    @property
    def uri(self) -> str:
        return f"s3://{self.location.bucket}/{self.key}"

    def ship(self) -> bool:
        for handler in self.logger.handlers:
            handler.flush()
        try:
            with open(self.path, "rb") as handle:
                put_bytes(self.client, self.settings, self.location.bucket, self.key, handle.read(), "text/plain")
            return True
        except Exception as exc:  # the log must never be the reason a run fails
            if not self._warned:
                self._warned = True
                self.logger.warning(describe_s3_error(exc, f"could not upload the log to {self.uri}"))
            return False


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
