"""The job end to end on this machine: a local S3 server, real spark-submit, outputs downloaded.

    python -m extractor.dev.demo                      # generated fruit images
    python -m extractor.dev.demo --images DIR         # a real folder, e.g. Fruits-360's Test/

Starts moto's S3 server on 127.0.0.1, uploads the images, runs
``spark-submit --master 'local[*]' driver.py`` against it, downloads the outputs to
``demo-output/``, prints a summary and stops the server.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from extractor.dev.local_s3 import REPO, LocalS3, local_s3, spark_submit
from extractor.dev.synthetic import fruit_dataset
from extractor.driver.weights import keras_cache_dir
from extractor.executor.models import MODELS
from extractor.storage.layout import LOCK_FILE
from extractor.storage.listing import is_image_key

BUCKET = "fruits-demo"
INPUT = "fruits/Training/"
OUTPUT = "features/"


def local_images(folder: Path, per_fruit: int | None) -> dict[str, bytes]:
    """``{"<subfolder>/<file>": bytes}`` for the images of each subfolder of ``folder``."""
    images = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.iterdir() if p.is_file() and is_image_key(p.name))
        for path in files[:per_fruit]:
            images[f"{sub.name}/{path.name}"] = path.read_bytes()
    if not images:
        raise SystemExit(f"demo: no .jpg/.jpeg/.png images in the subfolders of {folder}")
    return images


def choose_weights(requested: str, model: str) -> tuple[str, str | None]:
    """'auto' -> imagenet when Keras already has VGG16's file cached (no internet needed), else random."""
    if requested != "auto":
        return requested, None
    spec = MODELS.get(model)
    if spec is not None and spec.imagenet is not None and (Path(keras_cache_dir()) / spec.imagenet.fname).is_file():
        return "imagenet", None
    return "random", ("NOTICE: ImageNet weights are not cached on this machine and this demo does not "
                      "download them, so it runs with --weights random: the pipeline is real, the "
                      "features carry no meaning. Pass --weights imagenet (internet) or a .h5 file.")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m extractor.dev.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="folder with one subfolder of images per fruit")
    parser.add_argument("--per-fruit", type=int, default=12,
                        help="images per fruit (generated; or at most this many from --images)")
    parser.add_argument("--weights", default="auto", help="auto, imagenet, random or a .h5 file")
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--master", default="local[*]")
    parser.add_argument("--out-dir", type=Path, default=REPO / "demo-output")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further driver.py options, e.g. --extra --pca-k 10")
    return parser.parse_args(argv)


_PROGRESS = re.compile(r" extractor: (?P<stage>[^:]+): (?P<done>[\d,]+) / (?P<total>[\d,]+) (?P<unit>\w+) \(")


class ProgressBars:
    """In a terminal, the job's progress lines (``featurize: 1,200 / 9,000 images (...``) drawn as
    one tqdm bar per stage instead of printed; every other line printed above the bar."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.bar, self.stage = None, None

    def line(self, line: str) -> None:
        match = _PROGRESS.search(line)
        if match is None:
            if self.bar is not None and " extractor: stage " in line:
                self.close()
            (self.bar.write if self.bar is not None else print)("  " + line.rstrip(), file=self.stream)
            return
        from tqdm import tqdm

        done, total = (int(match[name].replace(",", "")) for name in ("done", "total"))
        if self.bar is None or self.stage != match["stage"]:
            self.close()
            self.stage = match["stage"]
            self.bar = tqdm(total=total, desc=f"  {self.stage}", unit=f" {match['unit']}", file=self.stream,
                            dynamic_ncols=True)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None


def run_driver(s3: LocalS3, args, weights: str) -> tuple[int, float]:
    """spark-submit driver.py on the uploaded images; the job's own log lines are echoed (in a
    terminal, its progress lines as a bar), Spark's go to logs/demo-spark-submit.log. Returns
    (exit code, wall seconds)."""
    bars = ProgressBars() if sys.stdout.isatty() else None
    command = [spark_submit(), "--master", args.master, str(REPO / "driver.py"),
               "--input", f"s3://{BUCKET}/{INPUT}", "--output", f"s3://{BUCKET}/{OUTPUT}",
               "--model", args.model, "--weights", weights, "--log-dir", str(REPO / "logs"),
               *(["--progress-interval", "1"] if bars is not None else []), *args.extra]
    print("running:", " ".join(command), flush=True)
    spark_log = REPO / "logs" / "demo-spark-submit.log"
    spark_log.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    with open(spark_log, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=s3.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            if " extractor: " in line:  # the job's own log lines; Spark's go to the file only
                if bars is not None:
                    bars.line(line)
                else:
                    print("  " + line.rstrip(), flush=True)
        code = process.wait()
        if bars is not None:
            bars.close()
    if code != 0:
        print(f"demo: the job failed (exit {code}); full output in {spark_log}", file=sys.stderr)
    return code, time.perf_counter() - start


def download_outputs(s3: LocalS3, out_dir: Path) -> dict:
    """Every output object into ``out_dir`` (emptied first); returns the manifest."""
    shutil.rmtree(out_dir, ignore_errors=True)
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=OUTPUT):
        for obj in page.get("Contents", []):
            if obj["Key"][len(OUTPUT):] == LOCK_FILE:  # the run lock, not an output
                continue
            target = out_dir / obj["Key"][len(OUTPUT):]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.client.download_file(BUCKET, obj["Key"], str(target))
    return json.loads((out_dir / "manifest.json").read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    images = local_images(args.images, args.per_fruit) if args.images else fruit_dataset(args.per_fruit)
    weights, notice = choose_weights(args.weights, args.model)
    if notice:
        print(f"\n*** {notice}\n", flush=True)
    with local_s3("demo") as s3:
        s3.create_bucket(BUCKET)
        s3.upload(BUCKET, INPUT, images)
        print(f"local S3 at {s3.endpoint}: uploaded {len(images)} images ({args.images or 'generated'}) to "
              f"s3://{BUCKET}/{INPUT}", flush=True)
        code, job_seconds = run_driver(s3, args, weights)
        if code != 0:
            return code
        manifest = download_outputs(s3, args.out_dir)
    print_summary(manifest, args.out_dir, job_seconds, time.perf_counter() - started, notice)
    return 0


def print_summary(manifest: dict, out_dir: Path, job_seconds: float, total_seconds: float, notice) -> None:
    counts = manifest["counts"]
    print("\n=== summary ===")
    print(f"{'fruit':<28}{'featurized':>11}{'failed':>8}")
    for label, row in counts["per_fruit"].items():
        print(f"{label:<28}{row['featurized']:>11}{row['failed']:>8}")
    print(f"listed {counts['listed']}, featurized {counts['featurized']}, failed {counts['failed']}, "
          f"skipped non-image keys {counts['skipped_non_image_keys']}")
    pca = manifest["pca"]
    if pca:
        print(f"PCA: k = {pca['k']} components, explained variance {pca['explained_variance']:.1%}")
    timings = manifest["timings_s"]
    print(f"model {manifest['model']['name']}/{manifest['model']['output_layer']} "
          f"({manifest['model']['output_dim']}-d), weights {manifest['weights']['source']}")
    print(f"featurize stage: {manifest['images_per_second']} images/s; stages (s): "
          + ", ".join(f"{k} {v}" for k, v in timings.items()))
    print(f"spark-submit wall time {job_seconds:.1f} s "
          f"({counts['listed'] / job_seconds:.2f} images/s end to end); demo total {total_seconds:.1f} s")
    print(f"outputs: {out_dir}/ (features/, pca/, errors.csv, manifest.json, report.html, explained_variance.png, "
          f"pca_scatter.png, pca_scatter.csv, logs/)")
    if notice:
        print("\n*** " + notice)


if __name__ == "__main__":
    sys.exit(main())
