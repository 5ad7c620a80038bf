"""A run lock per prefix (``--output``, ``--state``), held with S3 conditional writes.

One object, ``layout.lock_key(prefix)`` (``<prefix>_lock.json``), says who holds the prefix::

    {"lock": "extractor run lock", "prefix": "s3://b/out/", "mode": "job"|"erasure",
     "holder": {"run_id", "host", "pid", "started_at", "token"}, "lease_s": 600,
     "renewed_at": ..., "released": false}

- acquire: PutObject ``IfNoneMatch='*'``. When the object exists (412, or 409 for a concurrent
  conditional write) it is read (body, ETag, LastModified): a released marker, a lease expired
  (LastModified + its lease_s < now) or ``break_lock`` lets this run take it over with PutObject
  ``IfMatch=<that ETag>``; a 412 there means another run took it first, and it is read again.
  Otherwise LockHeld: one line naming the prefix, the holder and until when its lease holds.
- verify: once taken, a second PutObject ``IfNoneMatch='*'`` of the same key must be refused
  (412). An S3-compatible endpoint that ignores the header answers 200, and every run would
  "take" the lock: such an endpoint is refused in one line (``--no-lock`` runs without a lock,
  and says so in the log and the manifest).
- renew: PutObject ``IfMatch=<my ETag>`` (``renewed_at`` updated); ``run_locks.Renewer`` does
  it every lease / 3 in a daemon thread. A 412 means someone took the lock: it is lost, and ``check()``
  raises LockLost; the job calls ``check()`` before each destructive step.
- release: PutObject ``IfMatch=<my ETag>`` of a released marker (``released: true``); the object
  stays. A lost lock is not released: the winner's object is left alone. Never a delete:
  DeleteObject takes no condition that every S3 honours.

``token`` (random, per acquisition) tells this holder's own writes apart: a write that S3
applied but whose answer was lost, then retried by botocore, fails its condition on our own
object; reading it back shows our token, and the lock is still ours.

Pure: a client, S3Settings and plain values come in; nothing is created at import.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Callable

from extractor.errors import JobError
from extractor.storage.layout import LOCK_FILE, lock_key
from extractor.storage.s3 import S3Location, S3Settings, describe_s3_error

DEFAULT_LEASE_S = 600.0
MIN_LEASE_S = 1.0
_MARK = "extractor run lock"
_CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
_MISSING = ("NoSuchKey", "404")
_ATTEMPTS = 5   # create / read / take over rounds before giving up on a lock that keeps changing hands


class LockHeld(JobError):
    """Another run holds the lock (the message is the one line to print)."""


class LockLost(JobError):
    """This run held the lock, and another run took it."""


class ConditionalWritesIgnored(JobError):
    """The endpoint applied a create-if-absent over an existing object: no lock can hold there."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


def _code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    error = response.get("Error", {})
    return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")


def describe_holder(holder: dict | None) -> str:
    """``run 20261121T093015Z (job, started 2026-11-21T09:30:15+00:00 on host ip-10-0-0-1, pid 4242)``."""
    holder = holder or {}
    mode = holder.get("mode")
    return (f"run {holder.get('run_id', '?')} ({mode + ', ' if mode else ''}started {holder.get('started_at', '?')} "
            f"on host {holder.get('host', '?')}, pid {holder.get('pid', '?')})")


class RunLock:
    """The lock on one prefix. ``what``: the option that names it (``--output``, ``--state``),
    for messages. ``clock``: returns an aware UTC datetime (tests pass a fake one)."""

    def __init__(self, client, settings: S3Settings, location: S3Location, *, run_id: str, what: str = "--output",
                 mode: str = "job", lease_s: float = DEFAULT_LEASE_S, logger: logging.Logger | None = None,
                 clock: Callable[[], datetime] = utc_now, host: str | None = None, pid: int | None = None):
        if not lease_s >= MIN_LEASE_S:
            raise ValueError(f"lease_s must be >= {MIN_LEASE_S:g} s, got {lease_s!r}")
        self.client, self.settings, self.location = client, settings, location
        self.key = lock_key(location)
        self.uri = f"s3://{location.bucket}/{self.key}"
        self.what, self.mode, self.lease_s = what, mode, float(lease_s)
        self.logger = logger or logging.getLogger("extractor")
        self.clock = clock
        self.holder = {"run_id": run_id or "?", "host": host or socket.gethostname(),
                       "pid": os.getpid() if pid is None else pid, "started_at": _iso(clock()),
                       "token": uuid.uuid4().hex}
        self.etag: str | None = None
        self.lost_to: dict | None = None        # the holder that took it, once lost
        self.released = False
        self.took_over: dict | None = None      # {"reason": "expired"|"broken"|"released", "previous": holder}
        self.confirmed_at: datetime | None = None   # the last write of ours S3 accepted
        self._mutex = threading.Lock()

    # --- state -------------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        return self.etag is not None and self.lost_to is None and not self.released

    @property
    def lost(self) -> bool:
        return self.lost_to is not None

    def as_manifest(self) -> dict:
        return {"key": self.uri, "lease_s": self.lease_s, "mode": self.mode,
                "took_over": self.took_over}

    # --- S3 ----------------------------------------------------------------------------------
    def _body(self, **extra) -> bytes:
        body = {"lock": _MARK, "prefix": self.location.uri, "mode": self.mode, "holder": self.holder,
                "lease_s": self.lease_s, "renewed_at": self.clock().astimezone(timezone.utc).isoformat(),
                "released": False, **extra}
        return json.dumps(body, indent=1).encode("utf-8")

    def _put(self, body: bytes, **condition) -> str:
        response = self.client.put_object(Bucket=self.location.bucket, Key=self.key, Body=body,
                                          ContentType="application/json", **condition,
                                          **self.settings.encryption_args())
        return response["ETag"]

    def read(self) -> dict | None:
        """The lock object as it is: {"body": dict (``{}`` if unreadable), "etag", "last_modified"},
        or None when there is none."""
        try:
            response = self.client.get_object(Bucket=self.location.bucket, Key=self.key)
        except Exception as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        raw = response["Body"].read()
        try:
            body = json.loads(raw.decode("utf-8"))
        except ValueError:
            body = {}
        return {"body": body if isinstance(body, dict) else {}, "etag": response["ETag"],
                "last_modified": response["LastModified"]}

    def _mine(self, found: dict | None) -> bool:
        holder = (found or {}).get("body", {}).get("holder")
        return isinstance(holder, dict) and holder.get("token") == self.holder["token"]

    @staticmethod
    def _holder_of(found: dict) -> dict:
        body = found["body"]
        holder = body.get("holder") if isinstance(body.get("holder"), dict) else {}
        return {**{k: v for k, v in holder.items() if k != "token"}, "mode": body.get("mode")}

    def _expires(self, found: dict) -> datetime:
        lease = found["body"].get("lease_s")
        lease = float(lease) if isinstance(lease, (int, float)) and not isinstance(lease, bool) else DEFAULT_LEASE_S
        return found["last_modified"] + timedelta(seconds=lease)

    # --- the protocol ------------------------------------------------------------------------
    def acquire(self, break_lock: bool = False) -> "RunLock":
        """Take the lock (see the module docstring); LockHeld when another run holds it, a
        JobError (one line) when S3 refuses the write."""
        try:
            return self._acquire(break_lock)
        except JobError:
            raise
        except Exception as exc:
            raise JobError(describe_s3_error(exc, f"cannot write to {self.what} {self.location.uri} "
                                                  f"(taking its run lock {LOCK_FILE})")) from exc

    def _acquire(self, break_lock: bool) -> "RunLock":
        found = None
        for _ in range(_ATTEMPTS):
            try:
                etag = self._put(self._body(acquired_at=_iso(self.clock())), IfNoneMatch="*")
                return self._taken(etag, None)
            except Exception as exc:
                if _code(exc) not in _CONFLICT:
                    raise
            found = self.read()
            if found is None:       # released and removed by hand meanwhile: try again
                continue
            if self._mine(found):   # our own create, applied, then retried
                return self._taken(found["etag"], None)
            reason = self._takeable(found, break_lock)
            if reason is None:
                raise LockHeld(self.held_message(found))
            try:
                etag = self._put(self._body(acquired_at=_iso(self.clock())), IfMatch=found["etag"])
            except Exception as exc:
                if _code(exc) in _CONFLICT + _MISSING:
                    continue        # another run took it first (or it went): read it again
                raise
            return self._taken(etag, {"reason": reason, "previous": self._holder_of(found),
                                      "previous_last_modified": _iso(found["last_modified"])})
        raise JobError(f"{self.what} {self.location.uri}: its run lock {LOCK_FILE} kept changing hands "
                       f"({_ATTEMPTS} attempts to take it); try again")

    def _takeable(self, found: dict, break_lock: bool) -> str | None:
        if found["body"].get("released") is True:
            return "released"
        if self._expires(found) < self.clock():
            return "expired"
        return "broken" if break_lock else None

    def held_message(self, found: dict) -> str:
        until = _iso(self._expires(found))
        return (f"{self.what} {self.location.uri} is locked by {describe_holder(self._holder_of(found))}; its lease "
                f"holds until {until} unless renewed: wait for it to finish, or if that run is dead, re-run "
                f"with --break-lock")

    def _taken(self, etag: str, took_over: dict | None) -> "RunLock":
        self.etag, self.took_over, self.confirmed_at = etag, took_over, self.clock()
        try:
            self._verify_conditional_writes()
        except ConditionalWritesIgnored:
            self.release()  # a released marker: the run with --no-lock that may follow finds no holder
            raise
        if took_over is None:
            self.logger.info("run lock %s taken (lease %g s)", self.uri, self.lease_s)
        elif took_over["reason"] == "released":
            self.logger.info("run lock %s taken (released by %s)", self.uri, describe_holder(took_over["previous"]))
        else:
            why = ("its lease had expired (last renewed " + took_over["previous_last_modified"] + ")"
                   if took_over["reason"] == "expired" else "--break-lock")
            self.logger.warning("run lock %s taken over from %s: %s", self.uri,
                                describe_holder(took_over["previous"]), why)
        return self

    def _verify_conditional_writes(self) -> None:
        """The lock object exists now: a create-if-absent of it must be refused. When the endpoint
        applies it instead, it ignores conditional writes (the write replaced our own object with
        the same body, so nothing of another run's was touched)."""
        try:
            self.etag = self._put(self._body(acquired_at=_iso(self.clock())), IfNoneMatch="*")
        except Exception as exc:
            if _code(exc) in _CONFLICT:
                return
            raise
        endpoint = getattr(self.client.meta, "endpoint_url", None) or "this S3 endpoint"
        raise ConditionalWritesIgnored(
            f"{endpoint} ignores conditional writes (a second PutObject with If-None-Match: * of {self.uri} "
            f"succeeded): a run lock there excludes nothing; use an endpoint that honours them, or run with "
            f"--no-lock (no protection against a second run on {self.what} {self.location.uri})")

    def renew(self) -> bool:
        """Renew the lease; False when it was not renewed (lost, released, or a transient error,
        logged as a warning: the next renewal tries again)."""
        with self._mutex:
            if not self.held:
                return False
            try:
                self.etag = self._put(self._body(), IfMatch=self.etag)
                self.confirmed_at = self.clock()
                return True
            except Exception as exc:
                if _code(exc) not in _CONFLICT + _MISSING:
                    self.logger.warning("%s", describe_s3_error(exc, f"could not renew the run lock {self.uri} "
                                                                     f"(tried again at the next renewal)"))
                    return False
                return self._still_mine()

    def _still_mine(self) -> bool:
        """After a write of ours failed its condition: read the lock. True (its ETag adopted) when
        it is still ours: a write of ours that S3 applied, whose answer was lost, was retried.
        Otherwise it is lost (``lost_to`` set), or found released by ourselves."""
        try:
            found = self.read()
        except Exception as exc:
            self.logger.warning("%s", describe_s3_error(exc, f"could not read the run lock {self.uri}"))
            return False
        if found is not None and self._mine(found):
            if found["body"].get("released") is True:
                self.released = True
                return False
            self.etag, self.confirmed_at = found["etag"], self.clock()
            return True
        self.lost_to = self._holder_of(found) if found is not None else {"run_id": "(none: the lock object was deleted)"}
        self.logger.error("run lock %s lost to %s", self.uri, describe_holder(self.lost_to))
        return False

    def check(self) -> None:
        """Before a destructive step: renew now; LockLost when another run took the lock, a
        JobError when it cannot be confirmed and its lease may have run out."""
        if self.released or self.etag is None:
            raise JobError(f"the run lock on {self.what} {self.location.uri} is not held by this run")
        renewed = self.renew()
        self.raise_if_lost()
        if not renewed and (self.confirmed_at is None
                            or self.clock() - self.confirmed_at > timedelta(seconds=self.lease_s)):
            raise JobError(f"cannot confirm the run lock on {self.what} {self.location.uri}: not renewed for "
                           f"more than its lease ({self.lease_s:g} s), another run may hold it now")

    def raise_if_lost(self) -> None:
        """LockLost when a renewal (the thread's, or ``check``'s) found the lock taken; no request."""
        if self.lost_to is not None:
            raise LockLost(f"the run lock on {self.what} {self.location.uri} was lost to "
                           f"{describe_holder(self.lost_to)}; stopped before changing anything more there")

    def release(self) -> None:
        """Leave a released marker, if the lock is still ours (a lost lock is left to its winner);
        never raises: a lock left behind frees itself when its lease ends."""
        with self._mutex:
            for _ in range(2):
                if not self.held:
                    return
                try:
                    self._put(self._body(released=True, released_at=_iso(self.clock())), IfMatch=self.etag)
                except Exception as exc:
                    if _code(exc) in _CONFLICT + _MISSING:
                        self._still_mine()   # True: ours still (a retried renewal); write the marker again
                        continue
                    self.logger.warning("%s", describe_s3_error(exc, f"could not release the run lock {self.uri}; "
                                                                     f"it frees itself when its lease ends"))
                    return
                self.released = True
                self.logger.info("run lock %s released", self.uri)
                return
