"""--listing driver | distributed | auto and --inventory, through job.run on the suite's local
Spark: every way of finding the keys gives the same partitions, hence the same bytes."""

import json
import logging

import pytest

from extractor.driver import inputs, job
from extractor.driver.config import parse_args
from extractor.dev.inventory_files import inventory_from_bucket
from extractor.dev.synthetic import fruit_dataset
from extractor.errors import JobError

from conftest import keys_under, output_bytes

# Outputs whose bytes depend only on the keys, their partitions and batches (not on clocks).
SAME_BYTES = ("features/", "pca/", "errors.csv", "pca_model.npz", "pca_scatter.csv")


def run(spark, endpoint, bucket, out, *extra, run_id="r1"):
    cfg = parse_args(["--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/{out}/", "--model", "tiny",
                      "--weights", "random", "--batch-size", "3", "--partitions", "4", "--endpoint-url", endpoint,
                      *extra])
    return job.run(spark.sparkContext, cfg, s3_client=cfg.s3.client(), logger=logging.getLogger("test"),
                   run_id=run_id)


def same_bytes(client, bucket, out) -> dict:
    return {name: body for name, body in output_bytes(client, bucket, f"{out}/").items()
            if name.startswith(SAME_BYTES)}


@pytest.fixture
def photos(server_bucket):
    """Several folders, a unicode and an odd name, a root key, a skipped key, a broken photo."""
    client, bucket = server_bucket
    objects = fruit_dataset(3, ["Lemon", "Lime", "Orange"])
    objects["Ananás doce/ananás 1.jpg"] = objects["Lemon/lemon_000.jpg"]
    objects["Lime/a b+c (2).jpeg"] = objects["Lime/lime_001.jpg"]
    objects["root.jpg"] = objects["Orange/orange_002.jpg"]
    objects["Lime/notes.txt"] = b"not a photo"
    objects["Orange/broken.jpg"] = b"not a jpeg"
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key="in/" + key, Body=body)
    return client, bucket


def test_every_listing_gives_the_driver_listings_bytes(spark, s3_server, photos, monkeypatch):
    client, bucket = photos
    driver = run(spark, s3_server, bucket, "drv", "--listing", "driver")
    spread = run(spark, s3_server, bucket, "dst", "--listing", "distributed")
    monkeypatch.setattr(inputs, "AUTO_DRIVER_MAX_KEYS", 5)
    auto = run(spark, s3_server, bucket, "auto")
    want = same_bytes(client, bucket, "drv")
    assert b"broken.jpg" in want["errors.csv"] and len([n for n in want if n.startswith("features/")]) == 5
    for out in ("dst", "auto"):
        assert same_bytes(client, bucket, out) == want, out
        assert not [key for key in keys_under(client, bucket, f"{out}/") if "_staging/" in key]  # snapshot gone
    assert driver["listing"] == {"mode": "driver", "why": "--listing driver", "units": 1, "tasks": 0, "requests": 1,
                                 "folders": 5, "deleted_since_listed": 0, "changed_since_listed": 0}
    assert spread["listing"]["mode"] == "distributed" and spread["listing"]["why"] == "--listing distributed"
    # The folders, a listing unit each (the root's own keys one more), dealt to 4 tasks per core.
    assert spread["listing"]["requests"] >= spread["listing"]["units"] >= 5
    assert spread["listing"]["tasks"] == min(spread["listing"]["units"], 4 * spark.sparkContext.defaultParallelism)
    assert auto["listing"]["mode"] == "distributed"
    assert auto["listing"]["why"] == "--listing auto: more than 5 keys under --input"
    for manifest in (driver, spread, auto):
        assert manifest["counts"]["listed"] == 13 and manifest["counts"]["failed"] == 1
        assert manifest["counts"]["skipped_non_image_keys"] == 1


def test_auto_lists_a_small_input_on_the_driver_and_says_why(spark, s3_server, photos):
    manifest = run(spark, s3_server, photos[1], "small")
    assert manifest["listing"]["mode"] == "driver"
    assert manifest["listing"]["why"] == f"--listing auto: 14 keys, at most {inputs.AUTO_DRIVER_MAX_KEYS:,} are " \
                                         f"listed on the driver"


@pytest.mark.parametrize("file_format", ["CSV", "Parquet"])
def test_an_inventory_gives_the_listings_outputs_and_counts_what_changed_since(spark, s3_server, photos, file_format):
    client, bucket = photos
    manifest_key = inventory_from_bucket(client, bucket, "in/", dest_prefix="inv", file_format=file_format,
                                         rows_per_file=4)
    inventory = f"s3://{bucket}/{manifest_key}"
    listed = run(spark, s3_server, bucket, "lst", "--listing", "driver")
    read = run(spark, s3_server, bucket, "inv-out", "--inventory", inventory)
    assert same_bytes(client, bucket, "inv-out") == same_bytes(client, bucket, "lst")
    assert read["listing"]["mode"] == "inventory" and read["listing"]["why"] == f"--inventory {inventory}"
    assert read["listing"]["units"] == read["listing"]["tasks"] == 4   # 14 rows, 4 a file: a unit per data file
    assert read["counts"] == listed["counts"]
    # The inventory is a day old: one photo deleted since, one replaced since.
    client.delete_object(Bucket=bucket, Key="in/Lemon/lemon_001.jpg")
    orange = fruit_dataset(1, ["Orange"])["Orange/orange_000.jpg"]
    client.put_object(Bucket=bucket, Key="in/Lime/lime_000.jpg", Body=orange)
    later = run(spark, s3_server, bucket, "inv-out", "--inventory", inventory, run_id="r2")
    assert later["listing"]["deleted_since_listed"] == 1 and later["listing"]["changed_since_listed"] == 1
    assert later["counts"]["listed"] == 13 and later["counts"]["failed"] == 2
    errors = output_bytes(client, bucket, "inv-out/")["errors.csv"].decode()
    assert "in/Lemon/lemon_001.jpg,Lemon,object deleted since it was listed (NoSuchKey)" in errors


def test_an_incremental_run_reuses_the_vectors_whatever_listed_them(spark, s3_server, photos):
    client, bucket = photos
    state = ["--incremental", "--state", f"s3://{bucket}/state/"]
    first = run(spark, s3_server, bucket, "inc", *state, "--listing", "driver")
    again = run(spark, s3_server, bucket, "inc", *state, "--listing", "distributed", run_id="r2")
    assert first["counts"]["forwarded"] == 12 and first["listing"]["mode"] == "driver"
    assert again["listing"]["mode"] == "distributed"
    assert (again["counts"]["reused"], again["counts"]["forwarded"], again["counts"]["new"]) == (12, 0, 1)


@pytest.mark.parametrize("body, message", [
    (b"{not json", "is not JSON"),
    (json.dumps({"sourceBucket": "x"}).encode(), "lacks destinationBucket"),
])
def test_a_malformed_inventory_is_one_line_and_nothing_is_written(spark, s3_server, photos, body, message):
    client, bucket = photos
    client.put_object(Bucket=bucket, Key="inv/bad/2026-12-01T00-00Z/manifest.json", Body=body)
    with pytest.raises(JobError, match=message) as failure:
        run(spark, s3_server, bucket, "bad", "--inventory", f"s3://{bucket}/inv/bad/2026-12-01T00-00Z/manifest.json")
    assert "\n" not in str(failure.value)
    assert not [key for key in keys_under(client, bucket, "bad/") if not key.endswith("_lock.json")]


def test_an_inventory_of_another_bucket_is_refused(spark, s3_server, photos):
    client, bucket = photos
    key = inventory_from_bucket(client, bucket, "in/", dest_prefix="inv")
    other = key.replace("inv/", "inv2/")
    body = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    client.put_object(Bucket=bucket, Key=other, Body=json.dumps({**body, "sourceBucket": "someone-else"}).encode())
    with pytest.raises(JobError, match="is an inventory of bucket 'someone-else', --input is in"):
        run(spark, s3_server, bucket, "bad", "--inventory", f"s3://{bucket}/{other}")


@pytest.mark.parametrize("argv, message", [
    (["--listing", "driver", "--inventory", "s3://b/inv/c/2026-12-01T00-00Z/manifest.json"],
     "--inventory replaces the listing"),
    (["--inventory", "s3://b/inv/c/2026-12-01T00-00Z/"], "expects the s3:// URI of an inventory's manifest.json"),
    (["--inventory", "s3://b/manifest.json"], "expects the s3:// URI of an inventory's manifest.json"),
    (["--listing", "executors"], "invalid choice: 'executors'"),
])
def test_listing_options_are_checked_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--input", "s3://b/in/", "--output", "s3://b/out/", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
