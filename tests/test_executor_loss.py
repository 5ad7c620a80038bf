"""Executor loss: kill -9 one executor JVM while the featurize stage runs; Spark re-runs its tasks.

The real driver.py runs under ``spark-submit --master local-cluster[2,1,1024]``: a standalone
master and two workers inside the driver JVM, each launching one executor JVM (1 core) with its
own Python workers, all on this machine, against moto's S3 server on 127.0.0.1. One run goes
undisturbed (the control, in the suite's own process since its vectors do not depend on where they
are computed: batch size 1); in a second, identical run the test waits, polling the driver's REST
API, until the featurize stage has finished some tasks and has many still to start, then kills
with SIGKILL an executor that is running a task. The job must still exit 0, with every listed
image featurized exactly once and every vector equal to the control run's.

Evidence that the kill really happened mid-job comes from Spark itself: its event log (task
attempts and their executors, launch times, executor removal) and its log: ``Lost executor N
... Command exited with code 137``; for the task the executor was running, ``WARN Lost task I.0
... ExecutorLostFailure`` (or, when the kill lands in the few milliseconds between the driver
sending a task and the executor reporting it running, ``INFO task I.0 ... failed because while
it was being computed, its executor exited for a reason unrelated to the task``); then
``Finished task I.1`` on another executor. Spark 3.5 prints no "Resubmitted" here: that is for
shuffle map outputs, and this job's only stage is a result stage (collect).

Each run gets its own SPARK_HOME (symlinks to pyspark's files), so the executors' work folders
land in tmp_path rather than in the venv, and every process of the run (driver, executors,
Python workers) carries that SPARK_HOME in its environment: that is how the test finds the
executors of this run and how it makes sure nothing of it outlives the test.
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
import urllib.request
from pathlib import Path

import numpy as np
import pyspark
import pytest

from extractor.driver.package import build_zip
from extractor.dev.synthetic import fruit_dataset

from conftest import REPO, run_env, spark_submit

pytestmark = pytest.mark.slow

FRUITS = ["Apple Red", "Lemon", "Lime", "Orange"]
PER_FRUIT = 20                 # 80 images of 100x100 ...
PARTITIONS = 40                # ... 2 per task, batch 1: a task takes a fraction of a second
MASTER = "local-cluster[2,1,1024]"
# Kill only once this many tasks are done and at least this many have not even started.
MIN_DONE_BEFORE_KILL = 4
MIN_UNSTARTED_AT_KILL = 10
RUN_DEADLINE_S = 300
# Batch 1: each image is alone in its batch, so its vector does not depend on how the images
# were grouped (rounding.py): the control run may run anywhere with one TF thread per task.
JOB_ARGS = ["--model", "tiny", "--weights", "random", "--batch-size", "1", "--partitions", str(PARTITIONS),
            "--pca-k", "4"]

# The driver sets the root log level to WARN once its SparkContext exists; these loggers keep
# INFO, so the output shows the UI's port and every task start/finish (the retry included).
LOG4J2 = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss.SSS} %p %c{1}: %m%n%ex
logger.tsm.name = org.apache.spark.scheduler.TaskSetManager
logger.tsm.level = info
logger.utils.name = org.apache.spark.util.Utils
logger.utils.level = info
"""


# The driver's UI is on this machine: never go through an http_proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_spark_home(path: Path) -> Path:
    """A SPARK_HOME of symlinks to pip's pyspark, without its ``work`` folder (executors' cwd)."""
    path.mkdir()
    for child in Path(pyspark.__file__).parent.iterdir():
        if child.name != "work":
            (path / child.name).symlink_to(child)
    return path


def _cmdline(entry: Path) -> str:
    return (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def processes_with_env(marker: str) -> dict[int, str]:
    """pid -> command line of every process whose environment holds ``marker`` (NAME=value)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found[int(entry.name)] = _cmdline(entry)
            except OSError:  # gone meanwhile, or not ours
                pass
    return found


def live_group_members(pgid: int) -> dict[int, str]:
    """pid -> command line of the processes of group ``pgid``, zombies left out (they are dead:
    the init of some containers is slow to reap the shell that spark-class leaves behind)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, _ppid, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
                if int(group) == pgid and state != "Z":
                    found[int(entry.name)] = _cmdline(entry)
            except (OSError, ValueError):
                pass
    return found


class SparkRun:
    """driver.py under spark-submit (local-cluster), in its own session, output to a file."""

    def __init__(self, name: str, endpoint: str, bucket: str, root: Path, py_files: Path):
        self.name = name
        self.root = root / name
        self.root.mkdir()
        self.home = make_spark_home(self.root / "spark_home")
        self.marker = f"SPARK_HOME={self.home}"
        (self.root / "events").mkdir()
        (self.root / "log4j2.properties").write_text(LOG4J2)
        command = [
            spark_submit(), "--master", MASTER, "--py-files", str(py_files),
            "--driver-java-options", f"-Dlog4j2.configurationFile=file:{self.root / 'log4j2.properties'}",
            "--conf", f"spark.ui.port={free_port()}",
            "--conf", "spark.eventLog.enabled=true", "--conf", f"spark.eventLog.dir=file://{self.root / 'events'}",
            str(REPO / "driver.py"), "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/{name}/",
            *JOB_ARGS, "--log-dir", str(self.root / "logs")]
        env = dict(run_env(endpoint), SPARK_HOME=str(self.home))
        self.log_path = self.root / "spark-submit.out"
        self.started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self.ui = None
        self.app_id = None
        self.seconds = None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 6000) -> str:
        return f"\n--- {self.name}: last lines of spark-submit's output ---\n" + self.output()[-n:]

    def rest(self, path: str):
        """GET the driver's monitoring REST API; None while it is not (or no longer) up."""
        if self.ui is None:
            match = re.search(r"Successfully started service 'SparkUI' on port (\d+)", self.output())
            if not match:
                return None
            self.ui = f"http://127.0.0.1:{match.group(1)}"
        try:
            if self.app_id is None:
                apps = json.load(OPENER.open(f"{self.ui}/api/v1/applications", timeout=5))
                if not apps:
                    return None
                self.app_id = apps[0]["id"]
            return json.load(OPENER.open(f"{self.ui}/api/v1/applications/{self.app_id}/{path}", timeout=5))
        except (OSError, ValueError):
            return None

    def evidence(self, events=()) -> str:
        """For failure messages: Spark's lines about executors and retries, and the failed tasks."""
        pattern = re.compile(r"Lost|exited|unrelated|Executor updated|task \d+\.[1-9] |Resubmitted")
        lines = [line for line in self.output().splitlines() if pattern.search(line)]
        failed = [(e["Task Info"]["Index"], e["Task Info"]["Attempt"], e["Task Info"]["Executor ID"],
                   e["Task End Reason"]) for e in events
                  if e["Event"] == "SparkListenerTaskEnd" and e["Task End Reason"]["Reason"] != "Success"]
        return (f"\n--- {self.name}: Spark's lines about executors and retries (all in {self.log_path}) ---\n"
                + "\n".join(lines[:60]) + f"\n--- failed tasks in the event log: {failed}")

    def wait(self) -> int:
        remaining = RUN_DEADLINE_S - (time.monotonic() - self.started)
        try:
            code = self.process.wait(timeout=max(remaining, 1))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name}: spark-submit still running after {RUN_DEADLINE_S} s"
                                 + self.tail()) from None
        self.seconds = time.monotonic() - self.started
        return code

    def executor_pids(self) -> dict[str, int]:
        """executor id -> pid of this run's executor JVMs (CoarseGrainedExecutorBackend)."""
        pids = {}
        for pid, cmdline in processes_with_env(self.marker).items():
            match = re.search(r"CoarseGrainedExecutorBackend .*--executor-id (\S+)", cmdline)
            if match:
                pids[match.group(1)] = pid
        return pids

    def events(self) -> list[dict]:
        files = [p for p in (self.root / "events").iterdir() if not p.name.endswith(".inprogress")]
        assert len(files) == 1, f"{self.name}: expected one finished event log, found {files}"
        return [json.loads(line) for line in files[0].read_text().splitlines()]

    def cleanup(self) -> list[str]:
        """Make sure nothing of this run survives; returns what was still alive 15 s after
        spark-submit ended (or was killed): this run's processes are its process group plus
        anything carrying its SPARK_HOME (pyspark's daemons make process groups of their own)."""
        leftovers = []
        if self.process.poll() is None:  # the test failed mid-run
            leftovers.append(f"spark-submit {self.process.pid}")
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 15
        while True:
            alive = {**live_group_members(self.process.pid), **processes_with_env(self.marker)}
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for pid, cmdline in alive.items():
            leftovers.append(f"{pid} {cmdline[:150]}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leftovers


def read_csv(client, bucket: str, key: str) -> list[list[str]]:
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    return list(csv.reader(io.StringIO(body)))


def read_outputs(client, bucket: str, prefix: str):
    """One run's manifest, {path: vector}, {path: label}, and every row's path in features/*.csv
    and in pca/*.csv (lists, so that a duplicate row shows)."""
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}manifest.json")["Body"].read())
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    vectors, labels, feature_paths, pca_paths = {}, {}, [], []
    for key in sorted(keys):
        if key.startswith(f"{prefix}features/"):
            rows = read_csv(client, bucket, key)
            assert rows[0][:2] == ["path", "label"] and len(rows[0]) == 2 + 64
            for row in rows[1:]:
                feature_paths.append(row[0])
                vectors[row[0]] = np.array(row[2:], dtype=np.float32)
                labels[row[0]] = row[1]
        elif key.startswith(f"{prefix}pca/"):
            pca_paths += [row[0] for row in read_csv(client, bucket, key)[1:]]
    errors = read_csv(client, bucket, f"{prefix}errors.csv")
    assert errors == [["path", "label", "error"]], errors[:5]
    assert f"{prefix}_SUCCESS" in keys
    return manifest, vectors, labels, feature_paths, pca_paths


def kill_an_executor_mid_stage(run: SparkRun) -> dict:
    """Poll until the featurize stage is well under way, then SIGKILL a busy executor of this run.

    Fails, rather than passing vacuously, if the job ends (or never gets there) first."""
    snapshot = None
    while run.process.poll() is None and time.monotonic() - run.started < RUN_DEADLINE_S:
        stages = run.rest("stages") or []
        executors = run.rest("executors") or []
        stage = next((s for s in stages if s["numTasks"] == PARTITIONS and s["status"] == "ACTIVE"), None)
        if stage is not None:
            done, active = stage["numCompleteTasks"], stage["numActiveTasks"]
            unstarted = PARTITIONS - done - active
            busy = [e for e in executors if e["id"] != "driver" and e["isActive"]
                    and e["activeTasks"] >= 1 and e["completedTasks"] >= 1]
            if unstarted < MIN_UNSTARTED_AT_KILL:
                raise AssertionError(f"too late: the stage is at {done}/{PARTITIONS} tasks done, {active} running, "
                                     f"before an executor could be killed" + run.tail())
            if done >= MIN_DONE_BEFORE_KILL and busy:
                victim = sorted(busy, key=lambda e: e["id"])[0]
                pids = run.executor_pids()
                assert victim["id"] in pids, f"no process for executor {victim['id']} among {pids}"
                # Taken before the kill: the driver may log the executor's removal within a millisecond of it.
                at_ms = int(time.time() * 1000)
                os.kill(pids[victim["id"]], signal.SIGKILL)
                snapshot = {"executor": victim["id"], "pid": pids[victim["id"]], "executor_pids": pids,
                            "stage": stage["stageId"], "done": done, "running": active, "unstarted": unstarted,
                            "victim_done": victim["completedTasks"], "victim_running": victim["activeTasks"],
                            "at_ms": at_ms, "after_s": round(time.monotonic() - run.started, 1)}
                break
        time.sleep(0.2)
    assert snapshot is not None, (f"no executor was killed: spark-submit exited with {run.process.poll()} "
                                  f"before the featurize stage was under way (too late)" + run.tail())
    return snapshot


def test_killed_executor_tasks_are_rerun_and_the_output_is_complete_and_unchanged(
        s3_server, server_bucket, tmp_path, driver_here):
    client, bucket = server_bucket
    images = fruit_dataset(PER_FRUIT, FRUITS)
    for key, body in images.items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=body)
    uploaded = sorted(f"s3://{bucket}/in/{key}" for key in images)
    py_files = build_zip(tmp_path / "dist")  # as in production: the package travels with --py-files

    # The control: the same job, undisturbed, in this process on the suite's local Spark (the
    # subject, executors in their own JVMs, is the killed run's).
    started = time.monotonic()
    assert driver_here(s3_server, "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/control/",
                       *JOB_ARGS, log_dir=tmp_path / "control-logs") == 0
    control_seconds = time.monotonic() - started
    runs = []
    try:
        killed = SparkRun("killed", s3_server, bucket, tmp_path, py_files)
        runs.append(killed)
        kill = kill_an_executor_mid_stage(killed)
        code = killed.wait()
        print(f"\ncontrol run {control_seconds:.1f} s; killed run {killed.seconds:.1f} s; kill: {kill}")
        assert code == 0, killed.tail()
    finally:
        leftovers = {run.name: run.cleanup() for run in runs}
    assert all(not left for left in leftovers.values()), f"processes outlived spark-submit: {leftovers}"

    # Spark's event log: the only failures are the tasks that were on the killed executor, each
    # re-run (attempt 1) on another executor; every partition succeeded exactly once; and the
    # stage still had tasks to hand out after the kill (it was really mid-way).
    victim, stage = kill["executor"], kill["stage"]
    events = killed.events()
    why = killed.evidence(events)
    # The featurize job: the one holding the stage under way at the kill (a warm-up job runs before it).
    job_id = next(e["Job ID"] for e in events if e["Event"] == "SparkListenerJobStart" and stage in e["Stage IDs"])
    job_end = next(e["Completion Time"] for e in events
                   if e["Event"] == "SparkListenerJobEnd" and e["Job ID"] == job_id)
    removed = [e for e in events if e["Event"] == "SparkListenerExecutorRemoved" and e["Timestamp"] <= job_end]
    assert [(e["Executor ID"], e["Timestamp"] >= kill["at_ms"]) for e in removed] == [(victim, True)], why
    ends = [e for e in events if e["Event"] == "SparkListenerTaskEnd" and e["Stage ID"] == stage]
    failed = [e for e in ends if e["Task End Reason"]["Reason"] != "Success"]
    assert failed, "no task was lost with the executor" + why
    assert all(e["Task End Reason"]["Reason"] == "ExecutorLostFailure" and e["Task Info"]["Executor ID"] == victim
               and e["Task Info"]["Attempt"] == 0 for e in failed), why
    lost = {e["Task Info"]["Index"]: e["Task Info"]["Task ID"] for e in failed}
    succeeded = [e["Task Info"] for e in ends if e["Task End Reason"]["Reason"] == "Success"]
    assert sorted(info["Index"] for info in succeeded) == list(range(PARTITIONS)), why
    assert all(info["Attempt"] == 1 and info["Executor ID"] != victim
               for info in succeeded if info["Index"] in lost), why
    # (The REST snapshot may be a few tasks behind the kill: the listener bus is asynchronous.)
    launched_after_kill = [e for e in ends if e["Task Info"]["Launch Time"] > kill["at_ms"]]
    assert len(launched_after_kill) >= MIN_UNSTARTED_AT_KILL // 2, why
    assert any(info["Executor ID"] == victim for info in succeeded), \
        "the killed executor had finished no task: its results were not put to the test" + why

    # spark-submit's output says the same: the executor died of SIGKILL (137 = 128 + 9), its tasks
    # were lost -- WARN "Lost task", or, for a task sent to the executor that had not yet reported
    # it running, INFO "... unrelated to the task" -- and were re-run on another executor.
    output = killed.output()
    assert re.search(rf"ERROR TaskSchedulerImpl: Lost executor {victim} on \S+: Command exited with code 137",
                     output), why
    for index, tid in lost.items():
        assert (re.search(rf"WARN TaskSetManager: Lost task {index}\.0 in stage {stage}\.0 \(TID {tid}\) "
                          rf"\(\S+ executor {victim}\): ExecutorLostFailure", output)
                or re.search(rf"INFO TaskSetManager: task {index}\.0 in stage {stage}\.0 \(TID {tid}\) failed because "
                             rf"while it was being computed, its executor exited for a reason unrelated to the task",
                             output)), why
        retried = re.search(rf"INFO TaskSetManager: Finished task {index}\.1 in stage {stage}\.0 "
                            rf"\(TID \d+\) in \d+ ms on \S+ \(executor (\S+)\)", output)
        assert retried and retried.group(1) != victim, why

    # The outputs: complete, no duplicates, and the same vectors as without the kill.
    manifest, vectors, labels, feature_paths, pca_paths = read_outputs(client, bucket, "killed/")
    counts = manifest["counts"]
    assert (counts["listed"], counts["featurized"], counts["failed"]) == (len(images), len(images), 0)
    assert manifest["partitions"] == PARTITIONS and manifest["spark"]["app_id"] == killed.app_id
    assert sorted(feature_paths) == uploaded  # each image exactly once
    assert sorted(pca_paths) == uploaded
    assert all(labels[path] == path.split("/")[-2] for path in uploaded)

    control_manifest, control_vectors, _, control_paths, _ = read_outputs(client, bucket, "control/")
    assert sorted(control_paths) == uploaded and control_manifest["counts"]["failed"] == 0
    assert control_manifest["partitions"] == PARTITIONS and control_manifest["batch_size"] == 1
    # The images of the tasks that died with the executor were computed again: same numbers.
    # (parallelize slices the listing, sorted by key, into PARTITIONS runs of equal length.)
    per_task = len(uploaded) // PARTITIONS
    recomputed = [uploaded[i] for index in lost for i in range(index * per_task, (index + 1) * per_task)]
    print(f"recomputed after the kill: {recomputed}")
    for path in recomputed:
        np.testing.assert_array_equal(vectors[path], control_vectors[path], err_msg=path)
    assert all(np.array_equal(vectors[path], control_vectors[path]) for path in uploaded)
    assert len({vectors[path].tobytes() for path in uploaded}) == len(uploaded)  # not all one constant
