"""Command-line options of driver.py, validated early into a plain JobConfig."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from extractor.driver.inputs import (
    AUTO_DRIVER_MAX_KEYS,
    LISTING_MODES,
    check_listing_options,
)
from extractor.driver.weights import weights_kind
from extractor.errors import OneLineParser
from extractor.executor.feeding import (
    CPU_BATCH_SIZE,
    CPU_DECODE_THREADS,
    GPU_BATCH_SIZE,
)
from extractor.executor.images import DECODE_MODES, DEFAULT_MAX_PIXELS
from extractor.executor.models import MODELS
from extractor.storage.layout import check_locations, default_log_location
from extractor.storage.lock import DEFAULT_LEASE_S
from extractor.storage.run_locks import add_lock_options
from extractor.storage.s3 import (
    S3Location,
    S3Settings,
    add_s3_options,
    parse_s3_uri,
    settings_from_args,
)


@dataclass(frozen=True)
class JobConfig:
    input: S3Location
    output: S3Location
    log_location: S3Location
    s3: S3Settings
    model: str = "vgg16"
    weights: str = "imagenet"
    seed: int = 0
    batch_size: int | None = None        # None: auto, resolved by job.feeding_for (feeding.plan_feeding)
    precision: str = "float32"
    pca_k: int | None = None
    pca_variance: float | None = 0.95
    partitions: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    log_dir: str = "logs"
    collect: str = "auto"
    format: str = "csv"
    state: S3Location | None = None      # set only with --incremental
    progress_interval: float = 30.0      # seconds between progress lines; 0: none
    log_ship_interval: float = 60.0      # seconds between uploads of the log during a stage; 0: after stages only
    decode_threads: int | None = None    # None: auto, resolved with the batch size
    decode: str = "draft"                # "draft": large JPEGs decoded at a reduced DCT scale; "full": Keras' path
    lock_lease_s: float = DEFAULT_LEASE_S  # the run lock's lease on --output (and --state), renewed every third of it
    break_lock: bool = False             # take the run locks over even from a run whose lease holds
    no_lock: bool = False                # take no run lock (an endpoint that ignores conditional writes)
    listing: str = "auto"                # inputs.LISTING_MODES: where the input is listed
    inventory: str | None = None         # an S3 Inventory manifest.json read instead of listing


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="driver.py",
        description="Featurize the fruit images under an S3 prefix with a CNN, reduce with PCA, "
                    "and write one CSV per fruit back to S3.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", required=True, metavar="S3_URI",
                        help="s3://bucket/prefix/ holding one folder per fruit (label = parent folder)")
    parser.add_argument("--output", required=True, metavar="S3_URI",
                        help="s3://bucket/prefix/ for the results; a re-run replaces what is there")
    _add_model_options(parser)
    pca = parser.add_mutually_exclusive_group()
    pca.add_argument("--pca-k", type=int, default=None, metavar="N", help="keep exactly N components")
    pca.add_argument("--pca-variance", type=float, default=0.95, metavar="F",
                     help="keep the fewest components reaching this cumulative explained variance")
    parser.add_argument("--collect", default="auto", choices=["auto", "always", "never"],
                        help="'always': vectors collected on the driver (PCA and files there); 'never': PCA "
                             "from statistics aggregated on the executors, files written by the executors; "
                             "'auto': collect only when the estimate fits the driver's memory comfortably")
    parser.add_argument("--format", default="csv", choices=["csv", "parquet"],
                        help="per-fruit files: CSV (path,label,dim_0..) or Parquet (path, label, vector)")
    parser.add_argument("--incremental", action="store_true",
                        help="reuse the vectors stored under --state for keys whose ETag did not change; "
                             "featurize only new or changed images; drop keys deleted from --input")
    parser.add_argument("--state", default=None, metavar="S3_URI",
                        help="s3://bucket/prefix/ where --incremental keeps the vectors between runs")
    parser.add_argument("--listing", default="auto", choices=list(LISTING_MODES),
                        help="where the input's keys are listed: 'driver' (one sequential walk, every key "
                             "held by the driver), 'distributed' (the driver lists the folders, the executors "
                             f"their keys); 'auto': the driver up to {AUTO_DRIVER_MAX_KEYS:,} keys, the executors "
                             "past that")
    parser.add_argument("--inventory", default=None, metavar="S3_URI",
                        help="read the input's keys from this S3 Inventory report (its manifest.json; CSV or "
                             "Parquet) on the executors instead of listing; keys deleted since are error rows")
    parser.add_argument("--partitions", type=int, default=None,
                        help="RDD partitions (default: max(2 x default parallelism, images / 256))")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="images with more pixels are refused from their header (decompression bombs)")
    add_s3_options(parser, "written objects")
    parser.add_argument("--log-uri", default=None, metavar="S3_URI",
                        help="where the run's log is uploaded (default: <output>/logs/)")
    parser.add_argument("--log-dir", default="logs", help="local folder for the log file")
    parser.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                        help="log a progress line (images done, failed, rate, ETA) this often while a stage "
                             "runs; 0 turns them off")
    parser.add_argument("--log-ship-interval", type=float, default=60.0, metavar="SECONDS",
                        help="upload the log to S3 at most this often while a stage runs (when it grew); "
                             "0: only at start, after each stage and at the end")
    add_lock_options(parser, "this run")
    return parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """The CNN and how images are fed to it: model, weights, batches, decoding, precision."""
    parser.add_argument("--model", default="vgg16", choices=sorted(MODELS),
                        help="feature extractor; 'tiny' and 'probe4096' are for tests only (meaningless features)")
    parser.add_argument("--weights", default="imagenet",
                        help="'imagenet' (Keras download), 'random' (seeded, meaningless features), "
                             "or a .h5/.weights.h5 file: local path or s3:// URI")
    parser.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    parser.add_argument("--batch-size", type=_auto_int, default="auto",
                        help=f"images per forward pass; auto: {CPU_BATCH_SIZE}, or {GPU_BATCH_SIZE} per GPU when Spark "
                             f"gives tasks GPUs")
    parser.add_argument("--decode-threads", type=_auto_int, default="auto",
                        help="threads per task that download and decode images one batch ahead of the model; "
                             f"auto: {CPU_DECODE_THREADS}, or sized to keep the GPU fed when Spark gives tasks GPUs")
    parser.add_argument("--decode", default="draft", choices=list(DECODE_MODES),
                        help="'draft': a JPEG at least twice the model's input in both dimensions (a camera "
                             "photo) is decoded at the smallest DCT scale (1/2, 1/4, 1/8) still covering it, then "
                             "resized; smaller images decode exactly as with 'full', Keras' full-size decode")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="compute precision of the forward pass, mixed (float32 variables, float32 vectors): "
                             "bfloat16 for CPUs with AVX512-BF16/AMX and GPUs of compute capability 8.0+; "
                             "float16 for GPUs only (refused without one); see the README for fidelity")


def parse_args(argv: list[str] | None = None) -> JobConfig:
    """Parse and validate; bad input exits with status 2 and a one-line message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: error() exits


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """Check every value before anything expensive starts; ValueError says what was received."""
    source, output = parse_s3_uri(args.input), parse_s3_uri(args.output)
    log_location = parse_s3_uri(args.log_uri) if args.log_uri else default_log_location(output)
    state = _state_location(args)
    check_locations(source, output, state=state, written=[("--log-uri", log_location)])
    _check_numbers(args)
    kind = weights_kind(args.weights)
    if kind == "file" and not os.path.isfile(args.weights):
        raise ValueError(f"--weights file not found: {args.weights!r}")
    if kind == "s3":
        parse_s3_uri(args.weights, folder=False)
    return JobConfig(
        input=source,
        output=output,
        log_location=log_location,
        s3=settings_from_args(args),
        model=args.model,
        weights=args.weights,
        seed=args.seed,
        batch_size=args.batch_size,
        decode_threads=args.decode_threads,
        decode=args.decode,
        precision=args.precision,
        pca_k=args.pca_k,
        pca_variance=None if args.pca_k is not None else args.pca_variance,
        partitions=args.partitions,
        max_pixels=args.max_pixels,
        log_dir=args.log_dir,
        collect=args.collect,
        format=args.format,
        state=state,
        progress_interval=args.progress_interval,
        log_ship_interval=args.log_ship_interval,
        lock_lease_s=args.lock_lease,
        break_lock=args.break_lock,
        no_lock=args.no_lock,
        listing=args.listing,
        inventory=check_listing_options(args.listing, args.inventory),
    )


def _state_location(args: argparse.Namespace) -> S3Location | None:
    """--state, which only --incremental uses and which --incremental needs."""
    if args.incremental:
        if not args.state:
            raise ValueError("--incremental needs --state s3://bucket/prefix/ (where vectors are kept between runs)")
        return parse_s3_uri(args.state)
    if args.state:
        raise ValueError(f"--state {args.state!r} is only used with --incremental")
    return None


def _auto_int(text: str) -> int | None:
    """"auto" -> None; a whole number -> int (its range is checked with the other numbers)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number, got {text!r}") from None


def _check_numbers(args: argparse.Namespace) -> None:
    for option, value, most in (("--batch-size", args.batch_size, 1024),
                                ("--decode-threads", args.decode_threads, 128)):
        if value is not None and not 1 <= value <= most:
            raise ValueError(f"{option} must be between 1 and {most}, got {value}")
    if args.pca_k is not None and args.pca_k < 1:
        raise ValueError(f"--pca-k must be >= 1, got {args.pca_k}")
    if args.pca_k is None and not 0 < args.pca_variance <= 1:
        raise ValueError(f"--pca-variance must be in (0, 1], got {args.pca_variance}")
    for option, value in (("--progress-interval", args.progress_interval),
                          ("--log-ship-interval", args.log_ship_interval)):
        if not value >= 0:  # NaN too
            raise ValueError(f"{option} must be a number of seconds >= 0, got {value}")
    for option, value in (("--partitions", args.partitions), ("--max-pixels", args.max_pixels)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
