"""List the images under an S3 prefix and label each by its parent folder."""

from __future__ import annotations

from dataclasses import dataclass, field

from extractor.storage.s3 import S3Location, list_objects

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SKIPPED_EXAMPLES = 10   # non-image keys named in the log and the manifest (the first in key order)


@dataclass(frozen=True)
class ImageRef:
    key: str
    label: str
    etag: str = ""   # S3's ETag: an incremental run re-featurizes a key whose content changed


@dataclass
class Listing:
    images: list[ImageRef]
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


def is_image_key(key: str) -> bool:
    return key.lower().endswith(IMAGE_EXTENSIONS)


def label_for_key(key: str) -> str:
    """The name of the key's parent folder: ``Test/Apple Braeburn/r_1.jpg`` -> ``Apple Braeburn``.

    A key at the bucket root has no folder and gets the label ''.
    """
    parts = key.split("/")
    return parts[-2] if len(parts) >= 2 else ""


def etag(obj: dict) -> str:
    """A ListObjectsV2 entry's ETag without its quotes ('' when absent)."""
    return obj.get("ETag", "").strip('"')


class ListingTooLong(Exception):
    """The driver's listing passed its ``limit`` of keys (``list_images``)."""


def list_images(client, location: S3Location, page_size: int = 1000, limit: int | None = None) -> Listing:
    """Every image key under ``location`` (all pages, sorted); other keys are counted as skipped.
    ListingTooLong once more than ``limit`` keys were seen (None: no limit)."""
    images: list[ImageRef] = []
    skipped: list[str] = []
    for seen, obj in enumerate(list_objects(client, location.bucket, location.prefix, page_size=page_size), 1):
        if limit is not None and seen > limit:
            raise ListingTooLong(f"more than {limit:,} keys under {location.uri}")
        key = obj["Key"]
        if is_image_key(key):
            images.append(ImageRef(key, label_for_key(key), etag(obj)))
        else:
            skipped.append(key)
    images.sort(key=lambda ref: ref.key)
    return Listing(images=images, skipped=len(skipped), skipped_examples=skipped[:SKIPPED_EXAMPLES])


# --- the listing spread over the executors --------------------------------------------------
# The driver walks only the folder tree (one delimited ListObjectsV2 per folder, a few levels
# deep); each folder's keys are listed by an executor task (executor/listing_tasks.py). The driver holds folder
# names, never keys.

MAX_DEPTH = 3          # folder levels the driver descends at most (Training/Apple/ is depth 2)
# Where a folder of many photos is cut into key ranges, one listing task each, by the character
# after the folder's prefix: each digit (Fruits-360's names, camera counters), then the letters in
# a few bands. A range S3 holds nothing in costs one request; names sharing their first character
# stay one task (one level: the driver cannot know the density below without listing it).
SPLIT_CHARACTERS = "0123456789AHOV_aeimqu"


@dataclass(frozen=True)
class Unit:
    """One listing task: every key under ``prefix`` (``deep``), or only the keys directly in
    it (not deep: the files beside its sub-folders, which are units of their own). A deep unit
    with ``lower``/``upper`` holds only the keys k with lower <= k < upper (None: unbounded)."""

    prefix: str
    deep: bool = True
    lower: str | None = None
    upper: str | None = None

    def order(self) -> tuple:
        return self.prefix, self.deep, self.lower or ""


def split_folder(prefix: str, characters: str = SPLIT_CHARACTERS) -> list[Unit]:
    """``prefix``'s keys as contiguous key ranges cut at ``prefix + c`` for each character ``c``
    (sorted): every key under ``prefix`` falls in exactly one."""
    bounds = [None] + [prefix + c for c in characters] + [None]
    return [Unit(prefix, True, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def _delimited(client, bucket: str, prefix: str, page_size: int, leaf_keys: int):
    """(sub-folder prefixes, whether ``prefix`` directly holds keys, whether the walk is complete).

    A delimited listing pages through the folder's own keys too: the walk stops (incomplete)
    once ``leaf_keys`` of them were seen, so that the driver never pages through a big folder
    of photos, only through folders of folders."""
    folders, keys = [], 0
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/",
                                   PaginationConfig={"PageSize": page_size}):
        folders.extend(p["Prefix"] for p in page.get("CommonPrefixes", ()))
        keys += len(page.get("Contents", ()))
        if keys >= leaf_keys:
            return folders, True, False
    return folders, keys > 0, True


def discover_units(client, location: S3Location, *, min_units: int = 16, max_depth: int = MAX_DEPTH,
                   page_size: int = 1000, leaf_keys: int = 1000) -> list[Unit]:
    """The listing tasks for ``location``: folders descended level by level until there are at
    least ``min_units`` of them (or ``max_depth`` levels); every key under ``location`` falls in
    exactly one unit. A folder that directly holds ``leaf_keys`` keys or more is not descended:
    its keys, sub-folders included, are cut into key ranges (``split_folder``), one unit each
    (the driver reads at most about ``leaf_keys`` of its keys to find that out). Sorted by
    prefix; the order of the keys is restored by driver/scan.py's sort. ValueError on a bound below 1."""
    if min(min_units, max_depth, page_size, leaf_keys) < 1:
        raise ValueError(f"min_units, max_depth, page_size and leaf_keys must be >= 1, got "
                         f"{min_units}, {max_depth}, {page_size} and {leaf_keys}")
    units: list[Unit] = []
    level = [location.prefix]
    for depth in range(max_depth):
        below: list[str] = []
        for prefix in level:
            folders, has_keys, complete = _delimited(client, location.bucket, prefix, page_size, leaf_keys)
            if not complete:   # a folder of many photos: ranges of keys, one task each
                units.extend(split_folder(prefix))
                continue
            if has_keys:
                units.append(Unit(prefix, deep=False))
            below.extend(folders)
        if not below or len(units) + len(below) >= min_units or depth == max_depth - 1:
            units.extend(Unit(prefix) for prefix in below)
            break
        level = below
    return sorted(units, key=Unit.order)


def list_unit(client, unit: Unit, *, bucket: str, page_size: int = 1000):
    """Yield ``(key, etag)`` for every object of ``unit``, in S3's (UTF-8 byte) order: a listing
    task's ``read(client, unit)`` once ``bucket`` is bound. A key range starts with StartAfter
    just below its lower bound and stops at its upper bound (no page past it is requested)."""
    # StartAfter is exclusive: the lower bound with its last character decremented sorts before
    # every key >= lower; the few keys between the two are dropped here.
    start_after = unit.lower[:-1] + chr(ord(unit.lower[-1]) - 1) if unit.lower else None
    for obj in list_objects(client, bucket, unit.prefix, page_size, delimiter=None if unit.deep else "/",
                            start_after=start_after):
        key = obj["Key"]
        if unit.upper is not None and key >= unit.upper:
            return
        if unit.lower is None or key >= unit.lower:
            yield key, etag(obj)
