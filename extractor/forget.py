"""Right to be forgotten: erase photos from the input and their rows from a run's outputs.

    python -m extractor.forget --input s3://b/in/ --output s3://b/out/ \\
        --key s3://b/in/Apple/photo.jpg [--key ...] [--request-id ID] [--dry-run]
        [--state s3://b/state/ | --no-state]

For each photo key: every version of the object is deleted (a versioned bucket keeps the bytes
otherwise), its rows are removed from ``features/*.csv``, ``pca/*.csv`` and ``errors.csv`` (every
other byte kept) or from ``features/*.parquet`` and ``pca/*.parquet`` (rewritten without them),
``manifest.json``'s counts are decremented and its ``files`` entries updated, and one JSON line
goes to the audit log (default ``<output>audit/erasures.jsonl``, which re-runs of the job keep).
The audit log stores the sha256 of the photo's URI, never the URI: a file name can be personal data.

With ``--state`` (the job's ``--incremental --state``), the photo's stored vector is removed too:
each state part whose key range could hold it is rewritten without its rows (an emptied part is
dropped), then ``state.json`` is rewritten. When the manifest records a state and neither
``--state`` nor ``--no-state`` is given, nothing is done: the vectors must not be left silently.

Not redone: ``pca_model.npz`` (mean and components) and ``explained_variance.png`` are aggregates
over all images and are not refitted; a re-run of the job refits them without the photo.

Everything is read and checked before anything is changed; a failure part-way leaves a state
that the same command, run again, completes (it only removes what is still there). Writes go in
this order: output files, manifest, state parts, state.json, photos, audit log. Do not run it
while the job is writing the same output: a job finishing afterwards would bring the rows back.

Exit status: 0 done, 1 an S3 failure (one line on stderr), 2 bad arguments, or a state the
manifest records left unnamed (nothing touched).
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
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone

import numpy as np

from . import state as state_store
from .errors import JobError, OneLineParser
from .formats import get_format, read_table
from .outputs import AUDIT_FOLDER, KINDS
from .s3 import (S3Location, S3Settings, delete_keys, delete_objects, describe_s3_error, list_keys, parse_s3_uri,
                 put_bytes)

DEFAULT_AUDIT_NAME = "erasures.jsonl"
MANIFEST = "manifest.json"
# The files that name input photos (relative to the output prefix): CSVs in their first column,
# Parquet files in their "path" column.
_OUTPUT_NAME = re.compile(r"(?P<kind>features|pca)/[^/]+\.(?P<ext>csv|parquet)|errors\.csv")
_PART_ARRAYS = ("keys", "etags", "labels", "vectors")


# --- pure handling of contents ------------------------------------------------------------

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


def remove_parquet_rows(data: bytes, paths: set[str], column_prefix: str) -> tuple[bytes, list[tuple[str, str]]]:
    """A vectors Parquet file without the rows whose path is in ``paths``, as the job encodes it.

    Returns (new file, the removed rows' (path, label)); the new file is ``data`` itself when
    nothing matched, so an untouched file is never re-encoded.
    """
    row_paths, labels, matrix = read_table(data, "parquet")
    keep = [i for i, path in enumerate(row_paths) if path not in paths]
    if len(keep) == len(row_paths):
        return data, []
    removed = [(row_paths[i], labels[i]) for i in range(len(row_paths)) if row_paths[i] in paths]
    new = get_format("parquet").encode([row_paths[i] for i in keep], [labels[i] for i in keep], matrix[keep],
                                       column_prefix)
    return new, removed


def split_part(data: bytes, keys: set[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """One state part (.npz bytes) split into the rows to keep (its arrays keys, etags, labels,
    vectors, in their order) and the stored keys found in ``keys``."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        missing = [name for name in _PART_ARRAYS if name not in npz.files]
        if missing:
            raise ValueError(f"not a state part: no array {', '.join(missing)} (has {', '.join(npz.files)})")
        stored = npz["keys"].tolist()
        keep = np.array([key not in keys for key in stored], dtype=bool)
        kept = {name: npz[name][keep] for name in _PART_ARRAYS}
    return kept, [key for key in stored if key in keys]


def key_sha256(uri: str) -> str:
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()


def check_locations(input_loc: S3Location, output_loc: S3Location, key_uris: list[str],
                    audit_location: S3Location, state_location: S3Location | None = None) -> list[str]:
    """Refuse anything that could write or delete outside what was asked; returns the key URIs,
    deduplicated in order. ValueError says what was received."""
    if not output_loc.prefix:
        raise ValueError(f"--output needs a prefix, not a whole bucket, got {output_loc.uri!r}")
    if input_loc.contains(output_loc) or output_loc.contains(input_loc):
        raise ValueError(f"--output {output_loc.uri} and --input {input_loc.uri} overlap")
    # The job refuses the same layouts for its --state.
    if state_location is not None:
        if input_loc.contains(state_location) or state_location.contains(input_loc):
            raise ValueError(f"--state {state_location.uri} and --input {input_loc.uri} overlap")
        if state_location.contains(output_loc):
            raise ValueError(f"--output {output_loc.uri} is inside --state {state_location.uri}")
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

    ``removed`` is uri -> {relative file: labels of the removed rows}. A photo in features/ or
    pca/ was featurized, one in errors.csv failed.
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
        for relative, labels in sorted(by_file.items()):
            outcome = "failed" if relative == "errors.csv" else "featurized"
            outcomes.setdefault(outcome, labels[0])
        for field in ["listed", *outcomes]:
            _decrement(counts, field)
        for field, label in outcomes.items():
            if isinstance(per_fruit.get(label), dict):
                _decrement(per_fruit[label], field)
        manifest.setdefault("erasures", []).append(
            {"at": at, "key_sha256": key_sha256(uri), "request_id": request_id})
        changed = True
    return changed


def _update_files(manifest: dict, bodies: dict[str, bytes]) -> bool:
    """Set size and sha256 of each rewritten file the manifest lists: readers verify files by them.
    Returns whether anything changed."""
    files = manifest.get("files")
    changed = False
    for relative, body in bodies.items():
        entry = files.get(relative) if isinstance(files, dict) else None
        if isinstance(entry, dict):
            entry.update(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
            changed = True
    return changed


def _decrement(counts: dict, field: str) -> None:
    # Never below zero: a count already adjusted by hand must not turn negative.
    if isinstance(counts.get(field), int) and counts[field] > 0:
        counts[field] -= 1


def _read_manifest(client, output_loc: S3Location) -> dict | None:
    """The output's manifest.json, or None if there is none (or it is not a JSON object)."""
    key = output_loc.key(MANIFEST)
    with _s3_step(f"reading s3://{output_loc.bucket}/{key}"):
        found = _get(client, output_loc.bucket, key)
    if found is None:
        return None
    try:
        manifest = json.loads(found[0].decode("utf-8"))
    except ValueError as exc:
        raise JobError(f"s3://{output_loc.bucket}/{key} is not valid JSON: {exc}") from exc
    return manifest if isinstance(manifest, dict) else None


def _recorded_state(manifest: dict | None) -> str | None:
    """The --state URI an incremental run recorded in its manifest ("incremental": {"state"}), if any."""
    incremental = (manifest or {}).get("incremental")
    uri = incremental.get("state") if isinstance(incremental, dict) else None
    return uri if isinstance(uri, str) and uri else None


def check_state_choice(recorded: str | None, state_location: S3Location | None, no_state: bool) -> list[str]:
    """Refuse to leave a recorded state's vectors behind unless told to; returns warnings.
    ValueError says what to pass."""
    if state_location is not None and no_state:
        raise ValueError(f"--state {state_location.uri} and --no-state contradict each other; give one")
    if recorded is None or no_state:
        return []
    if state_location is None:
        raise ValueError(f"{MANIFEST} records the incremental state {recorded}: pass --state {recorded} to "
                         f"remove the photos' vectors from it too, or --no-state to leave them there")
    try:
        same = parse_s3_uri(recorded) == state_location
    except ValueError:
        same = False
    # Not a refusal: the state may have been moved since, and --state is then the right place.
    return [] if same else [f"--state {state_location.uri} is not the state {MANIFEST} records ({recorded}); "
                            f"vectors stored there were not looked at"]


def _plan_state(client, state_location: S3Location, keys: set[str], at: str) -> dict:
    """Read state.json and every part whose [first, last] could hold one of ``keys``.

    Returns what to do: "found" (a state.json exists), "state" (the new state.json, None if
    unchanged), "parts" (part key -> new body), "emptied" (part keys to delete once state.json
    no longer lists them), "removed" (Counter: stored key -> rows removed).
    """
    state_file = state_location.key(state_store.STATE_FILE)
    plan = {"found": False, "state": None, "parts": {}, "emptied": [], "removed": Counter()}
    with _s3_step(f"reading s3://{state_location.bucket}/{state_file}"):
        try:
            current = state_store.load_state(client, state_location)
        except ValueError as exc:
            raise JobError(f"cannot use --state {state_location.uri}: {exc}") from exc
    if current is None:
        return plan
    plan["found"] = True
    parts, changed = [], False
    for entry in current.get("parts") or []:
        try:
            could_hold = any(entry["first"] <= key <= entry["last"] for key in keys)
            relative = entry["key"]
        except (KeyError, TypeError) as exc:
            raise JobError(f"s3://{state_location.bucket}/{state_file} has a malformed part entry {entry!r}") from exc
        if not could_hold:
            parts.append(entry)
            continue
        part_key = state_location.key(relative)
        with _s3_step(f"reading s3://{state_location.bucket}/{part_key}"):
            found = _get(client, state_location.bucket, part_key)
        if found is None:
            raise JobError(f"s3://{state_location.bucket}/{state_file} lists {relative}, which does not exist")
        try:
            kept, gone = split_part(found[0], keys)
        except Exception as exc:  # np.load fails in many ways (BadZipFile, EOFError, ValueError) on bad bytes
            raise JobError(f"s3://{state_location.bucket}/{part_key} is not a state part: {exc}") from exc
        plan["removed"].update(gone)
        kept_keys = kept["keys"].tolist()
        if gone:
            # An emptied part is rewritten empty too, and deleted only after state.json stops
            # listing it: if that delete fails, the object left behind holds no vector.
            plan["parts"][part_key] = state_store.part_bytes(kept_keys, kept["etags"].tolist(),
                                                             kept["labels"].tolist(), kept["vectors"])
        if not kept_keys:
            plan["emptied"].append(part_key)
            changed = True
            continue
        # Recomputed even when nothing is gone: a run that failed before state.json left it stale.
        new_entry = {**entry, "first": min(kept_keys), "last": max(kept_keys), "rows": len(kept_keys)}
        changed = changed or new_entry != entry
        parts.append(new_entry)
    if changed:
        plan["state"] = {**current, "parts": parts, "rows": sum(p["rows"] for p in parts), "updated_at": at}
    return plan


def forget(client, settings: S3Settings, input_loc: S3Location, output_loc: S3Location,
           key_uris: list[str], audit_location: S3Location, request_id: str,
           dry_run: bool = False, now: datetime | None = None,
           state_location: S3Location | None = None, no_state: bool = False) -> dict:
    """Erase the photos, their rows and (with ``state_location``) their stored vectors; returns
    a report (with the raw URIs, for the operator).

    All reads come first, so a read failure changes nothing; then output files, manifest, state
    parts, state.json, photos and the audit log are written in that order. With ``dry_run``
    nothing is written. ValueError when the manifest records a state and neither
    ``state_location`` nor ``no_state`` is given.
    """
    uris = check_locations(input_loc, output_loc, key_uris, audit_location, state_location)
    at = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    manifest = _read_manifest(client, output_loc)
    recorded = _recorded_state(manifest)
    warnings = check_state_choice(recorded, state_location, no_state)

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
        name = _OUTPUT_NAME.fullmatch(relative)
        if not name:
            continue
        with _s3_step(f"reading s3://{output_loc.bucket}/{key}"):
            found = _get(client, output_loc.bucket, key)
        if found is None:  # deleted since the listing
            continue
        body, content_type = found
        if name["ext"] == "parquet":
            try:
                new_body, rows = remove_parquet_rows(body, paths, KINDS[name["kind"]])
            except Exception as exc:  # pyarrow raises its own errors (ArrowInvalid, OSError, KeyError) on bad files
                raise JobError(f"s3://{output_loc.bucket}/{key} is not a vectors Parquet file: {exc}") from exc
            content_type = content_type or get_format("parquet").content_type
        else:
            # surrogateescape: any byte that is not UTF-8 goes back out unchanged.
            new_text, records = _split_out(body.decode("utf-8", "surrogateescape"), paths)
            rows = [(_first_field(record), _label_of(record)) for record in records]
            new_body = new_text.encode("utf-8", "surrogateescape")
            content_type = content_type or "text/csv"
        if not rows:
            continue
        for path, label in rows:
            removed[path].setdefault(relative, []).append(label)
        rewrites[relative] = (new_body, content_type)

    manifest_body = None
    manifest_key = output_loc.key(MANIFEST)
    if rewrites:
        if manifest is not None:
            changed = _update_manifest(manifest, removed, at, request_id)
            changed = _update_files(manifest, {rel: body for rel, (body, _) in rewrites.items()}) or changed
            if changed:
                manifest_body = json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8")
        with _s3_step(f"checking versioning of bucket {output_loc.bucket}"):
            if _bucket_versioned(client, output_loc.bucket):
                warnings.append(f"bucket {output_loc.bucket} is versioned: earlier versions of the "
                                f"rewritten files still hold the removed rows until they are deleted")

    state_plan, state_rows = None, {}
    if state_location is not None:
        # The state stores input keys (no s3://bucket/), as the listing gave them.
        stored_keys = {uri: parse_s3_uri(uri, folder=False).prefix for uri in uris}
        state_plan = _plan_state(client, state_location, set(stored_keys.values()), at)
        state_rows = {uri: state_plan["removed"][key] for uri, key in stored_keys.items()}
        if not state_plan["found"]:
            warnings.append(f"no {state_store.STATE_FILE} under --state {state_location.uri}: "
                            f"no stored vectors were found there")
        if state_plan["parts"]:
            with _s3_step(f"checking versioning of bucket {state_location.bucket}"):
                if _bucket_versioned(client, state_location.bucket):
                    warnings.append(f"bucket {state_location.bucket} is versioned: earlier versions of the "
                                    f"rewritten state parts still hold the removed vectors until they are deleted")

    def state_fields(uri: str) -> dict:
        # Only when a state was named or explicitly declined, so older audit lines keep their shape.
        if state_location is not None:
            return {"state": state_location.uri, "state_rows_removed": state_rows[uri]}
        return {"state": recorded, "state_rows_removed": None} if no_state else {}

    lines = []
    for uri in uris:
        existed, targets = photos[uri]
        lines.append(json.dumps({
            "at": at, "request_id": request_id, "input": input_loc.uri, "output": output_loc.uri,
            "key_sha256": key_sha256(uri), "object_existed": existed, "versions_deleted": len(targets),
            "files_rewritten": {rel: len(labels) for rel, labels in sorted(removed[uri].items())},
            **state_fields(uri),
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
        if state_plan is not None:
            _write_state(client, settings, state_location, state_plan)
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

    if state_plan is not None:
        start = len(state_location.prefix)
        state_report = {"uri": state_location.uri, "skipped": False, "found": state_plan["found"],
                        "rows_removed": sum(state_plan["removed"].values()),
                        "parts_rewritten": sorted(k[start:] for k in state_plan["parts"]
                                                  if k not in state_plan["emptied"]),
                        "parts_deleted": sorted(k[start:] for k in state_plan["emptied"]),
                        "state_json_updated": state_plan["state"] is not None}
    else:
        state_report = {"uri": recorded, "skipped": True} if no_state else None
    return {
        "request_id": request_id,
        "dry_run": dry_run,
        "at": at,
        "input": input_loc.uri,
        "output": output_loc.uri,
        "audit_log": audit_location.uri,
        "keys": [{"uri": uri, "key_sha256": key_sha256(uri), "object_existed": photos[uri][0],
                  "versions_deleted": len(photos[uri][1]),
                  "files_rewritten": {rel: len(labels) for rel, labels in sorted(removed[uri].items())},
                  **state_fields(uri)}
                 for uri in uris],
        "files_rewritten": sorted(rewrites),
        "manifest_updated": manifest_body is not None,
        "state": state_report,
        "warnings": warnings,
    }


def _write_state(client, settings: S3Settings, location: S3Location, plan: dict) -> None:
    """Parts first, state.json (as state.commit writes it) next, emptied parts last: state.json
    never lists a missing part, and a failure part-way is completed by running forget again."""
    for part_key, body in sorted(plan["parts"].items()):
        with _s3_step(f"writing s3://{location.bucket}/{part_key}"):
            put_bytes(client, settings, location.bucket, part_key, body, "application/octet-stream")
    if plan["state"] is not None:
        state_file = location.key(state_store.STATE_FILE)
        with _s3_step(f"writing s3://{location.bucket}/{state_file}"):
            put_bytes(client, settings, location.bucket, state_file,
                      json.dumps(plan["state"], indent=1, ensure_ascii=False).encode("utf-8"), "application/json")
    if plan["emptied"]:
        with _s3_step(f"deleting emptied parts under {location.uri}"):
            delete_keys(client, location.bucket, plan["emptied"])


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
        stored = entry.get("state_rows_removed")
        if stored is not None:
            lines.append(f"  state rows {'to remove' if would else 'removed'}: {stored}")
        if not entry["object_existed"] and not entry["versions_deleted"] and not entry["files_rewritten"] \
                and not stored:
            lines.append("  found nowhere (still recorded in the audit log)")
    if report["manifest_updated"]:
        lines.append(f"{MANIFEST}: counts {'to decrement' if would else 'decremented'}")
    state = report.get("state")
    if state is not None and state["skipped"]:
        lines.append("state: not touched (--no-state)"
                     + (f"; the photos' vectors may remain in {state['uri']}" if state["uri"] else ""))
    elif state is not None and state["found"]:
        lines.append(f"state {state['uri']}: {state['rows_removed']} row(s) {'to remove' if would else 'removed'}, "
                     f"{len(state['parts_rewritten'])} part(s) {'to rewrite' if would else 'rewritten'}, "
                     f"{len(state['parts_deleted'])} emptied part(s) {'to delete' if would else 'deleted'}")
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
                    "remove its rows from the run's files (CSV or Parquet), counts and incremental state, "
                    "and log the erasure.",
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
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--state", default=None, metavar="S3_URI",
                       help="the job's --incremental --state folder: remove the photos' stored vectors too "
                            "(required when the output's manifest records a state, unless --no-state)")
    state.add_argument("--no-state", action="store_true",
                       help="leave an incremental state that the manifest records untouched (its vectors of "
                            "these photos stay there)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        input_loc = parse_s3_uri(args.input)
        output_loc = parse_s3_uri(args.output)
        audit_location = (parse_s3_uri(args.audit_log, folder=False) if args.audit_log else
                          S3Location(output_loc.bucket, output_loc.prefix + AUDIT_FOLDER + DEFAULT_AUDIT_NAME))
        state_location = parse_s3_uri(args.state) if args.state else None
        key_uris = check_locations(input_loc, output_loc, args.keys, audit_location, state_location)
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
                        request_id, dry_run=args.dry_run, state_location=state_location, no_state=args.no_state)
    except ValueError as exc:
        # Arguments that do not fit this output (a state it records, not named): nothing was changed.
        parser.error(str(exc))
        raise  # unreachable: error() exits
    except JobError as exc:
        # The audit line is written last: a re-run finishes the erasure and records it.
        print(f"forget: {exc}; re-running the same command is safe", file=sys.stderr)
        return 1
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
