"""Right to be forgotten: erase photos from the input and their rows from a run's outputs.

    python -m extractor.forget --input s3://b/in/ --output s3://b/out/ \\
        --key s3://b/in/Apple/photo.jpg [--key ...] [--request-id ID] [--dry-run]

For each photo key: every version of the object is deleted (a versioned bucket keeps the bytes
otherwise), its rows are removed from ``features/*.csv``, ``pca/*.csv`` and ``errors.csv`` (every
other byte kept), ``manifest.json``'s counts are decremented, and one JSON line goes to the audit
log (default ``<output>audit/erasures.jsonl``, which re-runs of the job keep). The audit log stores
the sha256 of the photo's URI, never the URI: a file name can be personal data.

Not redone: ``pca_model.npz`` (mean and components) and ``explained_variance.png`` are aggregates
over all images and are not refitted; a re-run of the job refits them without the photo.

Everything is read and checked before anything is changed; a failure part-way leaves a state
that the same command, run again, completes (it only removes what is still there). Do not run it
while the job is writing the same output: a job finishing afterwards would bring the rows back.

Exit status: 0 done, 1 an S3 failure (one line on stderr), 2 bad arguments (nothing touched).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import sys
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

from .errors import JobError
from .outputs import AUDIT_FOLDER
from .errors import OneLineParser
from .s3 import (S3Location, S3Settings, delete_objects, describe_s3_error, list_keys, parse_s3_uri,
                 put_bytes)

DEFAULT_AUDIT_NAME = "erasures.jsonl"
MANIFEST = "manifest.json"
# The CSVs that name input photos in their first column (relative to the output prefix).
_CSV_NAME = re.compile(r"(features|pca)/[^/]+\.csv|errors\.csv")


# --- pure text handling --------------------------------------------------------------------

def _records(text: str):
    """Yield the CSV records of ``text`` with their line endings, '' + ... == text.

    A record ends at a newline where the number of '"' seen in the record so far is even, so a
    quoted field may hold newlines. Splitting on '\\n' and counting quotes per piece keeps the
    work in C (feature rows are tens of kB each).
    """
    pieces = text.split("\n")
    record, quotes = [], 0
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        record.append(piece if last else piece + "\n")
        quotes += piece.count('"')
        if quotes % 2 == 0 or last:
            joined = "".join(record)
            if joined:
                yield joined
            record, quotes = [], 0


def _first_field(record: str) -> str:
    """The unquoted value of the record's first field."""
    if not record.startswith('"'):
        return record.split(",", 1)[0].rstrip("\r\n")
    parts, start = [], 1
    while True:
        end = record.find('"', start)
        if end == -1:  # unterminated quote: take what there is, it will match no path
            parts.append(record[start:])
            return "".join(parts)
        if record.startswith('""', end):
            parts.append(record[start:end] + '"')
            start = end + 2
        else:
            parts.append(record[start:end])
            return "".join(parts)


def _split_out(text: str, paths: set[str]) -> tuple[str, list[str]]:
    """(text without the matching records, the removed records); the header always stays."""
    kept, removed = [], []
    for index, record in enumerate(_records(text)):
        if index > 0 and _first_field(record) in paths:
            removed.append(record)
        else:
            kept.append(record)
    return "".join(kept), removed


def remove_rows(text: str, paths: set[str]) -> tuple[str, int]:
    """Remove the records whose first field equals one of ``paths``; every other byte is kept.

    The first record is the header and is never removed. Returns (new text, records removed).
    """
    new_text, removed = _split_out(text, paths)
    return new_text, len(removed)


def _label_of(record: str) -> str | None:
    """The second field (label) of one CSV record, or None if it has none."""
    fields = next(csv.reader(io.StringIO(record)), [])
    return fields[1] if len(fields) > 1 else None


def key_sha256(uri: str) -> str:
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()


def check_locations(input_loc: S3Location, output_loc: S3Location, key_uris: list[str],
                    audit_location: S3Location) -> list[str]:
    """Refuse anything that could write or delete outside what was asked; returns the key URIs,
    deduplicated in order. ValueError says what was received."""
    if not output_loc.prefix:
        raise ValueError(f"--output needs a prefix, not a whole bucket, got {output_loc.uri!r}")
    if input_loc.contains(output_loc) or output_loc.contains(input_loc):
        raise ValueError(f"--output {output_loc.uri} and --input {input_loc.uri} overlap")
    if not key_uris:
        raise ValueError("no --key given")
    uris = []
    for uri in key_uris:
        loc = parse_s3_uri(uri, folder=False)
        if loc.bucket != input_loc.bucket or not loc.prefix.startswith(input_loc.prefix) \
                or loc.prefix == input_loc.prefix:
            raise ValueError(f"--key {uri!r} is not an object under --input {input_loc.uri}")
        if loc.prefix.endswith("/"):
            raise ValueError(f"--key {uri!r} is a folder, not a photo")
        if loc.uri not in uris:
            uris.append(loc.uri)
    # Only <output>audit/ survives a re-run of the job; an audit log elsewhere would be deleted.
    audit_folder = output_loc.prefix + AUDIT_FOLDER
    if audit_location.bucket != output_loc.bucket or not audit_location.prefix.startswith(audit_folder) \
            or audit_location.prefix.endswith("/"):
        raise ValueError(f"--audit-log must be an object under s3://{output_loc.bucket}/{audit_folder} "
                         f"(kept by re-runs of the job), got {audit_location.uri!r}")
    return uris


# --- S3 ------------------------------------------------------------------------------------

@contextmanager
def _s3_step(what: str):
    """Turn a botocore failure into a one-line JobError naming the step."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise JobError(describe_s3_error(exc, what)) from exc


def _is_missing(exc) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey")


def _get(client, bucket: str, key: str) -> tuple[bytes, str] | None:
    """(body, content type) of an object, or None if it does not exist."""
    from botocore.exceptions import ClientError

    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _is_missing(exc):
            return None
        raise
    return response["Body"].read(), response.get("ContentType") or ""


def _bucket_versioned(client, bucket: str) -> bool:
    # "Suspended" still keeps the versions written while it was enabled.
    return client.get_bucket_versioning(Bucket=bucket).get("Status") in ("Enabled", "Suspended")


def _photo_versions(client, bucket: str, key: str, versioned: bool) -> tuple[bool, list[dict]]:
    """(whether the object exists now, the {Key, VersionId} to delete; VersionId absent if unversioned)."""
    from botocore.exceptions import ClientError

    if not versioned:
        try:
            client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                return False, []
            raise
        return True, [{"Key": key}]
    exists, targets = False, []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=key):
        # Prefix also matches photo.jpg.bak: keep the exact key only.
        for version in page.get("Versions", ()):
            if version["Key"] == key:
                exists = exists or version.get("IsLatest", False)
                targets.append({"Key": key, "VersionId": version["VersionId"]})
        for marker in page.get("DeleteMarkers", ()):
            if marker["Key"] == key:
                targets.append({"Key": key, "VersionId": marker["VersionId"]})
    return exists, targets


def _update_manifest(manifest: dict, removed: dict[str, dict[str, list[str]]], at: str,
                     request_id: str) -> bool:
    """Decrement the counts for each photo whose rows were removed and append to ``erasures``.

    ``removed`` is uri -> {relative file: removed records}. A photo in features/ or pca/ was
    featurized, one in errors.csv failed; its label is the record's second field.
    Returns whether anything changed.
    """
    counts = manifest.get("counts")
    counts = counts if isinstance(counts, dict) else {}
    per_fruit = counts.get("per_fruit")
    per_fruit = per_fruit if isinstance(per_fruit, dict) else {}
    changed = False
    for uri, by_file in removed.items():
        if not by_file:
            continue
        outcomes = {}
        for relative, records in sorted(by_file.items()):
            outcome = "failed" if relative == "errors.csv" else "featurized"
            outcomes.setdefault(outcome, _label_of(records[0]))
        for field in ["listed", *outcomes]:
            _decrement(counts, field)
        for field, label in outcomes.items():
            if isinstance(per_fruit.get(label), dict):
                _decrement(per_fruit[label], field)
        manifest.setdefault("erasures", []).append(
            {"at": at, "key_sha256": key_sha256(uri), "request_id": request_id})
        changed = True
    return changed


def _decrement(counts: dict, field: str) -> None:
    # Never below zero: a count already adjusted by hand must not turn negative.
    if isinstance(counts.get(field), int) and counts[field] > 0:
        counts[field] -= 1


def forget(client, settings: S3Settings, input_loc: S3Location, output_loc: S3Location,
           key_uris: list[str], audit_location: S3Location, request_id: str,
           dry_run: bool = False, now: datetime | None = None) -> dict:
    """Erase the photos and their rows; returns a report (with the raw URIs, for the operator).

    All reads come first, so a read failure changes nothing; then CSVs, manifest, photos and
    the audit log are written in that order. With ``dry_run`` nothing is written.
    """
    uris = check_locations(input_loc, output_loc, key_uris, audit_location)
    at = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    warnings = []

    with _s3_step(f"checking versioning of bucket {input_loc.bucket}"):
        input_versioned = _bucket_versioned(client, input_loc.bucket)
    photos = {}
    for uri in uris:
        key = parse_s3_uri(uri, folder=False).prefix
        with _s3_step(f"looking up {uri}"):
            photos[uri] = _photo_versions(client, input_loc.bucket, key, input_versioned)

    paths = set(uris)
    removed: dict[str, dict[str, list[str]]] = {uri: {} for uri in uris}
    rewrites = {}  # relative -> (new body, content type)
    with _s3_step(f"listing {output_loc.uri}"):
        keys = list(list_keys(client, output_loc.bucket, output_loc.prefix))
    for key in keys:
        relative = key[len(output_loc.prefix):]
        if not _CSV_NAME.fullmatch(relative):
            continue
        with _s3_step(f"reading s3://{output_loc.bucket}/{key}"):
            found = _get(client, output_loc.bucket, key)
        if found is None:  # deleted since the listing
            continue
        body, content_type = found
        # surrogateescape: any byte that is not UTF-8 goes back out unchanged.
        new_text, records = _split_out(body.decode("utf-8", "surrogateescape"), paths)
        if not records:
            continue
        for record in records:
            removed[_first_field(record)].setdefault(relative, []).append(record)
        rewrites[relative] = (new_text.encode("utf-8", "surrogateescape"), content_type or "text/csv")

    manifest_body = None
    manifest_key = output_loc.key(MANIFEST)
    if rewrites:
        with _s3_step(f"reading s3://{output_loc.bucket}/{manifest_key}"):
            found = _get(client, output_loc.bucket, manifest_key)
        if found is not None:
            try:
                manifest = json.loads(found[0].decode("utf-8"))
            except ValueError as exc:
                raise JobError(f"s3://{output_loc.bucket}/{manifest_key} is not valid JSON: {exc}") from exc
            if isinstance(manifest, dict) and _update_manifest(manifest, removed, at, request_id):
                manifest_body = json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8")
        with _s3_step(f"checking versioning of bucket {output_loc.bucket}"):
            if _bucket_versioned(client, output_loc.bucket):
                warnings.append(f"bucket {output_loc.bucket} is versioned: earlier versions of the "
                                f"rewritten files still hold the removed rows until they are deleted")

    lines = []
    for uri in uris:
        existed, targets = photos[uri]
        lines.append(json.dumps({
            "at": at, "request_id": request_id, "input": input_loc.uri, "output": output_loc.uri,
            "key_sha256": key_sha256(uri), "object_existed": existed, "versions_deleted": len(targets),
            "files_rewritten": {rel: len(recs) for rel, recs in sorted(removed[uri].items())},
        }, ensure_ascii=False))
    with _s3_step(f"reading {audit_location.uri}"):
        audit = _get(client, audit_location.bucket, audit_location.prefix)

    if not dry_run:
        for relative, (body, content_type) in sorted(rewrites.items()):
            with _s3_step(f"writing {output_loc.uri}{relative}"):
                put_bytes(client, settings, output_loc.bucket, output_loc.key(relative), body, content_type)
        if manifest_body is not None:
            with _s3_step(f"writing s3://{output_loc.bucket}/{manifest_key}"):
                put_bytes(client, settings, output_loc.bucket, manifest_key, manifest_body, "application/json")
        for uri in uris:
            _, targets = photos[uri]
            with _s3_step(f"deleting {uri}"):
                if input_versioned:
                    delete_objects(client, input_loc.bucket, targets)
                elif targets:
                    client.delete_object(Bucket=input_loc.bucket, Key=targets[0]["Key"])
        old_text, content_type = (audit[0].decode("utf-8", "surrogateescape"), audit[1]) if audit else ("", "")
        if old_text and not old_text.endswith("\n"):
            old_text += "\n"
        new_audit = (old_text + "".join(line + "\n" for line in lines)).encode("utf-8", "surrogateescape")
        with _s3_step(f"writing {audit_location.uri}"):
            put_bytes(client, settings, audit_location.bucket, audit_location.prefix, new_audit,
                      content_type or "application/x-ndjson")

    return {
        "request_id": request_id,
        "dry_run": dry_run,
        "at": at,
        "input": input_loc.uri,
        "output": output_loc.uri,
        "audit_log": audit_location.uri,
        "keys": [{"uri": uri, "key_sha256": key_sha256(uri), "object_existed": photos[uri][0],
                  "versions_deleted": len(photos[uri][1]),
                  "files_rewritten": {rel: len(recs) for rel, recs in sorted(removed[uri].items())}}
                 for uri in uris],
        "files_rewritten": sorted(rewrites),
        "manifest_updated": manifest_body is not None,
        "warnings": warnings,
    }


def format_summary(report: dict) -> str:
    """A few lines for the operator: per key, the photo and the rows removed."""
    would = report["dry_run"]
    lines = [f"erasure {report['request_id']}" + (" (dry run: nothing changed)" if would else "")]
    for entry in report["keys"]:
        lines.append(entry["uri"])
        if entry["object_existed"] or entry["versions_deleted"]:
            verb = "would be deleted" if would else "deleted"
            lines.append(f"  photo: {verb} ({entry['versions_deleted']} version(s))"
                         + ("" if entry["object_existed"] else ", no current version"))
        else:
            lines.append("  photo: not found in the input")
        if entry["files_rewritten"]:
            rows = ", ".join(f"{rel} {n}" for rel, n in entry["files_rewritten"].items())
            lines.append(f"  rows {'to remove' if would else 'removed'}: {rows}")
        else:
            lines.append("  rows: none found in the outputs")
        if not entry["object_existed"] and not entry["versions_deleted"] and not entry["files_rewritten"]:
            lines.append("  found nowhere (still recorded in the audit log)")
    if report["manifest_updated"]:
        lines.append(f"{MANIFEST}: counts {'to decrement' if would else 'decremented'}")
    target = "would append" if would else "appended"
    lines.append(f"audit log: {target} {len(report['keys'])} line(s) to {report['audit_log']}")
    lines.append("pca_model.npz is not refitted; re-run the job to refit it without these photos")
    lines.extend(f"warning: {w}" for w in report["warnings"])
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m extractor.forget",
        description="Erase photos (right to be forgotten): delete every version of each photo, "
                    "remove its rows from the run's CSVs and counts, and log the erasure.",
    )
    parser.add_argument("--input", required=True, metavar="S3_URI", help="the job's --input prefix")
    parser.add_argument("--output", required=True, metavar="S3_URI", help="the job's --output prefix")
    parser.add_argument("--key", required=True, action="append", metavar="S3_URI", dest="keys",
                        help="s3://bucket/key of a photo under --input; repeat for several")
    parser.add_argument("--audit-log", default=None, metavar="S3_URI",
                        help=f"JSON-lines audit log (default: <output>{AUDIT_FOLDER}{DEFAULT_AUDIT_NAME}); "
                             f"must lie under <output>{AUDIT_FOLDER}")
    parser.add_argument("--request-id", default=None,
                        help="the request's reference, stored in the audit log (default: a new UUID)")
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--region", default=None, help="AWS region (default: boto3's own resolution)")
    parser.add_argument("--sse-kms-key-id", default=None,
                        help="encrypt rewritten objects with this KMS key (default: SSE-S3, AES256)")
    parser.add_argument("--dry-run", action="store_true", help="show what would be done, change nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        input_loc = parse_s3_uri(args.input)
        output_loc = parse_s3_uri(args.output)
        audit_location = (parse_s3_uri(args.audit_log, folder=False) if args.audit_log else
                          S3Location(output_loc.bucket, output_loc.prefix + AUDIT_FOLDER + DEFAULT_AUDIT_NAME))
        key_uris = check_locations(input_loc, output_loc, args.keys, audit_location)
        request_id = args.request_id if args.request_id is not None else uuid.uuid4().hex
        if not request_id.strip() or any(ord(c) < 32 for c in request_id) or len(request_id) > 200:
            raise ValueError(f"--request-id must be one line of at most 200 characters, got {request_id!r}")
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: error() exits
    settings = S3Settings(endpoint_url=args.endpoint_url or None, region=args.region,
                          sse_kms_key_id=args.sse_kms_key_id)
    try:
        report = forget(settings.client(), settings, input_loc, output_loc, key_uris, audit_location,
                        request_id, dry_run=args.dry_run)
    except JobError as exc:
        # The audit line is written last: a re-run finishes the erasure and records it.
        print(f"forget: {exc}; re-running the same command is safe", file=sys.stderr)
        return 1
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
