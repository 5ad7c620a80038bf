"""Benchmark: JPEG download-free decode + resize rate per thread, the figure that sizes the
decode pool of a GPU task (``gpu.decode_threads``).

    python -m extractor.dev.bench --decode-rate                # 100x100 and 3000x4000 JPEGs
    python -m extractor.dev.bench --decode-rate --repeats 7 --threads 1 2 4
    python -m extractor.dev.bench --decode-rate --overlap       # where to decode camera photos

Each image goes through ``images.decode_image`` exactly as a featurize task's pool thread
runs it (decode, RGB, nearest resize to 224x224), from bytes already in memory: S3's part of
a thread's time is a wait, not CPU, and is a parameter of the sizing, not measured here.
Also timed: the CPU one S3 GET costs the calling thread in botocore (against moto on
127.0.0.1), and the forward thread's own work per batch (stack + VGG16 preprocessing), which
the pool does not hide. Prints images/s in total and per thread, and the serial (GIL) share
of a decode from the 1- and 2-thread rates, medians over --repeats.

``--overlap`` answers where camera photos should be decoded: one process per core runs VGG16
forward passes (one TensorFlow thread, batches of 32, as the job's tasks do) while the next
batch of 4000x3000 photos is decoded (draft) from memory in 4 threads of the same process, as
the job does, or in a one-process pool beside it, or not at all (arrays ready: the ceiling).
Prints the forward images/s summed over the processes and the share of forward time the
model waited for its next batch.
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from extractor.dev.synthetic import FRUITS, fruit_image, jpeg_bytes, noisy_jpeg
from extractor.executor.images import decode_image, preprocess_caffe

SIZE = (224, 224)
SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "fruits-360-sample" / "Train"


def camera_jpeg(seed: int, width: int = 4000, height: int = 3000, quality: int = 90) -> bytes:
    """A camera-size photo stand-in: a fruit scaled up, with sensor-like noise so the JPEG
    holds as much detail (bytes per pixel) as a phone photo rather than a flat gradient."""
    noise = np.random.default_rng(seed).normal(0, 6, (height, width, 3)).astype(np.int16)
    return noisy_jpeg(fruit_image(list(FRUITS)[seed % len(FRUITS)], seed), noise, quality)


def workloads(camera: int) -> dict[str, list[bytes]]:
    """name -> JPEG bodies: synthetic 100x100, the real sample when it is there, camera-size."""
    found = {"100x100 synthetic (Fruits-360 size)": [jpeg_bytes(fruit_image(f, i)) for f in FRUITS for i in range(40)]}
    if SAMPLE.is_dir():
        files = sorted(SAMPLE.glob("*/*.jpg"))[:400]
        if files:
            found[f"100x100 real ({len(files)} from {SAMPLE})"] = [f.read_bytes() for f in files]
    if camera:
        found["4000x3000 JPEG q90 (camera size)"] = [camera_jpeg(i) for i in range(camera)]
    return found


def decode_rate(bodies: list[bytes], threads: int, count: int) -> float:
    """images/s of ``count`` decodes (cycling through ``bodies``) on a pool of ``threads``."""
    work = [bodies[i % len(bodies)] for i in range(count)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda body: decode_image(body, SIZE), work[:threads]))  # threads started, caches warm
        start = time.perf_counter()
        list(pool.map(lambda body: decode_image(body, SIZE), work))
        return count / (time.perf_counter() - start)


def preprocess_rate(batch_size: int = 256, repeats: int = 5) -> float:
    """images/s of the forward thread's own work per batch: np.stack + preprocess_caffe."""
    arrays = [np.zeros((*SIZE, 3), np.uint8) for _ in range(batch_size)]
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        preprocess_caffe(np.stack(arrays))
        rates.append(batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def get_cpu_seconds(count: int = 200, repeats: int = 5) -> float:
    """CPU seconds one GET of a 100x100 JPEG costs the calling thread (signing, HTTP, parsing:
    Python code, holding the GIL), with the job's client settings. Thread CPU time: the
    in-process server's threads are not counted, nor any wait on the network."""
    from extractor.dev.local_s3 import REGION, local_s3
    from extractor.storage.s3 import S3Settings

    bucket = "fruits-bench-decode"
    with local_s3("bench") as s3:
        s3.create_bucket(bucket)
        s3.upload(bucket, "in/", {f"{i}.jpg": jpeg_bytes(fruit_image("Lemon", i)) for i in range(20)})
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ[name] = s3.env[name]
        client = S3Settings(endpoint_url=s3.endpoint, region=REGION).client()
        keys = [f"in/{i % 20}.jpg" for i in range(count)]
        samples = []
        for _ in range(repeats + 1):  # the first pass opens the connections
            start = time.thread_time()
            for key in keys:
                client.get_object(Bucket=bucket, Key=key)["Body"].read()
            samples.append((time.thread_time() - start) / count)
    return statistics.median(samples[1:])


def serial_share(rate_1: float, rate_2: float) -> float:
    """The share of a decode that cannot overlap (held under the GIL), from the rates of 1 and
    2 threads: two threads take (1 + g) x the time of one image for two images, so
    rate_2 / rate_1 = 2 / (1 + g)."""
    return min(1.0, max(0.0, 2 * rate_1 / rate_2 - 1))


def measure(threads: list[int], repeats: int, camera: int) -> dict:
    """{workload: {"bytes_median", "threads": {t: {"images_per_s", "per_thread"}}}} (medians)."""
    report = {}
    for name, bodies in workloads(camera).items():
        small = len(bodies[0]) < 1_000_000
        entry = {"images": len(bodies), "bytes_median": int(statistics.median(len(b) for b in bodies)),
                 "threads": {}}
        for t in threads:
            count = 2000 * t if small else 8 * t
            rates = [decode_rate(bodies, t, count) for _ in range(repeats)]
            median = statistics.median(rates)
            entry["threads"][t] = {"images_per_s": round(median, 2), "per_thread": round(median / t, 2),
                                   "runs": [round(r, 2) for r in rates]}
        if 1 in entry["threads"] and 2 in entry["threads"]:
            entry["serial_share"] = round(serial_share(entry["threads"][1]["images_per_s"],
                                                       entry["threads"][2]["images_per_s"]), 2)
        report[name] = entry
    return report


OVERLAP_MODES = ("none", "threads", "processes")


def _decode(body: bytes) -> np.ndarray:
    return decode_image(body, SIZE)


def overlap_worker(mode: str, batches: int, batch_size: int = 32) -> dict:
    """One task's loop: forward batch i while batch i + 1 is decoded (``mode``); {images/s, wait share}."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from extractor.driver.weights import load_weights
    from extractor.executor.models import get_spec
    from extractor.executor.worker import cached_model

    spec = get_spec("vgg16")

    class Weights:
        value = load_weights(spec, "random").arrays

    forward = cached_model(spec, "bench", Weights, 1, "float32")
    photos = [camera_jpeg(i) for i in range(4)]
    ready = np.stack([_decode(photos[0])] * batch_size)
    forward(spec.preprocess(ready))  # first call: kernels chosen
    pool = None if mode == "none" else (ThreadPoolExecutor(4) if mode == "threads" else
                                      # spawn: a fork would copy TensorFlow's threads' state
                                      ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")))

    def submit():
        bodies = [photos[i % len(photos)] for i in range(batch_size)]
        return None if pool is None else [pool.submit(_decode, body) for body in bodies]

    waited = forwarded = 0.0
    ahead, start = submit(), time.perf_counter()
    for _ in range(batches):
        began = time.perf_counter()
        arrays = ready if ahead is None else np.stack([f.result() for f in ahead])
        waited += time.perf_counter() - began
        ahead = submit()
        began = time.perf_counter()
        forward(spec.preprocess(arrays))
        forwarded += time.perf_counter() - began
    elapsed = time.perf_counter() - start
    if pool is not None:
        pool.shutdown(cancel_futures=True)
    return {"images_per_s": batches * batch_size / elapsed, "wait_share": waited / forwarded}


def measure_overlap(workers: int, batches: int, repeats: int) -> dict:
    """{mode: {"images_per_s": summed over ``workers`` processes, "wait_share": their mean}} (medians)."""
    import subprocess
    import sys

    from extractor.dev.local_s3 import REPO

    report = {}
    for mode in OVERLAP_MODES:
        totals, waits = [], []
        for _ in range(repeats):
            command = [sys.executable, "-m", "extractor.dev.bench", "--overlap-worker", mode, str(batches)]
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
            processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
                         for _ in range(workers)]
            results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in processes]
            totals.append(sum(r["images_per_s"] for r in results))
            waits.append(statistics.mean(r["wait_share"] for r in results))
        report[mode] = {"images_per_s": round(statistics.median(totals), 2), "wait_share": round(statistics.median(waits), 4),
                        "runs": [round(t, 2) for t in totals]}
    for mode in OVERLAP_MODES[1:]:
        report[mode]["over_none"] = round(report[mode]["images_per_s"] / report["none"]["images_per_s"], 3)
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m extractor.dev.bench --decode-rate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--camera", type=int, default=4, help="distinct camera-size photos (0: none)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--overlap", action="store_true", help="only the decode-placement comparison (see above)")
    parser.add_argument("--batches", type=int, default=6, help="with --overlap: forward batches of 32 per process")
    args = parser.parse_args(argv)
    if args.overlap:
        report = {"overlap": measure_overlap(os.cpu_count() or 1, args.batches, args.repeats)}
        for mode, entry in report["overlap"].items():
            ratio = f", {entry['over_none']:.3f} of the ceiling" if "over_none" in entry else " (the ceiling)"
            print(f"decode camera photos in {mode:9}: forward {entry['images_per_s']:.2f} images/s (runs {entry['runs']})"
                  f"{ratio}; the model waited {entry['wait_share']:.1%} of its forward time")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    if min(args.threads) < 1 or args.repeats < 1 or args.camera < 0:
        parser.error(f"--threads and --repeats must be >= 1, --camera >= 0; got {args.threads}, "
                     f"{args.repeats}, {args.camera}")
    report = {"decode": measure(args.threads, args.repeats, args.camera),
              "preprocess_batch256_images_per_s": round(preprocess_rate(), 1),
              "s3_get_cpu_ms": round(get_cpu_seconds(repeats=args.repeats) * 1000, 3)}
    for name, entry in report["decode"].items():
        rates = ", ".join(f"{t} thread(s): {r['images_per_s']:.1f} images/s ({r['per_thread']:.1f} per thread)"
                          for t, r in entry["threads"].items())
        serial = f"; serial (GIL) share {entry['serial_share']:.2f}" if "serial_share" in entry else ""
        print(f"decode + resize to 224x224, {name}, median {entry['bytes_median']:,} bytes: {rates}{serial}")
    print(f"S3 GET, client CPU per request (botocore, the job's client settings): {report['s3_get_cpu_ms']:.2f} ms")
    print(f"forward thread, np.stack + preprocess_caffe of a batch of 256: "
          f"{report['preprocess_batch256_images_per_s']:.0f} images/s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
