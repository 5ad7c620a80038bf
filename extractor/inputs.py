"""Where the input's keys come from: a ListObjectsV2 walk (the driver lists the folders, the
executors their keys) or an S3 Inventory report (the executors read its data files). Either
way the driver gets listing units and a reader for scan.enumerate_input, never the keys."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterator

from .inventory import InventoryManifest, inventory_keys, read_manifest
from .listing import discover_units, list_unit
from .s3 import parse_s3_uri

UNITS_PER_CORE = 4    # listing tasks per core the folder walk aims for (a slow folder is a small share)


@dataclass(frozen=True)
class InputSource:
    name: str            # for the log and the manifest: "list" or the inventory manifest's URI
    units: list          # one listing task each: listing.Unit, or an inventory data file
    read: Callable       # read(client, unit) -> Iterator[(key, etag)]


def input_source(client, cfg, parallelism: int) -> InputSource:
    """The listing units of ``cfg.input`` (``cfg.inventory``: the inventory's data files)."""
    if cfg.inventory:
        return inventory_source(client, cfg.inventory, cfg.input)
    units = discover_units(client, cfg.input, min_units=max(16, UNITS_PER_CORE * parallelism))
    return InputSource("list", units, partial(_read_listing, bucket=cfg.input.bucket))


def inventory_source(client, manifest_uri: str, location) -> InputSource:
    """The data files of the inventory whose manifest.json is ``manifest_uri``; ValueError when
    it is not an inventory of ``location``'s bucket."""
    manifest_location = parse_s3_uri(manifest_uri, folder=False)
    if not manifest_location.prefix.endswith("manifest.json"):
        raise ValueError(f"expected the s3:// URI of an inventory's manifest.json, got {manifest_uri!r}")
    manifest = read_manifest(client, manifest_location.bucket, manifest_location.prefix)
    if manifest.source_bucket != location.bucket:
        raise ValueError(f"it is an inventory of bucket {manifest.source_bucket!r}, --input is in "
                         f"{location.bucket!r}")
    # Each task gets the manifest with only its own file: not the whole list once per task.
    header = replace(manifest, files=[])
    return InputSource(manifest_uri, list(manifest.files), partial(_read_inventory, manifest=header,
                                                                   prefix=location.prefix))


def _read_listing(client, unit, *, bucket: str, page_size: int = 1000) -> Iterator[tuple[str, str]]:
    return list_unit(client, bucket, unit, page_size)


def _read_inventory(client, unit, *, manifest: InventoryManifest, prefix: str) -> Iterator[tuple[str, str]]:
    return inventory_keys(client, replace(manifest, files=[unit]), unit[0], prefix)
