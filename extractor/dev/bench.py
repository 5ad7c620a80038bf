"""Benchmark: the forward-pass ceiling, the prototype and this job, side by side in one run.

    python -m extractor.dev.bench                       # 500 generated images, float32
    python -m extractor.dev.bench --images ../shared/data/fruits-360-sample/Train --count 500 \
        --precision float32 bfloat16 --repeats 3
    python -m extractor.dev.bench --progress-overhead --count 200    # progress on (1 s) vs off
    python -m extractor.dev.bench --decode-rate      # JPEG decode + resize per thread (bench_decode)

Same machine, same images served by a local S3 server (moto on 127.0.0.1), same weights
(seeded random VGG16: speed does not depend on the values). Prints images/s for each, the
ratios job/ceiling and job/prototype, the time per stage, peak memory of the driver and of a
Python worker, and the startup overhead (spark-submit to the first forward pass). Medians
over --repeats runs. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .local_s3 import REPO, local_s3, spark_submit

BUCKET = "fruits-bench"


# --- the ceiling: batched forward passes on in-memory tensors, in worker processes ----------

def ceiling_worker(threads: int, precision: str, batch_size: int, batches: int) -> list[float]:
    """images/s of ``batches`` forward passes after one warm-up, built exactly as the job builds."""
    import numpy as np

    from ..worker import cached_model
    from ..models import get_spec, load_weights

    spec = get_spec("vgg16")

    class Weights:  # stands in for the broadcast
        value = load_weights(spec, "random").arrays

    forward = cached_model(spec, "bench", Weights, threads, precision)
    x = spec.preprocess(np.random.default_rng(0).integers(0, 256, (batch_size, 224, 224, 3)).astype(np.uint8))
    forward(x)
    rates = []
    for _ in range(batches):
        start = time.perf_counter()
        forward(x)
        rates.append(batch_size / (time.perf_counter() - start))
    return rates


def measure_ceiling(workers: int, threads: int, precision: str, batch_size: int, batches: int) -> float:
    """Sum over ``workers`` concurrent processes (as Spark runs them) of each one's median rate."""
    command = [sys.executable, "-m", "extractor.dev.bench", "--ceiling-worker", str(threads), precision,
               str(batch_size), str(batches)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
                 for _ in range(workers)]
    rates = [statistics.median(json.loads(p.communicate()[0].strip().splitlines()[-1])) for p in processes]
    return sum(rates)


# --- bfloat16 fidelity: the same images through both precisions --------------------------------

def vectors_worker(precision: str, image_dir: str, out_path: str) -> None:
    """fc2 vectors of every file in ``image_dir`` (sorted), saved as .npy; decoded as the job does."""
    import numpy as np

    from ..worker import cached_model
    from ..images import decode_image
    from ..models import get_spec, load_weights

    spec = get_spec("vgg16")

    class Weights:
        value = load_weights(spec, "random").arrays

    forward = cached_model(spec, "bench", Weights, os.cpu_count() or 1, precision)
    files = sorted(Path(image_dir).iterdir())
    batch = np.stack([decode_image(f.read_bytes(), spec.input_size) for f in files])
    vectors = np.concatenate([forward(spec.preprocess(batch[i:i + 32])) for i in range(0, len(batch), 32)])
    np.save(out_path, vectors)


def fidelity(images: dict[str, bytes], count: int = 96) -> dict:
    """bfloat16 against float32 on the same images: per-image cosine similarity, and what it
    does to the PCA (k at 95 %, and how much of each float32 component bfloat16's span keeps)."""
    import numpy as np

    from ..pca import fit_pca

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "images")
        folder.mkdir()
        for index, body in enumerate(list(images.values())[:count]):
            (folder / f"{index:05d}.img").write_bytes(body)
        vectors = {}
        for precision in ("float32", "bfloat16"):
            out = Path(tmp, f"{precision}.npy")
            subprocess.run([sys.executable, "-m", "extractor.dev.bench", "--vectors-worker", precision, str(folder),
                            str(out)], cwd=REPO, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
            vectors[precision] = np.load(out).astype(np.float64)
    a, b = vectors["float32"], vectors["bfloat16"]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    pca_a, pca_b = fit_pca(a, variance=0.95), fit_pca(b, variance=0.95)
    k = min(pca_a.k, pca_b.k, 10)
    # |cos| of each float32 component with its projection on bfloat16's first k+2 components.
    kept = np.linalg.norm(pca_a.components[:k] @ pca_b.components[:k + 2].T, axis=1)
    return {"images": len(a), "cosine_min": float(cosine.min()), "cosine_median": float(np.median(cosine)),
            "relative_l2_median": float(np.median(np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1))),
            "pca_k95": {"float32": pca_a.k, "bfloat16": pca_b.k},
            "explained_variance_at_k": {"float32": pca_a.cumulative_ratio, "bfloat16": pca_b.cumulative_ratio},
            "top_components_kept_min": float(kept.min()), "top_components_compared": k}


# --- CSV formatting ------------------------------------------------------------------------------

def csv_rows_per_second(rows: int = 1000, dim: int = 4096) -> dict[str, float]:
    """rows/s of three correct ways to write float32 rows (each reads back bit-exact)."""
    import numpy as np

    from ..outputs import format_rows

    rng = np.random.default_rng(0)
    values = rng.random((rows, dim)).astype(np.float32)
    values[values < 0.5] = 0  # fc2 is a ReLU: about half zeros
    paths = [f"s3://b/in/Kiwi/{i}.jpg" for i in range(rows)]
    results = {}

    def timed(name, fn):
        start = time.perf_counter()
        fn()
        results[name] = rows / (time.perf_counter() - start)

    timed("percent-format per row (used)", lambda: format_rows(paths, ["Kiwi"] * rows, values, "dim_"))
    timed("numpy.savetxt %.9g", lambda: np.savetxt(io.StringIO(), values, fmt="%.9g", delimiter=","))
    timed("str(float) per value", lambda: "\n".join(",".join(map(str, row)) for row in values.tolist()))
    return results


# --- end-to-end runs -------------------------------------------------------------------------------

def timed_submit(command: list[str], env: dict, log_path: Path) -> tuple[float, float]:
    """(submit epoch, wall seconds) of one spark-submit; raises if it fails."""
    submitted = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - submitted
    if code != 0:
        raise SystemExit(f"bench: {command[3] if len(command) > 3 else command} failed (exit {code}); see {log_path}")
    return submitted, wall


def run_job(env, master: str, task_cpus: int, precision: str, batch_size: int, output: str, log_dir: Path,
            s3, extra: tuple[str, ...] = ()) -> dict:
    command = [spark_submit(), "--master", master, "--conf", f"spark.task.cpus={task_cpus}",
               str(REPO / "driver.py"), "--input", f"s3://{BUCKET}/in/", "--output", f"s3://{BUCKET}/{output}/",
               "--weights", "random", "--precision", precision, "--batch-size", str(batch_size),
               "--log-dir", str(log_dir), *extra]
    submitted, wall = timed_submit(command, env, log_dir / f"{output}.log")
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{output}/manifest.json")["Body"].read())
    executors = manifest["executors"]
    n = manifest["counts"]["listed"]
    return {"images": n, "wall_s": wall, "images_per_s": n / wall,
            "startup_s": executors["first_forward_at"] - submitted,
            "stages_s": manifest["timings_s"], "task_seconds": executors["task_seconds"],
            "featurize_images_per_s": manifest["images_per_second"], "progress": manifest.get("progress"),
            "collect_s": executors.get("collect_s"), "driver_peak_rss_mb": manifest["driver_peak_rss_mb"],
            "worker_peak_rss_mb": executors["python_worker_peak_rss_mb"]}


def run_prototype(env, master: str, output: str, log_dir: Path, n: int) -> dict:
    command = [spark_submit(), "--master", master, str(REPO / "extractor" / "dev" / "prototype.py"),
               "--input", f"s3://{BUCKET}/in/", "--output", f"s3://{BUCKET}/{output}/"]
    _, wall = timed_submit(command, dict(env, PYTHONPATH=str(REPO)), log_dir / f"{output}.log")
    return {"images": n, "wall_s": wall, "images_per_s": n / wall}


def load_images(folder: Path | None, count: int) -> dict[str, bytes]:
    from ..listing import is_image_key
    from .synthetic import FRUITS, fruit_dataset

    if folder is None:
        per_fruit = -(-count // len(FRUITS))
        return dict(list(fruit_dataset(per_fruit).items())[:count])
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    files = [sorted(f for f in sub.iterdir() if is_image_key(f.name)) for sub in subfolders]
    images, index = {}, 0
    while len(images) < count and any(index < len(f) for f in files):  # round-robin over fruits
        for sub, names in zip(subfolders, files):
            if index < len(names) and len(images) < count:
                images[f"{sub.name}/{names[index].name}"] = names[index].read_bytes()
        index += 1
    return images


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="python -m extractor.dev.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="folder with one subfolder per fruit (default: generated)")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--precision", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="local[N] for the Spark runs")
    parser.add_argument("--task-cpus", type=int, nargs="+", default=[1],
                        help="TensorFlow threads per task; several values compare configurations")
    parser.add_argument("--prototype-repeats", type=int, default=1, help="0 to skip the prototype")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--progress-overhead", action="store_true",
                        help="only compare the job with progress lines and log uploads every second against "
                             "both turned off (runs alternate; medians of --repeats)")
    return parser.parse_args(argv)


PROGRESS_ON = ("--progress-interval", "1", "--log-ship-interval", "1")   # 30 and 60 times the defaults
PROGRESS_OFF = ("--progress-interval", "0", "--log-ship-interval", "0")


def bench_progress(s3, args, log_dir: Path) -> dict:
    """images/s with and without progress reporting, runs alternated so drift hits both alike."""
    runs = {"on": [], "off": []}
    for i in range(args.repeats):
        for name, extra in (("off", PROGRESS_OFF), ("on", PROGRESS_ON)):
            runs[name].append(run_job(s3.env, f"local[{args.cores}]", 1, "float32", args.batch_size,
                                      f"progress-{name}{i}", log_dir, s3.client, extra))
    entry = {}
    for name, found in runs.items():
        entry[name] = {key: statistics.median(r[key] for r in found) for key in ("images_per_s", "featurize_images_per_s")}
        entry[name]["runs"] = [round(r["featurize_images_per_s"], 3) for r in found]
        entry[name]["progress_lines"] = [r["progress"]["lines"] for r in found]
    for key in ("images_per_s", "featurize_images_per_s"):
        entry[f"on_over_off_{key}"] = entry["on"][key] / entry["off"][key]
    print(f"progress on (every 1 s, log shipped every 1 s): featurize {entry['on']['featurize_images_per_s']:.2f} "
          f"images/s (runs {entry['on']['runs']}, progress lines {entry['on']['progress_lines']}), end to end "
          f"{entry['on']['images_per_s']:.2f}\nprogress off: featurize {entry['off']['featurize_images_per_s']:.2f} "
          f"images/s (runs {entry['off']['runs']}), end to end {entry['off']['images_per_s']:.2f}\n"
          f"on / off: featurize {entry['on_over_off_featurize_images_per_s']:.3f}, end to end "
          f"{entry['on_over_off_images_per_s']:.3f}", flush=True)
    return entry


def bench_configuration(s3, args, precision: str, task_cpus: int, log_dir: Path, report: dict) -> dict:
    """Ceiling and job (medians of --repeats) for one precision and task size."""
    ceiling = statistics.median(measure_ceiling(args.cores // task_cpus, task_cpus, precision, args.batch_size, 4)
                                for _ in range(args.repeats))
    runs = [run_job(s3.env, f"local[{args.cores}]", task_cpus, precision, args.batch_size, f"job{i}", log_dir,
                    s3.client) for i in range(args.repeats)]
    job = _median_run(runs)
    entry = {"ceiling_images_per_s": ceiling, "job": job, "job_runs": runs,
             "job_over_ceiling": job["images_per_s"] / ceiling}
    if "prototype" in report:
        entry["job_over_prototype"] = job["images_per_s"] / report["prototype"]["images_per_s"]
    return entry


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--decode-rate"]:  # no Spark, no S3, no model: its own options
        from .bench_decode import main as decode_main

        return decode_main(argv[1:])
    if argv[:1] == ["--vectors-worker"]:
        vectors_worker(argv[1], argv[2], argv[3])
        return 0
    if argv[:1] == ["--ceiling-worker"]:
        threads, precision, batch_size, batches = int(argv[1]), argv[2], int(argv[3]), int(argv[4])
        print(json.dumps(ceiling_worker(threads, precision, batch_size, batches)))
        return 0
    args = parse_args(argv)
    images = load_images(args.images, args.count)
    n, master = len(images), f"local[{args.cores}]"
    print(f"bench: {n} images ({args.images or 'generated'}), {master}, batch {args.batch_size}, "
          f"{args.repeats} repeats; CPU: {_cpu_name()}", flush=True)
    log_dir = Path(tempfile.mkdtemp(prefix="fruits-bench-"))
    report = {"images": n, "source": str(args.images or "generated"), "master": master, "cpu": _cpu_name(),
              "batch_size": args.batch_size, "date": time.strftime("%Y-%m-%d"), "csv_rows_per_s": csv_rows_per_second()}
    with local_s3("bench") as s3:
        s3.create_bucket(BUCKET)
        s3.upload(BUCKET, "in/", images)
        if args.progress_overhead:
            report["progress_overhead"] = bench_progress(s3, args, log_dir)
        elif args.prototype_repeats:
            runs = [run_prototype(s3.env, master, f"proto{i}", log_dir, n) for i in range(args.prototype_repeats)]
            report["prototype"] = _median_run(runs)
            print(f"prototype: {report['prototype']['images_per_s']:.2f} images/s", flush=True)
        for precision in args.precision if not args.progress_overhead else ():
            for task_cpus in args.task_cpus:
                name = f"{precision}, {args.cores // task_cpus} task(s) x {task_cpus} thread(s)"
                report[name] = bench_configuration(s3, args, precision, task_cpus, log_dir, report)
                _print_entry(name, report[name])
        if "bfloat16" in args.precision:
            report["bfloat16_fidelity"] = fidelity(images)
            _print_fidelity(report["bfloat16_fidelity"])
    print("CSV formatting, rows of 4096 float32 per second: "
          + ", ".join(f"{k} {v:.0f}" for k, v in report["csv_rows_per_s"].items()))
    print(f"logs of every run in {log_dir}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _print_fidelity(f: dict) -> None:
    print(f"\nbfloat16 vs float32 on {f['images']} images: cosine similarity median {f['cosine_median']:.5f}, "
          f"min {f['cosine_min']:.5f}; relative L2 error median {f['relative_l2_median']:.4f}; PCA k at 95 %: "
          f"{f['pca_k95']['float32']} (float32) vs {f['pca_k95']['bfloat16']} (bfloat16); each of the top "
          f"{f['top_components_compared']} float32 components keeps >= {f['top_components_kept_min']:.3f} "
          f"of its length in bfloat16's span", flush=True)


def _median_run(runs: list[dict]) -> dict:
    """The run with the median images/s (its own stage figures stay consistent)."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    return ordered[len(ordered) // 2]


def _print_entry(name: str, entry: dict) -> None:
    job = entry["job"]
    print(f"\n== {name}")
    print(f"  ceiling (forward only)   {entry['ceiling_images_per_s']:7.2f} images/s")
    print(f"  job, end to end          {job['images_per_s']:7.2f} images/s  ({job['images']} images in "
          f"{job['wall_s']:.1f} s; runs: {', '.join(f'{r:.2f}' for r in sorted(x['images_per_s'] for x in entry['job_runs']))})")
    print(f"  job / ceiling            {entry['job_over_ceiling']:7.1%}")
    if "job_over_prototype" in entry:
        print(f"  job / prototype          {entry['job_over_prototype']:7.1f}x")
    print(f"  startup (submit -> first forward) {job['startup_s']:.1f} s; collect {job['collect_s']} s")
    print("  driver stages (s): " + ", ".join(f"{k} {v}" for k, v in job["stages_s"].items()))
    print("  task time summed over tasks (s): " + ", ".join(f"{k} {v}" for k, v in job["task_seconds"].items()))
    print(f"  peak memory: driver {job['driver_peak_rss_mb']} MB, Python worker {job['worker_peak_rss_mb']} MB")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
