"""The listing snapshot: each featurize partition's keys, written once under the run's staging
folder (``layout.listing_snapshot``) as gzipped JSON-lines pieces and read back by the task that
featurizes them, so a task run again after an executor loss sees exactly the keys it saw first.
The driver keeps one ``RangePlan`` per partition, never the keys."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field

from extractor.storage.state import PartitionPlan


@dataclass
class RangePlan:
    """Featurize partition ``index``: ``count`` keys in the snapshot ``pieces`` (in order), the key
    range [lower, upper) it owns (None: unbounded) and the state parts that may hold them."""

    index: int
    count: int
    pieces: list[str]
    lower: str | None
    upper: str | None
    state_parts: list[str] = field(default_factory=list)


def piece_key(prefix: str, partition: int, sort_range: int) -> str:
    """The piece of ``partition``'s keys that sort range ``sort_range`` holds."""
    return f"{prefix}part-{partition:05d}-{sort_range:05d}.jsonl.gz"


def piece_bytes(refs) -> bytes:
    """``(key, label, etag)`` tuples -> one piece's body, in their order."""
    return gzip.compress("".join(json.dumps(ref, ensure_ascii=False) + "\n" for ref in refs).encode("utf-8"),
                         compresslevel=1)


def piece_refs(body: bytes) -> list[tuple]:
    """A piece's body -> its ``(key, label, etag)`` tuples (``piece_bytes`` inverted)."""
    return [tuple(json.loads(line)) for line in gzip.decompress(body).decode("utf-8").splitlines()]


def load_plan(client, bucket: str, plan: RangePlan) -> PartitionPlan:
    """A RangePlan's keys read back from the snapshot: the PartitionPlan a featurize task runs."""
    refs = []
    for key in plan.pieces:
        refs.extend(piece_refs(client.get_object(Bucket=bucket, Key=key)["Body"].read()))
    if len(refs) != plan.count:
        raise ValueError(f"listing snapshot of partition {plan.index} holds {len(refs)} keys, "
                         f"{plan.count} were written")
    return PartitionPlan(plan.index, refs, plan.lower, plan.upper, plan.state_parts)
