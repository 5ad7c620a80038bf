import hashlib

import boto3
import numpy as np
import pytest
from botocore.exceptions import ClientError

from extractor.results.formats import PARQUET, read_table
from extractor.storage.multipart import MultipartWriter
from extractor.storage.s3 import S3Settings

from conftest import REGION, unique_bucket

MiB = 2**20


@pytest.fixture
def bucket(s3_mock):
    name = unique_bucket()
    s3_mock.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
    return name


@pytest.fixture
def calls(s3_mock):
    """Operation names the client sends, in order, with UploadPart body sizes."""
    seen = []

    def record(params, model, **_):
        seen.append((model.name, len(params["Body"]) if model.name == "UploadPart" else None))

    s3_mock.meta.events.register("provide-client-params.s3.*", record)
    return seen


def no_object_and_no_upload(client, bucket, key):
    with pytest.raises(ClientError, match="404"):
        client.head_object(Bucket=bucket, Key=key)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    return True


def odd_chunks(payload, seed=0):
    rng = np.random.default_rng(seed)
    start = 0
    while start < len(payload):
        size = int(rng.integers(1, 700_001))
        yield payload[start:start + size]
        start += size


def test_large_payload_goes_up_in_parts_of_part_size(s3_mock, bucket, calls):
    payload = np.random.default_rng(1).bytes(12 * MiB)
    with MultipartWriter(s3_mock, S3Settings(), bucket, "out/big.bin", part_size=5 * MiB) as sink:
        for chunk in odd_chunks(payload):
            assert sink.write(chunk) == len(chunk)
        assert sink.tell() == len(payload)
    assert [size for name, size in calls if name == "UploadPart"] == [5 * MiB, 5 * MiB, 2 * MiB]
    assert not any(name == "PutObject" for name, _ in calls)
    head = s3_mock.head_object(Bucket=bucket, Key="out/big.bin")
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == len(payload)
    assert s3_mock.get_object(Bucket=bucket, Key="out/big.bin")["Body"].read() == payload
    assert sink.nbytes == len(payload) and sink.sha256 == hashlib.sha256(payload).hexdigest()
    assert s3_mock.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_small_payload_is_one_put_object(s3_mock, bucket, calls):
    with MultipartWriter(s3_mock, S3Settings(), bucket, "out/small.csv", "text/csv", part_size=5 * MiB) as sink:
        sink.write(b"path,label\n")
        sink.write(memoryview(b"a,b\n"))
    assert [name for name, _ in calls] == ["PutObject"]
    head = s3_mock.head_object(Bucket=bucket, Key="out/small.csv")
    assert "-" not in head["ETag"] and head["ContentType"] == "text/csv"
    assert s3_mock.get_object(Bucket=bucket, Key="out/small.csv")["Body"].read() == b"path,label\na,b\n"
    assert (sink.nbytes, sink.sha256) == (15, hashlib.sha256(b"path,label\na,b\n").hexdigest())


def test_empty_payload_is_an_empty_object(s3_mock, bucket):
    with MultipartWriter(s3_mock, S3Settings(), bucket, "out/empty") as sink:
        pass
    assert s3_mock.get_object(Bucket=bucket, Key="out/empty")["Body"].read() == b""
    assert sink.sha256 == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("written", [100, 6 * MiB], ids=["buffered", "parts-uploaded"])
def test_exception_inside_with_leaves_no_object_and_no_pending_upload(s3_mock, bucket, calls, written):
    with pytest.raises(RuntimeError, match="boom"):
        with MultipartWriter(s3_mock, S3Settings(), bucket, "out/x.bin", part_size=5 * MiB) as sink:
            sink.write(b"x" * written)
            raise RuntimeError("boom")
    assert ("UploadPart", 5 * MiB) in calls if written > 5 * MiB else not calls
    assert no_object_and_no_upload(s3_mock, bucket, "out/x.bin")
    with pytest.raises(ValueError, match="closed"):
        sink.write(b"more")


def test_failed_part_upload_aborts_at_once(s3_mock, bucket):
    def fail_second_part(params, **_):
        if params["PartNumber"] == 2:
            raise ConnectionError("network gone")

    s3_mock.meta.events.register("provide-client-params.s3.UploadPart", fail_second_part)
    sink = MultipartWriter(s3_mock, S3Settings(), bucket, "out/x.bin", part_size=5 * MiB)
    sink.write(b"a" * 5 * MiB)
    with pytest.raises(ConnectionError):
        sink.write(b"b" * 5 * MiB)
    # Not even inside a `with`: the writer gave up by itself and cannot complete a corrupt object.
    assert no_object_and_no_upload(s3_mock, bucket, "out/x.bin")
    with pytest.raises(ValueError, match="closed"):
        sink.write(b"c")


@pytest.mark.parametrize("size", [1000, 6 * MiB], ids=["put_object", "multipart"])
@pytest.mark.parametrize("kms", [False, True], ids=["sse-s3", "sse-kms"])
def test_encryption_is_the_settings_one(s3_mock, bucket, size, kms):
    key_id = boto3.client("kms", region_name=REGION).create_key()["KeyMetadata"]["KeyId"] if kms else None
    with MultipartWriter(s3_mock, S3Settings(sse_kms_key_id=key_id), bucket, "out/e.bin",
                         part_size=5 * MiB) as sink:
        sink.write(b"e" * size)
    head = s3_mock.head_object(Bucket=bucket, Key="out/e.bin")
    assert head["ETag"].strip('"').endswith("-2") == (size > 5 * MiB)
    if kms:
        assert head["ServerSideEncryption"] == "aws:kms" and key_id in head["SSEKMSKeyId"]
    else:
        assert head["ServerSideEncryption"] == "AES256" and "SSEKMSKeyId" not in head


def test_parquet_assembled_through_the_writer(s3_mock, bucket):
    rng = np.random.default_rng(2)
    n, d = 600, 4096
    paths = [f"s3://b/in/Pêche/{i}.jpg" for i in range(n)]
    labels = ["Pêche"] * n
    matrix = rng.normal(size=(n, d)).astype(np.float32)
    parts = (PARQUET.part(paths[i:i + 100], labels[i:i + 100], matrix[i:i + 100], "dim_") for i in range(0, n, 100))
    with MultipartWriter(s3_mock, S3Settings(), bucket, "out/features/Pêche.parquet", PARQUET.content_type,
                         part_size=5 * MiB) as sink:
        PARQUET.assemble(parts, sink, "dim_", d)
    assert sink.nbytes > 5 * MiB
    body = s3_mock.get_object(Bucket=bucket, Key="out/features/Pêche.parquet")["Body"].read()
    assert len(body) == sink.nbytes and hashlib.sha256(body).hexdigest() == sink.sha256
    got_paths, got_labels, got_matrix = read_table(body, PARQUET)
    assert got_paths == paths and got_labels == labels
    np.testing.assert_array_equal(got_matrix, matrix)


def test_arguments_are_checked(s3_mock):
    for part_size in (5 * MiB - 1, 0, 5.5 * MiB, "8MiB"):
        with pytest.raises(ValueError, match=f"got {part_size!r}"):
            MultipartWriter(s3_mock, S3Settings(), "b", "k", part_size=part_size)
    with pytest.raises(ValueError, match="key must be a non-empty string, got ''"):
        MultipartWriter(s3_mock, S3Settings(), "b", "")


def test_file_object_interface():
    sink = MultipartWriter(None, S3Settings(), "b", "k")
    assert sink.writable() and not sink.readable() and not sink.seekable() and not sink.closed
    sink.write(b"abc")
    sink.flush()
    assert sink.tell() == 3
    sink.abort()  # nothing was sent, so nothing to undo, and no client needed
    assert sink.closed and sink.sha256 is None
    with pytest.raises(ValueError, match="closed"):
        sink.flush()
