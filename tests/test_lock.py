"""The run lock (extractor.storage.lock): conditional writes on moto, in-process and on its server."""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from botocore.exceptions import ClientError

from extractor.storage import layout
from extractor.storage import state as state_store
from extractor.driver.config import parse_args
from extractor.errors import JobError
from extractor.storage.lock import LockHeld, LockLost, RunLock
from extractor.storage.run_locks import RunLocks
from extractor.results.outputs import OutputWriter
from extractor.storage.s3 import S3Settings, parse_s3_uri

from conftest import REGION, unique_bucket

LOG = logging.getLogger("test.lock")


class Clock:
    """A clock the test moves; starts at the real time (S3's LastModified is real)."""

    def __init__(self):
        self.now = datetime.now(timezone.utc)

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def out(s3_mock):
    bucket = unique_bucket("lock")
    s3_mock.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    return s3_mock, parse_s3_uri(f"s3://{bucket}/runs/out/")


def lock(client, location, run_id, *, clock=None, lease_s=60, mode="job", what="--output", host="host-a", pid=11):
    return RunLock(client, S3Settings(), location, run_id=run_id, what=what, mode=mode, lease_s=lease_s,
                   logger=LOG, clock=clock or Clock(), host=host, pid=pid)


def stored(client, location):
    response = client.get_object(Bucket=location.bucket, Key=layout.lock_key(location))
    return json.loads(response["Body"].read()), response["ETag"]


def test_the_lock_object_is_named_by_the_layout(out):
    _, location = out
    assert layout.LOCK_FILE == "_lock.json"
    assert layout.lock_key(location) == "runs/out/_lock.json"


def test_acquire_on_an_empty_prefix_writes_the_holder_encrypted(out):
    client, location = out
    clock = Clock()
    mine = lock(client, location, "20260101T000000Z", clock=clock).acquire()
    assert mine.held and not mine.lost and mine.took_over is None
    body, etag = stored(client, location)
    assert etag == mine.etag
    assert body["holder"]["run_id"] == "20260101T000000Z"
    assert (body["holder"]["host"], body["holder"]["pid"]) == ("host-a", 11)
    assert body["holder"]["started_at"] == clock.now.isoformat(timespec="seconds")
    assert (body["mode"], body["lease_s"], body["released"], body["prefix"]) == ("job", 60.0, False, location.uri)
    head = client.head_object(Bucket=location.bucket, Key=layout.lock_key(location))
    assert head["ServerSideEncryption"] == "AES256"


def test_a_second_acquire_is_refused_in_one_line_naming_the_holder(out):
    client, location = out
    first = lock(client, location, "20260101T000000Z").acquire()
    before = stored(client, location)
    with pytest.raises(LockHeld) as refused:
        lock(client, location, "20260101T000500Z", host="host-b", pid=22).acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"--output {location.uri} is locked by run 20260101T000000Z (job, started "
                              f"{first.holder['started_at']} on host host-a, pid 11); its lease holds until ")
    assert message.endswith("wait for it to finish, or if that run is dead, re-run with --break-lock")
    assert stored(client, location) == before   # nothing written
    assert isinstance(refused.value, JobError)


def test_an_expired_lease_is_taken_over_with_a_warning_and_the_old_holder_loses_it(out, caplog):
    client, location = out
    dead = lock(client, location, "20260101T000000Z", lease_s=60).acquire()
    later = Clock()
    later.advance(61)   # past LastModified + 60 s
    caplog.set_level(logging.INFO, logger=LOG.name)
    new = lock(client, location, "20260101T010000Z", clock=later, host="host-b").acquire()
    assert new.held and new.took_over["reason"] == "expired"
    assert new.took_over["previous"]["run_id"] == "20260101T000000Z"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "taken over from run 20260101T000000Z" in warnings[0]
    assert "its lease had expired" in warnings[0]
    assert new.as_manifest()["took_over"]["previous"]["host"] == "host-a"

    # The dead run, if it was only slow: its renewal fails, the lock is lost, check() stops it.
    assert dead.renew() is False and dead.lost
    with pytest.raises(LockLost, match=rf"the run lock on --output {location.uri} was lost to run 20260101T010000Z"):
        dead.check()


def test_an_unexpired_lock_is_refused_without_break_lock_and_taken_with_it(out, caplog):
    client, location = out
    lock(client, location, "20260101T000000Z", lease_s=600).acquire()
    with pytest.raises(LockHeld):
        lock(client, location, "20260101T000100Z").acquire()
    caplog.set_level(logging.INFO, logger=LOG.name)
    breaker = lock(client, location, "20260101T000200Z", host="host-c").acquire(break_lock=True)
    assert breaker.took_over["reason"] == "broken"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "run 20260101T000000Z" in warnings[0] and "--break-lock" in warnings[0]
    assert stored(client, location)[0]["holder"]["run_id"] == "20260101T000200Z"


def test_renew_keeps_the_lock_and_check_passes(out):
    client, location = out
    clock = Clock()
    mine = lock(client, location, "r1", clock=clock).acquire()
    clock.advance(5)
    assert mine.renew() is True
    body, etag = stored(client, location)
    assert etag == mine.etag and body["renewed_at"] == clock.now.isoformat()
    assert body["holder"] == mine.holder
    mine.check()
    with pytest.raises(LockHeld):
        lock(client, location, "r2").acquire()


def test_renew_after_someone_broke_the_lock_loses_it(out):
    client, location = out
    mine = lock(client, location, "r1").acquire()
    lock(client, location, "r2", host="host-b").acquire(break_lock=True)
    assert mine.renew() is False
    assert mine.lost and mine.lost_to["run_id"] == "r2"
    with pytest.raises(LockLost, match="lost to run r2 .*host-b"):
        mine.check()
    assert mine.renew() is False   # a lost lock stays lost


def test_a_transient_error_in_renew_is_a_warning_and_the_next_renewal_works(out, caplog):
    client, location = out
    clock = Clock()
    mine = lock(client, location, "r1", clock=clock, lease_s=30).acquire()
    failures = []

    def fail_once(params, **_):
        if params["Key"] == mine.key and not failures:
            failures.append(1)
            raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "PutObject")

    client.meta.events.register("before-parameter-build.s3.PutObject", fail_once)
    caplog.set_level(logging.WARNING, logger=LOG.name)
    try:
        assert mine.renew() is False
        assert mine.held and not mine.lost
        assert any("could not renew the run lock" in r.getMessage() for r in caplog.records)
        assert mine.renew() is True
    finally:
        client.meta.events.unregister("before-parameter-build.s3.PutObject", fail_once)


def test_check_refuses_when_the_lock_could_not_be_confirmed_for_a_whole_lease(out):
    client, location = out
    clock = Clock()
    mine = lock(client, location, "r1", clock=clock, lease_s=30).acquire()

    def fail(params, **_):
        if params["Key"] == mine.key:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "PutObject")

    client.meta.events.register("before-parameter-build.s3.PutObject", fail)
    try:
        clock.advance(10)
        mine.check()                   # not renewed, but confirmed 10 s ago: the lease holds
        clock.advance(25)
        with pytest.raises(JobError, match="cannot confirm the run lock .* not renewed for more than its lease"):
            mine.check()
    finally:
        client.meta.events.unregister("before-parameter-build.s3.PutObject", fail)


def test_release_leaves_a_released_marker_that_the_next_acquire_takes(out, caplog):
    client, location = out
    first = lock(client, location, "r1").acquire()
    first.release()
    body, _ = stored(client, location)
    assert body["released"] is True and body["holder"]["run_id"] == "r1" and "released_at" in body
    first.release()   # twice: nothing more
    caplog.set_level(logging.INFO, logger=LOG.name)
    second = lock(client, location, "r2").acquire()
    assert second.took_over["reason"] == "released"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert stored(client, location)[0]["holder"]["run_id"] == "r2"
    with pytest.raises(JobError, match="not held by this run"):
        first.check()


def test_release_of_a_lost_lock_leaves_the_winner_alone(out):
    client, location = out
    loser = lock(client, location, "r1").acquire()
    winner = lock(client, location, "r2").acquire(break_lock=True)
    before = stored(client, location)
    loser.release()
    assert stored(client, location) == before
    assert winner.renew() is True


def test_a_create_that_was_applied_then_retried_is_recognised_as_ours(out):
    """S3 applied our create but the answer was lost; botocore's retry meets our own object (412)."""
    client, location = out
    mine = lock(client, location, "r1").acquire()
    mine.etag = None                   # as if the first answer never came
    mine.acquire()
    assert mine.held and mine.took_over is None
    assert stored(client, location)[1] == mine.etag


def test_run_locks_take_all_or_none(out):
    client, location = out
    state = parse_s3_uri(f"s3://{location.bucket}/state/")
    lock(client, state, "other", what="--state").acquire()
    locks = RunLocks.for_run(client, S3Settings(), location, state, run_id="r1", mode="job", logger=LOG)
    with pytest.raises(LockHeld, match=rf"^--state {state.uri} is locked by run other"):
        locks.acquire()
    # The output's lock was taken first, then released: the next run takes it without a warning.
    assert stored(client, location)[0]["released"] is True
    again = RunLocks.for_run(client, S3Settings(), location, None, run_id="r2", mode="erasure", logger=LOG).acquire()
    assert again.as_manifest()["output"]["took_over"]["reason"] == "released"
    assert again.as_manifest()["output"]["mode"] == "erasure"
    again.release()


def test_the_renewer_renews_every_third_of_the_lease_until_released(out):
    client, location = out
    locks = RunLocks.for_run(client, S3Settings(), location, None, run_id="r1", mode="job", lease_s=1,
                             logger=LOG).acquire()
    first = stored(client, location)[0]["renewed_at"]
    locks.start_renewing()
    time.sleep(0.8)
    renewed = stored(client, location)[0]
    assert renewed["renewed_at"] > first and renewed["released"] is False
    locks.check()
    locks.release()
    assert not locks._renewer._thread.is_alive()
    assert stored(client, location)[0]["released"] is True


def test_the_clean_ups_keep_the_locks(out):
    client, location = out
    lock(client, location, "r1").acquire()
    client.put_object(Bucket=location.bucket, Key=location.key("features/Old.csv"), Body=b"old")
    writer = OutputWriter(client, S3Settings(), location,
                          layout.kept_by_reruns(location, layout.default_log_location(location), None))
    writer.put("features/New.csv", b"new")
    assert writer.finish({}) == ["features/Old.csv"]
    assert stored(client, location)[0]["holder"]["run_id"] == "r1"

    state = parse_s3_uri(f"s3://{location.bucket}/state/")
    lock(client, state, "r1", what="--state").acquire()
    client.put_object(Bucket=location.bucket, Key=state.key("v-old/part-00000.npz"), Body=b"old")
    deleted = state_store.commit(client, S3Settings(), state, "new", {"model": "tiny"}, [])
    assert deleted == [state.key("v-old/part-00000.npz")]
    assert stored(client, state)[0]["holder"]["run_id"] == "r1"


def test_lock_options_of_the_driver():
    base = ["--input", "s3://b/in/", "--output", "s3://b/out/"]
    cfg = parse_args(base)
    assert (cfg.lock_lease_s, cfg.break_lock) == (600.0, False)
    cfg = parse_args(base + ["--lock-lease", "5", "--break-lock"])
    assert (cfg.lock_lease_s, cfg.break_lock) == (5.0, True)
    for bad in ("0.5", "nan", "soon"):
        with pytest.raises(SystemExit):
            parse_args(base + ["--lock-lease", bad])


def race(settings, location, n):
    """``n`` runs, each with its own client, try to take the lock at the same moment; returns what
    each got (its RunLock, or the LockHeld that refused it)."""
    clients = [settings.client() for _ in range(n)]
    barrier = threading.Barrier(n)
    outcomes = [None] * n

    def contend(i):
        mine = RunLock(clients[i], settings, location, run_id=f"run-{i}", lease_s=60, logger=LOG)
        barrier.wait()
        try:
            outcomes[i] = mine.acquire()
        except LockHeld as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def test_the_suites_server_decides_racing_creates_one_at_a_time(server_bucket, s3_server, monkeypatch):
    """moto checks If-None-Match, then writes: with the check slowed down, racing creates of one
    key would all pass it. The suite's server (local_s3.atomic_conditional_writes) decides them
    one at a time, as S3 does, so that the lock tests below test the lock, not moto."""
    from moto.s3.models import S3Backend

    _, bucket = server_bucket
    check = S3Backend.get_object

    def slow_check(self, *args, **kwargs):
        found = check(self, *args, **kwargs)
        time.sleep(0.05)  # what a loaded machine does between moto's check and its write
        return found

    monkeypatch.setattr(S3Backend, "get_object", slow_check)
    settings = S3Settings(endpoint_url=s3_server, region=REGION)
    clients = [settings.client() for _ in range(6)]
    barrier, codes = threading.Barrier(len(clients)), []

    def create(c):
        barrier.wait()
        try:
            c.put_object(Bucket=bucket, Key="race/key", Body=b"x", IfNoneMatch="*")
            codes.append(200)
        except ClientError as exc:
            codes.append(exc.response["ResponseMetadata"]["HTTPStatusCode"])

    threads = [threading.Thread(target=create, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(codes) == [200] + [412] * (len(clients) - 1)


def test_racing_acquirers_on_the_server_exactly_one_wins(server_bucket, s3_server):
    client, bucket = server_bucket
    location = parse_s3_uri(f"s3://{bucket}/out/")
    n = 8
    outcomes = race(S3Settings(endpoint_url=s3_server, region=REGION), location, n)
    winners = [o for o in outcomes if isinstance(o, RunLock)]
    assert len(winners) == 1, outcomes
    holder = stored(client, location)[0]["holder"]
    assert holder["run_id"] == winners[0].holder["run_id"]
    refusals = [str(o) for o in outcomes if isinstance(o, LockHeld)]
    assert len(refusals) == n - 1 and all(f"locked by run {holder['run_id']} " in r for r in refusals)


def test_racing_takeovers_of_an_expired_lock_exactly_one_wins(server_bucket, s3_server):
    client, bucket = server_bucket
    location = parse_s3_uri(f"s3://{bucket}/out/")
    # What a dead run leaves: its lease of 1 s ran out (LastModified has a resolution of 1 s).
    client.put_object(Bucket=bucket, Key=layout.lock_key(location), Body=json.dumps(
        {"holder": {"run_id": "dead", "host": "gone", "pid": 1, "started_at": "2026-01-01T00:00:00+00:00"},
         "lease_s": 1, "mode": "job", "released": False}).encode())
    time.sleep(2.1)
    outcomes = race(S3Settings(endpoint_url=s3_server, region=REGION), location, 6)
    winners = [o for o in outcomes if isinstance(o, RunLock)]
    assert len(winners) == 1, outcomes
    assert winners[0].took_over["reason"] == "expired" and winners[0].took_over["previous"]["run_id"] == "dead"
    assert all(isinstance(o, LockHeld) and f"run {winners[0].holder['run_id']} " in str(o)
               for o in outcomes if o is not winners[0])

class IgnoresConditions:
    """An S3-compatible store that ignores If-None-Match and If-Match: it answers 200 and writes."""

    def __init__(self, client):
        self._client = client
        self.meta = client.meta

    def put_object(self, **kwargs):
        kwargs.pop("IfNoneMatch", None)
        kwargs.pop("IfMatch", None)
        return self._client.put_object(**kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_an_endpoint_that_ignores_conditional_writes_is_refused_in_one_line(out):
    client, location = out
    with pytest.raises(JobError) as refused:
        RunLocks.for_run(IgnoresConditions(client), S3Settings(), location, None, run_id="r1", mode="job",
                         logger=LOG).acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{client.meta.endpoint_url} ignores conditional writes (a second PutObject with "
                              f"If-None-Match: * of s3://{location.bucket}/runs/out/_lock.json succeeded)")
    assert message.endswith(f"or run with --no-lock (no protection against a second run on --output {location.uri})")
    # What it wrote is a released marker: a run with --no-lock after it finds no holder.
    assert stored(client, location)[0]["released"] is True
    # The same store honouring the headers: the lock holds.
    lock(client, location, "r2").acquire()


def test_no_lock_takes_nothing_and_says_so(out, caplog):
    client, location = out
    state = parse_s3_uri(f"s3://{location.bucket}/state/")
    caplog.set_level(logging.WARNING, logger=LOG.name)
    locks = RunLocks.for_run(client, S3Settings(), location, state, run_id="r1", mode="job", no_lock=True,
                             logger=LOG).acquire()
    locks.start_renewing()
    locks.check()
    locks.release()
    assert locks.as_manifest() == {"none": "--no-lock: no mutual exclusion with other runs"}
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"--no-lock: this run takes no run lock on {location.uri} and {state.uri}")
    assert "no mutual exclusion" in warning
    assert "Contents" not in client.list_objects_v2(Bucket=location.bucket)
    cfg = parse_args(["--input", "s3://b/in/", "--output", "s3://b/out/", "--no-lock"])
    assert cfg.no_lock is True and parse_args(["--input", "s3://b/in/", "--output", "s3://b/out/"]).no_lock is False


def test_a_lock_the_renewer_found_lost_stops_the_writer_before_its_next_file(out):
    client, location = out
    locks = RunLocks.for_run(client, S3Settings(), location, None, run_id="r1", mode="job", logger=LOG).acquire()
    writer = OutputWriter(client, S3Settings(), location, guard=locks.raise_if_lost)
    writer.put("features/A.csv", b"a")
    lock(client, location, "r2", host="host-b").acquire(break_lock=True)
    locks.locks[0].renew()   # what the renewal thread does every third of the lease: finds it lost
    with pytest.raises(LockLost, match="lost to run r2"):
        writer.put("features/B.csv", b"b")
    with pytest.raises(LockLost):
        writer.finish({})
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=location.bucket)["Contents"])
    assert keys == [location.key("_lock.json"), location.key("features/A.csv")]   # nothing after the loss
