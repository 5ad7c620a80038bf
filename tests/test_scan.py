"""The listing spread over the executors (driver/scan.py + listing.discover_units) against the driver's
own listing (listing.list_images, the reference): same keys, order, labels, ETags, skipped
counts, partitions; and the driver's memory flat in the number of keys."""

from __future__ import annotations

import tracemalloc
from collections import Counter
from functools import partial

import pytest

from extractor.driver import scan
from extractor.storage.snapshot import load_plan
from extractor.storage import state as state_store
from extractor.dev.fake_listing import SyntheticBucket
from extractor.storage.listing import SPLIT_CHARACTERS, Unit, discover_units, list_images, list_unit, split_folder
from extractor.storage.s3 import S3Settings, parse_s3_uri

from conftest import REGION

# Every ordering trap of a key space: '-' and '.' sort before '/', upper case before lower case,
# multi-byte UTF-8 after ASCII, files beside folders at every level, an empty "folder" object,
# names with spaces, '+', '%', '#', quotes and commas; pages of 2 keys inside every folder.
ODD_KEYS = (
    [f"Training/Apple/{i:02d}_100.jpg" for i in range(7)]
    + [f"Training/Apple-Red/r_{i}.jpg" for i in range(3)]
    + ["Training/Apple.jpg", "Training/apple/low.jpg", "Training/a.png", "Training/readme.txt"]
    + [f"Training/Pêche été/{i}.JPEG" for i in range(5)]
    + ["Training/Kiwi 🥝/k+1 %41 #2.jpg", "Training/Kiwi 🥝/it's, \"quoted\".png", "Training/Kiwi 🥝/thumbs.db"]
    + ["Training/Empty/", "Training/Deep/x/y/z/d.jpg", "Training/Deep/x/notes.txt"]
    + [f"Test/Lemon/{i}.jpg" for i in range(4)] + ["Test/Lemon/.DS_Store"]
    + ["root.jpg", "Root-notes.txt", "zzz.jpeg", "Training", "Trainingx/t.jpg"]
)


def put_keys(client, bucket, keys, prefix=""):
    for i, key in enumerate(keys):
        client.put_object(Bucket=bucket, Key=prefix + key, Body=f"body {i}".encode())


def read_back(client, bucket, ranges):
    """Every partition's keys, read from the snapshot as a featurize task would."""
    return [load_plan(client, bucket, plan) for plan in ranges.plans]


@pytest.mark.parametrize("min_units, sort_range, leaf_keys", [(1, 100_000, 1000), (4, 5, 1000), (1000, 3, 1000),
                                                              (1000, 7, 5)])
@pytest.mark.parametrize("prefix", ["", "in/"])
def test_executor_listing_is_exactly_the_driver_listing(spark, s3_server, server_bucket, monkeypatch,
                                                        min_units, sort_range, leaf_keys, prefix):
    client, bucket = server_bucket
    put_keys(client, bucket, ODD_KEYS, prefix)
    location = parse_s3_uri(f"s3://{bucket}/{prefix}")
    settings = S3Settings(endpoint_url=s3_server, region=REGION)
    monkeypatch.setattr(scan, "KEYS_PER_SORT_RANGE", sort_range)  # several sort ranges on a small bucket

    expected = list_images(client, location, page_size=2)   # before the snapshot lands in the bucket
    units = discover_units(client, location, min_units=min_units, page_size=2, leaf_keys=leaf_keys)
    ranges = scan.enumerate_input(spark.sparkContext, units, read=partial(list_unit, bucket=bucket,
                                                                          page_size=2),
                                  s3_settings=settings, output_bucket=bucket, snapshot_prefix="snap/",
                                  partitions=lambda n: 5)

    refs = [(r.key, r.label, r.etag) for r in expected.images]
    assert ranges.count == len(refs) == 28
    assert ranges.by_label == Counter(label for _, label, _ in refs)
    assert (ranges.skipped, ranges.skipped_examples) == (expected.skipped, expected.skipped_examples)
    # The same partitions as sc.parallelize made of the driver's sorted listing: same keys, in
    # order, with their labels and ETags, and the same key-range bounds for the state.
    assert read_back(client, bucket, ranges) == state_store.plan_partitions(refs, 5)
    if leaf_keys == 5:
        # Folders holding 5 keys or more themselves are key ranges: Training/Apple/, Training/Pêche été/.
        assert set(split_folder(f"{prefix}Training/Apple/")) <= set(units)
        assert set(split_folder(f"{prefix}Training/Pêche été/")) <= set(units)
    elif min_units == 1000:
        # Descended three levels: Training/Apple/'s own files are a unit, Training/Deep/x/ one deep unit.
        assert {Unit(f"{prefix}Training/Apple/", deep=False), Unit(f"{prefix}Training/Deep/x/")} <= set(units)
    ranges.release(client, bucket)
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="snap/")


@pytest.mark.parametrize("leaf_keys", [1, 5, 1000])
def test_every_key_falls_in_exactly_one_unit(s3_mock, leaf_keys):
    bucket = "units-" + REGION
    s3_mock.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    put_keys(s3_mock, bucket, ODD_KEYS)
    location = parse_s3_uri(f"s3://{bucket}/")
    for min_units in (1, 3, 10, 1000):
        units = discover_units(s3_mock, location, min_units=min_units, page_size=3, leaf_keys=leaf_keys)
        assert units == sorted(units, key=Unit.order)
        seen = [key for unit in units for key, _ in list_unit(s3_mock, unit, bucket=bucket)]
        assert sorted(seen) == sorted(ODD_KEYS), min_units
    deepest = discover_units(s3_mock, location, min_units=1000, page_size=3, leaf_keys=leaf_keys)
    if leaf_keys == 5:  # Training/Apple/ holds 7 keys itself: key ranges, not descended into
        assert set(split_folder("Training/Apple/")) <= set(deepest)
        assert Unit("Training/Apple/", deep=False) not in deepest
        assert Unit("Training/Deep/x/") in deepest
    elif leaf_keys == 1:  # the root holds keys itself: everything is the root's key ranges
        assert deepest == split_folder("")


def test_key_ranges_cover_a_folder_once_and_stop_at_their_bound(s3_mock):
    """Every key of a split folder in exactly one range, whatever its first character (before
    '0', between the bounds, past 'u', multi-byte), and no page requested past a range's end."""
    bucket = "ranges-" + REGION
    s3_mock.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    names = ["!x.jpg", "-1.jpg", ".hidden.jpg", "0.jpg", "09.jpg", "0" * 5 + ".jpg", "1.jpg", "9~.jpg", "@.jpg",
             "A.jpg", "G.jpg", "H.jpg", "Z.jpg", "_.jpg", "`.jpg", "a.jpg", "u.jpg", "uz.jpg", "zz.jpg", "~.jpg",
             "é.jpg", "🥝.jpg", "sub/0.jpg", "sub/z.jpg"] + [f"r_{i}_100.jpg" for i in range(6)]
    put_keys(s3_mock, bucket, names, "F/")
    put_keys(s3_mock, bucket, ["E/x.jpg", "F0.jpg", "G/0.jpg"])
    ranges = split_folder("F/")
    assert len(ranges) == len(SPLIT_CHARACTERS) + 1
    listed = [key for unit in ranges for key, _ in list_unit(s3_mock, unit, bucket=bucket, page_size=2)]
    assert listed == sorted("F/" + name for name in names)   # each once, and the ranges in order
    calls = []
    s3_mock.meta.events.register("after-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    digits = [unit for unit in ranges if unit.lower == "F/0"][0]
    assert [key for key, _ in list_unit(s3_mock, digits, bucket=bucket, page_size=2)] == \
        ["F/0.jpg", "F/00000.jpg", "F/09.jpg"]
    assert len(calls) == 2   # the page holding F/1.jpg ends the range: the rest is never asked for


def test_the_driver_never_pages_through_a_folder_of_photos():
    """Descending (too few folders for the cluster) reads one page of each big folder, not its keys."""
    bucket = SyntheticBucket(folders=3, per_folder=20_000)
    client = bucket()
    units = discover_units(client, parse_s3_uri("s3://synthetic/"), min_units=1000)
    assert units == [unit for i in range(3) for unit in split_folder(bucket.folder(i))]
    assert client.requests == 1 + 3   # the root's folders, then one page of each folder


def test_an_empty_input_has_no_partitions(spark, s3_server, server_bucket):
    client, bucket = server_bucket
    put_keys(client, bucket, ["in/notes.txt", "in/Lemon/"])
    location = parse_s3_uri(f"s3://{bucket}/in/")
    ranges = scan.enumerate_input(spark.sparkContext, discover_units(client, location),
                                  read=partial(list_unit, bucket=bucket),
                                  s3_settings=S3Settings(endpoint_url=s3_server, region=REGION), output_bucket=bucket,
                                  snapshot_prefix="snap/", partitions=lambda n: 4)
    assert (ranges.count, ranges.skipped, ranges.plans) == (0, 2, [])


def test_split_points_balance_the_sample():
    summaries = [{"images": 1000, "sample": [f"a/{i:03d}" for i in range(0, 1000, 10)]},
                 {"images": 10, "sample": [f"b/{i}" for i in range(10)]}]
    splits = scan.split_points(summaries, 4)
    assert splits == ["a/250", "a/500", "a/750"]   # b/ weighs 10 of 1010: the splits fall in a/
    assert scan.split_points(summaries, 1) == []


def scan_synthetic(sc, bucket: SyntheticBucket, partitions: int):
    units = discover_units(bucket(), parse_s3_uri("s3://synthetic/"), min_units=4)
    tracemalloc.start()
    try:
        ranges = scan.enumerate_input(sc, units, read=partial(list_unit, bucket="synthetic"),
                                      s3_settings=S3Settings(), output_bucket="synthetic", snapshot_prefix="snap/",
                                      partitions=lambda n: partitions, client_factory=bucket)
        return ranges, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow  # a million keys through a Spark sort: ~30 s of both cores
def test_a_million_keys_leave_the_driver_memory_flat(spark):
    """1,000,000 keys listed by the executors from a paged fake client: the driver's Python peak
    does not grow with the keys (the driver-side listing needs hundreds of bytes per key)."""
    sc = spark.sparkContext
    small, small_peak = scan_synthetic(sc, SyntheticBucket(folders=40, per_folder=2_500, text_every=500), 64)
    large, large_peak = scan_synthetic(sc, SyntheticBucket(folders=40, per_folder=25_000, text_every=500), 64)
    assert (small.count, large.count) == (100_000, 1_000_000)
    assert (small.skipped, large.skipped) == (200, 2_000) and large.labels == 40
    assert large.requests == 40 * 25 + 40  # one page of 1000 keys per request, + the last of each folder
    assert [p.count for p in large.plans] == [1_000_000 * (i + 1) // 64 - 1_000_000 * i // 64 for i in range(64)]
    print(f"driver peak: {small_peak / 1e6:.2f} MB at 100,000 keys, {large_peak / 1e6:.2f} MB at 1,000,000")
    assert large_peak - small_peak < 1_000_000   # < 1.1 B per added key, with the partitions fixed

    # The measure can fail: the driver-side listing of the small bucket alone.
    tracemalloc.start()
    listing = list_images(SyntheticBucket(folders=40, per_folder=2_500)(), parse_s3_uri("s3://synthetic/"))
    driver_side = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(listing.images) == 100_000 and driver_side > 100 * 100_000
