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
job's run lock (``extractor.storage.lock``, mode "erasure") on ``--output``, and on ``--state`` when given,
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
import sys
import uuid
from datetime import datetime, timezone

from extractor.errors import JobError, OneLineParser
from extractor.forget import erasure
from extractor.forget.erasure import Request
from extractor.forget.erasure_io import (
    apply_erasure,
    read_erasure,
    read_output_files,
    read_versioning,
)
from extractor.storage import layout
from extractor.storage.layout import (
    AUDIT_FOLDER,
    AUDIT_LOG_FILE,
    MANIFEST_FILE,
    PCA_MODEL_FILE,
)
from extractor.storage.lock import DEFAULT_LEASE_S, LockHeld
from extractor.storage.run_locks import RunLocks, add_lock_options
from extractor.storage.s3 import (
    S3Location,
    S3Settings,
    add_s3_options,
    parse_s3_uri,
    settings_from_args,
)


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
