"""Where the input's keys come from, and which listing the run uses (``--listing``, ``--inventory``).

Three ways, one result: a ``scan.KeyRanges`` (counts per fruit, skipped keys, one plan per
featurize partition, cut at ``state.partition_bounds``), so every way gives the same partitions
and the same outputs:

- ``driver``: one ListObjectsV2 walk on the driver; the plans carry the keys
  (``state.PartitionPlan``). No Spark job, but the driver holds every key (~0.5 KB each) and the
  walk is sequential (1,000 keys a call).
- ``distributed``: the driver walks only the folder tree; executor tasks list the folders, Spark
  sorts the keys, and each partition's keys go to a snapshot under the run's staging folder
  (``snapshot.RangePlan``). The driver holds counts and boundaries, never the keys.
- ``inventory`` (``--inventory``): as distributed, but the tasks read the data files of an
  S3 Inventory report instead of listing: no ListObjectsV2 call at all.

``auto`` (the default) lists on the driver while the input is small and hands the listing to
the executors once the walk has seen more than ``AUTO_DRIVER_MAX_KEYS`` keys: that many is at most
100 sequential calls (2-5 s at 20-50 ms a call) and ~50 MB on the driver; past it the driver's
memory and the walk's time grow with the bucket, while the distributed listing's fixed cost (three
short Spark jobs and the snapshot) is paid once. The keys the driver walk saw are dropped.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterator

from extractor.driver.scan import KeyRanges, enumerate_input
from extractor.driver.spark import failed_job_as_error
from extractor.errors import JobError
from extractor.storage.inventory import (
    InventoryManifest,
    configuration_folder,
    inventory_keys,
    read_manifest,
)
from extractor.storage.layout import listing_snapshot
from extractor.storage.listing import (
    ListingTooLong,
    discover_units,
    list_images,
    list_unit,
)
from extractor.storage.s3 import RetryLog, describe_s3_error, parse_s3_uri
from extractor.storage.state import plan_partitions

LISTING_MODES = ("auto", "driver", "distributed")   # --listing; --inventory is the third source
AUTO_DRIVER_MAX_KEYS = 100_000   # auto: the driver lists up to this many keys, the executors past it
UNITS_PER_CORE = 4               # listing units per core the folder walk aims for (a slow folder is a small share)


@dataclass(frozen=True)
class Choice:
    """The listing a run uses and why (for the log and the manifest)."""

    mode: str        # "driver", "distributed" or "inventory"
    why: str


def check_listing_options(listing: str, inventory: str | None) -> str | None:
    """The --inventory URI once checked against --listing (ValueError naming what was received)."""
    if listing not in LISTING_MODES:
        raise ValueError(f"--listing must be one of {', '.join(LISTING_MODES)}, got {listing!r}")
    if inventory is None:
        return None
    if listing != "auto":
        raise ValueError(f"--inventory replaces the listing: leave --listing out, got --listing {listing}")
    location = parse_s3_uri(inventory, folder=False)
    if configuration_folder(location.prefix) is None:
        raise ValueError(f"--inventory expects the s3:// URI of an inventory's manifest.json, got {inventory!r}")
    return inventory


def list_input(sc, s3_client, cfg, *, run_id: str, partitions: Callable[[int], int],
               logger: logging.Logger) -> KeyRanges:
    """The input's images as featurize partitions, with the listing ``cfg.listing`` asks for
    (``cfg.inventory``: read from that report). JobError (one line) when the input cannot be
    listed or the inventory read; ``mode`` and ``why`` of the result say what was used."""
    spread = partial(_distributed, sc, s3_client, cfg, run_id, partitions, logger)
    try:
        if cfg.inventory:
            return spread(Choice("inventory", f"--inventory {cfg.inventory}"))
        if cfg.listing == "distributed":
            return spread(Choice("distributed", "--listing distributed"))
        if cfg.listing == "driver":
            return _on_the_driver(s3_client, cfg, partitions, None, "--listing driver")
        try:
            return _on_the_driver(s3_client, cfg, partitions, AUTO_DRIVER_MAX_KEYS,
                                  f"--listing auto: {{n:,}} keys, at most {AUTO_DRIVER_MAX_KEYS:,} are listed on "
                                  f"the driver")
        except ListingTooLong:
            return spread(Choice("distributed", f"--listing auto: more than {AUTO_DRIVER_MAX_KEYS:,} keys under "
                                                f"--input"))
    except JobError:
        raise
    except ValueError as exc:   # a malformed inventory, an input that changed while it was listed
        raise JobError(str(exc)) from exc
    except Exception as exc:
        raise JobError(describe_s3_error(exc, f"cannot list {cfg.input.uri}")) from exc


def _on_the_driver(s3_client, cfg, partitions, limit: int | None, why: str) -> KeyRanges:
    """The driver's walk (ListingTooLong past ``limit`` keys); ``why`` may name the keys ``{n}``."""
    calls = RetryLog().attach(s3_client)  # its retries are already the driver's, in the manifest
    try:
        listing = list_images(s3_client, cfg.input, limit=limit)
    finally:
        calls.detach(s3_client)
    refs = [(ref.key, ref.label, ref.etag) for ref in listing.images]
    return KeyRanges(count=len(refs), by_label=Counter(label for _, label, _ in refs), skipped=listing.skipped,
                     skipped_examples=listing.skipped_examples, units=1, requests=calls.calls,
                     plans=plan_partitions(refs, partitions(len(refs))) if refs else [],
                     mode="driver", why=why.format(n=len(refs) + listing.skipped))


def _distributed(sc, s3_client, cfg, run_id: str, partitions, logger: logging.Logger, choice: Choice) -> KeyRanges:
    """The listing (or the inventory's reading) on the executors: scan.enumerate_input."""
    if choice.mode == "inventory":
        units, read = inventory_units(s3_client, cfg.inventory, cfg.input)
    else:
        units = discover_units(s3_client, cfg.input, min_units=max(16, UNITS_PER_CORE * sc.defaultParallelism))
        read = partial(list_unit, bucket=cfg.input.bucket)
    logger.info("listing on the executors (%s): %d units (folders, key ranges or inventory files)", choice.why,
                len(units))
    with failed_job_as_error():
        ranges = enumerate_input(sc, units, read=read, s3_settings=cfg.s3, output_bucket=cfg.output.bucket,
                                 snapshot_prefix=listing_snapshot(cfg.output, run_id).prefix, partitions=partitions)
    return replace(ranges, mode=choice.mode, why=choice.why)


def inventory_units(client, manifest_uri: str, location) -> tuple[list, Callable]:
    """(the inventory's data files, one listing task each; their reader) for the keys under
    ``location``. ValueError when the manifest is malformed or inventories another bucket."""
    manifest_location = parse_s3_uri(manifest_uri, folder=False)
    manifest = read_manifest(client, manifest_location.bucket, manifest_location.prefix)
    if manifest.source_bucket != location.bucket:
        raise ValueError(f"--inventory {manifest_uri} is an inventory of bucket {manifest.source_bucket!r}, "
                         f"--input is in {location.bucket!r}")
    # Each task gets the manifest with its own file only, not the whole list once per task.
    header = replace(manifest, files=[])
    return list(manifest.files), partial(_read_inventory, manifest=header, prefix=location.prefix)


def _read_inventory(client, unit, *, manifest: InventoryManifest, prefix: str) -> Iterator[tuple[str, str]]:
    return inventory_keys(client, replace(manifest, files=[unit]), unit[0], prefix)
