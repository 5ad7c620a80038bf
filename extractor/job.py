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
from . import distributed, state
from .featurize import ERROR, FEATURES, STATS, PartitionSettings, spark_task, warm_up_task
from .formats import get_format
from .listing import list_images
from .models import get_spec, load_weights
from .outputs import (AUDIT_FOLDER, KINDS, OutputWriter, by_fruit, error_rows, format_errors, pca_model_bytes,
                      safe_names, variance_plot_png)
from .pca import fit_pca, fit_pca_from_moments
from .s3 import RetryLog, delete_keys, describe_s3_error, put_bytes

IMAGES_PER_PARTITION = 256


@dataclass
class Features:
    """What the executors sent back, sorted by key so outputs are reproducible."""

    keys: list[str]
    labels: list[str]
    vectors: np.ndarray                     # (n, d) float32
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (key, label, reason)
    stats: list[dict] = field(default_factory=list)         # one PartitionStats dict per partition


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
    keys, labels, blocks, errors, stats = [], [], [], [], []
    for record in records:
        if record[0] == FEATURES:
            _, block_keys, block_labels, vectors = record
            keys.extend(block_keys)
            labels.extend(block_labels)
            blocks.append(vectors)
        elif record[0] == ERROR:
            errors.append(tuple(record[1:]))
        elif record[0] == STATS:
            stats.append(record[1])
    returned = keys + [e[0] for e in errors]
    if len(returned) != len(listed_keys) or set(returned) != set(listed_keys):
        missing = set(listed_keys) - set(returned)
        raise JobError(f"accounting failed: listed {len(listed_keys)}, got back {len(returned)} "
                       f"({len(missing)} missing, e.g. {sorted(missing)[:3]})")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    vectors = np.concatenate(blocks)[order] if blocks else np.zeros((0, 0), np.float32)
    return Features([keys[i] for i in order], [labels[i] for i in order], vectors, sorted(errors), stats)


def executor_summary(stats: list[dict], collected_at: float | None = None) -> dict:
    """Partition stats -> seconds per activity and counts summed over tasks, S3 retries, first
    forward and last task end (epoch s), collect time, the largest Python worker's peak memory."""
    seconds, counts, retries = Counter(), Counter(), Counter()
    for item in stats:
        seconds.update(item["seconds"])
        counts.update(item.get("counts", {}))
        retries.update(item["retries"])
    firsts = [s["first_forward_at"] for s in stats if s["first_forward_at"]]
    last = max((s["finished_at"] for s in stats), default=None)
    summary = {"task_seconds": {k: round(v, 3) for k, v in sorted(seconds.items())},
               "task_counts": dict(sorted(counts.items())), "retries": dict(retries),
               "first_forward_at": min(firsts) if firsts else None, "last_task_finished_at": last,
               "python_worker_peak_rss_mb": round(max((s["peak_rss_mb"] for s in stats), default=0.0), 1)}
    if collected_at is not None and last is not None:
        # From the last task's end to the vectors being on the driver: the collect itself.
        summary["collect_s"] = round(collected_at - last, 3)
    return summary


def summary_of(features: "Features") -> dict:
    """The collect path's Features in the shape of distributed.summarize's result."""
    return {"featurized": Counter(features.labels), "failed": Counter(label for _, label, _ in features.errors),
            "examples": features.errors[:20], "stats": features.stats}


def featurize_counts(listing, summary: dict, task_counts: dict) -> dict:
    """The manifest's counts from the listing, the summary and executor_summary's task_counts."""
    task = Counter(task_counts)
    listed = len(listing.images)
    featurized, failed = sum(summary["featurized"].values()), sum(summary["failed"].values())
    if featurized + failed != listed:  # the distributed mode never sees the keys on the driver: count them
        raise JobError(f"accounting failed: listed {listed}, got back {featurized} featurized + {failed} failed")
    # new: listed keys without a reusable stored vector (all of them outside --incremental).
    return {"listed": listed, "featurized": featurized, "failed": failed, "new": listed - task["reused"],
            "reused": task["reused"], "removed": task["removed"], "forwarded": task["forwarded"],
            "downloaded": task["downloaded"]}


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
    fmt = get_format(cfg.format)
    retry_log = RetryLog(on_retry=lambda operation, retries, status: logger.warning(
        "S3 %s succeeded or failed after %d retries (last HTTP status %s)", operation, retries, status))
    retry_log.attach(s3_client)
    logger.info("run %s: %s -> %s, model %s (%s), weights %s, format %s", run_id, cfg.input.uri, cfg.output.uri,
                spec.name, spec.output_layer, cfg.weights, fmt.name)
    with stages.stage("preflight"):
        preflight(s3_client, cfg, run_id, logger)
    with stages.stage("list"):
        listing = list_stage(s3_client, cfg, logger)
    mode = choose_mode(cfg.collect, len(listing.images), spec.output_dim,
                       sc.getConf().get("spark.driver.memory", "1g"), logger)
    previous = load_state_stage(s3_client, cfg, logger) if cfg.state is not None else None
    warm_up = WarmUp(sc, spec, cfg.precision, logger)
    records = broadcast = None
    try:
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
            incremental = Incremental.plan(cfg, spec, weights, previous, run_id, logger) if cfg.state else None
            with stages.stage("featurize"):
                records, broadcast, spark_info = featurize_stage(sc, cfg, spec, weights, listing, logger, warm_up,
                                                                 incremental)
                features, summary = run_featurize(records, mode["used"], listing)
        finally:
            warm_up.cancel()
        return finish_run(sc, cfg, s3_client=s3_client, logger=logger, run_id=run_id, started=started,
                          stages=stages, spec=spec, fmt=fmt, weights=weights, listing=listing, mode=mode,
                          incremental=incremental, records=records, spark_info=spark_info, features=features,
                          summary=summary, retry_log=retry_log)
    finally:
        if records is not None and mode["used"] == "distributed":
            records.unpersist()
        if broadcast is not None:
            broadcast.unpersist()


def run_featurize(records, mode: str, listing) -> tuple["Features | None", dict]:
    """Run the featurize stage: collect every record, or fill the executors' cache and sum
    small per-partition summaries. Returns (Features or None, summary)."""
    try:
        if mode == "collect":
            collected = records.collect()
            collected_at = time.time()
            features = assemble(collected, [ref.key for ref in listing.images])
            summary = summary_of(features)
        else:
            from pyspark import StorageLevel

            # The CNN runs once; the PCA and the writes read the records back. On disk, not in the
            # executors' heap: Python records are bytes to Spark either way, and this mode is for
            # data that does not fit in memory (a heap full of cached blocks left no room for the
            # PCA's records: an executor OOM at 100,000 vectors on 1 GB executors).
            records.persist(StorageLevel.DISK_ONLY)
            summary = distributed.summarize(records)
            collected_at, features = None, None
    except JobError:
        raise
    except Exception as exc:
        raise JobError(f"Spark job failed: {spark_failure_summary(exc)}") from exc
    summary["collected_at"] = collected_at
    return features, summary


def finish_run(sc, cfg, *, s3_client, logger, run_id, started, stages, spec, fmt, weights, listing, mode,
               incremental, records, spark_info, features, summary, retry_log) -> dict:
    """PCA, files, state and manifest, once the vectors exist (collected or cached)."""
    spark_info["executors"] = executor_summary(summary["stats"], summary["collected_at"])
    spark_info["weight_loads"] = spark_info["weight_loads"].value
    counts = featurize_counts(listing, summary, spark_info["executors"]["task_counts"])
    rate = len(listing.images) / stages.seconds["featurize"]
    logger.info("featurized %d images (%d through the CNN, %d reused), %d failed, %.2f images/s; weights set in "
                "%d Python worker(s); S3 retries on the executors: %s", counts["featurized"], counts["forwarded"],
                counts["reused"], counts["failed"], rate, spark_info["weight_loads"],
                spark_info["executors"]["retries"] or "none")
    for key, label, reason in summary["examples"][:20]:
        logger.warning("failed: s3://%s/%s (%s): %s", cfg.input.bucket, key, label, reason)

    # Logs accumulate across runs, and the erasure audit trail (extractor.forget) must outlive them.
    keep = [cfg.output.key(AUDIT_FOLDER)]
    if cfg.log_location.bucket == cfg.output.bucket:
        keep.append(cfg.log_location.prefix)
    if cfg.state is not None and cfg.state.bucket == cfg.output.bucket:
        keep.append(cfg.state.prefix)
    writer = OutputWriter(s3_client, cfg.s3, cfg.output, keep_prefixes=keep)
    try:
        names = safe_names(label for label, n in summary["featurized"].items() if n)

        def write_files(pca_model) -> None:
            if features is not None:
                write_stage(writer, cfg, fmt, features, names, pca_model)
                writer.put("errors.csv", format_errors(error_rows(cfg.input.bucket, features.errors)), "text/csv")
                return
            writer.begin()
            try:
                files, staged = distributed.write_files(
                    sc, records, cfg=cfg, names=names, dim=spec.output_dim, pca_model=pca_model,
                    staging_prefix=cfg.output.prefix + f"_staging/{run_id or 'run'}/", output_key=cfg.output.key)
            except Exception as exc:
                if type(exc).__module__.startswith(("py4j", "pyspark")):  # keep the one-line error one line
                    raise RuntimeError(f"Spark job failed: {spark_failure_summary(exc)}") from exc
                raise
            for relative, _, nbytes, sha256 in files:
                writer.record(relative, nbytes, sha256)
            delete_keys(s3_client, cfg.output.bucket, staged)

        if not counts["featurized"]:
            write_files(None)
            raise JobError(f"none of the {counts['failed']} images could be featurized; "
                           f"reasons in {cfg.output.uri}errors.csv")
        with stages.stage("pca"):
            pca_model = pca_stage(sc, features, records, counts["featurized"], spec.output_dim, cfg, logger)
        with stages.stage("write"):
            write_files(pca_model)
            write_model_files(writer, cfg, pca_model)
        if incremental is not None:
            with stages.stage("state"):
                incremental.result.update(commit_state(s3_client, cfg, incremental, summary["stats"], logger))
        manifest = {
            "run_id": run_id,
            "status": "succeeded",
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input": cfg.input.uri,
            "output": cfg.output.uri,
            "warning": weights.warning,
            "counts": {**counts, "skipped_non_image_keys": listing.skipped,
                       "per_fruit": per_fruit_counts(summary, names, fmt.extension)},
            "collect": mode,
            "format": fmt.name,
            "incremental": incremental.as_manifest() if incremental is not None else None,
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
            "s3_retries": {"driver": dict(retry_log.by_operation), "executors": spark_info["executors"]["retries"]},
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
    located = [("--input", cfg.input), ("--output", cfg.output)] + ([("--state", cfg.state)] if cfg.state else [])
    for what, location in located:
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


def collect_misfit(n_images: int, dim: int, driver_memory: str) -> str | None:
    """Why collecting ``n_images`` ``dim``-d vectors would not fit the driver, or None if it fits."""
    heap = parse_memory(driver_memory)
    usable = max(0, heap - SPARK_RESERVED) * HEAP_SHARE_FOR_RESULTS
    jvm_need, python_need = collect_need(n_images, dim)
    available = _memory_available()
    if jvm_need > usable:
        needed_gb = math.ceil((jvm_need / HEAP_SHARE_FOR_RESULTS + SPARK_RESERVED) / 2**30)
        return (f"collecting {n_images} vectors of {dim} float32 needs about {jvm_need / 1e9:.1f} GB of "
                f"driver heap, more than spark.driver.memory={driver_memory} allows: run with "
                f"spark-submit --driver-memory {needed_gb}g or more, or with --collect never")
    if available is not None and python_need > available:
        return (f"collecting {n_images} vectors of {dim} float32 needs about {python_need / 1e9:.1f} GB "
                f"in the Python driver, only {available / 1e9:.1f} GB of memory is available: use a "
                f"driver machine with more memory, or --collect never")
    return None


def choose_mode(collect: str, n_images: int, dim: int, driver_memory: str, logger: logging.Logger) -> dict:
    """'collect' or 'distributed' from --collect and the driver's memory; refuses, before any
    compute, a forced collect that would run the driver out of memory."""
    jvm_need, python_need = collect_need(n_images, dim)
    misfit = collect_misfit(n_images, dim, driver_memory)
    logger.info("collect estimate: %d x %d float32 = %.2f GB in the driver JVM (spark.driver.memory %s) and "
                "%.2f GB in the Python driver: %s", n_images, dim, jvm_need / 1e9, driver_memory,
                python_need / 1e9, misfit or "fits")
    if collect == "always" and misfit:
        raise JobError(misfit)
    used = "collect" if collect == "always" or (collect == "auto" and not misfit) else "distributed"
    reason = {"always": "--collect always", "never": "--collect never"}.get(
        collect, "the vectors fit the driver" if not misfit else "the vectors would not fit the driver")
    logger.info("mode: %s (%s)", used, reason)
    return {"requested": collect, "used": used, "reason": reason,
            "estimate_gb": {"driver_jvm": round(jvm_need / 1e9, 3), "driver_python": round(python_need / 1e9, 3)}}


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


def featurize_stage(sc, cfg, spec, weights, listing, logger: logging.Logger, warm_up: WarmUp | None = None,
                    incremental: "Incremental | None" = None):
    """The records RDD (not yet computed), the weights' broadcast and Spark facts for the manifest."""
    parallelism = sc.defaultParallelism
    partitions = cfg.partitions or default_partitions(len(listing.images), parallelism)
    threads = int(sc.getConf().get("spark.task.cpus", "1"))
    broadcast = sc.broadcast(weights.arrays)
    weights.arrays = []  # the broadcast holds them now; don't keep a second copy
    builds = sc.accumulator(0)
    refs = [(ref.key, ref.label, ref.etag) for ref in listing.images]
    plans = state.plan_partitions(refs, partitions, incremental.previous if incremental else None,
                                  cfg.state)
    task = partial(
        spark_task,
        settings=PartitionSettings(bucket=cfg.input.bucket, batch_size=cfg.batch_size, max_pixels=cfg.max_pixels),
        model_name=spec.name, weights_id=weights.sha256, weights_broadcast=broadcast,
        s3_settings=cfg.s3, threads=threads, precision=cfg.precision, builds_counter=builds,
        state_location=cfg.state, state_version=incremental.version if incremental else None)
    logger.info("featurizing %d images in %d partitions (default parallelism %d, batch %d, "
                "%d TF threads per task)", len(refs), len(plans), parallelism, cfg.batch_size, threads)
    if warm_up is not None:
        warm_up.wait()
    records = sc.parallelize(plans, len(plans)).mapPartitions(task)
    info = {"partitions": len(plans), "weight_loads": builds,
            "warm_up": warm_up.as_dict() if warm_up is not None else None,
            "spark": {"master": sc.master, "app_id": sc.applicationId,
                      "default_parallelism": parallelism, "task_cpus": threads}}
    return records, broadcast, info


def pca_stage(sc, features, records, n: int, dim: int, cfg, logger: logging.Logger):
    """The fitted PCAModel, or None when fewer than 2 images were featurized: from the collected
    vectors, or from statistics aggregated on the executors."""
    if n < 2:
        logger.warning("PCA skipped: it needs at least 2 featurized images, got %d", n)
        return None
    if features is not None:
        model = fit_pca(features.vectors, k=cfg.pca_k, variance=cfg.pca_variance)
    else:
        try:
            moments = distributed.fit_moments(sc, records, dim)
        except Exception as exc:
            raise JobError(f"Spark job failed: {spark_failure_summary(exc)}") from exc
        model = fit_pca_from_moments(moments, k=cfg.pca_k, variance=cfg.pca_variance)
    if cfg.pca_k is not None and model.k < cfg.pca_k:
        logger.warning("--pca-k %d asked, only %d components exist for %d images: k = %d",
                       cfg.pca_k, model.k, n, model.k)
    logger.info("PCA: k = %d of %d, explained variance %.4f", model.k,
                len(model.explained_variance_ratio), model.cumulative_ratio)
    return model


def write_stage(writer: OutputWriter, cfg, fmt, features: Features, names: dict[str, str], pca_model) -> None:
    """Per-fruit feature and PCA files from the collected vectors (``names``: label -> file stem)."""
    projections = pca_model.transform(features.vectors) if pca_model is not None else None
    for label, rows, row_paths in by_fruit(cfg.input.bucket, features.keys, features.labels):
        row_labels = [label] * len(rows)
        writer.put(f"features/{names[label]}{fmt.extension}",
                   fmt.encode(row_paths, row_labels, features.vectors[rows], KINDS["features"]), fmt.content_type)
        if projections is not None:
            writer.put(f"pca/{names[label]}{fmt.extension}",
                       fmt.encode(row_paths, row_labels, projections[rows], KINDS["pca"]), fmt.content_type)


def write_model_files(writer: OutputWriter, cfg, pca_model) -> None:
    if pca_model is not None:
        writer.put("pca_model.npz", pca_model_bytes(pca_model))
        writer.put("explained_variance.png",
                   variance_plot_png(pca_model.explained_variance_ratio, pca_model.k, cfg.pca_variance), "image/png")


def per_fruit_counts(summary: dict, names: dict[str, str], extension: str) -> dict:
    counts = {label: {"file": f"{name}{extension}", "featurized": summary["featurized"].get(label, 0), "failed": 0}
              for label, name in sorted(names.items())}
    for label, failed in sorted(summary["failed"].items()):
        counts.setdefault(label, {"file": None, "featurized": 0, "failed": 0})["failed"] = failed
    return counts


class Incremental:
    """An incremental run's view of the state: the previous version (if usable) and the new one."""

    def __init__(self, location, previous: dict | None, fingerprint: dict, version: str, note: str):
        self.location, self.previous, self.fingerprint, self.version = location, previous, fingerprint, version
        self.note = note
        self.result: dict = {}

    @classmethod
    def plan(cls, cfg, spec, weights, previous: dict | None, run_id: str, logger: logging.Logger) -> "Incremental":
        fingerprint = state.fingerprint(spec, weights.sha256, cfg.precision)
        version = run_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        if previous is None:
            note = "no state yet: every image is new"
        elif previous["fingerprint"] != fingerprint:
            changed = sorted(k for k in fingerprint if previous["fingerprint"].get(k) != fingerprint[k])
            note = f"state made with another {', '.join(changed)}: every image is featurized again"
            logger.warning("incremental: %s", note)
            previous = None
        else:
            note = f"reusing version {previous['version']} ({previous['rows']} vectors)"
        logger.info("incremental: %s; this run stores version %s", note, version)
        return cls(cfg.state, previous, fingerprint, version, note)

    def as_manifest(self) -> dict:
        return {"state": self.location.uri, "previous_version": self.previous["version"] if self.previous else None,
                "version": self.version, "note": self.note, **self.result}


def load_state_stage(s3_client, cfg, logger: logging.Logger) -> dict | None:
    try:
        return state.load_state(s3_client, cfg.state)
    except ValueError as exc:
        raise JobError(f"cannot use --state {cfg.state.uri}: {exc}") from exc
    except Exception as exc:
        raise JobError(describe_s3_error(exc, f"cannot read --state {cfg.state.uri}")) from exc


def commit_state(s3_client, cfg, incremental: Incremental, stats: list[dict], logger: logging.Logger) -> dict:
    """Make this run's parts the current state; returns the figures for the manifest."""
    parts = [item["state_part"] for item in stats if item.get("state_part")]
    removed = state.commit(s3_client, cfg.s3, cfg.state, incremental.version, incremental.fingerprint, parts)
    rows = sum(p["rows"] for p in parts)
    logger.info("state %s: version %s, %d vectors in %d parts; %d old objects removed", cfg.state.uri,
                incremental.version, rows, len(parts), len(removed))
    return {"stored_vectors": rows, "parts": len(parts)}


def spark_failure_summary(exc: Exception) -> str:
    """The Python error at the bottom of a Py4J/Spark failure, in one line."""
    text = str(exc)
    candidates = [line.strip() for line in text.splitlines()
                  if line.strip() and ("Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0])
                  and not line.strip().startswith(("at ", "File "))]
    line = candidates[-1] if candidates else text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return line[:500]
