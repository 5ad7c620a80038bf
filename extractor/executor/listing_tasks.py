"""The listing's executor tasks (``extractor.driver.scan`` runs them): list units, sort each key
range, write the snapshot pieces. Plain functions of plain values, testable without Spark."""

from __future__ import annotations

import heapq
import random
from bisect import bisect_right
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

from extractor.storage.listing import SKIPPED_EXAMPLES, is_image_key, label_for_key
from extractor.storage.s3 import RetryLog, put_bytes
from extractor.storage.snapshot import piece_bytes, piece_key

SAMPLE_PER_TASK = 64            # keys each listing task samples for the sort's range boundaries
PUT_THREADS = 8                 # snapshot pieces one sort task puts at once

IMAGE, SKIPPED, STATS = "i", "s", "t"   # the first field of a listing task's records


def enumerate_units(index: int, groups: Iterable[list], *, read: Callable, client_factory: Callable,
                    sample_size: int = SAMPLE_PER_TASK) -> Iterator[tuple]:
    """One listing task over its group(s) of units: ``(IMAGE, key, label, etag)`` per image key,
    ``(SKIPPED, key)`` per other key, then one ``(STATS, dict)``: counts per label, skipped
    examples, a sample."""
    client = client_factory()
    retry_log = RetryLog.of_task(client)
    rng = random.Random(index)   # a fixed sample: the same run twice partitions the same way
    labels: Counter = Counter()
    skipped, examples, sample, seen = 0, [], [], 0
    for unit in (unit for group in groups for unit in group):
        for key, etag in read(client, unit):
            if is_image_key(key):
                label = label_for_key(key)
                labels[label] += 1
                seen += 1
                if len(sample) < sample_size:       # reservoir sampling, one pass
                    sample.append(key)
                elif (slot := rng.randrange(seen)) < sample_size:
                    sample[slot] = key
                yield IMAGE, key, label, etag
            else:
                skipped += 1
                examples = heapq.nsmallest(SKIPPED_EXAMPLES, examples + [key])
                yield SKIPPED, key
    yield STATS, {"labels": labels, "skipped": skipped, "examples": examples, "sample": sample, "images": seen,
                   "retries": dict(retry_log.by_operation) if retry_log is not None else {},
                   "requests": retry_log.calls if retry_log is not None else getattr(client, "requests", 0)}


def summaries(records) -> list[dict]:
    """A listing task's records -> its STATS dict, alone."""
    return [record[1] for record in records if record[0] == STATS]


def is_image(record: tuple) -> bool:
    return record[0] == IMAGE


def keyed(record: tuple) -> tuple[str, tuple[str, str]]:
    """An IMAGE record -> ``(key, (label, etag))``, to be range-partitioned by key."""
    return record[1], (record[2], record[3])


def range_of(key: str, splits: list[str]) -> int:
    """The sort range of ``key``: Spark's partitioner, run on the executors."""
    return bisect_right(splits, key)


def sorted_range(items) -> Iterator[tuple[str, str, str]]:
    """One sort range: ``(key, label, etag)`` sorted by key; a key listed twice fails the task."""
    refs = sorted((key, label, etag) for key, (label, etag) in items)
    for i in range(1, len(refs)):
        if refs[i - 1][0] == refs[i][0]:
            raise ValueError(f"key listed twice: {refs[i][0]!r}")
    return iter(refs)


def count(items) -> list[int]:
    """A sort range -> [its number of keys]."""
    return [sum(1 for _ in items)]


def write_pieces(index: int, refs, *, offsets: list[int], bounds: list[int], client_factory: Callable,
                 s3_settings, bucket: str, prefix: str) -> Iterator[tuple[int, int, int, str, str, dict]]:
    """Sort range ``index`` (its first key has global rank ``offsets[index]``) cut at the
    partition ``bounds``: one gzipped JSON-lines piece per partition it overlaps, put
    ``PUT_THREADS`` at a time (a range holds hundreds of pieces; each PUT waits on S3). Yields
    ``(partition, range, count, first key, piece key, S3 retries)``, the task's retries on its first."""
    client = client_factory()
    retry_log = RetryLog.of_task(client)
    pieces: list[tuple[int, list]] = []
    for rank, ref in enumerate(refs, offsets[index]):
        owner = bisect_right(bounds, rank) - 1
        if not pieces or pieces[-1][0] != owner:
            pieces.append((owner, []))
        pieces[-1][1].append(ref)

    def put(piece: tuple[int, list]) -> tuple[int, int, int, str, str]:
        partition, chunk = piece
        key = piece_key(prefix, partition, index)
        put_bytes(client, s3_settings, bucket, key, piece_bytes(chunk), "application/gzip")
        return partition, index, len(chunk), chunk[0][0], key

    with ThreadPoolExecutor(max_workers=PUT_THREADS) as pool:
        written = list(pool.map(put, pieces))
    retries = dict(retry_log.by_operation) if retry_log is not None else {}
    for i, piece in enumerate(written):
        yield (*piece, retries if i == 0 else {})
