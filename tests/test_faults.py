"""The real driver.py under spark-submit, talking to moto's S3 server through a proxy that
injects faults (throttling, 5xx, dropped connections, refused credentials and writes).

Images are seeded directly on the moto server; only the job's own requests (driver and
executors) go through the proxy.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import NamedTuple

import boto3
import pytest

from extractor.dev.synthetic import fruit_dataset

from conftest import REGION, keys_under, unique_bucket
from faulty_s3 import FaultyProxy


TINY = ("--model", "tiny", "--weights", "random")


def read(client, bucket, key) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def read_csv(client, bucket, key):
    return list(csv.reader(io.StringIO(read(client, bucket, key).decode("utf-8"))))


def job_lines(result):
    """The job's own log lines (Spark's are left out); the job logs to stderr."""
    return [line for line in (result.stdout + result.stderr).splitlines() if " extractor: " in line]


def error_lines(result):
    return [line for line in job_lines(result) if " ERROR " in line]


def uploaded_log(client, bucket, prefix) -> str:
    logs = [k for k in keys_under(client, bucket, prefix) if k.endswith(".log")]
    assert len(logs) == 1, logs
    return read(client, bucket, logs[0]).decode("utf-8")


def seed(client, bucket, images: dict[str, bytes], prefix="in/") -> set[str]:
    """Upload straight to moto (not through the proxy); returns the s3:// URIs."""
    for key, body in images.items():
        client.put_object(Bucket=bucket, Key=prefix + key, Body=body)
    return {f"s3://{bucket}/{prefix}{key}" for key in images}


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(driver_here, capsys):
    """``run(proxy or endpoint, *args, log_dir) -> Result``: one run of driver.main, its output."""
    def go(proxy_or_url, *args, log_dir):
        endpoint = proxy_or_url.url if isinstance(proxy_or_url, FaultyProxy) else proxy_or_url
        capsys.readouterr()  # only this run's output
        code = driver_here(endpoint, *args, *TINY, log_dir=log_dir)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)
    return go


def output(result) -> str:
    return (result.stdout + result.stderr)[-6000:]


@pytest.fixture
def proxy(s3_server):
    with FaultyProxy(s3_server, seed=20261121) as faulty:
        yield faulty


def test_transient_faults_on_list_get_and_put_are_retried_and_counted(proxy, server_bucket, tmp_path, run):
    client, bucket = server_bucket
    b = re.escape(bucket)
    uploaded = seed(client, bucket, fruit_dataset(8, ["Apple Red", "Lemon", "Lime"]))
    get_image = rf"^/{b}/in/[^?]+\.jpg$"
    listing_input = rf"^/{b}\?(?=.*list-type=2)(?=.*prefix=in/)"
    # Written before the manifest counts retries; report.html renders the manifest, so it comes after.
    put_output = rf"^/{b}/out/(?!logs/|manifest\.json|_SUCCESS|report\.html)"

    # One sure fault of each kind on known keys, then random ones (at most one per rule and key,
    # so no key can exhaust the 10 attempts).
    proxy.add_rule("drop", method="GET", path=rf"^/{b}/in/Apple Red/apple_red_000\.jpg$", count=1)
    proxy.add_rule("500", method="GET", path=rf"^/{b}/in/Lemon/lemon_001\.jpg$", count=1)
    proxy.add_rule("slowdown", method="GET", path=rf"^/{b}/in/Lime/lime_002\.jpg$", count=1)
    proxy.add_rule("slowdown", method="GET", path=get_image, probability=0.25, per_path=1)
    proxy.add_rule("500", method="GET", path=get_image, probability=0.1, per_path=1)
    proxy.add_rule("drop", method="GET", path=get_image, probability=0.1, per_path=1)
    proxy.add_rule("slowdown", method="GET", path=listing_input, count=1)
    proxy.add_rule("500", method="GET", path=listing_input, count=1)
    proxy.add_rule("drop", method="PUT", path=rf"^/{b}/out/features/Lemon\.csv$", count=1)
    proxy.add_rule("500", method="PUT", path=rf"^/{b}/out/errors\.csv$", count=1)
    proxy.add_rule("slowdown", method="PUT", path=put_output, probability=0.3, per_path=1)

    result = run(proxy, "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
                 "--batch-size", "4", log_dir=tmp_path)
    assert result.returncode == 0, output(result)

    # The faults really happened, of every kind, on every kind of request.
    get_faults = proxy.faults(method="GET", path=get_image)
    list_faults = proxy.faults(method="GET", path=listing_input)
    put_faults = proxy.faults(method="PUT", path=put_output)
    for action in ("slowdown", "500", "drop"):
        assert proxy.fired_by_action[action] > 0, proxy.fired_by_action
        assert proxy.faults(action, "GET", get_image) > 0
    assert get_faults >= 3 and list_faults == 2 and put_faults >= 2
    assert proxy.faults(path=r"/out/logs/|manifest\.json|_SUCCESS|report\.html") == 0

    # Every listed image featurized exactly once, nothing failed.
    featurized = []
    for fruit in ("Apple Red", "Lemon", "Lime"):
        rows = read_csv(client, bucket, f"out/features/{fruit}.csv")
        assert len(rows) == 8 + 1 and all(r[1] == fruit for r in rows[1:])
        featurized += [r[0] for r in rows[1:]]
    assert sorted(featurized) == sorted(uploaded)
    assert read_csv(client, bucket, "out/errors.csv") == [["path", "label", "error"]]
    assert "out/_SUCCESS" in keys_under(client, bucket, "out/")

    manifest = json.loads(read(client, bucket, "out/manifest.json"))
    counts = manifest["counts"]
    assert counts["listed"] == counts["featurized"] + counts["failed"] == len(uploaded)
    assert counts["failed"] == 0

    # Every fault cost exactly one retry, counted where it happened (driver or executors).
    retries = manifest["s3_retries"]
    assert retries["executors"] == {"GetObject": get_faults}
    assert retries["driver"].get("ListObjectsV2") == 2
    assert retries["driver"].get("PutObject") == put_faults

    # ... and shown in the log, on stderr and in the uploaded copy.
    log = uploaded_log(client, bucket, "out/logs/")
    printed = "\n".join(job_lines(result))
    for text in (log, printed):
        assert "S3 ListObjectsV2 succeeded or failed after 2 retries (last HTTP status 200)" in text
        assert re.search(r"WARNING extractor: S3 PutObject succeeded or failed after 1 retries", text)
        assert f"S3 retries on the executors: {{'GetObject': {get_faults}}}" in text
    assert error_lines(result) == []


def test_an_object_that_always_fails_becomes_an_error_row(proxy, server_bucket, tmp_path, run):
    client, bucket = server_bucket
    images = fruit_dataset(3, ["Apple Red", "Lemon"])
    good = seed(client, bucket, images)
    cursed = seed(client, bucket, {"Lemon/cursed.jpg": images["Lemon/lemon_000.jpg"]}).pop()
    proxy.add_rule("500", method="GET", path=rf"^/{re.escape(bucket)}/in/Lemon/cursed\.jpg$")

    result = run(proxy, "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
                 "--s3-max-attempts", "3", log_dir=tmp_path)
    assert result.returncode == 0, output(result)
    # Every attempt at the one key failed, and nothing else did. botocore makes
    # --s3-max-attempts + 1 attempts today (see test_s3_max_attempts_is_the_number_of_attempts).
    attempts = proxy.faults("500")
    assert attempts == proxy.faults("500", "GET", r"/in/Lemon/cursed\.jpg$") == 3  # --s3-max-attempts 3

    errors = read_csv(client, bucket, "out/errors.csv")
    assert errors == [["path", "label", "error"],
                      [cursed, "Lemon", f"S3 read failed after {attempts} attempts: InternalError"]]
    featurized = [r[0] for fruit in ("Apple Red", "Lemon")
                  for r in read_csv(client, bucket, f"out/features/{fruit}.csv")[1:]]
    assert sorted(featurized) == sorted(good)
    manifest = json.loads(read(client, bucket, "out/manifest.json"))
    assert (manifest["counts"]["listed"], manifest["counts"]["featurized"], manifest["counts"]["failed"]) == (7, 6, 1)
    assert manifest["counts"]["per_fruit"]["Lemon"]["failed"] == 1
    assert manifest["s3_retries"]["executors"] == {"GetObject": attempts - 1}
    assert "out/_SUCCESS" in keys_under(client, bucket, "out/")
    assert any(f"failed: {cursed} (Lemon): S3 read failed after {attempts} attempts" in line
               for line in job_lines(result))


def test_s3_max_attempts_is_the_number_of_attempts(proxy, server_bucket):
    from extractor.executor.featurize import _download
    from extractor.executor.images import ImageError
    from extractor.storage.s3 import S3Settings

    _, bucket = server_bucket
    proxy.add_rule("500", method="GET")
    client = S3Settings(endpoint_url=proxy.url, region="eu-west-3", max_attempts=3).client()
    with pytest.raises(ImageError) as failure:
        _download(client, bucket, "in/Lemon/cursed.jpg")
    assert proxy.faults("500") == 3
    assert str(failure.value) == "S3 read failed after 3 attempts: InternalError"


def test_a_failed_final_write_leaves_no_success_says_what_it_left_in_one_error_line(s3_server, tmp_path, run):
    """A run whose PUT of out/pca_model.npz always fails."""
    client = boto3.client("s3", endpoint_url=s3_server, region_name=REGION)
    bucket = unique_bucket()
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    seed(client, bucket, fruit_dataset(3, ["Apple Red", "Lemon"]))
    # What an earlier, successful run left: it must not vouch for this run's partial files.
    client.put_object(Bucket=bucket, Key="out/_SUCCESS", Body=b"")
    client.put_object(Bucket=bucket, Key="out/manifest.json", Body=b'{"status": "succeeded"}')
    with FaultyProxy(s3_server, seed=3) as proxy:
        proxy.add_rule("500", method="PUT", path=rf"^/{re.escape(bucket)}/out/pca_model\.npz$")
        result = run(proxy, "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
                     "--s3-max-attempts", "3", log_dir=tmp_path)
        put_faults = proxy.faults("500", "PUT")

    assert result.returncode == 1, output(result)
    assert put_faults == 3  # every attempt of --s3-max-attempts 3
    assert "Traceback" not in result.stdout + result.stderr
    assert len(error_lines(result)) == 1, error_lines(result)

    keys = keys_under(client, bucket, "out/")
    assert "out/_SUCCESS" not in keys and "out/manifest.json" not in keys
    assert "out/pca_model.npz" not in keys and "out/features/Lemon.csv" in keys

    failure = [line for line in error_lines(result) if "cannot write the outputs" in line]
    assert len(failure) == 1 and f"s3://{bucket}/out/" in failure[0] and "InternalError" in failure[0]
    log = uploaded_log(client, bucket, "out/logs/")
    assert ("writing the outputs failed after 5 files (features/Apple Red.csv, pca/Apple Red.csv, "
            "features/Lemon.csv, pca/Lemon.csv, errors.csv); no _SUCCESS was written") in log
    assert "cannot write the outputs" in log


def test_wrong_credentials_one_line_exit_1(proxy, server_bucket, tmp_path, run):
    _, bucket = server_bucket
    proxy.add_rule("bad-key")

    result = run(proxy, "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", log_dir=tmp_path)
    assert result.returncode == 1, output(result)
    errors = error_lines(result)
    assert len(errors) == 1, errors
    assert "access denied (InvalidAccessKeyId)" in errors[0] and f"s3://{bucket}/in/" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert proxy.fired_by_action["bad-key"] >= 2  # the first log upload, then the preflight
    assert all(outcome == "bad-key" for _, _, outcome in proxy.requests)  # nothing reached S3


def test_unwritable_output_fails_in_the_preflight(proxy, server_bucket, tmp_path, run):
    client, bucket = server_bucket
    seed(client, bucket, fruit_dataset(2, ["Lime"]))
    proxy.add_rule("denied", method="PUT", path=rf"^/{re.escape(bucket)}/out/")

    result = run(proxy, "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
                 "--log-uri", f"s3://{bucket}/joblogs/", log_dir=tmp_path)
    assert result.returncode == 1, output(result)
    errors = error_lines(result)
    assert len(errors) == 1, errors
    assert f"cannot write to --output s3://{bucket}/out/" in errors[0] and "AccessDenied" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert proxy.faults("denied") == 1  # a 403 is not retried

    log = uploaded_log(client, bucket, "joblogs/")
    assert "stage preflight: start" in log and "cannot write to --output" in log
    assert "stage list" not in log and "stage featurize" not in log
    assert keys_under(client, bucket, "out/") == []


def test_bucket_in_another_region_is_refused(s3_server, tmp_path, run):
    bucket = unique_bucket("elsewhere")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)  # no LocationConstraint: us-east-1
    seed(client, bucket, fruit_dataset(2, ["Lime"]))

    result = run(s3_server, "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
                 "--region", "eu-west-3", log_dir=tmp_path)
    assert result.returncode == 1, output(result)
    errors = error_lines(result)
    assert len(errors) == 1, errors
    assert f"bucket {bucket!r} is in us-east-1, the job runs in eu-west-3" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not any("stage list" in line for line in job_lines(result))
    assert [k for k in keys_under(client, bucket, "out/") if not k.startswith("out/logs/")] == []


def test_a_failed_part_write_in_distributed_mode_fails_the_run_in_one_line(proxy, server_bucket, tmp_path, run):
    client, bucket = server_bucket
    seed(client, bucket, fruit_dataset(2, ["Lemon", "Lime"]))
    client.put_object(Bucket=bucket, Key="out/_SUCCESS", Body=b"")  # an earlier run's
    proxy.add_rule("500", method="PUT", path=rf"^/{re.escape(bucket)}/out/_staging/")
    result = run(proxy, "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--collect", "never",
                 "--s3-max-attempts", "2", log_dir=tmp_path)
    assert result.returncode == 1, output(result)
    errors = error_lines(result)
    assert len(errors) == 1, errors
    assert f"cannot write the outputs to s3://{bucket}/out/: RuntimeError: Spark job failed: " in errors[0]
    assert "InternalError" in errors[0]  # (Spark itself logs each failed task attempt, with its traceback)
    keys = keys_under(client, bucket, "out/")
    assert "out/_SUCCESS" not in keys and "out/manifest.json" not in keys
