"""Checks before any compute, so that a run fails in seconds, not after an hour: every bucket in
the job's region (photos may be personal data: they must not cross regions silently), the run
locks on the output (and the state) taken, and the output prefix writable."""

from __future__ import annotations

import logging

from extractor.errors import JobError
from extractor.storage.layout import write_probe
from extractor.storage.s3 import delete_keys, describe_s3_error, put_bytes

# What GetBucketLocation answers for the two regions that predate LocationConstraint values.
_LEGACY_REGIONS = {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}


def bucket_region(s3_client, what: str, location) -> str:
    try:
        answer = s3_client.get_bucket_location(Bucket=location.bucket).get("LocationConstraint")
    except Exception as exc:
        raise JobError(describe_s3_error(exc, f"cannot reach {what} {location.uri}")) from exc
    return _LEGACY_REGIONS.get(answer, answer)


def preflight(s3_client, cfg, run_id: str, logger: logging.Logger, locks=None) -> None:
    """JobError (one line) unless the input, output and state buckets are in the job's region,
    ``locks`` (run_locks.RunLocks: --output, then --state) could be taken, and the output is writable
    (a zero-byte probe is written and deleted). A failure after the locks were taken releases them."""
    import boto3

    region = cfg.s3.region or boto3.session.Session().region_name
    located = [("--input", cfg.input), ("--output", cfg.output)] + ([("--state", cfg.state)] if cfg.state else [])
    for what, location in located:
        found = bucket_region(s3_client, what, location)
        if region and found != region:
            raise JobError(f"{what} bucket {location.bucket!r} is in {found}, the job runs in {region}: "
                           f"photos would cross regions; run with --region {found} (or copy the data)")
    if locks is not None:
        locks.acquire()  # another run on the same prefix: one line naming it, nothing written
    probe = write_probe(cfg.output, run_id)
    try:
        put_bytes(s3_client, cfg.s3, cfg.output.bucket, probe, b"", "text/plain")
        delete_keys(s3_client, cfg.output.bucket, [probe])
    except Exception as exc:
        if locks is not None:
            locks.release()
        raise JobError(describe_s3_error(exc, f"cannot write to --output {cfg.output.uri}")) from exc
    logger.info("preflight: buckets in %s, %s writable", region or "(region not set)", cfg.output.uri)
