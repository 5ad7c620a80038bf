"""The run lock with real runs against moto's S3 server.

The run that holds the lock is driver.py under spark-submit (local[2]), a process of its own
(killed with SIGKILL in one test); it reads its photos through FaultyProxy with a latency on
every image GET, cleared once the other run has been refused, so that it then finishes at its
usual pace. The other runs are driver.main in this process, on the suite's SparkContext: the
real driver (arguments, preflight, lock, log upload, exit status) without a JVM start and a
TensorFlow import each.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from extractor.dev.synthetic import fruit_dataset
from extractor.forget.command import main as forget_main
from extractor.storage.layout import LOG_FOLDER

from conftest import REGION, REPO, keys_under, output_bytes, run_env, spark_submit
from faulty_s3 import FaultyProxy

pytestmark = pytest.mark.slow

SLOW_GET_S = 4.0   # each image GET through the `slow` proxy: the run holds its lock while others start
TINY = ("--model", "tiny", "--weights", "random", "--progress-interval", "0")
LOCKED = re.compile(r"ERROR extractor: run (?P<me>\S+) failed: (?P<what>--output|--state) (?P<prefix>s3://\S+) "
                    r"is locked by run (?P<holder>\S+) \(job, started (?P<started>\S+) on host (?P<host>\S+), "
                    r"pid (?P<pid>\d+)\); its lease holds until (?P<until>\S+) unless renewed: wait for it to "
                    r"finish, or if that run is dead, re-run with --break-lock$")


def start(endpoint, *args, log_dir):
    """driver.py under spark-submit (the run that holds the lock), in the background, in a session of its own (its JVM and Python
    workers can be killed together); its output goes to files in ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [spark_submit(), "--master", "local[2]", "--conf", "spark.ui.enabled=false", str(REPO / "driver.py"),
               *args, "--endpoint-url", endpoint, *TINY, "--log-dir", str(log_dir)]
    out, err = open(log_dir / "stdout", "w"), open(log_dir / "stderr", "w")
    process = subprocess.Popen(command, cwd=REPO, env=run_env(endpoint), stdout=out, stderr=err, text=True,
                               start_new_session=True)
    process.log_dir = log_dir
    return process


def finished(process, timeout=300):
    """(exit status, stdout + stderr)."""
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return code, (process.log_dir / "stdout").read_text() + (process.log_dir / "stderr").read_text()


def run(driver_here, endpoint, *args, log_dir):
    """driver.main in this process, on the suite's SparkContext: the runs that need no process of
    their own (a refused run never reaches Spark; the runs after a killed one only need the lock
    it left). Returns (exit status, its log file)."""
    code = driver_here(endpoint, *args, *TINY, log_dir=log_dir)
    return code, "\n".join(path.read_text() for path in sorted(log_dir.glob("*.log")))


def error_lines(output):
    return [line for line in output.splitlines() if " ERROR extractor: " in line]


def refusal(code, output):
    """The refused run: exit 1 and one ERROR line naming the lock's holder, parsed."""
    assert code == 1, output[-4000:]
    [line] = error_lines(output)
    refused = LOCKED.search(line)
    assert refused, line
    assert "Traceback" not in output
    return refused


def winner_and_refusal(winner, code, output):
    """The run that held the lock succeeded; the other was refused (``refusal``)."""
    winner_code, winner_output = finished(winner)
    assert winner_code == 0, winner_output[-4000:]
    return refusal(code, output)


def lock_body(client, bucket, key):
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def wait_for(client, bucket, key, process, timeout=180):
    """Until ``key`` holds a lock that is not released (the run took it; a released marker an
    earlier run left does not count); the run must still be running. Returns the lock's body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, finished(process)[1][-3000:]
        if keys_under(client, bucket, key):
            body = lock_body(client, bucket, key)
            if body["released"] is False:
                return body
        time.sleep(0.2)
    raise AssertionError(f"{key} never held")


def kill_once_it_holds(process, client, bucket, key):
    """SIGKILL the whole run (driver JVM, Python driver and workers) once it holds ``key``: what a
    killed EMR step or a lost primary node leaves. Returns the holder its lock names."""
    holder = wait_for(client, bucket, key, process)["holder"]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    return holder


def accounted(client, bucket, prefix, images):
    """Every listed image is in exactly one place: a per-fruit file or errors.csv."""
    found = []
    for name, body in output_bytes(client, bucket, prefix).items():
        if name.startswith("features/") or name == "errors.csv":
            found += [row[0] for row in list(csv.reader(io.StringIO(body.decode("utf-8"))))[1:]]
    assert sorted(found) == sorted(f"s3://{bucket}/in/{key}" for key in images)


def etags_outside_logs(client, bucket, prefix):
    """key -> ETag of every object under ``prefix`` but its logs (which every run adds to)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])
            if not o["Key"].startswith(prefix + LOG_FOLDER)}


def seed(client, bucket, per_fruit=8):
    images = fruit_dataset(per_fruit, ["Apple Red", "Lemon"])
    images["Lemon/broken.jpg"] = b"not a jpeg"
    for key, body in images.items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=body)
    return images


@pytest.fixture
def slow(s3_server, server_bucket):
    """A proxy that delays every image GET (4 s); ``.clear_rules()`` lets the run finish."""
    _, bucket = server_bucket
    with FaultyProxy(s3_server) as proxy:
        proxy.add_latency(SLOW_GET_S, method="GET", path=rf"^/{re.escape(bucket)}/in/")
        yield proxy


def test_two_runs_on_one_output_one_is_refused_and_touches_nothing(s3_server, server_bucket, slow, tmp_path,
                                                                   driver_here):
    client, bucket = server_bucket
    images = seed(client, bucket)
    args = ("--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--partitions", "2",
            "--decode-threads", "1", "--batch-size", "2")
    winner = start(slow.url, *args, log_dir=tmp_path / "winner")
    try:
        holder = wait_for(client, bucket, "out/_lock.json", winner)["holder"]
        # The second run goes through a proxy of its own, which records every request it makes.
        with FaultyProxy(s3_server) as watched:
            code, output = run(driver_here, watched.url, *args, log_dir=tmp_path / "loser")
            loser_requests = list(watched.requests)
        # forget, meanwhile, is refused too (the job holds the output lock), and changes nothing.
        photo = f"s3://{bucket}/in/Lemon/lemon_000.jpg"
        assert forget_main(["--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--key", photo,
                            "--endpoint-url", s3_server, "--region", REGION]) == 1
        assert keys_under(client, bucket, "in/Lemon/lemon_000.jpg")
        assert winner.poll() is None, "the winner finished before the other run was refused: no overlap"
    finally:
        slow.clear_rules()
    refused = winner_and_refusal(winner, code, output)
    assert (refused["what"], refused["prefix"], refused["holder"]) == ("--output", f"s3://{bucket}/out/",
                                                                       holder["run_id"])
    assert (refused["started"], refused["host"], int(refused["pid"])) == (holder["started_at"], socket.gethostname(),
                                                                         holder["pid"])
    assert refused["me"] != holder["run_id"]
    # What the refused run wrote: its own log, and one conditional PUT of the lock that S3 refused.
    writes = [(method, target, status) for method, target, status in loser_requests if method in ("PUT", "POST", "DELETE")]
    assert [(m, t, s) for m, t, s in writes if not t.startswith(f"/{bucket}/out/logs/{refused['me']}.log")] == [
        ("PUT", f"/{bucket}/out/_lock.json", 412)]
    # It never listed nor read a photo: refused in the preflight, before any compute.
    assert not any(t.startswith(f"/{bucket}/in/") or "prefix=in/" in t for _, t, _ in loser_requests)

    # The winner's result is whole, and released its lock.
    accounted(client, bucket, "out/", images)
    manifest = json.loads(client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    assert manifest["run_id"] == holder["run_id"] and manifest["counts"]["failed"] == 1
    counts = manifest["counts"]
    assert counts["listed"] == counts["featurized"] + counts["failed"] == len(images)
    assert "out/_SUCCESS" in keys_under(client, bucket, "out/")
    assert manifest["lock"]["output"]["key"] == f"s3://{bucket}/out/_lock.json"
    assert manifest["lock"]["output"]["took_over"] is None
    assert lock_body(client, bucket, "out/_lock.json")["released"] is True
    assert {f"out/logs/{holder['run_id']}.log", f"out/logs/{refused['me']}.log"} <= set(keys_under(client, bucket, "out/logs/"))
    first = output_bytes(client, bucket, "out/")

    # Run again, alone: it takes the released lock and writes the same bytes.
    code, output = run(driver_here, s3_server, *args, log_dir=tmp_path / "alone")
    assert code == 0, output[-4000:]
    assert f"run lock s3://{bucket}/out/_lock.json taken (released by run {holder['run_id']} " in output
    assert output_bytes(client, bucket, "out/") == first


def test_a_killed_runs_lock_holds_for_its_lease_unless_broken(s3_server, server_bucket, slow, tmp_path,
                                                             driver_here):
    client, bucket = server_bucket
    images = seed(client, bucket, per_fruit=2)
    args = ("--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/")

    holder = kill_once_it_holds(start(slow.url, *args, log_dir=tmp_path / "killed"), client, bucket, "out/_lock.json")
    slow.clear_rules()
    left = client.get_object(Bucket=bucket, Key="out/_lock.json")
    assert json.loads(left["Body"].read())["released"] is False   # nobody released it
    # What the killed run left besides its log: its lock, and its preflight's write probe where the
    # kill came before the probe's delete (which moment the kill meets is up to the scheduler).
    killed_left = etags_outside_logs(client, bucket, "out/")
    assert "out/_lock.json" in killed_left and set(killed_left) <= {
        "out/_lock.json", f"out/.write-check-{holder['run_id']}"}, killed_left

    code, output = run(driver_here, s3_server, *args, log_dir=tmp_path / "within")
    refused = refusal(code, output)
    assert (refused["holder"], refused["host"], int(refused["pid"])) == (holder["run_id"], socket.gethostname(),
                                                                         holder["pid"])
    assert client.head_object(Bucket=bucket, Key="out/_lock.json")["ETag"] == left["ETag"]
    assert etags_outside_logs(client, bucket, "out/") == killed_left   # the refused run touched none of them

    code, output = run(driver_here, s3_server, *args, "--break-lock", log_dir=tmp_path / "broken")
    assert code == 0, output[-4000:]
    assert re.search(rf"WARNING extractor: run lock \S+ taken over from run {holder['run_id']} \(job, started "
                     rf"\S+ on host \S+, pid {holder['pid']}\): --break-lock", output), output[-4000:]
    manifest = json.loads(client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    assert manifest["lock"]["output"]["took_over"]["reason"] == "broken"
    assert manifest["lock"]["output"]["took_over"]["previous"]["run_id"] == holder["run_id"]
    accounted(client, bucket, "out/", images)
    assert not [k for k in keys_under(client, bucket, "out/") if "/.write-check-" in k]  # a leftover probe is stale

    # Killed with a lease of 2 s: the next run (its start alone takes longer) takes the lock over.
    slow.add_latency(SLOW_GET_S, method="GET", path=rf"^/{re.escape(bucket)}/in/")
    holder = kill_once_it_holds(start(slow.url, *args, "--lock-lease", "2", log_dir=tmp_path / "killed-short"),
                                client, bucket, "out/_lock.json")
    slow.clear_rules()
    time.sleep(2.1)  # LastModified has a resolution of one second
    code, output = run(driver_here, s3_server, *args, "--lock-lease", "30", log_dir=tmp_path / "expired")
    assert code == 0, output[-4000:]
    assert re.search(rf"WARNING extractor: run lock \S+ taken over from run {holder['run_id']} .*: its lease had "
                     r"expired", output), output[-4000:]
    manifest = json.loads(client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    assert manifest["lock"]["output"]["took_over"]["reason"] == "expired"
    assert manifest["lock"]["output"]["lease_s"] == 30
    assert lock_body(client, bucket, "out/_lock.json")["released"] is True
    accounted(client, bucket, "out/", images)


def test_two_incremental_runs_on_one_state_one_is_refused(s3_server, server_bucket, slow, tmp_path, driver_here):
    client, bucket = server_bucket
    images = seed(client, bucket, per_fruit=6)
    state = ("--incremental", "--state", f"s3://{bucket}/state/", "--partitions", "2", "--decode-threads", "1")
    winner = start(slow.url, "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out1/", *state,
                   log_dir=tmp_path / "winner")
    try:
        holder = wait_for(client, bucket, "state/_lock.json", winner)["holder"]
        code, output = run(driver_here, s3_server, "--input", f"s3://{bucket}/in/", "--output",
                           f"s3://{bucket}/out2/", *state,
                           log_dir=tmp_path / "loser")
        assert winner.poll() is None, "the winner finished before the other run was refused: no overlap"
    finally:
        slow.clear_rules()
    refused = winner_and_refusal(winner, code, output)
    assert (refused["what"], refused["prefix"], refused["holder"]) == (
        "--state", f"s3://{bucket}/state/", holder["run_id"])
    # The refused run had taken its own output's lock first: given back, nothing else written there.
    assert lock_body(client, bucket, "out2/_lock.json")["released"] is True
    assert [k for k in keys_under(client, bucket, "out2/") if not k.startswith("out2/logs/")] == ["out2/_lock.json"]

    accounted(client, bucket, "out1/", images)
    manifest = json.loads(client.get_object(Bucket=bucket, Key="out1/manifest.json")["Body"].read())
    assert set(manifest["lock"]) == {"output", "state"}
    assert manifest["lock"]["state"]["key"] == f"s3://{bucket}/state/_lock.json"
    # The commit deleted what was not the current version, but kept the state's lock.
    kept = keys_under(client, bucket, "state/")
    assert "state/state.json" in kept and "state/_lock.json" in kept
    assert lock_body(client, bucket, "state/_lock.json")["released"] is True
