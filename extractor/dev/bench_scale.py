"""Scale benchmark of the path that never collects: a small driver, many 4096-d vectors.

    python -m extractor.dev.bench_scale --counts 10000 30000 100000

For each count: that many small images on a local S3 (moto), the real driver.py under
``spark-submit --master local-cluster[2,1,1024] --driver-memory 512m`` with ``--collect auto``
(which must choose the distributed mode: the vectors would not fit that driver) and the
``probe4096`` model (VGG16's 4096-d output at a thousandth of its cost: the subject here is
everything after the CNN). Prints wall time, the driver's stage times, seconds per 1,000
vectors and the Python driver's peak memory (its JVM heap is capped at 512 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from extractor.dev.local_s3 import REGION, REPO, local_s3, spark_submit
from extractor.dev.synthetic import FRUITS, fruit_image, jpeg_bytes

MASTER = "local-cluster[2,1,1024]"
DRIVER_MEMORY = "512m"
VARIANTS = 40  # distinct images per fruit, reused under many keys: generating 100,000 JPEGs is not the subject


def upload_images(client, bucket: str, prefix: str, count: int, threads: int = 16,
                  store=None) -> dict[str, int]:
    """``count`` images spread over the fruits as ``<prefix><fruit>/img_<i>.jpg``; returns the
    number per fruit. ``store(bucket, key, body)``, when given, replaces the PutObject calls
    (a test seeding its in-process moto server directly)."""
    fruits = sorted(FRUITS)
    bodies = {(f, v): jpeg_bytes(fruit_image(f, v)) for f in fruits for v in range(VARIANTS)}
    jobs = [(fruits[i % len(fruits)], i) for i in range(count)]

    def put(job):
        fruit, i = job
        key, body = f"{prefix}{fruit}/img_{i:07d}.jpg", bodies[fruit, i % VARIANTS]
        if store is not None:
            store(bucket, key, body)
        else:
            client.put_object(Bucket=bucket, Key=key, Body=body)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, jobs))
    per_fruit: dict[str, int] = {}
    for fruit, _ in jobs:
        per_fruit[fruit] = per_fruit.get(fruit, 0) + 1
    return per_fruit


def submit(endpoint: str, bucket: str, input_prefix: str, output_prefix: str, log_dir: Path, *extra: str,
           master: str = MASTER, driver_memory: str = DRIVER_MEMORY, conf: dict[str, str] | None = None,
           timeout: int = 1800) -> dict:
    """driver.py under spark-submit (``conf``: more Spark settings); returns exit code, wall
    seconds, the manifest (or None) and the output."""
    from extractor.driver.package import build_zip

    py_files = build_zip(log_dir / "dist")  # as on EMR: executors import the package from the zip
    settings = [arg for key, value in {"spark.ui.enabled": "false", **(conf or {})}.items()
                for arg in ("--conf", f"{key}={value}")]
    command = [spark_submit(), "--master", master, "--driver-memory", driver_memory, *settings, "--py-files", str(py_files),
               str(REPO / "driver.py"), "--input", f"s3://{bucket}/{input_prefix}",
               "--output", f"s3://{bucket}/{output_prefix}", "--model", "probe4096", "--weights", "random",
               "--log-dir", str(log_dir), *extra]
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
               AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION=REGION, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("AWS_PROFILE", None)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    manifest = None
    if result.returncode == 0:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="bench",
                              aws_secret_access_key="bench")
        manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{output_prefix}manifest.json")["Body"].read())
    return {"returncode": result.returncode, "wall_s": wall, "manifest": manifest,
            "output": result.stdout[-4000:] + result.stderr[-4000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extractor.dev.bench_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--format", default="csv", choices=["csv", "parquet"])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    log_dir = Path(tempfile.mkdtemp(prefix="fruits-scale-"))
    print(f"bench_scale: {MASTER}, driver memory {DRIVER_MEMORY}, model probe4096, format {args.format}", flush=True)
    rows = []
    with local_s3("bench") as s3:
        for count in args.counts:
            bucket = f"fruits-scale-{count}"
            s3.create_bucket(bucket)
            upload_images(s3.client, bucket, "in/", count)
            run = submit(s3.endpoint, bucket, "in/", "out/", log_dir, "--format", args.format)
            if run["returncode"] != 0:
                print(run["output"])
                raise SystemExit(f"bench_scale: the run over {count} images failed")
            m = run["manifest"]
            row = {"vectors": m["counts"]["featurized"], "mode": m["collect"]["used"], "wall_s": round(run["wall_s"], 1),
                   "stages_s": m["timings_s"], "driver_peak_rss_mb": m["driver_peak_rss_mb"],
                   "s_per_1000": round(run["wall_s"] / count * 1000, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\nvectors  mode         wall s  s/1000  driver peak MB  stages (s)")
    for r in rows:
        print(f"{r['vectors']:7d}  {r['mode']:11s} {r['wall_s']:7.1f} {r['s_per_1000']:7.2f} {r['driver_peak_rss_mb']:15.0f}  "
              + ", ".join(f"{k} {v}" for k, v in r["stages_s"].items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
