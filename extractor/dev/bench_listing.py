"""Benchmark: the listing's limits at millions of keys (driver memory, time, requests).

    python -m extractor.dev.bench_listing [--keys 100000 1000000 10000000] [--folders 100]
        [--latency-ms 30] [--driver-max 10000000]

A key-only synthetic bucket served by a paged fake client (dev.fake_listing: ListObjectsV2
pages of 1,000 keys, each request taking ``--latency-ms``, nothing stored), so the listing is
measured, not the CNN or a local S3. Each case runs in a fresh Python process and reports its
wall time and the process' peak RSS over its RSS once ready (imports done, SparkContext and
its Python workers started):

- ``driver``: the driver's walk (``--listing driver``: listing.list_images, every key held as
  Python objects), then the partition plans the featurize stage would parallelize;
- ``distributed``: the job's executor listing (``--listing distributed``: listing.discover_units
  on the driver, scan.enumerate_input on local[2]: listing tasks, the sort, the snapshot's
  puts), with the job's default partitions (images / 256).

``--local-s3 N``: the real check, on moto's server on 127.0.0.1 seeded with N zero-byte keys in
``--folders`` folders: the driver walk, the executor listing and an inventory of the same keys
(gzip CSV, 10,000 rows a file) read by the executors, through boto3 over HTTP, the three
compared partition by partition, key by key (time and requests only: the server shares the process, so
its memory is not the driver's).

An inventory is read by the same tasks as the distributed listing (one per data file, no
ListObjectsV2 call), so its cost is the distributed row's without the listing requests.
Not a test: timings depend on this machine and on the latency chosen; what the README quotes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def one(case: str, keys: int, folders: int, latency_s: float) -> dict:
    from extractor.dev.fake_listing import SyntheticBucket
    from extractor.driver.featurizing import default_partitions
    from extractor.storage.listing import discover_units, list_images
    from extractor.storage.s3 import S3Settings, parse_s3_uri
    from extractor.storage.state import plan_partitions

    bucket = SyntheticBucket(folders=folders, per_folder=keys // folders, latency_s=latency_s)
    location = parse_s3_uri("s3://synthetic/")
    if case == "driver":
        ready = _current_rss_mb()
        start = time.perf_counter()
        client = bucket()
        listing = list_images(client, location)
        refs = [(ref.key, ref.label, ref.etag) for ref in listing.images]
        plans = plan_partitions(refs, default_partitions(len(refs), 2))
        seconds, count, requests, partitions = time.perf_counter() - start, len(refs), client.requests, len(plans)
    else:
        from functools import partial

        from pyspark import SparkConf, SparkContext

        from extractor.driver.inputs import UNITS_PER_CORE
        from extractor.driver.scan import enumerate_input
        from extractor.storage.listing import list_unit

        sc = SparkContext(conf=SparkConf().setMaster("local[2]").setAppName("bench-listing")
                          .set("spark.ui.enabled", "false").set("spark.driver.memory", "2g"))
        sc.setLogLevel("ERROR")
        sc.parallelize([0, 1], 2).count()   # the Python workers started before the clock
        ready = _current_rss_mb()
        start = time.perf_counter()
        walker = bucket()
        units = discover_units(walker, location, min_units=max(16, UNITS_PER_CORE * sc.defaultParallelism))
        ranges = enumerate_input(sc, units, read=partial(list_unit, bucket="synthetic"), s3_settings=S3Settings(),
                                 output_bucket="synthetic", snapshot_prefix="snapshot/",
                                 partitions=lambda n: default_partitions(n, sc.defaultParallelism),
                                 client_factory=bucket)
        seconds, count, partitions = time.perf_counter() - start, ranges.count, len(ranges.plans)
        requests = walker.requests + ranges.requests + sum(len(plan.pieces) for plan in ranges.plans)
        sc.stop()
    return {"case": case, "keys": count, "seconds": round(seconds, 1), "requests": requests,
            "partitions": partitions, "rss_ready_mb": round(ready, 1), "rss_peak_mb": round(_peak_rss_mb(), 1),
            "driver_mb": round(_peak_rss_mb() - ready, 1)}


def local_s3_check(keys: int, folders: int) -> dict:
    """Both listings of N keys on the local S3 server, compared (see the module doc)."""
    import os
    from functools import partial

    from pyspark import SparkConf, SparkContext

    from extractor.dev.local_s3 import local_s3, store_in_backend
    from extractor.driver.featurizing import default_partitions
    from extractor.driver.inputs import UNITS_PER_CORE
    from extractor.driver.scan import enumerate_input
    from extractor.storage.listing import discover_units, list_images, list_unit
    from extractor.storage.s3 import RetryLog, S3Settings, parse_s3_uri
    from extractor.storage.snapshot import load_plan
    from extractor.storage.state import plan_partitions

    with local_s3() as s3:
        os.environ.update(s3.env)   # the Python workers reach the server with these
        s3.create_bucket("listing")
        per_folder = keys // folders
        for i in range(folders):
            for j in range(per_folder):
                store_in_backend("listing", f"in/fruit-{i:05d}/{j:08d}_100.jpg", b"")
        settings = S3Settings(endpoint_url=s3.endpoint)
        location = parse_s3_uri("s3://listing/in/")
        client = settings.client()
        calls = RetryLog().attach(client)
        start = time.perf_counter()
        listing = list_images(client, location)
        driver_s, driver_calls = time.perf_counter() - start, calls.calls
        refs = [(ref.key, ref.label, ref.etag) for ref in listing.images]
        sc = SparkContext(conf=SparkConf().setMaster("local[2]").setAppName("bench-listing-local-s3")
                          .set("spark.ui.enabled", "false"))
        sc.setLogLevel("ERROR")
        sc.parallelize([0, 1], 2).count()
        partitions = partial(default_partitions, parallelism=sc.defaultParallelism)
        before = calls.calls
        start = time.perf_counter()
        units = discover_units(client, location, min_units=max(16, UNITS_PER_CORE * sc.defaultParallelism))
        ranges = enumerate_input(sc, units, read=partial(list_unit, bucket="listing"), s3_settings=settings,
                                 output_bucket="listing", snapshot_prefix="out/_staging/bench/listing/",
                                 partitions=lambda n: partitions(n))
        spread_s = time.perf_counter() - start
        spread_calls = calls.calls - before + ranges.requests + sum(len(plan.pieces) for plan in ranges.plans)
        want = plan_partitions(refs, partitions(len(refs)))
        same = [load_plan(client, "listing", plan) for plan in ranges.plans] == want
        inventory_s, units, read_ranges, driver_calls_ = _inventory_read(sc, client, calls, settings, location, refs,
                                                                         partitions)
        inventory_calls = driver_calls_ + read_ranges.requests + sum(len(plan.pieces) for plan in read_ranges.plans)
        same = same and [load_plan(client, "listing", plan) for plan in read_ranges.plans] == want
        sc.stop()
    return {"keys": len(refs), "driver_s": round(driver_s, 1), "driver_requests": driver_calls,
            "distributed_s": round(spread_s, 1), "distributed_requests": spread_calls,
            "inventory_s": round(inventory_s, 1), "inventory_requests": inventory_calls, "inventory_files": len(units),
            "partitions": len(ranges.plans), "same_partitions_and_keys": same}


def _inventory_read(sc, client, calls, settings, location, refs: list, partitions) -> tuple[float, list, object, int]:
    """The same keys from an inventory (gzip CSV, 10,000 rows a file, as AWS would write them),
    read by the executors: (seconds, the data files, scan.KeyRanges, the driver's requests)."""
    from extractor.dev.inventory_files import write_inventory
    from extractor.driver.inputs import inventory_units
    from extractor.driver.scan import enumerate_input

    manifest = write_inventory(client, source_bucket=location.bucket, dest_bucket=location.bucket, dest_prefix="inv",
                               objects=({"Key": key, "ETag": f'"{etag}"', "Size": 0} for key, _, etag in refs),
                               rows_per_file=10_000)
    before, start = calls.calls, time.perf_counter()
    units, read = inventory_units(client, f"s3://{location.bucket}/{manifest}", location)
    ranges = enumerate_input(sc, units, read=read, s3_settings=settings, output_bucket=location.bucket,
                             snapshot_prefix="out/_staging/bench-inventory/listing/", partitions=partitions)
    return time.perf_counter() - start, units, ranges, calls.calls - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extractor.dev.bench_listing", description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--folders", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=30.0, help="each request's latency (ms)")
    parser.add_argument("--driver-max", type=int, default=10_000_000,
                        help="largest key count to list on the driver (it needs GBs at 10 M)")
    parser.add_argument("--local-s3", type=int, default=None, metavar="N",
                        help="instead: both listings of N keys on moto's server, compared")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "KEYS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.local_s3:
        print(json.dumps(local_s3_check(args.local_s3, args.folders)))
        return 0
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.folders, args.latency_ms / 1000)))
        return 0
    rows = []
    for keys in args.keys:
        for case in ("driver", "distributed"):
            if case == "driver" and keys > args.driver_max:
                continue
            done = subprocess.run([sys.executable, "-m", "extractor.dev.bench_listing", "--folders", str(args.folders),
                                   "--latency-ms", str(args.latency_ms), "--one", case, str(keys)],
                                  capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{case:11s} {row['keys']:>11,} keys: {row['seconds']:7.1f} s, {row['requests']:>7,} requests, "
                  f"driver +{row['driver_mb']:8.1f} MB RSS ({row['driver_mb'] * 2**20 / row['keys']:6.1f} B/key), "
                  f"{row['partitions']} partitions", flush=True)
    print(json.dumps({"latency_ms": args.latency_ms, "folders": args.folders, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
