"""job.run in this process with the suite's local Spark; workers reach S3 on the loopback server."""

import csv
import io
import json
import logging

import pytest

from extractor.driver import collected, job, modes
from extractor.driver.config import parse_args
from extractor.errors import JobError
from extractor.dev.synthetic import fruit_dataset

from conftest import keys_under, output_bytes


def upload(client, bucket, prefix, objects):
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=prefix + key, Body=body)


def run_job(spark, endpoint, bucket, *extra):
    cfg = parse_args(["--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
                      "--model", "tiny", "--weights", "random", "--endpoint-url", endpoint, *extra])
    return job.run(spark.sparkContext, cfg, s3_client=cfg.s3.client(), logger=logging.getLogger("test"))


def test_model_built_once_per_worker_process_not_per_task(spark, s3_server, server_bucket):
    client, bucket = server_bucket
    upload(client, bucket, "in/", fruit_dataset(8, ["Lemon", "Lime"]))
    manifest = run_job(spark, s3_server, bucket, "--partitions", "8", "--batch-size", "2")
    assert manifest["partitions"] == 8
    assert manifest["counts"]["featurized"] == 16
    # local[2] runs at most 2 Python workers at a time, reused across the 8 tasks.
    assert 1 <= manifest["weight_loads"] <= 2
    # The warm-up job built the model in the workers while the driver loaded the weights.
    assert manifest["warm_up"]["enabled"] and manifest["warm_up"]["workers"] >= 1
    # No GPUs asked: the CPU figures (4 download/decode threads), no GPU seen.
    assert (manifest["batch_size"], manifest["decode_threads"]) == (2, 4)
    gpu = manifest["spark"]["gpu"]
    assert (gpu["requested"], gpu["addresses_seen"], gpu["devices"], gpu["auto"]) == (None, [], [], ["decode threads"])


def test_rerun_replaces_the_old_result_without_stale_files(spark, s3_server, server_bucket):
    client, bucket = server_bucket
    upload(client, bucket, "in/", fruit_dataset(3, ["Lemon", "Lime", "Orange"]))
    run_job(spark, s3_server, bucket)
    assert "out/features/Orange.csv" in keys_under(client, bucket, "out/")

    client.delete_objects(Bucket=bucket, Delete={"Objects": [
        {"Key": k} for k in keys_under(client, bucket, "in/Orange/")]})
    client.put_object(Bucket=bucket, Key="out/audit/erasures.jsonl", Body=b"{}\n")
    manifest = run_job(spark, s3_server, bucket, "--pca-k", "2")

    keys = keys_under(client, bucket, "out/")
    assert "out/features/Orange.csv" not in keys and "out/pca/Orange.csv" not in keys
    assert {"out/features/Lemon.csv", "out/features/Lime.csv", "out/_SUCCESS"} <= set(keys)
    assert "out/audit/erasures.jsonl" in keys  # the erasure audit trail survives re-runs
    assert manifest["counts"]["listed"] == 6 and manifest["pca"]["k"] == 2
    rows = list(csv.reader(io.StringIO(client.get_object(
        Bucket=bucket, Key="out/pca/Lime.csv")["Body"].read().decode())))
    assert rows[0] == ["path", "label", "pc_0", "pc_1"] and len(rows) == 4


def test_empty_prefix_is_a_job_error(spark, s3_server, server_bucket):
    client, bucket = server_bucket
    client.put_object(Bucket=bucket, Key="in/readme.txt", Body=b"no images here")
    with pytest.raises(JobError, match=r"no \.jpg/\.jpeg/\.png images under s3://.*/in/ \(1 other keys\)"):
        run_job(spark, s3_server, bucket)


def test_all_images_broken_writes_errors_and_fails(spark, s3_server, server_bucket):
    client, bucket = server_bucket
    upload(client, bucket, "in/", {"Kiwi/a.jpg": b"", "Kiwi/b.jpg": b"junk"})
    with pytest.raises(JobError, match="none of the 2 images"):
        run_job(spark, s3_server, bucket)
    keys = keys_under(client, bucket, "out/")
    assert "out/errors.csv" in keys and "out/_SUCCESS" not in keys


def test_rerun_gives_byte_identical_outputs(spark, s3_server, server_bucket):
    client, bucket = server_bucket
    upload(client, bucket, "in/", fruit_dataset(5, ["Lemon", "Lime", "Orange"]))
    upload(client, bucket, "in/", {"Lime/broken.jpg": b"\xff\xd8\xff junk"})
    first_manifest = run_job(spark, s3_server, bucket, "--partitions", "3")
    first = output_bytes(client, bucket)
    second_manifest = run_job(spark, s3_server, bucket, "--partitions", "3")
    second = output_bytes(client, bucket)
    assert sorted(first) == sorted(second) == sorted([
        "_SUCCESS", "errors.csv", "explained_variance.png", "pca_model.npz",
        "pca_scatter.csv", "pca_scatter.png", "report.html", "features/Lemon.csv", "features/Lime.csv", "features/Orange.csv",
        "pca/Lemon.csv", "pca/Lime.csv", "pca/Orange.csv"])
    for name in first:
        assert first[name] == second[name], name
    assert first_manifest["files"] == second_manifest["files"]  # sizes and sha256 of each file


def test_a_collect_that_would_not_fit_stops_before_any_compute(spark, s3_server, server_bucket, monkeypatch):
    client, bucket = server_bucket
    upload(client, bucket, "in/", fruit_dataset(2, ["Lemon"]))
    # As if each vector were 1 GB: far more than the suite's 1g driver heap.
    monkeypatch.setattr(collected, "collect_need", lambda n, d: (n * 2**30, n * 2**30))
    monkeypatch.setattr(modes, "collect_need", collected.collect_need)
    jobs_before = len(spark.sparkContext.statusTracker().getJobIdsForGroup())
    with pytest.raises(JobError, match=r"needs about 2\.1 GB of driver heap, more than spark\.driver\.memory=1g "
                                       r"allows: run with spark-submit --driver-memory \d+g"):
        run_job(spark, s3_server, bucket, "--collect", "always")
    assert len(spark.sparkContext.statusTracker().getJobIdsForGroup()) == jobs_before  # no Spark job ran
    assert keys_under(client, bucket, "out/") == ["out/_lock.json"]  # and nothing was written but the run lock


def test_collect_estimate_against_driver_memory(spark):
    from extractor.driver.collected import collect_misfit, collect_need
    from extractor.driver.modes import choose_mode
    from extractor.driver.spark import driver_memory, memory_bytes

    sc = spark.sparkContext
    log = logging.getLogger("test")
    # Spark's own reading: a number without a unit is MiB for spark.driver.memory.
    assert memory_bytes(sc, "10g") == 10 * 2**30 and memory_bytes(sc, "512m") == 512 * 2**20
    assert memory_bytes(sc, "2048") == 2048 * 2**20 and memory_bytes(sc, "1024k") == 2**20
    with pytest.raises(ValueError, match="'ten'"):
        memory_bytes(sc, "ten")
    assert driver_memory(sc) == ("1g", 2**30)  # the suite's session sets none: Spark's default
    ten = 10 * 2**30
    jvm, python = collect_need(90_000, 4096)
    assert jvm == 90_000 * (4096 * 4 + 256) and python == 3 * jvm
    assert collect_misfit(90_000, 4096, "10g", ten) is None  # Fruits-360 with the documented 10g: fits
    assert "--driver-memory 32g" in collect_misfit(1_000_000, 4096, "10g", ten)  # a million images: 16.6 GB
    assert choose_mode("auto", 90_000, 4096, "10g", ten, log).used == "collect"
    assert choose_mode("auto", 1_000_000, 4096, "10g", ten, log).used == "distributed"
    assert choose_mode("never", 10, 4096, "10g", ten, log).used == "distributed"
    with pytest.raises(JobError, match="--driver-memory 32g"):
        choose_mode("always", 1_000_000, 4096, "10g", ten, log)

    # spark.driver.maxResultSize caps what one action returns (a bare number is bytes, as Spark
    # reads it): a collect past it would fail once every task had run, so auto goes distributed
    # and always stops first. The suite's session sets none: Spark's default of 1g.
    from extractor.driver.distributed import largest_result_bytes
    from extractor.driver.spark import max_result_size

    assert max_result_size(sc) == ("1g", 2**30)
    assert memory_bytes(sc, "25165824", bare="bytes") == memory_bytes(sc, "24m", bare="bytes") == 24 * 2**20
    with pytest.raises(ValueError, match="'KiB'"):
        memory_bytes(sc, "24m", bare="KiB")
    small, cap = 512 * 2**20, ("24m", 24 * 2**20)
    assert collect_misfit(1600, 4096, "512m", small) is None  # 27 MB fits 512m of heap ...
    assert "spark.driver.maxResultSize=24m" in collect_misfit(1600, 4096, "512m", small, cap)  # ... not 24m of results
    assert collect_misfit(1500, 4096, "512m", small, cap) is None
    assert collect_misfit(1600, 4096, "512m", small, ("0", 0)) is None  # 0: no limit
    choice = choose_mode("auto", 1600, 4096, "512m", small, log, cap)
    assert (choice.used, choice.reason) == ("distributed", "the vectors would not fit the driver")
    with pytest.raises(JobError, match=r"returns about 25 MiB of task results, more than spark.driver.maxResultSize=24m"):
        choose_mode("always", 1600, 4096, "512m", small, log, cap)
    # The distributed mode's own largest result, one block of the moments (512 x 4096 float64):
    # a limit below it is refused before any compute, in either mode's words.
    assert 16 * 2**20 < largest_result_bytes(4096) < 18 * 2**20 and largest_result_bytes(8) < 2 * 2**20
    with pytest.raises(JobError, match=r"spark.driver.maxResultSize=8m is below the 17 MiB that the distributed"):
        choose_mode("never", 10, 4096, "10g", ten, log, ("8m", 8 * 2**20))
    assert choose_mode("never", 10, 8, "10g", ten, log, ("8m", 8 * 2**20)).used == "distributed"


@pytest.mark.parametrize("content", [b"", b"this is not HDF5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 64])
def test_an_unreadable_weights_file_is_one_clear_error(spark, s3_server, server_bucket, tmp_path, content):
    client, bucket = server_bucket
    upload(client, bucket, "in/", fruit_dataset(1, ["Lemon"]))
    weights = tmp_path / "broken.weights.h5"
    weights.write_bytes(content)
    cfg = parse_args(["--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--model", "tiny",
                      "--weights", str(weights), "--endpoint-url", s3_server])
    with pytest.raises(JobError, match=r"cannot load weights '.*broken\.weights\.h5': ") as caught:
        job.run(spark.sparkContext, cfg, s3_client=cfg.s3.client(), logger=logging.getLogger("test"))
    assert "\n" not in str(caught.value)
    assert keys_under(client, bucket, "out/") == ["out/_lock.json"]
    # The run lock, released on the failure: the next run takes it at once.
    assert json.loads(client.get_object(Bucket=bucket, Key="out/_lock.json")["Body"].read())["released"] is True


def test_counts_must_account_for_every_listed_image_fruit_by_fruit():
    """The driver may only hold counts (the distributed listing and mode): a lost partition must
    fail the run, not shrink it, and so must an image lost in one folder while another folder
    got one too many back."""
    from collections import Counter

    from extractor.driver.vectors import Summary

    summary = Summary(featurized=Counter({"Lime": 3}), failed=Counter({"Lime": 2}), examples=[])
    counts = summary.counts(Counter({"Lime": 5}), {"forwarded": 3, "downloaded": 5})
    assert (counts["listed"], counts["featurized"], counts["failed"], counts["new"]) == (5, 3, 2, 5)
    with pytest.raises(JobError, match="accounting failed: listed 5, got back 3 featurized \\+ 1 failed"):
        Summary(featurized=Counter({"Lime": 3}), failed=Counter({"Lime": 1}),
                examples=[]).counts(Counter({"Lime": 5}), {})
    swapped = Summary(featurized=Counter({"Lime": 4, "Kiwi": 1}), failed=Counter(), examples=[])
    with pytest.raises(JobError, match="2 folders differ: 'Kiwi': listed 2, got back 1, 'Lime': listed 3, got back 4"):
        swapped.counts(Counter({"Lime": 3, "Kiwi": 2}), {})


def test_a_failed_spark_job_is_one_line_from_the_structured_exception(spark, tmp_path):
    from extractor.driver.spark import failure_summary, python_exception_line

    def boom(partition):  # nested: cloudpickle sends it by value, the workers cannot import this module
        try:
            raise KeyError("inner")
        except KeyError:
            raise RuntimeError("boom 42\nsecond line") from None

    sc = spark.sparkContext
    with pytest.raises(Exception) as caught:
        sc.parallelize(range(2), 2).mapPartitions(boom).collect()
    # The task's Python exception, found in the Java exception's causes, not the JVM's wording around it.
    assert failure_summary(caught.value) == "RuntimeError: boom 42"
    with pytest.raises(Exception) as caught:
        sc.textFile(str(tmp_path / "missing")).collect()
    # No Python exception in the chain: its innermost Java cause (Hadoop's, under Spark's).
    assert failure_summary(caught.value) == f"java.io.IOException: Input path does not exist: file:{tmp_path}/missing"
    assert failure_summary(ValueError("plain\nmore")) == "ValueError: plain"
    chained = ('Traceback (most recent call last):\n  File "a.py", line 1, in f\n    g()\nKeyError: 1\n\n'
               'During handling of the above exception, another exception occurred:\n\n'
               'Traceback (most recent call last):\n  File "b.py", line 2, in h\n    raise X\n'
               '    ^^^^^^^\nOSError: [Errno 5] disk\n')
    assert python_exception_line(chained) == "OSError: [Errno 5] disk"
    assert python_exception_line("no frames here") == "no frames here"


# --- the run lock (extractor.storage.lock) in a run ----------------------------------------------------

def another_runs_lock(s3_server, bucket, run_id, break_lock=False):
    from extractor.storage.lock import RunLock
    from extractor.storage.s3 import S3Settings, parse_s3_uri

    settings = S3Settings(endpoint_url=s3_server, region="eu-west-3")
    return RunLock(settings.client(), settings, parse_s3_uri(f"s3://{bucket}/out/"), run_id=run_id,
                   host="other-host", pid=77).acquire(break_lock=break_lock)


def test_a_run_on_a_held_output_is_refused_before_any_spark_job_and_touches_nothing(spark, s3_server, server_bucket):
    from extractor.storage.lock import LockHeld
    from extractor.driver.warmup import WarmUp

    client, bucket = server_bucket
    upload(client, bucket, "in/", fruit_dataset(2, ["Lemon"]))
    client.put_object(Bucket=bucket, Key="out/features/Lemon.csv", Body=b"the holder's file")
    another_runs_lock(s3_server, bucket, "holder-run")
    before = client.get_object(Bucket=bucket, Key="out/_lock.json")
    tracker = spark.sparkContext.statusTracker()
    jobs_before = len(tracker.getJobIdsForGroup()), len(tracker.getJobIdsForGroup(WarmUp.GROUP))
    with pytest.raises(LockHeld) as refused:
        run_job(spark, s3_server, bucket)
    assert "\n" not in str(refused.value)
    assert str(refused.value).startswith(f"--output s3://{bucket}/out/ is locked by run holder-run (job, started ")
    assert (len(tracker.getJobIdsForGroup()), len(tracker.getJobIdsForGroup(WarmUp.GROUP))) == jobs_before
    assert keys_under(client, bucket, "out/") == ["out/_lock.json", "out/features/Lemon.csv"]
    assert client.get_object(Bucket=bucket, Key="out/features/Lemon.csv")["Body"].read() == b"the holder's file"
    assert client.head_object(Bucket=bucket, Key="out/_lock.json")["ETag"] == before["ETag"]


def test_a_run_whose_lock_is_taken_over_stops_before_its_next_write(spark, s3_server, server_bucket, monkeypatch):
    from extractor.storage.lock import LockLost

    client, bucket = server_bucket
    upload(client, bucket, "in/", fruit_dataset(2, ["Lemon", "Lime"]))
    featurize = job.featurize_rdd

    def featurize_while_another_run_breaks_the_lock(*args, **kwargs):
        another_runs_lock(s3_server, bucket, "breaker-run", break_lock=True)
        return featurize(*args, **kwargs)

    monkeypatch.setattr(job, "featurize_rdd", featurize_while_another_run_breaks_the_lock)
    with pytest.raises(LockLost, match=rf"^the run lock on --output s3://{bucket}/out/ was lost to run breaker-run "
                                       r"\(job, .*host other-host, pid 77\); stopped before changing anything more"):
        run_job(spark, s3_server, bucket)
    # Nothing written under --output, no _SUCCESS; the lock is the breaker's, left alone.
    assert keys_under(client, bucket, "out/") == ["out/_lock.json"]
    body = json.loads(client.get_object(Bucket=bucket, Key="out/_lock.json")["Body"].read())
    assert body["holder"]["run_id"] == "breaker-run" and body["released"] is False
