"""--collect never (PCA from moments on the executors, files assembled from executor parts),
--format parquet and --incremental, through job.run on the suite's local Spark."""

import json
import logging

import numpy as np
import pytest

from extractor.driver import job
from extractor.driver.config import parse_args
from extractor.results.formats import read_table
from extractor.results.scatter import read_points_csv
from extractor.dev.synthetic import fruit_dataset

from images import encode, gradient_rgb
from rounding import assert_same_pca, assert_same_table

FRUITS = ["Lemon", "Lime", "Orange"]


def upload(client, bucket, objects, prefix="in/"):
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=prefix + key, Body=body)


def run(spark, endpoint, bucket, out, *extra, run_id="r1"):
    cfg = parse_args(["--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/{out}/", "--model", "tiny",
                      "--weights", "random", "--batch-size", "3", "--partitions", "4", "--endpoint-url", endpoint,
                      *extra])
    return job.run(spark.sparkContext, cfg, s3_client=cfg.s3.client(), logger=logging.getLogger("test"),
                   run_id=run_id)


def files(client, bucket, prefix):
    """relative name -> bytes of every object under prefix (logs excepted)."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(prefix):]
            if not relative.startswith("logs/"):
                out[relative] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out



@pytest.fixture
def dataset(server_bucket):
    client, bucket = server_bucket
    objects = fruit_dataset(5, FRUITS)
    objects["Orange/broken.jpg"] = b"not a jpeg"
    upload(client, bucket, objects)
    return client, bucket, objects


def test_distributed_mode_gives_the_collect_modes_files(spark, s3_server, dataset):
    client, bucket, _ = dataset
    collected = run(spark, s3_server, bucket, "c", "--collect", "always")
    spread = run(spark, s3_server, bucket, "d", "--collect", "never")
    assert collected["collect"]["used"] == "collect" and spread["collect"]["used"] == "distributed"
    assert spread["collect"]["reason"] == "--collect never"
    a, b = files(client, bucket, "c/"), files(client, bucket, "d/")
    assert sorted(a) == sorted(b)  # same files, and no staging parts left behind
    assert not any(name.startswith("_staging") for name in b)
    for name in a:
        if name.startswith("features/") or name == "errors.csv":
            assert a[name] == b[name], name  # same rows, same order, same bytes
    assert b"broken.jpg" in b["errors.csv"]
    # The scatter draws the same photos in both modes (sampled by path, on the executors here);
    # the PCA, fitted from moments on the executors instead of the collected matrix, agrees
    # within rounding on its leading components.
    assert len(read_points_csv(a["pca_scatter.csv"])) == 15
    assert_same_pca(b, a, FRUITS)
    # The manifest vouches for the assembled files with their real sizes and hashes.
    manifest = json.loads(b["manifest.json"])
    import hashlib
    for name, meta in manifest["files"].items():
        assert meta == {"bytes": len(b[name]), "sha256": hashlib.sha256(b[name]).hexdigest()}, name
    assert manifest["counts"]["per_fruit"]["Orange"] == {"file": "Orange.csv", "featurized": 5, "failed": 1}


def test_parquet_holds_the_same_rows_as_csv_in_both_modes(spark, s3_server, dataset):
    client, bucket, _ = dataset
    run(spark, s3_server, bucket, "csv", "--collect", "always")
    run(spark, s3_server, bucket, "pq-c", "--collect", "always", "--format", "parquet")
    manifest = run(spark, s3_server, bucket, "pq-d", "--collect", "never", "--format", "parquet")
    assert manifest["format"] == "parquet"
    assert manifest["counts"]["per_fruit"]["Lime"]["file"] == "Lime.parquet"
    csv_files = files(client, bucket, "csv/")
    for out in ("pq-c/", "pq-d/"):
        got = files(client, bucket, out)
        for fruit in FRUITS:
            paths, labels, vectors = read_table(got[f"features/{fruit}.parquet"], "parquet")
            want = read_table(csv_files[f"features/{fruit}.csv"], "csv")
            assert (paths, labels) == (want[0], want[1])
            np.testing.assert_array_equal(vectors, want[2])  # float32, exactly


def test_incremental_run_featurizes_only_new_and_changed_images(spark, s3_server, dataset):
    client, bucket, objects = dataset
    state = ["--incremental", "--state", f"s3://{bucket}/state/"]
    first = run(spark, s3_server, bucket, "inc", *state, run_id="r1")
    assert first["counts"]["forwarded"] == 15 and first["counts"]["reused"] == 0
    assert first["incremental"]["previous_version"] is None and first["incremental"]["stored_vectors"] == 15

    client.delete_object(Bucket=bucket, Key="in/Lemon/lemon_000.jpg")
    client.delete_object(Bucket=bucket, Key="in/Orange/orange_004.jpg")
    client.put_object(Bucket=bucket, Key="in/Lime/lime_002.jpg", Body=encode(gradient_rgb(80, 90), "JPEG"))
    upload(client, bucket, {f"Lime/new_{i}.jpg": encode(gradient_rgb(50 + i, 70), "JPEG") for i in range(3)})

    second = run(spark, s3_server, bucket, "inc", *state, run_id="r2")
    counts = second["counts"]
    # 3 new + 1 changed went through the CNN (and were downloaded, with the broken file again);
    # the other 12 stored vectors were reused (15 - 2 deleted - 1 changed); 2 deleted keys dropped.
    assert counts["forwarded"] == 4 and counts["downloaded"] == 5
    assert counts["reused"] == 12 and counts["removed"] == 2 and counts["new"] == 5  # 3 new, 1 changed, 1 broken
    assert counts["featurized"] == 16 and counts["failed"] == 1
    assert second["incremental"]["previous_version"] == "r1" and second["incremental"]["stored_vectors"] == 16

    # A full run over today's input: the same rows, vectors within float32 rounding (the reused
    # vectors met run r1's batches, a full run batches every image anew), the same errors.csv.
    incremental_files = files(client, bucket, "inc/")
    run(spark, s3_server, bucket, "full", "--collect", "always", run_id="r3")
    reference = files(client, bucket, "full/")
    features = sorted(name for name in reference if name.startswith("features/"))
    assert features == [f"features/{fruit}.csv" for fruit in FRUITS]
    assert sorted(incremental_files) == sorted(reference)
    for name in features:
        assert_same_table(incremental_files[name], reference[name], what=name)
    assert incremental_files["errors.csv"] == reference["errors.csv"]
    assert_same_pca(incremental_files, reference, FRUITS)
    # The distributed mode reusing every stored vector: byte for byte the incremental run's
    # features (the same stored float32 values, written again).
    third = run(spark, s3_server, bucket, "inc-d", *state, "--collect", "never", run_id="r4")
    assert third["counts"]["forwarded"] == 0 and third["counts"]["reused"] == 16
    spread = files(client, bucket, "inc-d/")
    for name in features + ["errors.csv"]:
        assert spread[name] == incremental_files[name], name

    # Only the current version's parts are kept.
    kept = [k["Key"] for k in client.list_objects_v2(Bucket=bucket, Prefix="state/")["Contents"]]
    assert "state/state.json" in kept and all(k in ("state/state.json", "state/_lock.json") or k.startswith("state/v-r4/")
                                              for k in kept)


def test_state_from_other_weights_is_not_reused(spark, s3_server, dataset):
    client, bucket, _ = dataset
    state = ["--incremental", "--state", f"s3://{bucket}/state/"]
    run(spark, s3_server, bucket, "w", *state, run_id="r1")
    again = run(spark, s3_server, bucket, "w", *state, "--seed", "7", run_id="r2")
    assert again["counts"]["forwarded"] == 15 and again["counts"]["reused"] == 0
    assert "weights_sha256" in again["incremental"]["note"]


def test_state_written_before_decode_modes_counts_as_full_size_decoding():
    """A state.json from before --decode existed holds full-size decodes: reused by --decode
    full, featurized again (and said why) by the default draft decoding."""
    from types import SimpleNamespace

    from extractor.executor.models import get_spec
    from extractor.storage.s3 import parse_s3_uri
    from extractor.storage.state import Incremental, fingerprint

    spec, weights = get_spec("tiny"), SimpleNamespace(sha256="ab" * 32)
    old = fingerprint(spec, weights.sha256, "float32")
    del old["decode"]
    previous = {"version": "r0", "rows": 3, "fingerprint": old, "parts": []}
    location, logger = parse_s3_uri("s3://b/state/"), logging.getLogger("test")
    full = Incremental.plan(location, spec, weights, "float32", previous, "r1", logger, decode="full")
    assert full.previous is not None and full.note == "reusing version r0 (3 vectors)"
    draft = Incremental.plan(location, spec, weights, "float32", previous, "r1", logger, decode="draft")
    assert draft.previous is None and draft.note == ("state made with another decode: every image is featurized again "
                                                 "(--decode full would reuse it)")
    assert draft.fingerprint["decode"] == "draft"


def test_state_needs_incremental_and_must_not_overlap_the_input():
    with pytest.raises(SystemExit):
        parse_args(["--input", "s3://b1/in/", "--output", "s3://b1/out/", "--state", "s3://b1/st/"])
    with pytest.raises(SystemExit):
        parse_args(["--input", "s3://b1/in/", "--output", "s3://b1/out/", "--incremental"])
    with pytest.raises(SystemExit):
        parse_args(["--input", "s3://b1/in/", "--output", "s3://b1/out/", "--incremental", "--state", "s3://b1/in/s/"])
