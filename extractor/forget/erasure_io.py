"""An erasure's S3 side (``extractor.forget``): everything read before a change (the photos and
their versions, the output's files and manifest, the incremental state), and the writes that
apply ``erasure.plan_erasure``'s plan, in order: output files, manifest, state parts,
state.json, photos, audit log."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator

from extractor.errors import JobError
from extractor.forget import erasure
from extractor.forget.erasure import Found, Plan, Request, StatePlan, part_to_read
from extractor.storage import layout
from extractor.storage import state as state_store
from extractor.storage.layout import MANIFEST_FILE, STATE_FILE
from extractor.storage.s3 import (
    S3Location,
    S3Settings,
    delete_keys,
    delete_objects,
    describe_s3_error,
    list_keys,
    put_bytes,
)


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
