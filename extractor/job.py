"""The job's stages wired together: keys -> images -> vectors -> PCA -> files.

``run`` takes a SparkContext, a JobConfig and an S3 client; it creates none of them.
"""

from __future__ import annotations

import logging
import math
import platform
import resource
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from importlib import metadata

import numpy as np

from . import __version__
from .errors import JobError
from .featurize import ERROR, FEATURES, STATS, PartitionSettings, spark_task, warm_up_task
from .listing import list_images
from .models import get_spec, load_weights
from .outputs import (AUDIT_FOLDER, OutputWriter, format_errors, format_rows, pca_model_bytes, safe_names,
                      variance_plot_png)
from .pca import fit_pca
from .s3 import RetryLog, delete_keys, describe_s3_error, put_bytes

IMAGES_PER_PARTITION = 256


@dataclass
class Features:
    """What the executors sent back, sorted by key so outputs are reproducible."""

    keys: list[str]
    labels: list[str]
    vectors: np.ndarray                     # (n, d) float32
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (key, label, reason)
    retries: dict[str, int] = field(default_factory=dict)  # S3 operation -> retries on the executors
    executor_stats: dict = field(default_factory=dict)     # summed PartitionStats, see executor_summary


class Stages:
    """Times each stage, logs it and ships the log to S3 after it."""

    def __init__(self, logger: logging.Logger, ship=None):
        self.logger = logger
        self.ship = ship or (lambda: None)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        self.logger.info("stage %s: start", name)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.logger.info("stage %s: done in %.1f s", name, self.seconds[name])
        self.ship()


def default_partitions(n_images: int, parallelism: int) -> int:
    """Enough partitions to keep every core busy and make a retried task cheap."""
    return max(1, min(n_images, max(2 * parallelism, math.ceil(n_images / IMAGES_PER_PARTITION))))


def assemble(records, listed_keys: list[str]) -> Features:
    """Collected partition records -> Features; checks that every listed key came back once."""
    keys, labels, blocks, errors, retries, stats = [], [], [], [], Counter(), []
    for record in records:
        if record[0] == FEATURES:
            _, block_keys, block_labels, vectors = record
            keys.extend(block_keys)
            labels.extend(block_labels)
            blocks.append(vectors)
        elif record[0] == ERROR:
            errors.append(tuple(record[1:]))
        elif record[0] == STATS:
            retries.update(record[1]["retries"])
            stats.append(record[1])
    returned = keys + [e[0] for e in errors]
    if len(returned) != len(listed_keys) or set(returned) != set(listed_keys):
        missing = set(listed_keys) - set(returned)
        raise JobError(f"accounting failed: listed {len(listed_keys)}, got back {len(returned)} "
                       f"({len(missing)} missing, e.g. {sorted(missing)[:3]})")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    vectors = np.concatenate(blocks)[order] if blocks else np.zeros((0, 0), np.float32)
    return Features([keys[i] for i in order], [labels[i] for i in order], vectors, sorted(errors), dict(retries),
                    executor_summary(stats))


def executor_summary(stats: list[dict]) -> dict:
    """Partition stats -> seconds per activity summed over tasks, first forward and last task end
    (epoch s), the largest Python worker's peak memory."""
    seconds = Counter()
    for item in stats:
        seconds.update(item["seconds"])
    firsts = [s["first_forward_at"] for s in stats if s["first_forward_at"]]
    return {"task_seconds": {k: round(v, 3) for k, v in sorted(seconds.items())},
            "first_forward_at": min(firsts) if firsts else None,
            "last_task_finished_at": max((s["finished_at"] for s in stats), default=None),
            "python_worker_peak_rss_mb": round(max((s["peak_rss_mb"] for s in stats), default=0.0), 1)}


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "extractor": __version__}
    for name in ("pyspark", "tensorflow", "tensorflow-cpu", "keras", "numpy", "pillow", "boto3", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def run(sc, cfg, *, s3_client, logger: logging.Logger, ship=None, run_id: str = "") -> dict:
    """Run the whole job; returns the manifest written next to the outputs."""
    started = datetime.now(timezone.utc)
    stages = Stages(logger, ship)
    spec = get_spec(cfg.model)
    retry_log = RetryLog(on_retry=lambda operation, retries, status: logger.warning(
        "S3 %s succeeded or failed after %d retries (last HTTP status %s)", operation, retries, status))
    retry_log.attach(s3_client)
    logger.info("run %s: %s -> %s, model %s (%s), weights %s", run_id, cfg.input.uri, cfg.output.uri,
                spec.name, spec.output_layer, cfg.weights)
    with stages.stage("preflight"):
        preflight(s3_client, cfg, run_id, logger)
    with stages.stage("list"):
        listing = list_stage(s3_client, cfg, logger)
    check_collect_fits(len(listing.images), spec.output_dim, sc.getConf().get("spark.driver.memory", "1g"), logger)
    warm_up = WarmUp(sc, spec, cfg.precision, logger)
    try:
        with stages.stage("load_weights"):
            try:
                weights = load_weights(spec, cfg.weights, seed=cfg.seed, s3_client=s3_client)
            except (OSError, ValueError) as exc:
                raise JobError(f"cannot load weights {cfg.weights!r}: {exc}") from exc
        logger.info("weights %s: %d arrays, %.0f MB, sha256 %s", weights.source, len(weights.arrays),
                    weights.nbytes / 1e6, weights.sha256[:16])
        if weights.warning:
            logger.warning("%s", weights.warning)
        with stages.stage("featurize"):
            features, spark_info = featurize_stage(sc, cfg, spec, weights, listing, logger, warm_up)
    finally:
        warm_up.cancel()
    rate = len(listing.images) / stages.seconds["featurize"]
    logger.info("featurized %d images, %d failed, %.2f images/s; weights set in %d Python worker(s); S3 retries on the "
                "executors: %s", len(features.keys), len(features.errors), rate, spark_info["weight_loads"],
                features.retries or "none")
    for key, label, reason in features.errors[:20]:
        logger.warning("failed: s3://%s/%s (%s): %s", cfg.input.bucket, key, label, reason)

    # Logs accumulate across runs, and the erasure audit trail (extractor.forget) must outlive them.
    keep = [cfg.output.key(AUDIT_FOLDER)]
    if cfg.log_location.bucket == cfg.output.bucket:
        keep.append(cfg.log_location.prefix)
    writer = OutputWriter(s3_client, cfg.s3, cfg.output, keep_prefixes=keep)
    errors_csv = format_errors([(f"s3://{cfg.input.bucket}/{key}", label, reason)
                                for key, label, reason in features.errors])
    try:
        if not features.keys:
            writer.put("errors.csv", errors_csv, "text/csv")
            raise JobError(f"none of the {len(features.errors)} images could be featurized; "
                           f"reasons in {cfg.output.uri}errors.csv")
        with stages.stage("pca"):
            pca_model = pca_stage(features, cfg, logger)
        with stages.stage("write"):
            names = write_stage(writer, cfg, features, pca_model)
            writer.put("errors.csv", errors_csv, "text/csv")
        manifest = {
            "run_id": run_id,
            "status": "succeeded",
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input": cfg.input.uri,
            "output": cfg.output.uri,
            "warning": weights.warning,
            "counts": {"listed": len(listing.images), "featurized": len(features.keys),
                       "failed": len(features.errors), "skipped_non_image_keys": listing.skipped,
                       "per_fruit": per_fruit_counts(features, names)},
            "model": {"name": spec.name, "output_layer": spec.output_layer, "output_dim": spec.output_dim,
                      "input_size": list(spec.input_size), "preprocessing": spec.preprocess.__name__},
            "weights": {"source": weights.source, "kind": weights.kind, "sha256": weights.sha256,
                        "seed": weights.seed, "warning": weights.warning},
            "pca": None if pca_model is None else {
                "k": pca_model.k, "explained_variance": round(pca_model.cumulative_ratio, 6),
                "requested_k": cfg.pca_k, "target_variance": cfg.pca_variance,
                "components_available": len(pca_model.explained_variance_ratio)},
            "batch_size": cfg.batch_size,
            "precision": cfg.precision,
            **spark_info,
            "timings_s": stages.seconds,
            "images_per_second": round(rate, 3),
            "s3_retries": {"driver": dict(retry_log.by_operation), "executors": features.retries},
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "versions": library_versions(),
        }
        stale = writer.finish(manifest)
        if stale:
            logger.info("removed %d stale files of an earlier run: %s", len(stale), stale[:5])
        logger.info("outputs written under %s (%d files + manifest.json + _SUCCESS)",
                    cfg.output.uri, len(writer.written) - 2)
    except JobError:
        raise
    except Exception as exc:
        written = writer.written
        # A warning: the run's one ERROR line is the driver's, from the JobError below.
        logger.warning("writing the outputs failed after %d files (%s); no _SUCCESS was written, so "
                     "%s holds a partial result that readers must ignore; re-run the job to replace it",
                     len(written), ", ".join(written[:10]) + (" ..." if len(written) > 10 else ""),
                     cfg.output.uri)
        raise JobError(describe_s3_error(exc, f"cannot write the outputs to {cfg.output.uri}")) from exc
    return manifest


def preflight(s3_client, cfg, run_id: str, logger: logging.Logger) -> None:
    """Fail in seconds, not after an hour of compute: buckets in the job's region, output writable."""
    import boto3

    region = cfg.s3.region or boto3.session.Session().region_name
    for what, location in (("--input", cfg.input), ("--output", cfg.output)):
        try:
            answer = s3_client.get_bucket_location(Bucket=location.bucket).get("LocationConstraint")
        except Exception as exc:
            raise JobError(describe_s3_error(exc, f"cannot reach {what} {location.uri}")) from exc
        bucket_region = {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(answer, answer)
        if region and bucket_region != region:
            raise JobError(f"{what} bucket {location.bucket!r} is in {bucket_region}, the job runs in {region}: "
                           f"photos would cross regions; run with --region {bucket_region} (or copy the data)")
    probe = cfg.output.key(f".write-check-{run_id or 'run'}")
    try:
        put_bytes(s3_client, cfg.s3, cfg.output.bucket, probe, b"", "text/plain")
        delete_keys(s3_client, cfg.output.bucket, [probe])
    except Exception as exc:
        raise JobError(describe_s3_error(exc, f"cannot write to --output {cfg.output.uri}")) from exc
    logger.info("preflight: buckets in %s, %s writable", region or "(region not set)", cfg.output.uri)


def parse_memory(text: str) -> int:
    """Spark's memory strings ('10g', '512m', '1024k', '2t', plain bytes) -> bytes."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    text = text.strip().lower().removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# Spark keeps 300 MB of the heap for itself; collected results are built in what is left, and
# the Python driver then holds the pickled blocks, their concatenation and the sorted copy.
SPARK_RESERVED = 300 * 2**20
HEAP_SHARE_FOR_RESULTS = 0.5
PYTHON_COPIES = 3


def collect_need(n_images: int, dim: int) -> tuple[int, int]:
    """(driver JVM bytes, driver Python bytes) that collecting ``n_images`` ``dim``-d vectors needs."""
    payload = n_images * (dim * 4 + 256)  # float32 rows + key, label and pickling overhead
    return payload, PYTHON_COPIES * payload


def check_collect_fits(n_images: int, dim: int, driver_memory: str, logger: logging.Logger) -> None:
    """Refuse, before any compute, a collect that would run the driver out of memory."""
    heap = parse_memory(driver_memory)
    usable = max(0, heap - SPARK_RESERVED) * HEAP_SHARE_FOR_RESULTS
    jvm_need, python_need = collect_need(n_images, dim)
    available = _memory_available()
    logger.info("collect estimate: %d x %d float32 = %.2f GB in the driver JVM (usable %.2f GB of "
                "spark.driver.memory %s) and %.2f GB in the Python driver (%s available)", n_images, dim,
                jvm_need / 1e9, usable / 1e9, driver_memory, python_need / 1e9,
                f"{available / 1e9:.2f} GB" if available is not None else "unknown")
    if jvm_need > usable:
        needed_gb = math.ceil((jvm_need / HEAP_SHARE_FOR_RESULTS + SPARK_RESERVED) / 2**30)
        raise JobError(f"collecting {n_images} vectors of {dim} float32 needs about {jvm_need / 1e9:.1f} GB of "
                       f"driver heap, more than spark.driver.memory={driver_memory} allows: run with "
                       f"spark-submit --driver-memory {needed_gb}g or more, or split --input into smaller prefixes")
    if available is not None and python_need > available:
        raise JobError(f"collecting {n_images} vectors of {dim} float32 needs about {python_need / 1e9:.1f} GB "
                       f"in the Python driver, only {available / 1e9:.1f} GB of memory is available: use a "
                       f"driver machine with more memory, or split --input into smaller prefixes")


def _memory_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def list_stage(s3_client, cfg, logger: logging.Logger):
    try:
        listing = list_images(s3_client, cfg.input)
    except Exception as exc:
        raise JobError(describe_s3_error(exc, f"cannot list {cfg.input.uri}")) from exc
    logger.info("listed %d images in %d folders; skipped %d non-image keys%s", len(listing.images),
                len({r.label for r in listing.images}), listing.skipped,
                f" (e.g. {listing.skipped_examples[:3]})" if listing.skipped else "")
    if not listing.images:
        raise JobError(f"no .jpg/.jpeg/.png images under {cfg.input.uri} ({listing.skipped} other keys)")
    return listing


class WarmUp:
    """A Spark job, started in a thread, that makes every Python worker import TensorFlow and
    build and trace the model while the driver loads the weights: seconds of each worker's
    start-up hidden behind the driver's. Only an optimisation: if it fails, the tasks build
    the model themselves."""

    GROUP = "fruits-warm-up"

    def __init__(self, sc, spec, precision: str, logger: logging.Logger):
        self.sc, self.logger = sc, logger
        self.seconds: float | None = None
        self.workers = 0
        conf = sc.getConf()
        self.enabled = conf.get("spark.python.worker.reuse", "true").lower() == "true"
        threads = int(conf.get("spark.task.cpus", "1"))
        self.slots = max(1, sc.defaultParallelism // threads)
        self.task = partial(warm_up_task, model_name=spec.name, threads=threads, precision=precision)
        self.thread = threading.Thread(target=self._work, name="warm-up", daemon=True)
        if self.enabled:
            self.thread.start()

    def _work(self) -> None:
        start = time.perf_counter()
        self.sc.setJobGroup(self.GROUP, "warm-up: import TensorFlow, build the model", interruptOnCancel=False)
        try:
            results = self.sc.parallelize(range(self.slots), self.slots).mapPartitions(self.task).collect()
        except Exception as exc:
            self.logger.info("warm-up did not finish (%s); tasks build the model themselves",
                             spark_failure_summary(exc))
            return
        self.seconds = round(time.perf_counter() - start, 3)
        self.workers = len({pid for pid, _ in results})
        self.logger.info("warm-up: %d Python worker(s) imported TensorFlow and built the model in %.1f s",
                         self.workers, self.seconds)

    def wait(self) -> None:
        """Let the warm-up tasks end first: a featurize task beside them would start a second worker."""
        if self.enabled:
            self.thread.join()

    def cancel(self) -> None:
        if self.enabled and self.thread.is_alive():
            self.sc.cancelJobGroup(self.GROUP)
            self.thread.join(timeout=30)

    def as_dict(self) -> dict:
        return {"enabled": self.enabled, "slots": self.slots, "workers": self.workers, "seconds": self.seconds}


def featurize_stage(sc, cfg, spec, weights, listing, logger: logging.Logger,
                    warm_up: WarmUp | None = None) -> tuple[Features, dict]:
    """Broadcast the weights, featurize every listed image on the executors, collect."""
    parallelism = sc.defaultParallelism
    partitions = cfg.partitions or default_partitions(len(listing.images), parallelism)
    threads = int(sc.getConf().get("spark.task.cpus", "1"))
    broadcast = sc.broadcast(weights.arrays)
    weights.arrays = []  # the broadcast holds them now; don't keep a second copy
    builds = sc.accumulator(0)
    task = partial(
        spark_task,
        settings=PartitionSettings(bucket=cfg.input.bucket, batch_size=cfg.batch_size, max_pixels=cfg.max_pixels),
        model_name=spec.name, weights_id=weights.sha256, weights_broadcast=broadcast,
        s3_settings=cfg.s3, threads=threads, precision=cfg.precision, builds_counter=builds)
    refs = [(ref.key, ref.label) for ref in listing.images]
    logger.info("featurizing %d images in %d partitions (default parallelism %d, batch %d, "
                "%d TF threads per task)", len(refs), partitions, parallelism, cfg.batch_size, threads)
    if warm_up is not None:
        warm_up.wait()
    try:
        records = sc.parallelize(refs, partitions).mapPartitions(task).collect()
    except Exception as exc:
        raise JobError(f"Spark job failed: {spark_failure_summary(exc)}") from exc
    finally:
        broadcast.unpersist()
    collected_at = time.time()
    features = assemble(records, [key for key, _ in refs])
    executors = dict(features.executor_stats)
    if executors.get("last_task_finished_at"):
        # From the last task's end to the vectors being on the driver: the collect itself.
        executors["collect_s"] = round(collected_at - executors["last_task_finished_at"], 3)
    info = {"partitions": partitions, "weight_loads": builds.value, "executors": executors,
            "warm_up": warm_up.as_dict() if warm_up is not None else None,
            "spark": {"master": sc.master, "app_id": sc.applicationId,
                      "default_parallelism": parallelism, "task_cpus": threads}}
    return features, info


def pca_stage(features: Features, cfg, logger: logging.Logger):
    """The fitted PCAModel, or None when fewer than 2 images were featurized."""
    n = len(features.keys)
    if n < 2:
        logger.warning("PCA skipped: it needs at least 2 featurized images, got %d", n)
        return None
    model = fit_pca(features.vectors, k=cfg.pca_k, variance=cfg.pca_variance)
    if cfg.pca_k is not None and model.k < cfg.pca_k:
        logger.warning("--pca-k %d asked, only %d components exist for %d images: k = %d",
                       cfg.pca_k, model.k, n, model.k)
    logger.info("PCA: k = %d of %d, explained variance %.4f", model.k,
                len(model.explained_variance_ratio), model.cumulative_ratio)
    return model


def write_stage(writer: OutputWriter, cfg, features: Features, pca_model) -> dict[str, str]:
    """Per-fruit feature and PCA CSVs, the PCA model and its plot; returns label -> file stem."""
    names = safe_names(features.labels)
    paths = np.asarray([f"s3://{cfg.input.bucket}/{key}" for key in features.keys], dtype=object)
    labels = np.asarray(features.labels, dtype=object)
    projections = pca_model.transform(features.vectors) if pca_model is not None else None
    for label, name in sorted(names.items()):
        rows = np.flatnonzero(labels == label)
        row_paths, row_labels = paths[rows].tolist(), [label] * len(rows)
        writer.put(f"features/{name}.csv", format_rows(row_paths, row_labels, features.vectors[rows], "dim_"),
                   "text/csv")
        if projections is not None:
            writer.put(f"pca/{name}.csv", format_rows(row_paths, row_labels, projections[rows], "pc_"), "text/csv")
    if pca_model is not None:
        writer.put("pca_model.npz", pca_model_bytes(pca_model))
        writer.put("explained_variance.png",
                   variance_plot_png(pca_model.explained_variance_ratio, pca_model.k, cfg.pca_variance), "image/png")
    return names


def per_fruit_counts(features: Features, names: dict[str, str]) -> dict:
    counts = {label: {"file": f"{name}.csv", "featurized": 0, "failed": 0} for label, name in sorted(names.items())}
    for label in features.labels:
        counts[label]["featurized"] += 1
    for _, label, _ in features.errors:
        counts.setdefault(label, {"file": None, "featurized": 0, "failed": 0})["failed"] += 1
    return counts


def spark_failure_summary(exc: Exception) -> str:
    """The Python error at the bottom of a Py4J/Spark failure, in one line."""
    text = str(exc)
    candidates = [line.strip() for line in text.splitlines()
                  if line.strip() and ("Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0])
                  and not line.strip().startswith(("at ", "File "))]
    line = candidates[-1] if candidates else text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return line[:500]
