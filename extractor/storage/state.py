"""What incremental runs remember: every featurized key with its ETag, label and vector.

Layout under ``--state`` (an S3 folder)::

    state.json                      which version is current, its fingerprint and its parts
    v-<run id>/part-00042.npz       one part per Spark partition: keys, etags, labels, vectors

Each part holds a contiguous, sorted range of keys, so a partition of a later run reads only
the parts that overlap its own key range. ``state.json`` is written last: a run that fails
before leaves the previous version current, and its orphan parts are removed by the next
commit.
"""

from __future__ import annotations

import io
import json
from bisect import bisect_left
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import numpy as np

from extractor.errors import JobError
from extractor.records import key_order
from extractor.storage.layout import STATE_FILE, lock_key, state_part
from extractor.storage.s3 import (
    S3Location,
    delete_keys,
    describe_s3_error,
    list_keys,
    put_bytes,
)

STATE_FORMAT = 1


def fingerprint(spec, weights_sha256: str, precision: str, decode: str = "draft") -> dict:
    """What must be equal for a stored vector to be reused: model, layer, input, decoding,
    preprocessing, weights and precision."""
    return {"model": spec.name, "output_layer": spec.output_layer, "output_dim": spec.output_dim,
            "input_size": list(spec.input_size), "decode": decode, "preprocessing": spec.preprocess.__name__,
            "weights_sha256": weights_sha256, "precision": precision}


def load_state(client, location: S3Location) -> dict | None:
    """The current ``state.json``, or None when the folder has none yet."""
    try:
        body = client.get_object(Bucket=location.bucket, Key=location.key(STATE_FILE))["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    state = json.loads(body)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{location.uri}{STATE_FILE} has format {state.get('format')!r}, "
                         f"this version reads {STATE_FORMAT}")
    return state


@dataclass(frozen=True)
class PartitionPlan:
    """One Spark partition's work: its listed images and the state parts that may hold them.

    The partition owns the key range [lower, upper) (None: unbounded), so every stored key
    falls in exactly one partition: the one that reuses it, or counts it as removed.
    """

    index: int
    refs: list[tuple[str, str, str]]          # (key, label, etag), sorted by key
    lower: str | None = None
    upper: str | None = None
    state_parts: list[str] = field(default_factory=list)   # keys of part objects to read

    def owns(self, key: str) -> bool:
        return (self.lower is None or key >= self.lower) and (self.upper is None or key < self.upper)


def partition_bounds(n: int, n_partitions: int) -> list[int]:
    """Where each of the partitions of ``n`` sorted keys starts, by rank, plus ``n``: the split
    ``sc.parallelize`` makes (at most ``n`` partitions, at least one)."""
    if n_partitions < 1:
        raise ValueError(f"n_partitions must be >= 1, got {n_partitions}")
    n_partitions = min(n_partitions, max(1, n))
    return [n * i // n_partitions for i in range(n_partitions + 1)]


def plan_partitions(refs: list[tuple[str, str, str]], n_partitions: int) -> list[PartitionPlan]:
    """Split sorted ``refs`` into ``n_partitions`` contiguous ranges (as ``sc.parallelize`` would);
    ``with_state_parts`` gives them their stored parts."""
    bounds = partition_bounds(len(refs), n_partitions)
    if any(refs[i][0] >= refs[i + 1][0] for i in range(len(refs) - 1)):
        raise ValueError("refs must be sorted by key, without duplicates")
    n_partitions = len(bounds) - 1
    plans = []
    for index in range(n_partitions):
        chunk = refs[bounds[index]:bounds[index + 1]]
        lower = None if index == 0 else chunk[0][0]
        upper = None if index == n_partitions - 1 else refs[bounds[index + 1]][0]
        plans.append(PartitionPlan(index, chunk, lower, upper))
    return plans


def with_state_parts(plans: list, state: dict | None, state_location: S3Location | None) -> list:
    """``plans`` (PartitionPlan, or snapshot.RangePlan: anything with ``lower``, ``upper`` and
    ``state_parts``), each given the keys of the stored parts of ``state`` (``state.json``) that
    may hold keys of its range [lower, upper)."""
    parts = (state or {}).get("parts", [])
    return [replace(plan, state_parts=[state_location.key(p["key"]) for p in parts
                                       if (plan.upper is None or p["first"] < plan.upper)
                                       and (plan.lower is None or p["last"] >= plan.lower)])
            for plan in plans]


@dataclass
class StoredRows:
    """Rows of a state part (or several), sorted by key."""

    keys: list[str]
    etags: list[str]
    labels: list[str]
    vectors: np.ndarray    # (n, d) float32

    def find(self, key: str) -> int | None:
        i = bisect_left(self.keys, key)
        return i if i < len(self.keys) and self.keys[i] == key else None


def read_rows(client, bucket: str, part_keys: list[str], plan: PartitionPlan) -> StoredRows:
    """The stored rows of ``plan``'s key range, from the parts that overlap it."""
    keys, etags, labels, blocks = [], [], [], []
    for part_key in part_keys:
        body = client.get_object(Bucket=bucket, Key=part_key)["Body"].read()
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            part_keys_ = npz["keys"].tolist()
            mine = [i for i, key in enumerate(part_keys_) if plan.owns(key)]
            if not mine:
                continue
            keys.extend(part_keys_[i] for i in mine)
            etags.extend(npz["etags"][mine].tolist())
            labels.extend(npz["labels"][mine].tolist())
            blocks.append(npz["vectors"][mine])
    order = key_order(keys)
    vectors = np.concatenate(blocks)[order] if blocks else np.zeros((0, 0), np.float32)
    return StoredRows([keys[i] for i in order], [etags[i] for i in order], [labels[i] for i in order], vectors)


def part_bytes(keys: list[str], etags: list[str], labels: list[str], vectors: np.ndarray) -> bytes:
    """An .npz of one part, rows sorted by key; strings stored as numpy unicode (no pickle)."""
    order = key_order(keys)
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.asarray([keys[i] for i in order], dtype=str),
             etags=np.asarray([etags[i] for i in order], dtype=str),
             labels=np.asarray([labels[i] for i in order], dtype=str),
             vectors=np.asarray(vectors, dtype=np.float32)[order])
    return buffer.getvalue()


def write_part(client, settings, location: S3Location, version: str, index: int, keys: list[str],
               etags: list[str], labels: list[str], vectors: np.ndarray) -> dict | None:
    """Store one partition's rows; returns the part's entry for ``state.json`` (None when empty).
    Deterministic name: a retried task overwrites its own part."""
    if not keys:
        return None
    name = state_part(version, index)
    put_bytes(client, settings, location.bucket, location.key(name), part_bytes(keys, etags, labels, vectors),
              "application/octet-stream")
    return {"key": name, "first": min(keys), "last": max(keys), "rows": len(keys)}


def write_state(client, settings, location: S3Location, state: dict, updated_at: str | None = None) -> dict:
    """Write ``state.json`` (every writer of it comes here): ``state`` with its ``rows`` recounted
    from its parts and ``updated_at`` set (now, unless given). Returns what was written."""
    state = dict(state)  # a key already there keeps its place
    state["rows"] = sum(p["rows"] for p in state["parts"])
    state["updated_at"] = updated_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
    put_bytes(client, settings, location.bucket, location.key(STATE_FILE),
              json.dumps(state, indent=1, ensure_ascii=False).encode("utf-8"), "application/json")
    return state


def commit(client, settings, location: S3Location, version: str, fingerprint_: dict, parts: list[dict]) -> list[str]:
    """Make ``version`` current, then delete every other part under the folder (older versions,
    parts of failed runs), the run lock excepted. Returns the keys deleted."""
    parts = sorted(parts, key=lambda p: p["first"])
    write_state(client, settings, location, {"format": STATE_FORMAT, "version": version, "fingerprint": fingerprint_,
                                             "parts": parts})
    current = {location.key(p["key"]) for p in parts} | {location.key(STATE_FILE), lock_key(location)}
    stale = [key for key in list_keys(client, location.bucket, location.prefix) if key not in current]
    delete_keys(client, location.bucket, stale)
    return stale


# --- driver side ---------------------------------------------------------------------------

def load_for_run(client, location: S3Location) -> dict | None:
    """``load_state`` for a run: a JobError (one line) when the state cannot be read or used."""
    try:
        return load_state(client, location)
    except ValueError as exc:
        raise JobError(f"cannot use --state {location.uri}: {exc}") from exc
    except Exception as exc:
        raise JobError(describe_s3_error(exc, f"cannot read --state {location.uri}")) from exc


class Incremental:
    """An incremental run's view of the state: the previous version (if usable) and the new one."""

    def __init__(self, location: S3Location, previous: dict | None, fingerprint: dict, version: str, note: str):
        self.location, self.previous, self.fingerprint, self.version = location, previous, fingerprint, version
        self.note = note
        self.result: dict = {}

    @classmethod
    def plan(cls, location: S3Location, spec, weights, precision: str, previous: dict | None, run_id: str,
             logger, decode: str = "draft") -> "Incremental":
        """Reuse ``previous`` only if it was made with the same fingerprint; the new version is
        named after the run. A state written before --decode existed was decoded full size."""
        fingerprint_ = fingerprint(spec, weights.sha256, precision, decode)
        if previous is not None and "decode" not in previous["fingerprint"]:
            previous = {**previous, "fingerprint": {**previous["fingerprint"], "decode": "full"}}
        version = run_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        if previous is None:
            note = "no state yet: every image is new"
        elif previous["fingerprint"] != fingerprint_:
            changed = sorted(k for k in fingerprint_ if previous["fingerprint"].get(k) != fingerprint_[k])
            note = f"state made with another {', '.join(changed)}: every image is featurized again"
            if changed == ["decode"]:
                note += f" (--decode {previous['fingerprint']['decode']} would reuse it)"
            logger.warning("incremental: %s", note)
            previous = None
        else:
            note = f"reusing version {previous['version']} ({previous['rows']} vectors)"
        logger.info("incremental: %s; this run stores version %s", note, version)
        return cls(location, previous, fingerprint_, version, note)

    def commit(self, client, settings, stats: list[dict], logger) -> None:
        """Make this run's parts (named in the tasks' stats) the current state."""
        parts = [item["state_part"] for item in stats if item.get("state_part")]
        removed = commit(client, settings, self.location, self.version, self.fingerprint, parts)
        rows = sum(p["rows"] for p in parts)
        logger.info("state %s: version %s, %d vectors in %d parts; %d old objects removed", self.location.uri,
                    self.version, rows, len(parts), len(removed))
        self.result.update(stored_vectors=rows, parts=len(parts))

    def as_manifest(self) -> dict:
        return {"state": self.location.uri, "previous_version": self.previous["version"] if self.previous else None,
                "version": self.version, "note": self.note, **self.result}
