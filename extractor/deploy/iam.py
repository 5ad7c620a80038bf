"""The least-privilege IAM policy for the EMR cluster's EC2 instance profile.

    python -m extractor.deploy.iam --input s3://b/in/ --output s3://b/out/ --code s3://b/code/ \\
        --emr-log-uri s3://b/emr-logs/ [--log-uri S3_URI] [--weights S3_URI] [--kms-key-arn ARN] \\
        [--state S3_URI] [--packed-env S3_URI] [--inventory S3_URI]

prints the policy document (JSON) on stdout; a bad argument is one line on stderr and exit 2.

What the instance profile needs, and nothing more, on S3:
  the job      GetBucketLocation on the input and output buckets (its preflight),
               ListBucket on the input and output prefixes (listing; stale outputs),
               GetObject on the input prefix and on the weights object (download_file:
               HeadObject + GetObject), PutObject + DeleteObject on the output prefix
               (DeleteObjects: _SUCCESS and stale files; PutObject also covers the
               multipart CreateMultipartUpload, UploadPart and CompleteMultipartUpload),
               AbortMultipartUpload on the output prefix (a failed streamed file),
               GetObject on <output>_staging/ only (the listing snapshot of --listing
               distributed and --inventory, read by the featurize tasks; --collect never:
               the parts the executors staged, read back into each file), GetObject on the run lock
               <output>_lock.json (read when a conditional write finds it held; its writes,
               conditional PutObjects, are the outputs' PutObject), PutObject on its log prefix;
  with --state ListBucket on the state prefix (old parts to delete; a missing state.json
               answers NoSuchKey only to a caller that may list), GetObject + PutObject +
               DeleteObject on it (state.json, the parts of each version, and its run lock
               <state>_lock.json, which the state statement already covers);
  with --inventory  GetObject under the inventory configuration's folder (the manifest.json
               named and the data files it lists, under <configuration>/data/); no listing;
  EMR          GetObject on the code prefix (bootstrap `aws s3 cp` of single files:
               HeadObject + GetObject), PutObject on the cluster's log URI;
  with --packed-env  GetObject on the archives' prefix (spark-submit reads the archive once to
               stage it for YARN).
Outside _staging/ and the lock the job never reads what it wrote, so no other GetObject on the
output prefix.
"""

from __future__ import annotations

import argparse
import json
import sys

from extractor.errors import OneLineParser
from extractor.storage import layout
from extractor.storage.inventory import configuration_folder
from extractor.storage.s3 import S3Location, parse_s3_uri

VERSION = "2012-10-17"
# The condition key S3 sets from a write's x-amz-server-side-encryption header: the job sends
# AES256 (SSE-S3), or aws:kms (SSE-KMS) with --sse-kms-key-id.
SSE_HEADER = "s3:x-amz-server-side-encryption"
# Characters IAM would read as wildcards or policy variables in a Resource or a condition.
_WILDCARDS = ("*", "?", "$")


def _arn(bucket: str, key_pattern: str | None = None) -> str:
    return f"arn:aws:s3:::{bucket}" if key_pattern is None else f"arn:aws:s3:::{bucket}/{key_pattern}"


def _location(uri: str, what: str, *, folder: bool = True) -> S3Location:
    """parse_s3_uri plus the checks a policy needs; ValueError names the option and the value."""
    try:
        location = parse_s3_uri(uri, folder=folder)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if any(c in location.bucket + location.prefix for c in _WILDCARDS):
        raise ValueError(f"{what}: {uri!r} contains one of {' '.join(_WILDCARDS)}, "
                         f"which IAM reads as a wildcard or a variable")
    return location


def _list_statement(sid: str, location: S3Location) -> dict:
    statement = {"Sid": sid, "Effect": "Allow", "Action": "s3:ListBucket",
                 "Resource": _arn(location.bucket)}
    if location.prefix:  # a whole-bucket input lists without a prefix: no condition can match it
        statement["Condition"] = {"StringLike": {"s3:prefix": [location.prefix, location.prefix + "*"]}}
    return statement


def _allow(sid: str, actions: list[str], resources: list[str]) -> dict:
    return {"Sid": sid, "Effect": "Allow", "Action": actions if len(actions) > 1 else actions[0],
            "Resource": resources if len(resources) > 1 else resources[0]}


def instance_profile_policy(input_uri: str, output_uri: str, code_uri: str, log_uri: str | None,
                            emr_log_uri: str, weights_uri: str | None = None,
                            kms_key_arn: str | None = None, state_uri: str | None = None,
                            packed_env_uri: str | None = None, inventory_uri: str | None = None) -> dict:
    """The policy document for the cluster's EC2 instance profile (see the module docstring).

    ``log_uri`` None means the job's default, ``<output>logs/``. ``weights_uri`` None,
    'imagenet' or 'random' needs no S3 access; otherwise it must be the s3:// URI of the
    weights object. ``kms_key_arn``: the key of --sse-kms-key-id, as an ARN. ``state_uri``:
    the job's --state (--incremental), None without. ``packed_env_uri``: the prefix of the
    packed environments (create_cluster.sh --packed-env), None without. ``inventory_uri``: the
    job's --inventory (a manifest.json), None without. Raises ValueError.
    """
    source = _location(input_uri, "--input")
    output = _location(output_uri, "--output")
    code = _location(code_uri, "--code")
    log = _location(log_uri, "--log-uri") if log_uri else layout.default_log_location(output)
    emr_log = _location(emr_log_uri, "--emr-log-uri")
    state = _location(state_uri, "--state") if state_uri else None
    # The job refuses these layouts too: a policy for one would grant writes among the photos.
    layout.check_locations(source, output, state=state, written=[("--log-uri", log), ("--emr-log-uri", emr_log)])
    weights = _weights_object(weights_uri)
    _check_kms_key_arn(kms_key_arn)

    job_writes = [output, log] + ([state] if state else [])
    packed = _location(packed_env_uri, "--packed-env") if packed_env_uri else None
    inventory = _inventory_folder(inventory_uri) if inventory_uri else None
    statements = [
        *_read_statements(source, output, state, code, weights),
        *([_allow("ReadPackedEnvironment", ["s3:GetObject"], [_objects(packed)])] if packed else []),
        *([_allow("ReadInventoryReport", ["s3:GetObject"], [_objects(inventory)])] if inventory else []),
        *_output_statements(output),
        *(_state_statements(state) if state else []),
        *_log_statements(log, emr_log),
        *_encryption_statements(job_writes, kms_key_arn),
    ]
    return {"Version": VERSION, "Statement": statements}


def _objects(location: S3Location) -> str:
    return _arn(location.bucket, location.prefix + "*")


def _weights_object(weights_uri: str | None) -> S3Location | None:
    """The weights object the job downloads, or None where it needs no S3 access."""
    if weights_uri in (None, "imagenet", "random"):
        return None
    if not weights_uri.startswith("s3://"):
        raise ValueError(f"--weights: expected the s3:// URI of the weights object "
                         f"(or imagenet/random, which need no S3 access), got {weights_uri!r}")
    weights = _location(weights_uri, "--weights", folder=False)
    if not weights.prefix or weights.prefix.endswith("/"):
        raise ValueError(f"--weights: no object key in {weights_uri!r}")
    return weights


def _inventory_folder(manifest_uri: str) -> S3Location:
    """The inventory configuration's folder, ``<destination>/<source bucket>/<configuration>/``:
    AWS writes each day's manifest under ``<that>/<date>/`` and every day's data files under
    ``<that>/data/``, so one grant serves every day's report."""
    manifest = _location(manifest_uri, "--inventory", folder=False)
    folder = configuration_folder(manifest.prefix)
    if folder is None:
        raise ValueError(f"--inventory: expected s3://bucket/.../<configuration>/<date>/manifest.json, "
                         f"got {manifest_uri!r}")
    return S3Location(manifest.bucket, folder)


def _check_kms_key_arn(kms_key_arn: str | None) -> None:
    # IAM matches a KMS key by its ARN only: a key id or an alias in Resource would grant nothing.
    if kms_key_arn and not (kms_key_arn.startswith("arn:") and ":kms:" in kms_key_arn and ":key/" in kms_key_arn):
        raise ValueError(f"--kms-key-arn: expected arn:aws:kms:REGION:ACCOUNT:key/ID, got {kms_key_arn!r}")


def _read_statements(source: S3Location, output: S3Location, state: S3Location | None, code: S3Location,
                     weights: S3Location | None) -> list[dict]:
    """What the job and the bootstrap read: bucket locations, listings, photos, code, weights."""
    buckets = {source.bucket, output.bucket} | ({state.bucket} if state else set())
    statements = [
        # The job's preflight refuses buckets outside its region (GDPR): it asks where they are.
        _allow("LocateJobBuckets", ["s3:GetBucketLocation"], sorted(_arn(bucket) for bucket in buckets)),
        _list_statement("ListInputPrefix", source),
        _list_statement("ListOutputPrefixForStaleFiles", output),
        _allow("ReadInputImages", ["s3:GetObject"], [_objects(source)]),
        _allow("ReadCodeAndBootstrap", ["s3:GetObject"], [_objects(code)]),
    ]
    if weights is not None:
        statements.append(_allow("ReadWeightsObject", ["s3:GetObject"], [_arn(weights.bucket, weights.prefix)]))
    return statements


def _output_statements(output: S3Location) -> list[dict]:
    return [
        _allow("WriteAndReplaceOutputs", ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
               [_objects(output)]),
        # The job reads back only what it staged itself, never its outputs: the listing snapshot
        # (--listing distributed, --inventory) and what --collect never's executors staged.
        _allow("ReadStagedParts", ["s3:GetObject"], [_objects(layout.staging(output))]),
        # The run lock (extractor.storage.lock): a PutObject with If-None-Match or If-Match is authorised as
        # s3:PutObject, which WriteAndReplaceOutputs grants on every key under the output, the lock
        # included; only reading the holder when the prefix is taken needs this. The lock is never
        # deleted. The state's lock lies under --state: ReadWriteState covers it.
        _allow("ReadRunLock", ["s3:GetObject"], [_arn(output.bucket, layout.lock_key(output))]),
    ]


def _state_statements(state: S3Location) -> list[dict]:
    return [
        _list_statement("ListStatePrefix", state),
        _allow("ReadWriteState", ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"], [_objects(state)]),
    ]


def _log_statements(log: S3Location, emr_log: S3Location) -> list[dict]:
    return [
        _allow("WriteJobLog", ["s3:PutObject"], [_objects(log)]),
        _allow("WriteEmrClusterLogs", ["s3:PutObject"], [_objects(emr_log)]),
    ]


def _encryption_statements(job_writes: list[S3Location], kms_key_arn: str | None) -> list[dict]:
    """The denies that hold every request to TLS and every job write to its encryption; the key's use."""
    # Any other value of the header is a wrong encryption; with a KMS key, SSE-S3 is one too.
    sse_values = ["aws:kms"] if kms_key_arn else ["AES256", "aws:kms"]
    statements = [
        {"Sid": "DenyS3WithoutTls", "Effect": "Deny", "Action": "s3:*", "Resource": "*",
         "Condition": {"Bool": {"aws:SecureTransport": "false"}}},
        # Refuses a job write that asks for another encryption, not one that asks for none:
        # UploadPart and CompleteMultipartUpload are authorised as s3:PutObject and cannot carry
        # the header (S3 rejects it on UploadPart; it belongs to CreateMultipartUpload), so a deny
        # on a missing header -- Null "true", or StringNotEquals[IfExists], both true when the key
        # is absent -- would refuse every part of a streamed output. A missing header is left to
        # the job, which sends it on every PutObject and CreateMultipartUpload (tested), and to
        # the bucket's default encryption (S3 encrypts every new object, SSE-S3 at least).
        # EMR's own log pusher is not known to send it: its prefix is left to that default.
        {"Sid": "DenyJobWritesWithOtherSse", "Effect": "Deny", "Action": "s3:PutObject",
         "Resource": sorted({_objects(location) for location in job_writes}),
         "Condition": {"Null": {SSE_HEADER: "false"}, "StringNotEquals": {SSE_HEADER: sse_values}}},
    ]
    if kms_key_arn:
        statements.append(_allow("UseSseKmsKey", ["kms:GenerateDataKey", "kms:Decrypt"], [kms_key_arn]))
    return statements


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m extractor.deploy.iam",
                     description="Print the IAM policy (JSON) for the EMR cluster's EC2 instance profile.")
    parser.add_argument("--input", required=True, metavar="S3_URI", help="the job's --input")
    parser.add_argument("--output", required=True, metavar="S3_URI", help="the job's --output")
    parser.add_argument("--code", required=True, metavar="S3_URI",
                        help="prefix holding driver.py, extractor.zip, the bootstrap script, requirements.txt")
    parser.add_argument("--log-uri", default=None, metavar="S3_URI",
                        help="the job's --log-uri (default: <output>logs/)")
    parser.add_argument("--emr-log-uri", required=True, metavar="S3_URI", help="the cluster's LogUri")
    parser.add_argument("--weights", default=None, metavar="S3_URI",
                        help="the job's --weights, if it is an s3:// object")
    parser.add_argument("--kms-key-arn", default=None, metavar="ARN",
                        help="ARN of the job's --sse-kms-key-id key")
    parser.add_argument("--state", default=None, metavar="S3_URI",
                        help="the job's --state, if it runs with --incremental")
    parser.add_argument("--packed-env", default=None, metavar="S3_URI",
                        help="prefix of the packed environments (create_cluster.sh --packed-env)")
    parser.add_argument("--inventory", default=None, metavar="S3_URI",
                        help="the job's --inventory (an S3 Inventory manifest.json), if it reads one")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        policy = instance_profile_policy(args.input, args.output, args.code, args.log_uri,
                                         args.emr_log_uri, args.weights, args.kms_key_arn, args.state,
                                         args.packed_env, args.inventory)
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(policy, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
