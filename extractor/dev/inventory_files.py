"""Write an S3 Inventory report the way AWS writes one, for the tests (moto has no inventory
delivery): manifest.json + manifest.checksum under a timestamped folder, data files
under data/, hive/dt=.../symlink.txt, in CSV (gzip, every field quoted, URL-encoded keys) or
Parquet (Snappy, AWS's lower_snake columns and types). See extractor.storage.inventory for the reader.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import hashlib
import io
import json
import uuid
from typing import Iterable, Iterator
from urllib.parse import quote_plus

from extractor.storage.inventory import FORMATS
from extractor.storage.s3 import list_objects

# (CSV name, Parquet name, Parquet type in the manifest's fileSchema, only with versions=True)
FIELDS = [
    ("Bucket", "bucket", "required binary bucket (UTF8)", False),
    ("Key", "key", "required binary key (UTF8)", False),
    ("VersionId", "version_id", "optional binary version_id (UTF8)", True),
    ("IsLatest", "is_latest", "optional boolean is_latest", True),
    ("IsDeleteMarker", "is_delete_marker", "optional boolean is_delete_marker", True),
    ("Size", "size", "optional int64 size", False),
    ("LastModifiedDate", "last_modified_date", "optional int64 last_modified_date (TIMESTAMP_MILLIS)", False),
    ("ETag", "e_tag", "optional binary e_tag (UTF8)", False),
    ("StorageClass", "storage_class", "optional binary storage_class (UTF8)", False),
]
EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def _fields(versions: bool):
    return [f for f in FIELDS if versions or not f[3]]


def _rows(source_bucket: str, objects: Iterable[dict], versions: bool) -> Iterator[dict]:
    """One dict per inventory row (CSV names); with ``versions``, older versions and delete markers too:
    for every object an older version and an old delete marker under the same key (both not latest),
    and for every third object a deleted sibling key (an old version, then a latest delete marker)."""
    for n, obj in enumerate(objects):
        key = obj["Key"]
        modified = obj.get("LastModified") or EPOCH
        current = {"Bucket": source_bucket, "Key": key, "VersionId": f"v{n}-2", "IsLatest": True,
                   "IsDeleteMarker": False, "Size": int(obj.get("Size", 0)), "LastModifiedDate": modified,
                   "ETag": str(obj.get("ETag", "")).strip('"'), "StorageClass": "STANDARD"}
        if versions:
            older = dict(current, VersionId=f"v{n}-0", IsLatest=False, ETag=hashlib.md5(key.encode()).hexdigest())
            marker = dict(older, VersionId=f"v{n}-1", IsDeleteMarker=True, Size=None, ETag=None, StorageClass=None)
            yield older
            yield marker
        yield current
        if versions and n % 3 == 0:
            folder, _, name = key.rpartition("/")
            gone = f"{folder}/deleted {n} {name}" if folder else f"deleted {n} {name}"
            yield dict(older, Key=gone)
            yield dict(older, Key=gone, VersionId=f"v{n}-g", IsLatest=True, IsDeleteMarker=True,
                       Size=None, ETag=None, StorageClass=None)


def _csv_file(rows: list[dict], fields) -> bytes:
    text = io.StringIO(newline="")
    writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for row in rows:
        values = []
        for name, *_ in fields:
            value = row.get(name)
            if name == "Key":
                value = quote_plus(value, safe="/")  # URL-encoded, space as '+' (as AWS's CSV does)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, dt.datetime):
                value = value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + \
                    f"{value.microsecond // 1000:03d}Z"
            values.append("" if value is None else str(value))
        writer.writerow(values)
    return gzip.compress(text.getvalue().encode("utf-8"))


def _parquet_file(rows: list[dict], fields) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"bucket": pa.string(), "key": pa.string(), "version_id": pa.string(), "is_latest": pa.bool_(),
             "is_delete_marker": pa.bool_(), "size": pa.int64(), "last_modified_date": pa.timestamp("ms", tz="UTC"),
             "e_tag": pa.string(), "storage_class": pa.string()}
    schema = pa.schema([pa.field(snake, types[snake], nullable=not spec.startswith("required"))
                        for _, snake, spec, _ in fields])
    table = pa.table({snake: [row.get(name) for row in rows] for name, snake, _, _ in fields}, schema=schema)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="snappy")
    return sink.getvalue()


def write_inventory(client, *, source_bucket: str, dest_bucket: str, dest_prefix: str, objects: Iterable[dict],
                    file_format: str = "CSV", rows_per_file: int = 1000, versions: bool = False,
                    config_id: str = "inventory", created: dt.datetime | None = None) -> str:
    """Write the inventory of ``objects`` (ListObjectsV2 entries: Key, ETag quoted, Size in bytes,
    LastModified) into ``dest_bucket`` as AWS lays it out, ``rows_per_file`` rows per data file;
    ``versions`` makes it an "IncludedObjectVersions: All" report. Returns the manifest.json key."""
    if file_format not in FORMATS:
        raise ValueError(f"file_format must be {' or '.join(map(repr, FORMATS))}, got {file_format!r}")
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file!r}")
    created = (created or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).replace(second=0, microsecond=0)
    base = "/".join(p for p in (dest_prefix.strip("/"), source_bucket, config_id) if p)
    fields = _fields(versions)
    files, batch = [], []

    def flush():
        body = _csv_file(batch, fields) if file_format == "CSV" else _parquet_file(batch, fields)
        key = f"{base}/data/{uuid.uuid4()}." + ("csv.gz" if file_format == "CSV" else "parquet")
        client.put_object(Bucket=dest_bucket, Key=key, Body=body)
        files.append({"key": key, "size": len(body), "MD5checksum": hashlib.md5(body).hexdigest()})
        batch.clear()

    for row in _rows(source_bucket, objects, versions):
        batch.append(row)
        if len(batch) >= rows_per_file:
            flush()
    if batch:
        flush()
    schema = (", ".join(name for name, *_ in fields) if file_format == "CSV"
              else "message s3.inventory { " + " ".join(spec + ";" for _, _, spec, _ in fields) + " }")
    manifest = json.dumps({
        "sourceBucket": source_bucket, "destinationBucket": f"arn:aws:s3:::{dest_bucket}", "version": "2016-11-30",
        "creationTimestamp": str(int(created.timestamp() * 1000)), "fileFormat": file_format,
        "fileSchema": schema, "files": files}, indent=4).encode()
    folder = f"{base}/{created.strftime('%Y-%m-%dT%H-%MZ')}"
    client.put_object(Bucket=dest_bucket, Key=f"{folder}/manifest.json", Body=manifest)
    client.put_object(Bucket=dest_bucket, Key=f"{folder}/manifest.checksum", Body=hashlib.md5(manifest).hexdigest())
    symlink = "".join(f"s3://{dest_bucket}/{f['key']}\n" for f in files)
    client.put_object(Bucket=dest_bucket, Key=f"{base}/hive/dt={created.strftime('%Y-%m-%d-%H-%M')}/symlink.txt",
                      Body=symlink.encode())
    return f"{folder}/manifest.json"


def inventory_from_bucket(client, bucket: str, prefix: str = "", *, dest_bucket: str | None = None,
                          dest_prefix: str = "inventory", **options) -> str:
    """List ``s3://bucket/prefix`` (a real or moto bucket) and write its inventory into ``dest_bucket``
    (default: the same bucket, as AWS allows); ``options`` go to write_inventory. Returns the manifest key.

    The listing is taken whole before anything is written, so the report never lists itself."""
    return write_inventory(client, source_bucket=bucket, dest_bucket=dest_bucket or bucket, dest_prefix=dest_prefix,
                           objects=list(list_objects(client, bucket, prefix)), **options)
