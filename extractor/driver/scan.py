"""Enumerate the input on the executors and cut it into contiguous key ranges.

The driver hands out listing units (folders from ``listing.discover_units``, or the data files of
an S3 Inventory); executor tasks (``extractor.executor.listing_tasks``) list them, Spark sorts the
keys, and each featurize partition's keys are written once to a snapshot under the run's staging
folder (``extractor.storage.snapshot``). The driver keeps per-fruit
counts, a few examples and one ``RangePlan`` per partition — never the keys — so its memory
does not grow with the bucket, and the featurize tasks' lineage reads S3 objects this run wrote:
a task run again after an executor loss sees exactly the keys it saw first, even when photos
keep landing in the input.

Spark jobs, in order: (1) list the units and summarize each task (counts, a key sample),
(2) range-partition the keys on the sample and sort each range, counting them, (3) write the
snapshot pieces. Partition ``i`` holds the keys of global rank ``[n*i//P, n*(i+1)//P)``, the
split ``sc.parallelize`` made of the sorted driver-side listing before: the same partitions,
hence byte-identical outputs.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from extractor.driver.spark import job_group
from extractor.executor import listing_tasks
from extractor.storage.listing import SKIPPED_EXAMPLES
from extractor.storage.s3 import delete_keys
from extractor.storage.snapshot import RangePlan
from extractor.storage.state import partition_bounds

TASKS_PER_CORE = 4              # listing tasks per core: units (folders, key ranges, inventory files) are
                                # dealt round robin, so a big folder's ranges run side by side and an
                                # empty range costs a request, not a Spark task
KEYS_PER_SORT_RANGE = 100_000   # keys one sort task holds (~15 MB as Python tuples)


@dataclass
class KeyRanges:
    """What the driver keeps of the enumeration: counts, examples, and the partitions' plans."""

    count: int                               # image keys
    by_label: Counter                        # label -> image keys
    skipped: int                             # non-image keys
    skipped_examples: list[str]
    units: int                               # listing units (folders, key ranges or inventory files)
    plans: list[RangePlan]
    retries: dict = field(default_factory=dict)   # S3 retries of the listing tasks, per operation
    requests: int = 0                        # list/read requests the tasks made
    mode: str = "distributed"                # the listing used (inputs.list_input): driver, distributed, inventory
    why: str = ""
    released: bool = False                   # the snapshot was deleted
    tasks: int = 0                           # Spark tasks that listed the units (0: the driver did)

    @property
    def labels(self) -> int:
        return len(self.by_label)

    def snapshot_keys(self) -> list[str]:
        """The snapshot's pieces (none when the plans carry their keys: the driver listing)."""
        return [key for plan in self.plans if isinstance(plan, RangePlan) for key in plan.pieces]

    def release(self, client, bucket: str) -> None:
        """Delete the snapshot once no featurize task can need it again (twice is harmless)."""
        keys = [] if self.released else self.snapshot_keys()
        if keys:
            delete_keys(client, bucket, keys)
        self.released = True

    def as_manifest(self) -> dict:
        """The manifest's ``listing``: which listing, why, and what it cost."""
        return {"mode": self.mode, "why": self.why, "units": self.units, "tasks": self.tasks,
                "requests": self.requests, "folders": self.labels}

def split_points(summaries: list[dict], ranges: int) -> list[str]:
    """``ranges - 1`` keys that cut the sampled keys into ranges of about equal weight (each
    sample key stands for its task's images / its sample size)."""
    weighted = sorted((key, s["images"] / len(s["sample"])) for s in summaries if s["sample"] for key in s["sample"])
    total = sum(weight for _, weight in weighted)
    splits, cumulative, target = [], 0.0, 1
    for key, weight in weighted:
        cumulative += weight
        if target < ranges and cumulative >= total * target / ranges and (not splits or key > splits[-1]):
            splits.append(key)
            target += 1
    return splits


def enumerate_input(sc, units: list, *, read: Callable, s3_settings, output_bucket: str, snapshot_prefix: str,
                    partitions: Callable[[int], int], client_factory: Callable | None = None) -> KeyRanges:
    """List ``units`` on the executors and plan the featurize partitions (see the module doc).
    ``partitions(n)``: how many for ``n`` image keys. ValueError when the input changed between
    the jobs (a re-listed task saw other keys: run again)."""
    from pyspark import StorageLevel

    client_factory = client_factory or s3_settings.client
    tasks = max(1, min(len(units), TASKS_PER_CORE * sc.defaultParallelism))
    listed = (sc.parallelize([units[task::tasks] for task in range(tasks)], tasks)
              .mapPartitionsWithIndex(partial(listing_tasks.enumerate_units, read=read, client_factory=client_factory))
              .persist(StorageLevel.MEMORY_AND_DISK))
    sorted_refs = None
    try:
        with job_group(sc, "list", f"list {len(units)} folders, key ranges or inventory files in {tasks} tasks"):
            summaries = listed.mapPartitions(listing_tasks.summaries).collect()
        ranges = _summarize(summaries, len(units))
        ranges.tasks = tasks
        if not ranges.count:
            return ranges
        bounds = partition_bounds(ranges.count, partitions(ranges.count))
        n_ranges = max(1, min(len(bounds) - 1, -(-ranges.count // KEYS_PER_SORT_RANGE)))
        splits = split_points(summaries, n_ranges)
        sorted_refs = (listed.filter(listing_tasks.is_image).map(listing_tasks.keyed)
                       .partitionBy(len(splits) + 1, partial(listing_tasks.range_of, splits=splits))
                       .mapPartitions(listing_tasks.sorted_range)
                       .persist(StorageLevel.MEMORY_AND_DISK))
        with job_group(sc, "list", f"sort {ranges.count:,} keys in {len(splits) + 1} ranges"):
            counts = sorted_refs.mapPartitions(listing_tasks.count).collect()
        if sum(counts) != ranges.count:
            raise ValueError(f"the input changed while it was listed ({ranges.count} then {sum(counts)} "
                             f"image keys); run again")
        offsets = [sum(counts[:i]) for i in range(len(counts))]
        with job_group(sc, "list", f"snapshot the listing in {len(bounds) - 1} partitions"):
            pieces = sorted_refs.mapPartitionsWithIndex(partial(
                listing_tasks.write_pieces, offsets=offsets, bounds=bounds, client_factory=client_factory,
                s3_settings=s3_settings, bucket=output_bucket, prefix=snapshot_prefix)).collect()
        ranges.plans = _plans(pieces, bounds)
        retries = Counter(ranges.retries)
        for *_, piece_retries in pieces:
            retries.update(piece_retries)
        ranges.retries = dict(retries)
        return ranges
    finally:
        listed.unpersist()
        if sorted_refs is not None:
            sorted_refs.unpersist()


def _summarize(summaries: list[dict], units: int) -> KeyRanges:
    by_label: Counter = Counter()
    retries: Counter = Counter()
    for s in summaries:
        by_label.update(s["labels"])
        retries.update(s["retries"])
    examples = heapq.nsmallest(SKIPPED_EXAMPLES, (key for s in summaries for key in s["examples"]))
    return KeyRanges(count=sum(s["images"] for s in summaries), by_label=by_label,
                     skipped=sum(s["skipped"] for s in summaries), skipped_examples=examples, units=units, plans=[],
                     retries=dict(retries), requests=sum(s["requests"] for s in summaries))


def _plans(pieces: list[tuple], bounds: list[int]) -> list[RangePlan]:
    by_partition: dict[int, list] = {}
    for partition, range_index, count, first, key, _ in sorted(pieces, key=lambda piece: piece[:2]):
        by_partition.setdefault(partition, []).append((range_index, count, first, key))
    n = len(bounds) - 1
    if sorted(by_partition) != list(range(n)):
        raise ValueError(f"listing snapshot: {len(by_partition)} of {n} partitions written")
    firsts = [by_partition[i][0][2] for i in range(n)]
    plans = []
    for i in range(n):
        own = by_partition[i]
        count = sum(c for _, c, _, _ in own)
        if count != bounds[i + 1] - bounds[i]:
            raise ValueError(f"listing snapshot: partition {i} holds {count} keys, "
                             f"{bounds[i + 1] - bounds[i]} expected")
        plans.append(RangePlan(i, count, [key for _, _, _, key in own], firsts[i] if i else None,
                               firsts[i + 1] if i + 1 < n else None))
    return plans
