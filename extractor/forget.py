"""Right to be forgotten: erase photos from the input and their rows from a run's outputs.

    python -m extractor.forget --input s3://b/in/ --output s3://b/out/ \\
        --key s3://b/in/Apple/photo.jpg [--key ...] [--request-id ID] [--dry-run]
        [--state s3://b/state/ | --no-state] [--break-lock] [--lock-lease SECONDS] [--no-lock]

For each photo key: every version of the object is deleted (a versioned bucket keeps the bytes
otherwise), its rows are removed from ``features/*.csv``, ``pca/*.csv``, ``errors.csv`` and
``pca_scatter.csv`` (every other byte kept) or from ``features/*.parquet`` and ``pca/*.parquet``
(rewritten without them), ``pca_scatter.png`` is redrawn from the points left and ``report.html``
rebuilt from the new counts and errors, ``manifest.json``'s counts are decremented and its
``files`` entries updated, and one JSON line
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
this order: output files, manifest, state parts, state.json, photos, audit log. It holds the
job's run lock (``extractor.lock``, mode "erasure") on ``--output``, and on ``--state`` when given,
from its reads under the lock to its audit line: while a job runs on the same output (or state)
forget is refused in one line naming that run (exit 1, nothing changed), and a job started while
forget runs is refused the same way; so no job can write the erased rows back by finishing
afterwards. The checks (and a dry run, which changes nothing) read without the lock; a dry run
says so.

Exit status: 0 done, 1 an S3 failure or a run lock another run holds (one line on stderr), 2 bad
arguments, or a state the manifest records left unnamed (nothing touched).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

from . import erasure, layout
from . import state as state_store
from .erasure import Found, Plan, Request, StatePlan, part_to_read
from .errors import JobError, OneLineParser
from .layout import AUDIT_FOLDER, AUDIT_LOG_FILE, MANIFEST_FILE, PCA_MODEL_FILE, STATE_FILE
from .lock import DEFAULT_LEASE_S, LockHeld
from .run_locks import RunLocks, add_lock_options
from .s3 import (S3Location, S3Settings, add_s3_options, delete_keys, delete_objects, describe_s3_error, list_keys,
                 parse_s3_uri, put_bytes, settings_from_args)


def check_request(input_loc: S3Location, output_loc: S3Location, key_uris: list[str],
                  audit_location: S3Location, state_location: S3Location | None = None) -> list[str]:
    """Refuse anything that could write or delete outside what was asked; returns the key URIs,
    deduplicated in order. ValueError says what was received."""
    # The job's own rules for --output and --state: forget refuses the layouts the job refuses.
    layout.check_locations(input_loc, output_loc, state=state_location)
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
    layout.check_audit_log(output_loc, audit_location)
    return uris


@contextmanager
def _s3_step(what: str):
    """Turn a botocore failure into a one-line JobError naming the step."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise JobError(describe_s3_error(exc, what)) from exc


def _missing(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey")


def _get(client, bucket: str, key: str, what: str) -> tuple[bytes, str] | None:
    """(body, content type) of an object, or None if it does not exist; JobError naming ``what``."""
    with _s3_step(what):
        try:
            response = client.get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if _missing(exc):
                return None
            raise
        return response["Body"].read(), response.get("ContentType") or ""


def _bucket_versioned(client, bucket: str) -> bool:
    """Whether the bucket keeps earlier versions ("Suspended" keeps those written while enabled)."""
    with _s3_step(f"checking versioning of bucket {bucket}"):
        return client.get_bucket_versioning(Bucket=bucket).get("Status") in ("Enabled", "Suspended")


def _photo_versions(client, bucket: str, key: str, versioned: bool) -> tuple[bool, list[dict]]:
    """(whether the object exists now, the {Key, VersionId} to delete; VersionId absent if unversioned)."""
    if not versioned:
        try:
            client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if _missing(exc):
                return False, []
            raise
        return True, [{"Key": key}]
    exists, targets = False, []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=key):
        # Prefix also matches photo.jpg.bak: keep the exact key only.
        versions = [version for version in page.get("Versions", ()) if version["Key"] == key]
        exists = exists or any(version.get("IsLatest", False) for version in versions)
        markers = [marker for marker in page.get("DeleteMarkers", ()) if marker["Key"] == key]
        targets += [{"Key": key, "VersionId": version["VersionId"]} for version in versions + markers]
    return exists, targets


def _read_state(client, location: S3Location, keys: set[str]) -> tuple[dict | None, dict[str, bytes]]:
    """state.json (None if there is none) and, by name, the parts whose key range could hold ``keys``."""
    with _s3_step(f"reading {location.uri}{STATE_FILE}"):
        try:
            current = state_store.load_state(client, location)
        except ValueError as exc:
            raise JobError(f"cannot use --state {location.uri}: {exc}") from exc
    bodies = {}
    for entry in (current or {}).get("parts") or []:
        relative = part_to_read(entry, keys, location)
        if relative is not None:
            found = _get(client, location.bucket, location.key(relative), f"reading {location.uri}{relative}")
            if found is None:
                raise JobError(f"{location.uri}{STATE_FILE} lists {relative}, which does not exist")
            bodies[relative] = found[0]
    return current, bodies


def read_erasure(client, request: Request) -> Found:
    """Every read but the output files' (``read_output_files``): returns what was found.
    ValueError, before any further read, when the manifest records a state left unnamed."""
    manifest_uri = request.output.uri + MANIFEST_FILE
    body = _get(client, request.output.bucket, request.output.key(MANIFEST_FILE), f"reading {manifest_uri}")
    try:
        manifest = json.loads(body[0].decode("utf-8")) if body else None
    except ValueError as exc:
        raise JobError(f"{manifest_uri} is not valid JSON: {exc}") from exc
    manifest = manifest if isinstance(manifest, dict) else None    # not a JSON object: as if there were none
    incremental = (manifest or {}).get("incremental")   # an incremental run records its --state there
    recorded = incremental.get("state") if isinstance(incremental, dict) else None
    recorded = recorded if isinstance(recorded, str) and recorded else None
    warnings = erasure.check_state_choice(recorded, request.state, request.no_state)
    versioned = _bucket_versioned(client, request.input.bucket)
    photos = {}
    for uri, key in request.stored.items():
        with _s3_step(f"looking up {uri}"):
            photos[uri] = _photo_versions(client, request.input.bucket, key, versioned)
    state = (None, {}) if request.state is None else _read_state(client, request.state, set(request.stored.values()))
    audit = _get(client, request.audit_log.bucket, request.audit_log.prefix, f"reading {request.audit_log.uri}")
    pictures = {}
    for name in (layout.VARIANCE_PLOT_FILE, layout.SCATTER_PLOT_FILE):  # report.html embeds them
        found = _get(client, request.output.bucket, request.output.key(name), f"reading {request.output.uri}{name}")
        pictures[name] = found[0] if found else None
    return Found(manifest, recorded, warnings, versioned, photos, state, audit, pictures)


def read_output_files(client, output: S3Location) -> Iterator[tuple[str, bytes, str, dict]]:
    """Yield (relative, body, content type, ``layout.photo_file``'s dict) of each output file that names
    input photos, each read only when asked for: the plan then holds no more than the files it rewrites."""
    with _s3_step(f"listing {output.uri}"):
        keys = list(list_keys(client, output.bucket, output.prefix))
    for key in keys:
        name = layout.photo_file(key[len(output.prefix):])
        found = _get(client, output.bucket, key, f"reading s3://{output.bucket}/{key}") if name else None
        if found is not None:  # None: not such a file, or deleted since the listing
            yield (key[len(output.prefix):], *found, name)


def read_versioning(client, request: Request, plan: Plan) -> tuple[bool, bool]:
    """Whether the output's and the state's buckets keep earlier versions of what ``plan``
    rewrites there (a bucket where nothing is rewritten is not asked)."""
    output = bool(plan.rewrites) and _bucket_versioned(client, request.output.bucket)
    state = plan.state is not None and bool(plan.state.parts) and _bucket_versioned(client, request.state.bucket)
    return output, state


def _put(client, settings: S3Settings, location: S3Location, key: str, body: bytes, content_type: str) -> None:
    with _s3_step(f"writing s3://{location.bucket}/{key}"):
        put_bytes(client, settings, location.bucket, key, body, content_type)


def apply_erasure(client, settings: S3Settings, request: Request, plan: Plan) -> None:
    """Write ``plan``: output files, manifest, state parts, state.json, photos, audit log. The
    audit line goes last: a failure before it is completed, and recorded, by running again."""
    output = request.output
    for relative, (body, content_type) in sorted(plan.rewrites.items()):
        _put(client, settings, output, output.key(relative), body, content_type)
    if plan.manifest_body is not None:
        _put(client, settings, output, output.key(MANIFEST_FILE), plan.manifest_body, "application/json")
    if plan.state is not None:
        _write_state(client, settings, request.state, plan.state, request.at)
    for uri in request.uris:
        with _s3_step(f"deleting {uri}"):
            targets = plan.found.photos[uri][1]
            if plan.found.input_versioned:
                delete_objects(client, request.input.bucket, targets)
            elif targets:
                client.delete_object(Bucket=request.input.bucket, Key=targets[0]["Key"])
    _put(client, settings, request.audit_log, request.audit_log.prefix, *plan.audit)


def _write_state(client, settings: S3Settings, location: S3Location, plan: StatePlan, at: str) -> None:
    """Parts first, state.json (through state.write_state) next, emptied parts last: state.json
    never lists a missing part, and a failure part-way is completed by running forget again."""
    for part_key, body in sorted(plan.parts.items()):
        _put(client, settings, location, part_key, body, "application/octet-stream")
    if plan.state is not None:
        with _s3_step(f"writing {location.uri}{STATE_FILE}"):
            state_store.write_state(client, settings, location, plan.state, updated_at=at)
    if plan.emptied:
        with _s3_step(f"deleting emptied parts under {location.uri}"):
            delete_keys(client, location.bucket, plan.emptied)


def forget(client, settings: S3Settings, input_loc: S3Location, output_loc: S3Location,
           key_uris: list[str], audit_location: S3Location, request_id: str,
           dry_run: bool = False, now: datetime | None = None,
           state_location: S3Location | None = None, no_state: bool = False,
           break_lock: bool = False, lock_lease_s: float = DEFAULT_LEASE_S, no_lock: bool = False) -> dict:
    """Erase the photos, their rows and (with ``state_location``) their stored vectors; returns the
    report (``erasure.report``, with the raw URIs, and ``lock``). All reads come first, so a read
    failure changes nothing; then output files, manifest, state parts, state.json, photos and the
    audit log are written in that order, nothing with ``dry_run``. ValueError when the manifest
    records a state and neither ``state_location`` nor ``no_state`` is given.

    Unless ``dry_run``, the run locks of ``output_loc`` (and ``state_location``) are taken once the
    first reads passed their checks (lock.LockHeld when a job holds one: nothing changed), everything
    is read again under them, written, and the locks released."""
    uris = check_request(input_loc, output_loc, key_uris, audit_location, state_location)
    at = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    stored = {uri: parse_s3_uri(uri, folder=False).prefix for uri in uris}
    request = Request(input_loc, output_loc, uris, audit_location, request_id, at, state_location, no_state, stored)
    found = read_erasure(client, request)   # a refusal (ValueError) or a read failure: nothing written
    if dry_run:
        plan = erasure.plan_erasure(request, found, read_output_files(client, output_loc))
        report = erasure.report(request, plan, read_versioning(client, request, plan), dry_run)
        return {**report, "lock": None}
    locks = RunLocks.for_run(client, settings, output_loc, state_location, run_id=request_id, mode="erasure",
                             lease_s=lock_lease_s, break_lock=break_lock, no_lock=no_lock).acquire()
    try:
        locks.start_renewing()
        found = read_erasure(client, request)   # again, under the lock: what a job wrote meanwhile
        plan = erasure.plan_erasure(request, found, read_output_files(client, output_loc))
        versioned = read_versioning(client, request, plan)
        locks.check()
        apply_erasure(client, settings, request, plan)
        return {**erasure.report(request, plan, versioned, dry_run), "lock": locks.as_manifest()}
    finally:
        locks.release()


def format_summary(report: dict) -> str:
    """A few lines for the operator: per key, the photo and the rows removed."""
    would = report["dry_run"]
    lines = [f"erasure {report['request_id']}" + (" (dry run: nothing changed; read without the run lock, "
                                                  "so a job running on this output may change it meanwhile)"
                                                  if would else "")]
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
        if not (entry["object_existed"] or entry["versions_deleted"] or entry["files_rewritten"] or stored):
            lines.append("  found nowhere (still recorded in the audit log)")
    if report["manifest_updated"]:
        lines.append(f"{MANIFEST_FILE}: counts {'to decrement' if would else 'decremented'}")
    state = report.get("state")
    if state is not None and state["skipped"]:
        lines.append("state: not touched (--no-state)"
                     + (f"; the photos' vectors may remain in {state['uri']}" if state["uri"] else ""))
    elif state is not None and state["found"]:
        lines.append(f"state {state['uri']}: {state['rows_removed']} row(s) {'to remove' if would else 'removed'}, "
                     f"{len(state['parts_rewritten'])} part(s) {'to rewrite' if would else 'rewritten'}, "
                     f"{len(state['parts_deleted'])} emptied part(s) {'to delete' if would else 'deleted'}")
    lines.append(f"audit log: {'would append' if would else 'appended'} {len(report['keys'])} line(s) "
                 f"to {report['audit_log']}")
    lines.append(f"{PCA_MODEL_FILE} is not refitted; re-run the job to refit it without these photos")
    lines.extend(f"warning: {w}" for w in report["warnings"])
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m extractor.forget", description=(
        "Erase photos (right to be forgotten): delete every version of each photo, remove its rows from the "
        "run's files (CSV or Parquet), counts and incremental state, and log the erasure."))
    parser.add_argument("--input", required=True, metavar="S3_URI", help="the job's --input prefix")
    parser.add_argument("--output", required=True, metavar="S3_URI", help="the job's --output prefix")
    parser.add_argument("--key", required=True, action="append", metavar="S3_URI", dest="keys",
                        help="s3://bucket/key of a photo under --input; repeat for several")
    parser.add_argument("--audit-log", default=None, metavar="S3_URI",
                        help=f"JSON-lines audit log (default: <output>{AUDIT_FOLDER}{AUDIT_LOG_FILE}); "
                             f"must lie under <output>{AUDIT_FOLDER}")
    parser.add_argument("--request-id", default=None,
                        help="the request's reference, stored in the audit log (default: a new UUID)")
    add_s3_options(parser, "rewritten objects")
    parser.add_argument("--dry-run", action="store_true", help="show what would be done, change nothing")
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--state", default=None, metavar="S3_URI",
                       help="the job's --incremental --state folder: remove the photos' stored vectors too "
                            "(required when the output's manifest records a state, unless --no-state)")
    state.add_argument("--no-state", action="store_true",
                       help="leave an incremental state that the manifest records untouched (its vectors of "
                            "these photos stay there)")
    add_lock_options(parser, "forget")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        input_loc, output_loc = parse_s3_uri(args.input), parse_s3_uri(args.output)
        audit_location = parse_s3_uri(args.audit_log, folder=False) if args.audit_log else layout.audit_log(output_loc)
        state_location = parse_s3_uri(args.state) if args.state else None
        settings = settings_from_args(args)
        request_id = args.request_id if args.request_id is not None else uuid.uuid4().hex
        if not request_id.strip() or any(ord(c) < 32 for c in request_id) or len(request_id) > 200:
            raise ValueError(f"--request-id must be one line of at most 200 characters, got {request_id!r}")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        report = forget(settings.client(), settings, input_loc, output_loc, args.keys, audit_location,
                        request_id, dry_run=args.dry_run, state_location=state_location, no_state=args.no_state,
                        break_lock=args.break_lock, lock_lease_s=args.lock_lease, no_lock=args.no_lock)
    except ValueError as exc:
        # Locations or keys refused (check_request), or arguments that do not fit this output (a
        # state it records, not named): nothing was changed.
        parser.error(str(exc))
    except LockHeld as exc:
        print(f"forget: {exc}", file=sys.stderr)   # nothing was changed
        return 1
    except JobError as exc:
        # The audit line is written last: a re-run finishes the erasure and records it.
        print(f"forget: {exc}; re-running the same command is safe", file=sys.stderr)
        return 1
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
