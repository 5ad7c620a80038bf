"""The job's stages in the order the data flows: preflight -> list -> weights -> featurize ->
vectors -> PCA -> write -> state -> manifest.

``run`` takes a SparkContext, a JobConfig and an S3 client; it creates none of them. Where the
vectors are kept (collected on the driver, or persisted on the executors) is chosen once, by
``modes.choose_mode``; from then on the job only speaks to ``vectors.Vectors``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from extractor.driver.featurizing import featurize_rdd, task_partitions
from extractor.driver.inputs import list_input
from extractor.driver.logs import Stages
from extractor.driver.modes import choose_mode
from extractor.driver.preflight import preflight
from extractor.driver.progress import ProgressReporter, Tracked
from extractor.driver.spark import (
    driver_memory,
    failed_job_as_error,
    job_group,
    max_result_size,
    task_counts,
)
from extractor.driver.warmup import WarmUp
from extractor.driver.weights import load_weights
from extractor.errors import JobError
from extractor.executor.feeding import plan_feeding
from extractor.executor.models import get_spec
from extractor.records import FAILURE_EXAMPLES
from extractor.results import manifest as manifests
from extractor.results import scatter
from extractor.results.formats import get_format
from extractor.results.outputs import OutputWriter, error_rows, safe_names
from extractor.storage import state
from extractor.storage.layout import (
    ERRORS_FILE,
    MANIFEST_FILE,
    SUCCESS_FILE,
    kept_by_reruns,
)
from extractor.storage.run_locks import RunLocks
from extractor.storage.s3 import RetryLog, describe_s3_error


@dataclass
class Run:
    """What every stage of one run shares: plain holders, built once by ``run``."""

    sc: object
    cfg: object                     # resolved (feeding_for)
    s3_client: object
    logger: logging.Logger
    run_id: str
    stages: Stages
    spec: object                    # models.ModelSpec
    fmt: object                     # formats.OutputFormat
    locks: RunLocks
    progress: ProgressReporter
    started: datetime
    retry_log: RetryLog             # the driver's own S3 retries
    shipper: object = None          # logs.LogShipper, or None
    releases: list = field(default_factory=list)   # what to give back when the run ends, in order


@dataclass
class Featurized:
    """What the stages up to the vectors hand to the writing stages."""

    listing: object                 # scan.KeyRanges
    mode: object                    # modes.Mode
    weights: object
    incremental: object             # state.Incremental, or None
    vectors: object                 # vectors.Vectors
    counts: dict
    spark_facts: dict


def run(sc, cfg, *, s3_client, logger: logging.Logger, shipper=None, run_id: str = "") -> dict:
    """Run the whole job; returns the manifest written next to the outputs. ``shipper``: the
    LogShipper (or None), called after each stage and, while one runs, by the progress thread."""
    started = datetime.now(timezone.utc)
    stages = Stages(logger, shipper.ship if shipper is not None else None)
    spec, fmt = get_spec(cfg.model), get_format(cfg.format)
    retry_log = driver_retry_log(s3_client, logger)
    logger.info("run %s: %s -> %s, model %s (%s), weights %s, format %s", run_id, cfg.input.uri, cfg.output.uri,
                spec.name, spec.output_layer, cfg.weights, fmt.name)
    cfg, feeding = feeding_for(sc, cfg, logger)
    locks = RunLocks.for_run(s3_client, cfg.s3, cfg.output, cfg.state, run_id=run_id, mode="job",
                             lease_s=cfg.lock_lease_s, break_lock=cfg.break_lock, no_lock=cfg.no_lock, logger=logger)
    with stages.stage("preflight"):  # takes the run locks: before any Spark job, read or write
        preflight(s3_client, cfg, run_id, logger, locks)
    # Everything before the first forward pass that does not need the listing starts now and
    # runs beside it: the workers import TensorFlow and build the model (warm-up), the driver
    # reads the weights (a thread; its I/O and h5py release the GIL).
    warm_up = WarmUp(sc, spec, cfg.precision, logger)
    weights_loading = Background(load_weights_stage, spec, cfg, s3_client, logger)
    progress = ProgressReporter(logger, interval=cfg.progress_interval, shipper=shipper,
                                ship_interval=cfg.log_ship_interval, tasks=task_counts(sc))
    ctx = Run(sc, cfg, s3_client, logger, run_id, stages, spec, fmt, locks, progress, started, retry_log, shipper)
    try:
        locks.start_renewing()
        return write_stages(ctx, featurize_stages(ctx, warm_up, weights_loading, feeding))
    finally:
        progress.stop()
        warm_up.cancel()
        for release in ctx.releases:
            release()
        locks.release()  # last: a released marker, the object stays (extractor.storage.lock)


def featurize_stages(ctx: Run, warm_up, weights_loading, feeding) -> Featurized:
    """list -> weights -> featurize -> vectors, with every listed image accounted for."""
    sc, cfg, spec = ctx.sc, ctx.cfg, ctx.spec
    with ctx.stages.stage("list"):
        listing = list_stage(sc, ctx.s3_client, cfg, ctx.run_id, ctx.logger)
    ctx.releases.append(lambda: release_snapshot(ctx.s3_client, cfg, listing, ctx.logger))
    mode = choose_mode(cfg.collect, listing.count, spec.output_dim, *driver_memory(sc), ctx.logger,
                       max_result_size(sc))
    previous = state.load_for_run(ctx.s3_client, cfg.state) if cfg.state is not None else None
    ctx.progress.start()
    with ctx.stages.stage("load_weights"):  # what is left of it once the listing is done
        weights = weights_loading.result()
    incremental = (state.Incremental.plan(cfg.state, spec, weights, cfg.precision, previous, ctx.run_id, ctx.logger,
                                          cfg.decode)
                   if cfg.state is not None else None)
    with ctx.stages.stage("featurize"):
        featurizing = featurize_rdd(sc, cfg, spec, weights, listing, ctx.logger, warm_up, incremental)
        ctx.releases.append(featurizing.release)
        vectors = gather_stage(sc, mode, featurizing, listing, ctx.progress)
        ctx.releases.insert(0, vectors.release)   # before the broadcast its records may still need
    counts, spark_facts = featurize_report(sc, cfg, listing, vectors, featurizing, warm_up,
                                           ctx.stages.seconds["featurize"], ctx.logger, feeding.as_dict())
    return Featurized(listing, mode, weights, incremental, vectors, counts, spark_facts)


def write_stages(ctx: Run, done: Featurized) -> dict:
    """PCA -> files -> state -> manifest -> _SUCCESS, each write under the run lock; the manifest."""
    sc, cfg, spec, vectors, counts = ctx.sc, ctx.cfg, ctx.spec, done.vectors, done.counts
    writer = OutputWriter(ctx.s3_client, cfg.s3, cfg.output, kept_by_reruns(cfg.output, cfg.log_location, cfg.state),
                          guard=ctx.locks.raise_if_lost)
    names = safe_names(label for label, n in vectors.summary.featurized.items() if n)
    per_fruit = scatter.quota(len(names))
    ctx.locks.check()  # still ours before the first write under --output
    with writer.failures_in_one_line(ctx.logger):
        if not counts["featurized"]:
            vectors.write(sc, writer, cfg, names, spec.output_dim, None, ctx.run_id, progress=ctx.progress)
            raise JobError(f"none of the {counts['failed']} images could be featurized; "
                           f"reasons in {cfg.output.uri}{ERRORS_FILE}")
        with ctx.stages.stage("pca"):
            pca_model = pca_stage(sc, vectors, counts["featurized"], spec.output_dim, cfg, ctx.logger, ctx.progress)
        with ctx.stages.stage("write"):
            points = vectors.write(sc, writer, cfg, names, spec.output_dim, pca_model, ctx.run_id,
                                   per_fruit=per_fruit, progress=ctx.progress)
            pictures = writer.put_pca_files(pca_model, cfg.pca_variance, points, per_fruit)
        if done.incremental is not None:
            ctx.locks.check()  # the commit deletes the older versions under --state
            with ctx.stages.stage("state"):
                done.incremental.commit(ctx.s3_client, cfg.s3, vectors.summary.stats, ctx.logger)
        manifest = manifests.build(ctx, done, names=names, per_fruit=per_fruit, pca_model=pca_model)
        writer.put_report(manifest, vectors.summary.reasons, failure_rows(cfg, vectors.summary), pictures)
        release_snapshot(ctx.s3_client, cfg, done.listing, ctx.logger)  # before finish, which would call it stale
        ctx.locks.check()  # finish deletes what this run did not write, then writes _SUCCESS
        finish(writer, manifest, ctx.logger)
    return manifest


class Background:
    """``fn(*args)`` in a daemon thread; ``result()`` waits and returns it, or raises what it raised.
    Not a ThreadPoolExecutor: its thread is joined at exit, so a run that failed while listing
    would still wait for half a gigabyte of weights before it could exit."""

    def __init__(self, fn, *args):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name=fn.__name__, daemon=True)
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def feeding_for(sc, cfg, logger: logging.Logger):
    """(cfg with "auto" batch size and decode threads resolved for the Spark conf, the Feeding);
    a GPU request that cannot work is a JobError before anything starts."""
    try:
        feeding = plan_feeding(dict(sc.getConf().getAll()), cfg.batch_size, cfg.decode_threads)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    feeding.log(logger)
    return replace(cfg, batch_size=feeding.batch_size, decode_threads=feeding.decode_threads), feeding


def driver_retry_log(s3_client, logger: logging.Logger) -> RetryLog:
    """Counts (and logs) the S3 retries of the driver's own calls."""
    return RetryLog(on_retry=lambda operation, retries, status: logger.warning(
        "S3 %s succeeded or failed after %d retries (last HTTP status %s)", operation, retries, status)
                    ).attach(s3_client)


def gather_stage(sc, mode, featurizing, listing, progress):
    """Run the featurize tasks (one Spark job, named, its images counted as tasks end) into the
    mode's Vectors; a failed Spark job is a one-line JobError."""
    n = listing.count
    with job_group(sc, "featurize", f"featurize {n:,} images") as group, \
            progress.track(Tracked("featurize", n, lambda: featurizing.images_done.value,
                                   failed=lambda: featurizing.images_failed.value, group=group)), \
            failed_job_as_error():
        return mode.gather(sc, featurizing.records)


def failure_rows(cfg, summary) -> list[tuple[str, str, str]]:
    """The first failures as errors.csv rows (path, label, reason), for the report."""
    return error_rows(cfg.input.bucket, summary.examples[:FAILURE_EXAMPLES])


def list_stage(sc, s3_client, cfg, run_id: str, logger: logging.Logger):
    """The input's images as featurize partitions (inputs.list_input: the listing ``cfg`` asks
    for); JobError (one line) when the input cannot be listed or holds none."""
    listing = list_input(sc, s3_client, cfg, run_id=run_id, partitions=task_partitions(cfg, sc.defaultParallelism),
                         logger=logger)
    where = f"{listing.units} units in {listing.tasks} tasks, " if listing.tasks else ""
    logger.info("listed %d images in %d folders (listing: %s, because %s; %s%d requests); skipped %d non-image "
                "keys%s", listing.count, listing.labels, listing.mode, listing.why, where, listing.requests,
                listing.skipped, f" (e.g. {listing.skipped_examples[:3]})" if listing.skipped else "")
    if listing.retries:
        logger.warning("S3 retries of the listing tasks: %s", listing.retries)
    if not listing.count:
        raise JobError(f"no .jpg/.jpeg/.png images under {cfg.input.uri} ({listing.skipped} other keys)")
    return listing


def release_snapshot(s3_client, cfg, listing, logger: logging.Logger) -> None:
    """Delete the listing snapshot, if any; a failure only costs a warning (a later run's clean-up
    of the output removes what is left under _staging/)."""
    try:
        listing.release(s3_client, cfg.output.bucket)
    except Exception as exc:
        logger.warning("could not delete the listing snapshot: %s", describe_s3_error(exc, "delete"))


def load_weights_stage(spec, cfg, s3_client, logger: logging.Logger):
    """The weights as numpy arrays (JobError, one line, when the source cannot be read)."""
    start = time.perf_counter()
    try:
        weights = load_weights(spec, cfg.weights, seed=cfg.seed, s3_client=s3_client)
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot load weights {cfg.weights!r}: {exc}") from exc
    logger.info("weights %s: %d arrays, %.0f MB, sha256 %s, loaded in %.1f s", weights.source, len(weights.arrays),
                weights.nbytes / 1e6, weights.sha256[:16], time.perf_counter() - start)
    if weights.warning:
        logger.warning("%s", weights.warning)
    return weights


def featurize_report(sc, cfg, listing, vectors, featurizing, warm_up, seconds: float,
                     logger: logging.Logger, gpu: dict | None = None) -> tuple[dict, dict]:
    """(the manifest's counts, once every listed image is accounted for; its Spark facts)."""
    summary = vectors.summary
    executors = manifests.executor_summary(summary.stats, summary.collected_at)
    facts = manifests.spark_facts(sc, featurizing, warm_up, executors, gpu)
    counts = summary.counts(listing.by_label, executors["task_counts"])
    logger.info("featurized %d images (%d through the CNN, %d reused), %d failed, %.2f images/s; weights set in "
                "%d Python worker(s); S3 retries on the executors: %s", counts["featurized"], counts["forwarded"],
                counts["reused"], counts["failed"], listing.count / seconds, facts["weight_loads"],
                executors["retries"] or "none")
    for key, label, reason in summary.examples[:FAILURE_EXAMPLES]:
        logger.warning("failed: s3://%s/%s (%s): %s", cfg.input.bucket, key, label, reason)
    return counts, facts


def pca_stage(sc, vectors, n: int, dim: int, cfg, logger: logging.Logger, progress=None):
    """The fitted PCAModel, or None when fewer than 2 images were featurized."""
    if n < 2:
        logger.warning("PCA skipped: it needs at least 2 featurized images, got %d", n)
        return None
    with failed_job_as_error(spark_errors_only=True):
        model = vectors.fit_pca(sc, dim, cfg.pca_k, cfg.pca_variance, progress)
    if cfg.pca_k is not None and model.k < cfg.pca_k:
        logger.warning("--pca-k %d asked, only %d components exist for %d images: k = %d",
                       cfg.pca_k, model.k, n, model.k)
    logger.info("PCA: k = %d of %d, explained variance %.4f", model.k,
                len(model.explained_variance_ratio), model.cumulative_ratio)
    return model


def finish(writer: OutputWriter, manifest: dict, logger: logging.Logger) -> None:
    """Stale files of an earlier run removed, then the manifest and _SUCCESS: the result is final."""
    stale = writer.finish(manifest)
    if stale:
        logger.info("removed %d stale files of an earlier run: %s", len(stale), stale[:5])
    logger.info("outputs written under %s (%d files + %s + %s)", writer.location.uri, len(writer.written) - 2,
                MANIFEST_FILE, SUCCESS_FILE)
