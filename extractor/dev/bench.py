"""Benchmark: the forward-pass ceiling, the prototype, the peer and this job, side by side in one run.

    python -m extractor.dev.bench                       # 500 generated images, float32
    python -m extractor.dev.bench --images ../shared/data/fruits-360-sample/Train --count 2000 \
        --precision float32 bfloat16 --repeats 3 --prototype-repeats 0 --peer --large 300
    python -m extractor.dev.bench --progress-overhead --count 200    # progress on (1 s) vs off
    python -m extractor.dev.bench --decode-rate      # JPEG decode + resize per thread (bench_decode)

Same machine, same images served by a local S3 server (moto on 127.0.0.1), same weights
(seeded random VGG16: speed does not depend on the values). Prints images/s for each, the
ratios job/ceiling, job/prototype and job/peer, the time per stage, peak memory of the driver
and of a Python worker, and the startup overhead (spark-submit to the first forward pass).
``--peer``: what a Spark user would write instead (extractor/dev/peer.py: binaryFile + an
iterator pandas UDF), on the same images from local files. ``--large N``: N camera-size photos
(4000x3000 JPEG q90, the first N images upscaled with noise) through the job and the peer, the
large/small rate and draft decoding's fidelity against full-size decoding. Medians over
--repeats runs. Not a test: nothing here asserts a speed.
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

from extractor.dev.bench_fidelity import compare, describe
from extractor.dev.bench_model import BENCH_MODELS
from extractor.dev.bench_report import LARGE_ROWS, cpu_name, print_entry, print_sizes
from extractor.dev.bench_runs import (
    BUCKET,
    run_job,
    run_peer,
    run_prototype,
    write_folder,
)
from extractor.dev.local_s3 import REPO, local_s3
from extractor.dev.synthetic import camera_photos

# --- the ceiling: batched forward passes on in-memory tensors, in worker processes ----------

def ceiling_worker(threads: int, precision: str, batch_size: int, batches: int, model: str = "vgg16") -> list[float]:
    """images/s of ``batches`` forward passes after one warm-up, built exactly as the job builds."""
    import numpy as np

    from extractor.driver.weights import load_weights
    from extractor.executor.models import get_spec
    from extractor.executor.worker import cached_model

    spec = get_spec(model)

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


def measure_ceiling(workers: int, threads: int, precision: str, batch_size: int, batches: int,
                    model: str = "vgg16") -> float:
    """Sum over ``workers`` concurrent processes (as Spark runs them) of each one's median rate."""
    command = [sys.executable, "-m", "extractor.dev.bench", "--ceiling-worker", str(threads), precision,
               str(batch_size), str(batches), model]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
                 for _ in range(workers)]
    rates = [statistics.median(json.loads(p.communicate()[0].strip().splitlines()[-1])) for p in processes]
    return sum(rates)


# --- CSV formatting ------------------------------------------------------------------------------

CSV_ROWS = 1000  # rows per CSV formatting timing: a second or two each


def csv_rows_per_second(rows: int = CSV_ROWS, dim: int = 4096) -> dict[str, float]:
    """rows/s of three correct ways to write float32 rows (each reads back bit-exact)."""
    import numpy as np

    from extractor.results.outputs import format_rows

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


def load_images(folder: Path | None, count: int) -> dict[str, bytes]:
    from extractor.dev.synthetic import FRUITS, fruit_dataset
    from extractor.storage.listing import is_image_key

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
    parser.add_argument("--csv-rows", type=int, default=CSV_ROWS, help="rows of 4096 float32 per CSV formatting timing")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--model", default="vgg16", choices=BENCH_MODELS,
                        help="tiny: every row with the suite's test model, to check the benchmark itself "
                             "(its figures mean nothing)")
    parser.add_argument("--precision", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="local[N] for the Spark runs")
    parser.add_argument("--task-cpus", type=int, nargs="+", default=[1],
                        help="TensorFlow threads per task; several values compare configurations")
    parser.add_argument("--prototype-repeats", type=int, default=1, help="0 to skip the prototype")
    parser.add_argument("--peer", action="store_true",
                        help="also run the peer (binaryFile + iterator pandas UDF) --repeats times per image size")
    parser.add_argument("--large", type=int, default=0, metavar="N",
                        help="also N camera-size photos (4000x3000 JPEG q90) through the job (and the peer)")
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
                                      f"progress-{name}{i}", log_dir, s3.client, extra, model=args.model))
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
    ceiling = statistics.median(measure_ceiling(args.cores // task_cpus, task_cpus, precision, args.batch_size, 4,
                                                args.model) for _ in range(args.repeats))
    runs = [run_job(s3.env, f"local[{args.cores}]", task_cpus, precision, args.batch_size, f"job{i}", log_dir,
                    s3.client, model=args.model) for i in range(args.repeats)]
    job = _median_run(runs)
    entry = {"ceiling_images_per_s": ceiling, "job": job, "job_runs": runs,
             "job_over_ceiling": job["images_per_s"] / ceiling}
    if "prototype" in report:
        entry["job_over_prototype"] = job["images_per_s"] / report["prototype"]["images_per_s"]
    return entry


def _helper_command(argv: list[str]) -> int | None:
    """The modes bench runs in subprocesses of its own, or alone: their exit code; None for a bench run."""
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "--decode-rate":  # no Spark, no S3, no model: its own options
        from extractor.dev.bench_decode import main as decode_main

        return decode_main(rest)
    if command == "--weights-load":
        from extractor.dev.bench_weights import main as weights_main

        return weights_main(rest)
    if command == "--vectors-worker":
        from extractor.dev.bench_fidelity import vectors_worker

        vectors_worker(*rest[:5])
    elif command == "--overlap-worker":
        from extractor.dev.bench_decode import overlap_worker

        print(json.dumps(overlap_worker(rest[0], int(rest[1]))))
    elif command == "--ceiling-worker":
        print(json.dumps(ceiling_worker(int(rest[0]), rest[1], int(rest[2]), int(rest[3]), rest[4])))
    else:
        return None
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    code = _helper_command(argv)
    if code is not None:
        return code
    args = parse_args(argv)
    images = load_images(args.images, args.count)
    n, master = len(images), f"local[{args.cores}]"
    print(f"bench: {n} images ({args.images or 'generated'}), {master}, model {args.model}, batch "
          f"{args.batch_size}, {args.repeats} repeats; CPU: {cpu_name()}", flush=True)
    log_dir = Path(tempfile.mkdtemp(prefix="fruits-bench-"))
    report = {"images": n, "source": str(args.images or "generated"), "master": master, "cpu": cpu_name(),
              "model": args.model, "batch_size": args.batch_size, "date": time.strftime("%Y-%m-%d"),
              "csv_rows_per_s": csv_rows_per_second(args.csv_rows)}
    large = camera_photos(images, args.large) if args.large else {}
    if large:
        print(f"bench: {len(large)} camera-size photos, median {statistics.median(map(len, large.values())):,.0f} "
              "bytes", flush=True)
    with local_s3("bench") as s3:
        s3.create_bucket(BUCKET)
        s3.upload(BUCKET, "in/", images)
        s3.upload(BUCKET, "large/", large)
        if args.progress_overhead:
            report["progress_overhead"] = bench_progress(s3, args, log_dir)
        elif args.prototype_repeats:
            runs = [run_prototype(s3.env, master, f"proto{i}", log_dir, n, args.model)
                    for i in range(args.prototype_repeats)]
            report["prototype"] = _median_run(runs)
            print(f"prototype: {report['prototype']['images_per_s']:.2f} images/s", flush=True)
        for precision in args.precision if not args.progress_overhead else ():
            for task_cpus in args.task_cpus:
                name = f"{precision}, {args.cores // task_cpus} task(s) x {task_cpus} thread(s)"
                report[name] = bench_configuration(s3, args, precision, task_cpus, log_dir, report)
                print_entry(name, report[name])
        if not args.progress_overhead and (large or args.peer):
            report["sizes"] = bench_sizes(s3, args, images, large, log_dir, report)
        _fidelity(report, args, images, large)
    print("CSV formatting, rows of 4096 float32 per second: "
          + ", ".join(f"{k} {v:.0f}" for k, v in report["csv_rows_per_s"].items()))
    print(f"logs of every run in {log_dir}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _fidelity(report: dict, args, images: dict, large: dict) -> None:
    """bfloat16 against float32, and draft decoding against full decoding of the camera-size photos."""
    if "bfloat16" in args.precision:
        report["bfloat16_fidelity"] = compare(images, ("float32", "draft"), ("bfloat16", "draft"), model=args.model)
        print("\n" + describe("bfloat16 fidelity", report["bfloat16_fidelity"]), flush=True)
    if large:
        report["draft_fidelity"] = compare(large, ("float32", "full"), ("float32", "draft"), model=args.model)
        print("\n" + describe("draft decoding fidelity (camera-size photos)", report["draft_fidelity"]), flush=True)


def bench_sizes(s3, args, images: dict, large: dict, log_dir: Path, report: dict) -> dict:
    """float32 at the first --task-cpus: the job on the camera-size photos, the peer on both
    sizes (local files), and the ratios job/peer, job/ceiling and large/small."""
    master, task_cpus = f"local[{args.cores}]", args.task_cpus[0]
    small = report[f"float32, {args.cores // task_cpus} task(s) x {task_cpus} thread(s)"]
    rows = {"small": {"job": small["job"], "job_runs": small["job_runs"]}}
    for size, (output, extra) in LARGE_ROWS.items() if large else ():
        runs = [run_job(s3.env, master, task_cpus, "float32", args.batch_size, f"{output}{i}", log_dir, s3.client,
                        extra=extra, source="large/", model=args.model) for i in range(args.repeats)]
        rows[size] = {"job": _median_run(runs), "job_runs": runs}
    if args.peer:
        for size, found in (("small", images), ("large", large)):
            if found:
                folder = write_folder(found, log_dir / f"peer-input-{size}")
                runs = [run_peer(master, folder, f"peer-{size}{i}", log_dir, len(found), args.model)
                        for i in range(args.repeats)]
                rows[size].update(peer=_median_run(runs), peer_runs=runs)
    for size, row in list(rows.items()):
        row["job_over_ceiling"] = row["job"]["images_per_s"] / small["ceiling_images_per_s"]
        if "peer" in row:
            row["job_over_peer"] = row["job"]["images_per_s"] / row["peer"]["images_per_s"]
    for size in LARGE_ROWS:
        for key in ("featurize_images_per_s", "running_images_per_s"):
            if size in rows:
                rows[f"{size} / small: {key}"] = rows[size]["job"][key] / rows["small"]["job"][key]
    print_sizes(rows, small["ceiling_images_per_s"])
    return rows


def _median_run(runs: list[dict]) -> dict:
    """The run with the median images/s (its own stage figures stay consistent)."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    return ordered[len(ordered) // 2]


if __name__ == "__main__":
    sys.exit(main())
