"""What an erasure changes, worked out without S3 from what ``extractor.forget`` read: the output
files and state parts without the photos' rows, the manifest, the audit lines and the report."""

from __future__ import annotations

import copy
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import numpy as np

from extractor.errors import JobError
from extractor.forget.csv_rows import first_field, label_of, split_out
from extractor.results.formats import get_format, read_table
from extractor.results.outputs import KINDS
from extractor.results.report import rebuild as rebuild_report
from extractor.storage import state as state_store
from extractor.storage.layout import (
    ERRORS_FILE,
    MANIFEST_FILE,
    REPORT_FILE,
    SCATTER_PLOT_FILE,
    SCATTER_POINTS_FILE,
    STATE_FILE,
)
from extractor.storage.s3 import S3Location, parse_s3_uri

_PART_ARRAYS = ("keys", "etags", "labels", "vectors")


def key_sha256(uri: str) -> str:
    """The hex sha256 of a photo's URI: the audit log stores it instead of the URI."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()


class Request(NamedTuple):
    """One erasure as asked; ``stored``: uri -> the input key the state stores it under."""
    input: S3Location
    output: S3Location
    uris: list[str]                                # checked, deduplicated
    audit_log: S3Location
    request_id: str
    at: str
    state: S3Location | None
    no_state: bool
    stored: dict[str, str]


class Found(NamedTuple):
    """What was read before the output files (those are planned as they are read)."""
    manifest: dict | None
    recorded: str | None                           # the --state the manifest records
    warnings: list[str]                            # from check_state_choice
    input_versioned: bool
    photos: dict[str, tuple[bool, list[dict]]]     # uri -> (exists now, the {Key, VersionId} to delete)
    state: tuple[dict | None, dict[str, bytes]]    # (state.json, part name -> body), with --state
    audit: tuple[bytes, str] | None                # (body, content type) of the audit log
    pictures: dict[str, bytes | None] = {}         # the report's PNGs as they are (None: absent)


@dataclass
class StatePlan:
    """What to do to the state."""
    found: bool                                                # a state.json exists
    state: dict | None = None                                  # the new state.json, None if unchanged
    parts: dict[str, bytes] = field(default_factory=dict)      # part key -> new body
    emptied: list[str] = field(default_factory=list)           # delete once state.json no longer lists them
    removed: Counter = field(default_factory=Counter)          # stored key -> rows removed


class Plan(NamedTuple):
    """Every write, in ``forget``'s order, and each key's entry (uri -> ``key_entry``)."""
    rewrites: dict[str, tuple[bytes, str]]         # relative -> (new body, content type)
    manifest_body: bytes | None
    state: StatePlan | None
    audit: tuple[bytes, str]                       # the whole new audit log, its content type
    entries: dict[str, dict]
    found: Found


def remove_parquet_rows(data: bytes, paths: set[str], column_prefix: str) -> tuple[bytes, list[tuple[str, str]]]:
    """A vectors Parquet file without the rows whose path is in ``paths``, as the job encodes it. Returns
    (new file, the removed rows' (path, label)); ``data`` itself when nothing matched: never re-encoded."""
    row_paths, labels, matrix = read_table(data, "parquet")
    keep = [i for i, path in enumerate(row_paths) if path not in paths]
    if len(keep) == len(row_paths):
        return data, []
    removed = [(row_paths[i], labels[i]) for i in range(len(row_paths)) if row_paths[i] in paths]
    new = get_format("parquet").encode([row_paths[i] for i in keep], [labels[i] for i in keep], matrix[keep],
                                       column_prefix)
    return new, removed


def plan_rewrites(request: Request, files: Iterable[tuple[str, bytes, str, dict]]):
    """Returns (relative -> (new body, content type) of the ``files`` that lose rows, uri -> {relative:
    labels of its removed rows}, the new bodies of errors.csv and pca_scatter.csv, for the report);
    ``files`` (``erasure_io.read_output_files``) are consumed one at a time."""
    paths, rewrites, sources = set(request.uris), {}, {}
    removed: dict[str, dict[str, list[str]]] = {uri: {} for uri in request.uris}
    for relative, body, content_type, name in files:
        if name["ext"] == "parquet":
            try:
                new_body, rows = remove_parquet_rows(body, paths, KINDS[name["kind"]])
            except Exception as exc:  # pyarrow raises its own errors (ArrowInvalid, OSError, KeyError) on bad files
                raise JobError(f"{request.output.uri}{relative} is not a vectors Parquet file: {exc}") from exc
            content_type = content_type or get_format("parquet").content_type
        else:
            # surrogateescape: any byte that is not UTF-8 goes back out unchanged.
            new_text, records = split_out(body.decode("utf-8", "surrogateescape"), paths)
            rows = [(first_field(record), label_of(record)) for record in records]
            new_body, content_type = new_text.encode("utf-8", "surrogateescape"), content_type or "text/csv"
        for path, label in rows:
            removed[path].setdefault(relative, []).append(label)
        if rows:
            rewrites[relative] = (new_body, content_type)
        if relative in (ERRORS_FILE, SCATTER_POINTS_FILE):
            sources[relative] = new_body
    return rewrites, removed, sources


def rebuild_pictures(manifest: dict, rewrites: dict, sources: dict[str, bytes], pictures: dict) -> dict:
    """report.html and pca_scatter.png redone without the erased photos, for a run that wrote them
    (its manifest lists them). Returns relative -> (new body, content type)."""
    listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    if REPORT_FILE not in listed and SCATTER_PLOT_FILE not in listed:
        return {}
    points = sources.get(SCATTER_POINTS_FILE) if SCATTER_POINTS_FILE in rewrites else None
    shown = {k: v for k, v in manifest.items() if k != "files"}
    try:
        bodies = rebuild_report(shown, sources.get(ERRORS_FILE), points, pictures)
    except ValueError as exc:
        raise JobError(f"cannot redraw the pictures of {manifest.get('output')}: {exc}") from exc
    types = {REPORT_FILE: "text/html; charset=utf-8", SCATTER_PLOT_FILE: "image/png"}
    return {relative: (body, types[relative]) for relative, body in bodies.items() if relative in listed}


def _decrement(counts: dict, name: str) -> None:
    # Never below zero: a count already adjusted by hand must not turn negative.
    if isinstance(counts.get(name), int) and counts[name] > 0:
        counts[name] -= 1


def _update_manifest(manifest: dict, removed: dict[str, dict[str, list[str]]], at: str,
                     request_id: str) -> bool:
    """Decrement the counts for each photo whose rows were removed (uri -> {relative file: labels
    of the removed rows}; in features/ or pca/ it was featurized, in errors.csv it failed) and
    append it to ``erasures``. Returns whether anything changed."""
    counts = manifest["counts"] if isinstance(manifest.get("counts"), dict) else {}
    per_fruit = counts["per_fruit"] if isinstance(counts.get("per_fruit"), dict) else {}
    changed = False
    for uri, by_file in removed.items():
        if not by_file:
            continue
        outcomes = {}
        for relative, labels in sorted(by_file.items()):
            outcomes.setdefault("failed" if relative == ERRORS_FILE else "featurized", labels[0])
        for name in ["listed", *outcomes]:
            _decrement(counts, name)
        for outcome, label in outcomes.items():
            if isinstance(per_fruit.get(label), dict):
                _decrement(per_fruit[label], outcome)
        manifest.setdefault("erasures", []).append({"at": at, "key_sha256": key_sha256(uri), "request_id": request_id})
        changed = True
    return changed


def _update_files(manifest: dict, bodies: dict[str, bytes]) -> bool:
    """Set size and sha256 of each rewritten file listed (readers verify by them); returns whether any was."""
    files = manifest["files"] if isinstance(manifest.get("files"), dict) else {}
    listed = [(files[relative], body) for relative, body in bodies.items() if isinstance(files.get(relative), dict)]
    for entry, body in listed:
        entry.update(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    return bool(listed)


def check_state_choice(recorded: str | None, state_location: S3Location | None, no_state: bool) -> list[str]:
    """Refuse to leave a recorded state's vectors behind unless told to (a ValueError says how); returns warnings."""
    if state_location is not None and no_state:
        raise ValueError(f"--state {state_location.uri} and --no-state contradict each other; give one")
    if recorded is None or no_state:
        return []
    if state_location is None:
        raise ValueError(f"{MANIFEST_FILE} records the incremental state {recorded}: pass --state {recorded} to "
                         f"remove the photos' vectors from it too, or --no-state to leave them there")
    try:
        same = parse_s3_uri(recorded) == state_location
    except ValueError:
        same = False
    # Not a refusal: the state may have been moved since, and --state is then the right place.
    return [] if same else [f"--state {state_location.uri} is not the state {MANIFEST_FILE} records ({recorded}); "
                            f"vectors stored there were not looked at"]


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


def part_to_read(entry, keys: set[str], location: S3Location) -> str | None:
    """The part's name if its [first, last] could hold one of ``keys``, else None; JobError if malformed."""
    try:
        could_hold = any(entry["first"] <= key <= entry["last"] for key in keys)
        relative = entry["key"]
    except (KeyError, TypeError) as exc:
        raise JobError(f"{location.uri}{STATE_FILE} has a malformed part entry {entry!r}") from exc
    return relative if could_hold else None


def plan_state(location: S3Location, current: dict | None, bodies: dict[str, bytes], keys: set[str],
               at: str) -> StatePlan:
    """The state without ``keys``, from state.json (``current``, None if there is none) and the
    bodies of the parts ``part_to_read`` picks. JobError for a part that is not one."""
    plan = StatePlan(found=current is not None)
    parts, changed = [], False
    for entry in (current or {}).get("parts") or []:
        relative = part_to_read(entry, keys, location)
        if relative is None:
            parts.append(entry)
            continue
        part_key = location.key(relative)
        try:
            kept, gone = split_part(bodies[relative], keys)
        except Exception as exc:  # np.load fails in many ways (BadZipFile, EOFError, ValueError) on bad bytes
            raise JobError(f"s3://{location.bucket}/{part_key} is not a state part: {exc}") from exc
        plan.removed.update(gone)
        kept_keys = kept["keys"].tolist()
        if gone:
            # An emptied part is rewritten empty too, and deleted only after state.json stops
            # listing it: if that delete fails, the object left behind holds no vector.
            plan.parts[part_key] = state_store.part_bytes(kept_keys, kept["etags"].tolist(),
                                                          kept["labels"].tolist(), kept["vectors"])
        if not kept_keys:
            plan.emptied.append(part_key)
            changed = True
            continue
        # Recomputed even when nothing is gone: a run that failed before state.json left it stale.
        new_entry = {**entry, "first": min(kept_keys), "last": max(kept_keys), "rows": len(kept_keys)}
        changed = changed or new_entry != entry
        parts.append(new_entry)
    if changed:
        # rows and updated_at as state.write_state sets them: a malformed entry fails before any write.
        plan.state = {**current, "parts": parts, "rows": sum(p["rows"] for p in parts), "updated_at": at}
    return plan


def plan_erasure(request: Request, found: Found, files: Iterable[tuple[str, bytes, str, dict]]) -> Plan:
    """What to write, from what was read and the output ``files`` (read as they are consumed).
    Returns the Plan; JobError for an output file or a state part that is not one."""
    rewrites, removed, sources = plan_rewrites(request, files)
    body = None
    if rewrites and found.manifest is not None:
        manifest = copy.deepcopy(found.manifest)  # what was read stays as it was read
        changed = _update_manifest(manifest, removed, request.at, request.request_id)
        rewrites.update(rebuild_pictures(manifest, rewrites, sources, found.pictures))
        if _update_files(manifest, {rel: new for rel, (new, _) in rewrites.items()}) or changed:
            body = json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8")
    state = None if request.state is None else \
        plan_state(request.state, *found.state, set(request.stored.values()), request.at)
    def state_fields(uri: str) -> dict:
        # Only when a state was named or explicitly declined, so that older audit lines keep their shape.
        if state is not None:
            return {"state": request.state.uri, "state_rows_removed": state.removed[request.stored[uri]]}
        return {"state": found.recorded, "state_rows_removed": None} if request.no_state else {}

    entries = {uri: key_entry(uri, *found.photos[uri], removed[uri], state_fields(uri)) for uri in request.uris}
    lines = [json.dumps({"at": request.at, "request_id": request.request_id, "input": request.input.uri,
                         "output": request.output.uri, **entries[uri]}, ensure_ascii=False) for uri in request.uris]
    return Plan(rewrites, body, state, audit_body(found.audit, lines), entries, found)


def key_entry(uri: str, existed: bool, targets: list, removed: dict[str, list[str]], state_fields: dict) -> dict:
    """What the audit line (adding the request) and the report (adding the URI) both say of a key."""
    return {"key_sha256": key_sha256(uri), "object_existed": existed, "versions_deleted": len(targets),
            "files_rewritten": {rel: len(labels) for rel, labels in sorted(removed.items())}, **state_fields}


def audit_body(log: tuple[bytes, str] | None, lines: list[str]) -> tuple[bytes, str]:
    """The audit log as read (None: none yet) with ``lines`` appended; returns (body, content type)."""
    text, content_type = (log[0].decode("utf-8", "surrogateescape"), log[1]) if log else ("", "")
    if text and not text.endswith("\n"):
        text += "\n"
    body = (text + "".join(line + "\n" for line in lines)).encode("utf-8", "surrogateescape")
    return body, content_type or "application/x-ndjson"


def report(request: Request, plan: Plan, versioned: tuple[bool, bool], dry_run: bool) -> dict:
    """``forget``'s report, with the raw URIs (for the operator, never for the audit log);
    ``versioned``: whether the output's and the state's buckets keep earlier versions."""
    warnings, state = list(plan.found.warnings), plan.state
    if versioned[0]:
        warnings.append(f"bucket {request.output.bucket} is versioned: earlier versions of the "
                        f"rewritten files still hold the removed rows until they are deleted")
    if state is None:
        state_report = {"uri": plan.found.recorded, "skipped": True} if request.no_state else None
    else:
        if not state.found:
            warnings.append(f"no {STATE_FILE} under --state {request.state.uri}: no stored vectors were found there")
        start = len(request.state.prefix)
        state_report = {"uri": request.state.uri, "skipped": False, "found": state.found,
                        "rows_removed": sum(state.removed.values()),
                        "parts_rewritten": sorted(k[start:] for k in state.parts if k not in state.emptied),
                        "parts_deleted": sorted(k[start:] for k in state.emptied),
                        "state_json_updated": state.state is not None}
    if versioned[1]:
        warnings.append(f"bucket {request.state.bucket} is versioned: earlier versions of the "
                        f"rewritten state parts still hold the removed vectors until they are deleted")
    return {"request_id": request.request_id, "dry_run": dry_run, "at": request.at, "input": request.input.uri,
            "output": request.output.uri, "audit_log": request.audit_log.uri,
            "keys": [{"uri": uri, **plan.entries[uri]} for uri in request.uris],
            "files_rewritten": sorted(plan.rewrites), "manifest_updated": plan.manifest_body is not None,
            "state": state_report, "warnings": warnings}
