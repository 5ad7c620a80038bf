"""job.run in this process with the suite's local Spark; workers reach S3 on the loopback server."""

import csv
import io
import logging

import pytest

from extractor import job
from extractor.config import parse_args
from extractor.errors import JobError
from extractor.synthetic import fruit_dataset


def upload(client, bucket, prefix, objects):
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=prefix + key, Body=body)


def run_job(spark, endpoint, bucket, *extra):
    cfg = parse_args(["--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
                      "--model", "tiny", "--weights", "random", "--endpoint-url", endpoint, *extra])
    return job.run(spark.sparkContext, cfg, s3_client=cfg.s3.client(), logger=logging.getLogger("test"))


def keys_under(client, bucket, prefix):
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def test_model_built_once_per_worker_process_not_per_task(spark, s3_server, server_bucket):
    client, bucket = server_bucket
    upload(client, bucket, "in/", fruit_dataset(8, ["Lemon", "Lime"]))
    manifest = run_job(spark, s3_server, bucket, "--partitions", "8", "--batch-size", "2")
    assert manifest["partitions"] == 8
    assert manifest["counts"]["featurized"] == 16
    # local[2] runs at most 2 Python workers at a time, reused across the 8 tasks.
    assert 1 <= manifest["model_builds"] <= 2


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
