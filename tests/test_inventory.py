"""S3 Inventory as the input listing: extractor.storage.inventory reading what extractor.dev.inventory_files
writes the way AWS does, against moto."""

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import re

import pytest

from extractor.dev.inventory_files import inventory_from_bucket, write_inventory
from extractor.errors import JobError
from extractor.storage.inventory import inventory_keys, parse_manifest, read_inventory_file, read_manifest
from extractor.storage.s3 import list_objects

from conftest import REGION, unique_bucket

KEYS = [
    "Test/Apple Braeburn/r_0_100.jpg",
    "Test/Apple Braeburn/r_1_100.jpg",
    "Test/Pêche été/3.JPEG",
    "Test/苹果/一.png",
    "Test/a+b c/plus and space.jpg",
    "Test/a b+c/space and plus.jpg",
    "Test/100%25/literal percent-25.jpg",
    "Test/50% off/x.jpg",
    "Test/#hash/n#1.jpg",
    "Test/comma, folder/a,b.jpg",
    'Test/quo"te/it\'s "q".jpg',
    "Test/deep/er/and/deeper/k.png",
    "Test/tilde~/&amp;?=.jpg",
    "Test/notes.txt",
    "Test/Kiwi/",
    "Training/Lime/l.jpg",
    "root.jpg",
]


@pytest.fixture
def buckets(s3_mock):
    """(client, source bucket filled with KEYS, empty destination bucket)."""
    source, dest = unique_bucket("inv-src"), unique_bucket("inv-dst")
    for name in (source, dest):
        s3_mock.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
    for n, key in enumerate(KEYS):
        s3_mock.put_object(Bucket=source, Key=key, Body=f"body {n} of {key}".encode())
    return s3_mock, source, dest


def listed(client, bucket, prefix=""):
    return sorted((o["Key"], o["ETag"].strip('"')) for o in list_objects(client, bucket, prefix))


def read_all(client, manifest, prefix=None):
    rows = []
    for key, _, _ in manifest.files:
        if prefix is None:
            rows.extend(read_inventory_file(client, manifest, key))
        else:
            rows.extend(inventory_keys(client, manifest, key, prefix))
    return rows


@pytest.mark.parametrize("file_format", ["CSV", "Parquet"])
@pytest.mark.parametrize("versions", [False, True])
def test_round_trip_gives_exactly_what_list_objects_gives(buckets, file_format, versions):
    client, source, dest = buckets
    key = inventory_from_bucket(client, source, dest_bucket=dest, file_format=file_format,
                                rows_per_file=4, versions=versions)
    manifest = read_manifest(client, dest, key)

    assert manifest.file_format == file_format
    assert manifest.source_bucket == source and manifest.destination_bucket == dest
    assert len(manifest.files) > 3  # several data files
    rows = read_all(client, manifest)
    assert len(rows) == len(set(rows))  # no key twice
    assert sorted(rows) == listed(client, source)
    assert {"VersionId", "IsLatest", "IsDeleteMarker"} <= set(manifest.columns) if versions else \
        "IsLatest" not in manifest.columns


def test_versions_filter_drops_old_versions_and_delete_markers(buckets):
    client, source, dest = buckets
    key = inventory_from_bucket(client, source, dest_bucket=dest, versions=True, rows_per_file=5)
    manifest = read_manifest(client, dest, key)
    raw = []
    for file_key, _, _ in manifest.files:
        body = client.get_object(Bucket=dest, Key=file_key)["Body"].read()
        raw.extend(csv.reader(io.StringIO(gzip.decompress(body).decode())))
    col = {name: i for i, name in enumerate(manifest.columns)}
    old = [r for r in raw if r[col["IsLatest"]] == "false"]
    markers = [r for r in raw if r[col["IsDeleteMarker"]] == "true"]
    latest_markers = [r for r in markers if r[col["IsLatest"]] == "true"]
    assert old and markers and latest_markers  # the report really has all three kinds of row to drop
    kept = {k for k, _ in read_all(client, manifest)}
    assert kept == {k for k, _ in listed(client, source)}
    assert not kept & {m[col["Key"]] for m in latest_markers}


def test_csv_is_gzip_quoted_headerless_with_url_encoded_keys(buckets):
    client, source, dest = buckets
    key = inventory_from_bucket(client, source, dest_bucket=dest, dest_prefix="reports", config_id="daily")
    assert re.fullmatch(rf"reports/{source}/daily/\d{{4}}-\d\d-\d\dT\d\d-\d\dZ/manifest\.json", key)
    body = client.get_object(Bucket=dest, Key=key)["Body"].read()
    checksum = client.get_object(Bucket=dest, Key=key.replace(".json", ".checksum"))["Body"].read()
    assert checksum.decode().strip() == hashlib.md5(body).hexdigest()
    data = json.loads(body)
    assert data["destinationBucket"] == f"arn:aws:s3:::{dest}"
    assert isinstance(data["creationTimestamp"], str) and data["creationTimestamp"].isdigit()
    [file] = data["files"]
    assert re.fullmatch(rf"reports/{source}/daily/data/[0-9a-f-]{{36}}\.csv\.gz", file["key"])
    lines = gzip.decompress(client.get_object(Bucket=dest, Key=file["key"])["Body"].read()).decode().splitlines()
    assert len(lines) == len(KEYS)  # no header row
    assert all(line.startswith('"') and line.endswith('"') for line in lines)
    encoded = {next(csv.reader([line]))[1] for line in lines}
    assert "Test/a%2Bb+c/plus+and+space.jpg" in encoded  # a space is '+', a '+' is %2B
    assert "Test/100%2525/literal+percent-25.jpg" in encoded
    manifest = parse_manifest(body)
    assert dict(read_inventory_file(client, manifest, file["key"]))["Test/a+b c/plus and space.jpg"]


def test_parquet_has_aws_columns_and_plain_keys(buckets):
    import pyarrow.parquet as pq

    client, source, dest = buckets
    key = inventory_from_bucket(client, source, dest_bucket=dest, file_format="Parquet", versions=True)
    manifest = read_manifest(client, dest, key)
    [(file_key, _, _)] = manifest.files
    assert file_key.endswith(".parquet")
    table = pq.read_table(io.BytesIO(client.get_object(Bucket=dest, Key=file_key)["Body"].read()))
    assert table.column_names[:6] == ["bucket", "key", "version_id", "is_latest", "is_delete_marker", "size"]
    assert "e_tag" in table.column_names and str(table.schema.field("last_modified_date").type).startswith("timestamp[ms")
    assert "Test/a+b c/plus and space.jpg" in table.column("key").to_pylist()
    assert manifest.columns[:3] == ["Bucket", "Key", "VersionId"] and "ETag" in manifest.columns


@pytest.mark.parametrize("file_format", ["CSV", "Parquet"])
def test_prefix_filter(buckets, file_format):
    client, source, dest = buckets
    manifest = read_manifest(client, dest, inventory_from_bucket(client, source, dest_bucket=dest,
                                                                 file_format=file_format, rows_per_file=3))
    assert sorted(read_all(client, manifest, "Test/Apple Braeburn/")) == listed(client, source, "Test/Apple Braeburn/")
    assert sorted(read_all(client, manifest, "Training/")) == listed(client, source, "Training/")
    assert read_all(client, manifest, "Nothing/") == []


def test_only_keys_of_a_prefix_are_inventoried_by_inventory_from_bucket(buckets):
    client, source, dest = buckets
    manifest = read_manifest(client, dest, inventory_from_bucket(client, source, "Training/", dest_bucket=dest))
    assert read_all(client, manifest) == listed(client, source, "Training/")


def test_same_bucket_destination_does_not_list_itself(buckets):
    client, source, _ = buckets
    manifest = read_manifest(client, source, inventory_from_bucket(client, source, rows_per_file=2))
    assert sorted(read_all(client, manifest)) == [r for r in listed(client, source) if not r[0].startswith("inventory/")]


@pytest.mark.parametrize("file_format", ["CSV", "Parquet"])
def test_truncated_or_corrupted_file_is_refused_before_any_row(buckets, file_format):
    client, source, dest = buckets
    manifest = read_manifest(client, dest, inventory_from_bucket(client, source, dest_bucket=dest,
                                                                 file_format=file_format))
    [(file_key, _, _)] = manifest.files
    body = client.get_object(Bucket=dest, Key=file_key)["Body"].read()

    client.put_object(Bucket=dest, Key=file_key, Body=body[:-20])
    with pytest.raises(JobError, match=rf"{len(body) - 20} bytes, its manifest says {len(body)}.*truncated"):
        next(read_inventory_file(client, manifest, file_key))

    flipped = body[:40] + bytes([body[40] ^ 0xFF]) + body[41:]
    client.put_object(Bucket=dest, Key=file_key, Body=flipped)
    with pytest.raises(JobError, match=f"MD5 {hashlib.md5(flipped).hexdigest()}.*corrupted"):
        next(read_inventory_file(client, manifest, file_key))


def test_rows_of_another_bucket_are_an_error(buckets):
    client, source, dest = buckets
    manifest = read_manifest(client, dest, inventory_from_bucket(client, source, dest_bucket=dest))
    wrong = dataclasses.replace(manifest, source_bucket="someone-elses-bucket")
    with pytest.raises(JobError, match=f"lists s3://{source}/.*for bucket 'someone-elses-bucket'"):
        list(read_inventory_file(client, wrong, manifest.files[0][0]))


def test_a_file_not_in_the_manifest_is_refused(buckets):
    client, source, dest = buckets
    manifest = read_manifest(client, dest, inventory_from_bucket(client, source, dest_bucket=dest))
    with pytest.raises(ValueError, match="not one of the manifest's 1 data files"):
        next(read_inventory_file(client, manifest, "elsewhere/data/x.csv.gz"))


def test_empty_bucket_gives_a_manifest_without_files(buckets):
    client, _, dest = buckets
    empty = unique_bucket("inv-empty")
    client.create_bucket(Bucket=empty, CreateBucketConfiguration={"LocationConstraint": REGION})
    manifest = read_manifest(client, dest, inventory_from_bucket(client, empty, dest_bucket=dest))
    assert manifest.files == [] and read_all(client, manifest) == []


# The manifests of AWS's own examples (S3 User Guide, "Locating your inventory list"), one with the
# Parquet schema spelled as newer reports spell it (STRING, TIMESTAMP(MILLIS,true)).
def aws_manifest(**changes):
    data = {"sourceBucket": "example-source-bucket",
            "destinationBucket": "arn:aws:s3:::example-inventory-destination-bucket",
            "version": "2016-11-30", "creationTimestamp": "1514944800000", "fileFormat": "CSV",
            "fileSchema": "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, "
                          "StorageClass, IsMultipartUploaded, ReplicationStatus, EncryptionStatus",
            "files": [{"key": "Inventory/example-source-bucket/2016-11-06T21-32Z/files/939c6d46.csv.gz",
                       "size": 2147483647, "MD5checksum": "f11166069f1990abeb9c97ace9cdfabc"}]}
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not None}).encode()


def test_parses_aws_example_manifests():
    manifest = parse_manifest(aws_manifest())
    assert manifest.destination_bucket == "example-inventory-destination-bucket"
    assert manifest.created == 1514944800000 and manifest.file_format == "CSV"
    assert manifest.columns[:4] == ["Bucket", "Key", "VersionId", "IsLatest"]
    assert manifest.files == [("Inventory/example-source-bucket/2016-11-06T21-32Z/files/939c6d46.csv.gz",
                               2147483647, "f11166069f1990abeb9c97ace9cdfabc")]
    schema = ("message s3.inventory {  required binary bucket (STRING);  required binary key (STRING);  "
              "optional binary version_id (STRING);  optional boolean is_latest;  optional int64 size;  "
              "optional int64 last_modified_date (TIMESTAMP(MILLIS,true));  optional binary e_tag (STRING);  "
              "optional boolean is_multipart_uploaded;  optional binary bucket_key_status (STRING);}")
    parquet = parse_manifest(aws_manifest(fileFormat="Parquet", fileSchema=schema))
    assert parquet.columns == ["Bucket", "Key", "VersionId", "IsLatest", "Size", "LastModifiedDate", "ETag",
                               "IsMultipartUploaded", "BucketKeyStatus"]


def test_orc_is_refused_with_what_to_do():
    orc = aws_manifest(fileFormat="ORC", fileSchema="struct<bucket:string,key:string,e_tag:string>")
    with pytest.raises(ValueError, match="ORC.*only CSV and Parquet.*configure the inventory"):
        parse_manifest(orc)


@pytest.mark.parametrize("changes,message", [
    ({"fileSchema": None}, "lacks fileSchema"),
    ({"files": None, "sourceBucket": None}, "lacks sourceBucket, files"),
    ({"fileFormat": "Avro"}, "unknown fileFormat 'Avro'"),
    ({"fileSchema": "Bucket, Size, ETag"}, "no Bucket and Key columns"),
    ({"destinationBucket": "arn:aws:s3:::b/prefix"}, "destinationBucket"),
    ({"creationTimestamp": "yesterday"}, "creationTimestamp or files malformed"),
    ({"files": [{"key": "a.csv.gz"}]}, "creationTimestamp or files malformed"),
])
def test_bad_manifests_are_refused_naming_what_is_wrong(changes, message):
    with pytest.raises(ValueError, match=message):
        parse_manifest(aws_manifest(**changes), source="s3://b/m/manifest.json")


def test_not_a_manifest_at_all(buckets):
    client, _, dest = buckets
    client.put_object(Bucket=dest, Key="m/manifest.json", Body=b"<html>")
    with pytest.raises(ValueError, match=f"s3://{dest}/m/manifest.json is not JSON"):
        read_manifest(client, dest, "m/manifest.json")
    with pytest.raises(ValueError, match="JSON list, not"):
        parse_manifest(b"[]")


def test_write_inventory_refuses_bad_options(s3_mock):
    with pytest.raises(ValueError, match="file_format"):
        write_inventory(s3_mock, source_bucket="a", dest_bucket="b", dest_prefix="", objects=[], file_format="ORC")
