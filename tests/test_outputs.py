import csv
import hashlib
import io
import json

import numpy as np
import pytest

from extractor.results.outputs import OutputWriter, format_errors, format_rows, safe_names
from extractor.storage.s3 import S3Settings, parse_s3_uri

from conftest import REGION, unique_bucket


def test_readable_labels_are_kept():
    names = safe_names(["Apple Braeburn", "Pêche été", "Kiwi"])
    assert names == {"Apple Braeburn": "Apple Braeburn", "Pêche été": "Pêche été", "Kiwi": "Kiwi"}


@pytest.mark.parametrize("label", ["..", ".", "a/b", "a\\b", "x:y*z?", "", " ", "..hidden", "100%", "tab\there"])
def test_unsafe_labels_are_made_safe(label):
    name = safe_names([label])[label]
    assert "/" not in name and "\\" not in name and not name.startswith(".") and name.strip()
    assert not any(c in name for c in ':*?"<>|%\t')


def test_no_two_labels_share_a_file_even_ignoring_case():
    labels = ["a/b", "a_b", "a:b", "Apple", "apple", "APPLE", "..", "_"]
    names = safe_names(labels)
    assert len({n.casefold() for n in names.values()}) == len(labels)
    # Every label in a clash gets a hash of its original name, so none depends on the others' order.
    assert all(names[label].startswith("a_b-") for label in ("a/b", "a_b", "a:b"))
    assert all(names[label].lower().startswith("apple-") for label in ("Apple", "apple", "APPLE"))


def test_float32_values_round_trip_exactly():
    rng = np.random.default_rng(0)
    values = (rng.normal(size=(5, 7)) * 10.0 ** rng.integers(-8, 8, size=(5, 7))).astype(np.float32)
    values[0, 0] = 0.0
    paths = [f's3://b/in/Kiwi, "gold"/{i}.jpg' for i in range(5)]
    data = format_rows(paths, ["Kiwi, \"gold\""] * 5, values, "dim_")
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    assert rows[0] == ["path", "label"] + [f"dim_{i}" for i in range(7)]
    assert [r[0] for r in rows[1:]] == paths and rows[1][1] == 'Kiwi, "gold"'
    parsed = np.array([[np.float32(v) for v in r[2:]] for r in rows[1:]], dtype=np.float32)
    np.testing.assert_array_equal(parsed, values)


def test_errors_csv():
    data = format_errors([("s3://b/a,b.jpg", "a", "empty object (0 bytes)")])
    assert list(csv.reader(io.StringIO(data.decode()))) == [
        ["path", "label", "error"], ["s3://b/a,b.jpg", "a", "empty object (0 bytes)"]]


def test_writer_replaces_an_earlier_run_and_encrypts(s3_mock):
    bucket = unique_bucket()
    s3_mock.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    for key in ["out/features/Old.csv", "out/_SUCCESS", "out/logs/old.log", "out/manifest.json"]:
        s3_mock.put_object(Bucket=bucket, Key=key, Body=b"old")
    writer = OutputWriter(s3_mock, S3Settings(), parse_s3_uri(f"s3://{bucket}/out/"),
                          keep_prefixes=("out/logs/",))
    writer.put("features/New.csv", b"new")
    # While writing, neither the old _SUCCESS nor the old manifest vouches for the prefix.
    assert "Contents" not in s3_mock.list_objects_v2(Bucket=bucket, Prefix="out/_SUCCESS")
    assert "Contents" not in s3_mock.list_objects_v2(Bucket=bucket, Prefix="out/manifest.json")
    stale = writer.finish({"status": "succeeded"})

    keys = sorted(o["Key"] for o in s3_mock.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"])
    assert keys == ["out/_SUCCESS", "out/features/New.csv", "out/logs/old.log", "out/manifest.json"]
    assert stale == ["features/Old.csv"]
    assert json.loads(s3_mock.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read()) == {
        "status": "succeeded",
        "files": {"features/New.csv": {"bytes": 3, "sha256": hashlib.sha256(b"new").hexdigest()}}}
    for key in ["out/_SUCCESS", "out/features/New.csv", "out/manifest.json"]:
        assert s3_mock.head_object(Bucket=bucket, Key=key)["ServerSideEncryption"] == "AES256"


def test_pca_model_bytes_are_reproducible_and_load_with_numpy():
    from extractor.results.pca import fit_pca
    from extractor.results.outputs import pca_model_bytes

    model = fit_pca(np.random.default_rng(0).normal(size=(20, 6)), k=3)
    first = pca_model_bytes(model)
    assert first == pca_model_bytes(model)
    loaded = np.load(io.BytesIO(first))
    np.testing.assert_array_equal(loaded["components"], model.components)
    assert sorted(loaded.files) == ["components", "explained_variance", "explained_variance_ratio", "mean"]


def test_kms_encryption_arguments():
    assert S3Settings(sse_kms_key_id="arn:key").encryption_args() == {
        "ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "arn:key"}
