"""Read an AWS S3 Inventory report (manifest.json and its CSV or Parquet data files) as the
job's input listing: the documented way to enumerate hundreds of millions of objects.

Format (AWS S3 User Guide, "Locating your inventory list" and "Amazon S3 Inventory list"):
manifest.json names sourceBucket, destinationBucket (an ARN), creationTimestamp (ms since the
epoch, a string), fileFormat, fileSchema and files [{key, size, MD5checksum}], keys relative to
the destination bucket. CSV files are gzip, no header, the columns in fileSchema's order, and
keys URL-encoded (space as '+'); Parquet columns are lower_snake (e_tag, is_latest, ...) and keys
are plain. With "IncludedObjectVersions: All" there is a row per version and per delete marker.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import tempfile
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import unquote_plus

from extractor.errors import JobError

FORMATS = ("CSV", "Parquet")
REQUIRED_FIELDS = ("sourceBucket", "destinationBucket", "creationTimestamp", "fileFormat", "fileSchema", "files")
CHUNK = 1 << 20  # bytes per read while downloading a data file
PARQUET_BATCH = 65_536  # rows per record batch: bounds the Python objects alive at once
ROW_COLUMNS = ("Bucket", "Key", "ETag", "IsLatest", "IsDeleteMarker")   # what a row gives, CSV spelling


@dataclass(frozen=True)
class InventoryManifest:
    """One inventory report. ``columns`` use the CSV spelling (Bucket, Key, ETag, IsLatest, ...)
    whatever the format; ``files`` are (key in destination_bucket, size in bytes, md5 hex);
    ``created`` is when AWS began scanning, in ms since the epoch (UTC)."""

    source_bucket: str
    destination_bucket: str
    file_format: str
    columns: list[str]
    files: list[tuple[str, int, str]]
    created: int


def configuration_folder(manifest_key: str) -> str | None:
    """The inventory configuration's folder of a manifest's key, as AWS lays a report out
    (``<destination prefix>/<source bucket>/<configuration>/<date>/manifest.json`` -> everything up
    to ``<configuration>/``, which also holds every day's ``data/``); None for a key not so laid out."""
    parts = manifest_key.split("/")
    if parts[-1] != "manifest.json" or len(parts) < 3:
        return None
    return "/".join(parts[:-2]) + "/"


def csv_name(name: str) -> str:
    """A Parquet/ORC column name in the CSV spelling: ``e_tag`` -> ``ETag``, ``version_id`` -> ``VersionId``."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_")) if "_" in name or name.islower() else name


def parse_manifest(body: bytes, source: str = "manifest.json") -> InventoryManifest:
    """The manifest in ``body`` (JSON bytes); ValueError naming ``source`` and what is wrong or missing."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{source} is not JSON ({exc}); expected an S3 Inventory manifest.json") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source} holds a JSON {type(data).__name__}, not an S3 Inventory manifest object")
    missing = [name for name in REQUIRED_FIELDS if name not in data]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}: not an S3 Inventory manifest.json? "
                         f"(its fields: {', '.join(sorted(map(str, data))) or 'none'})")
    fmt = data["fileFormat"]
    if fmt == "ORC":
        raise ValueError(f"{source}: the inventory is in ORC, and only CSV and Parquet inventories are read; "
                         f"configure the inventory's output format as CSV or Apache Parquet")
    if fmt not in FORMATS:
        raise ValueError(f"{source}: unknown fileFormat {fmt!r}; expected one of {', '.join(FORMATS)}")
    schema = data["fileSchema"]
    if not isinstance(schema, str) or not schema.strip():
        raise ValueError(f"{source}: fileSchema is empty or not a string: {schema!r}")
    if fmt == "CSV":
        columns = [name.strip() for name in schema.split(",")]
    else:  # "message s3.inventory { required binary bucket (UTF8); optional binary e_tag (STRING); ... }"
        columns = [csv_name(n) for n in re.findall(r"(?:required|optional|repeated)\s+\w+\s+(\w+)", schema)]
    if "Key" not in columns or "Bucket" not in columns:
        raise ValueError(f"{source}: fileSchema has no Bucket and Key columns: {schema!r}")
    destination = str(data["destinationBucket"])
    destination = destination[len("arn:aws:s3:::"):] if destination.startswith("arn:aws:s3:::") else destination
    if not destination or "/" in destination or ":" in destination:
        raise ValueError(f"{source}: destinationBucket {data['destinationBucket']!r} is not an arn:aws:s3:::bucket ARN")
    try:
        created = int(data["creationTimestamp"])
        files = [(str(f["key"]), int(f["size"]), str(f.get("MD5checksum") or "").lower()) for f in data["files"]]
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{source}: creationTimestamp or files malformed ({exc!r}); files must be a list of "
                         f"{{key, size, MD5checksum}}, got {str(data['files'])[:200]}") from None
    return InventoryManifest(str(data["sourceBucket"]), destination, fmt, columns, files, created)


def read_manifest(client, bucket: str, key: str) -> InventoryManifest:
    """GET ``s3://bucket/key`` (a manifest.json) and parse it."""
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return parse_manifest(body, source=f"s3://{bucket}/{key}")


def _download_checked(client, manifest: InventoryManifest, file_key: str):
    """The data file in a temporary file (caller closes it), after its size and MD5 matched the manifest:
    no row of a truncated or corrupted copy is ever yielded. Memory: one chunk."""
    entry = next((f for f in manifest.files if f[0] == file_key), None)
    if entry is None:
        raise ValueError(f"{file_key!r} is not one of the manifest's {len(manifest.files)} data files")
    _, size, md5 = entry
    where = f"s3://{manifest.destination_bucket}/{file_key}"
    digest, nbytes = hashlib.md5(), 0
    handle = tempfile.TemporaryFile()
    try:
        body = client.get_object(Bucket=manifest.destination_bucket, Key=file_key)["Body"]
        for chunk in body.iter_chunks(CHUNK):
            digest.update(chunk)
            nbytes += len(chunk)
            handle.write(chunk)
        if nbytes != size:
            raise JobError(f"inventory data file {where} has {nbytes} bytes, its manifest says {size}: "
                           f"truncated or replaced copy")
        if md5 and digest.hexdigest() != md5:
            raise JobError(f"inventory data file {where} has MD5 {digest.hexdigest()}, its manifest says {md5}: "
                           f"corrupted or replaced copy")
        handle.seek(0)
        return handle
    except BaseException:
        handle.close()
        raise


def _csv_rows(handle, columns: list[str], where: str) -> Iterator[tuple[str, str, str, str, str]]:
    """(bucket, key URL-decoded, etag, is_latest, is_delete_marker) per row; absent columns give ''."""
    index = {name: i for i, name in enumerate(columns)}
    picks = [index.get(name) for name in ROW_COLUMNS]
    with io.TextIOWrapper(gzip.GzipFile(fileobj=handle), encoding="utf-8", newline="") as text:
        for number, row in enumerate(csv.reader(text), 1):
            if not row:
                continue  # AWS may end a file with blank lines
            if len(row) != len(columns):
                raise JobError(f"inventory data file {where} row {number} has {len(row)} fields, "
                               f"fileSchema names {len(columns)}")
            bucket, key, etag, latest, marker = ("" if i is None else row[i] for i in picks)
            yield bucket, unquote_plus(key), etag, latest or "true", marker or "false"


def _parquet_rows(handle, where: str) -> Iterator[tuple[str, str, str, str, str]]:
    """As _csv_rows, from a Parquet file read batch by batch, only the needed columns."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(handle)
    except Exception as exc:  # pyarrow's ArrowInvalid and kin
        raise JobError(f"inventory data file {where} is not a readable Parquet file: {exc}") from None
    present = {csv_name(name): name for name in parquet.schema_arrow.names}
    wanted = [present.get(name) for name in ROW_COLUMNS]
    if wanted[0] is None or wanted[1] is None:
        raise JobError(f"inventory data file {where} has no bucket/key columns: {parquet.schema_arrow.names}")
    names = [name for name in wanted if name is not None]
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, columns=names):
        values = [batch.column(name).to_pylist() if name else None for name in wanted]
        for i in range(batch.num_rows):
            bucket, key, etag, latest, marker = (None if v is None else v[i] for v in values)
            yield (bucket or "", key or "", etag or "", "false" if latest is False else "true",
                   "true" if marker else "false")


def read_inventory_file(client, manifest: InventoryManifest, file_key: str) -> Iterator[tuple[str, str]]:
    """(key, etag without quotes) of each current object listed in one data file of ``manifest``.

    Rows of older versions (IsLatest false) and delete markers are dropped, so a versioned
    inventory gives what ListObjectsV2 would. The file is downloaded to a temporary file and its
    size and MD5 checked first (JobError on mismatch); rows are then streamed. A row of another
    bucket than the manifest's source bucket is a JobError.
    """
    where = f"s3://{manifest.destination_bucket}/{file_key}"
    with _download_checked(client, manifest, file_key) as handle:
        rows = (_csv_rows(handle, manifest.columns, where) if manifest.file_format == "CSV"
                else _parquet_rows(handle, where))
        for bucket, key, etag, latest, marker in rows:
            if bucket != manifest.source_bucket:
                raise JobError(f"inventory data file {where} lists s3://{bucket}/{key}, but the manifest is "
                               f"for bucket {manifest.source_bucket!r}")
            if latest.lower() == "true" and marker.lower() != "true":
                yield key, etag.strip('"')


def inventory_keys(client, manifest: InventoryManifest, file_key: str, prefix: str) -> Iterator[tuple[str, str]]:
    """read_inventory_file, keeping only keys that start with ``prefix`` (the job's --input prefix)."""
    for key, etag in read_inventory_file(client, manifest, file_key):
        if key.startswith(prefix):
            yield key, etag
