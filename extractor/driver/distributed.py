"""The distributed mode, which never collects the vectors: records persisted on the executors,
PCA from statistics aggregated there, projections and per-fruit files written by them.

The driver holds per-fruit counts and the O(d^2) PCA statistics; no fruit's rows pass through
it. Its executor tasks are in ``extractor.executor.output_tasks``.
"""

from __future__ import annotations

from collections import Counter
from functools import partial

from extractor.driver.progress import NoProgress, Tracked
from extractor.driver.spark import failure_summary, is_spark_error, job_group
from extractor.driver.vectors import Summary, Vectors
from extractor.executor.output_tasks import (
    MOMENT_BLOCK_ROWS,
    assemble_file,
    partition_moments,
    summarize_partition,
    write_parts,
)
from extractor.records import FAILURE_EXAMPLES
from extractor.results.formats import get_format
from extractor.results.pca import assemble_blocks, fit_pca_from_moments, merge_blocks
from extractor.results.scatter import lowest_per_fruit
from extractor.storage.layout import (
    ERRORS_FILE,
    ERRORS_PARTS,
    FEATURES,
    PCA,
    run_staging,
    vectors_file,
)
from extractor.storage.s3 import delete_keys

# Besides the block's float64 rows: its mean, count and start, pickled, and the task result's framing.
RESULT_OVERHEAD = 2**20


def largest_result_bytes(dim: int, block_rows: int = MOMENT_BLOCK_ROWS) -> int:
    """Bytes of the largest task result this mode sends the driver (one block of the moments,
    ``(min(block_rows, dim), dim)`` float64): what spark.driver.maxResultSize must allow."""
    return min(block_rows, dim) * dim * 8 + dim * 8 + RESULT_OVERHEAD


def summarize(records_rdd) -> Summary:
    """Run the featurize stage (the RDD is persisted: this pass fills the cache) and sum the
    partitions' summaries on the driver."""
    featurized, failed, reasons, examples, stats = Counter(), Counter(), Counter(), [], []
    for item in records_rdd.mapPartitions(summarize_partition).collect():
        featurized.update(item["featurized"])
        failed.update(item["failed"])
        reasons.update(item["reasons"])
        examples.extend(item["examples"])
        if item["stats"] is not None:
            stats.append(item["stats"])
    return Summary(featurized, failed, sorted(examples)[:FAILURE_EXAMPLES], stats, reasons=reasons)


def fit_moments(sc, records_rdd, dim: int, block_rows: int = MOMENT_BLOCK_ROWS, rows_counter=None):
    """Count, mean and scatter matrix of every vector, aggregated on the executors; the driver
    receives them one (block_rows, d) block at a time."""
    slots = max(1, min(records_rdd.getNumPartitions(), sc.defaultParallelism))
    n_blocks = -(-dim // block_rows)
    blocks = (records_rdd.coalesce(slots)  # one (d, d) partial per core, not per partition
              .mapPartitions(partial(partition_moments, block_rows=block_rows, rows_counter=rows_counter))
              .reduceByKey(merge_blocks, numPartitions=n_blocks))
    return assemble_blocks(blocks.toLocalIterator(prefetchPartitions=True), dim, block_rows)


def write_files(sc, records_rdd, *, cfg, names: dict[str, str], dim: int, pca_model, staging_prefix: str,
                output_key, per_fruit: int = 1, progress=None, total: int = 0):
    """Executors write parts, then one task per output file assembles it. Returns the files as
    (relative name, key, bytes, sha256), the staging keys to delete and the scatter's points
    (``per_fruit`` at most per fruit). ``progress``: a ProgressReporter; ``total``: images."""
    progress = progress or NoProgress()
    fmt = get_format(cfg.format)
    pca_broadcast = sc.broadcast(pca_model) if pca_model is not None else None
    written_rows = sc.accumulator(0)
    try:
        task = partial(write_parts, s3_settings=cfg.s3, input_bucket=cfg.input.bucket,
                       output_bucket=cfg.output.bucket, staging_prefix=staging_prefix, format_name=cfg.format,
                       names=names, pca_broadcast=pca_broadcast, per_fruit=per_fruit, rows_counter=written_rows)
        described = "write the features/" + (" and pca/" if pca_model is not None else "") + " parts"
        with job_group(sc, "write-parts", f"{described} of {total:,} images") as group, \
                progress.track(Tracked("write parts", total, lambda: written_rows.value, group=group)):
            results = records_rdd.mapPartitionsWithIndex(lambda i, records: task(i, records)).collect()
    finally:
        if pca_broadcast is not None:
            pca_broadcast.unpersist()
    parts = [part for written, _ in results for part in written]
    points = lowest_per_fruit((point for _, candidates_ in results for point in candidates_), per_fruit)
    grouped: dict[tuple, list] = {}
    for kind, label, index, key in sorted(parts, key=lambda p: (p[0], p[1] or "", p[2])):
        grouped.setdefault((kind, label), []).append(key)
    jobs = []
    for label, name in sorted(names.items()):
        for kind in (FEATURES, PCA) if pca_model is not None else (FEATURES,):
            relative = vectors_file(kind, name, fmt.extension)
            width = dim if kind == FEATURES else pca_model.k
            jobs.append((relative, output_key(relative), kind, width, grouped.get((kind, label), [])))
    jobs.append((ERRORS_FILE, output_key(ERRORS_FILE), ERRORS_PARTS, 0, grouped.get((ERRORS_PARTS, None), [])))
    task = partial(assemble_file, s3_settings=cfg.s3, bucket=cfg.output.bucket, format_name=cfg.format)
    with job_group(sc, "assemble", f"assemble {len(jobs):,} files from their parts") as group, \
            progress.track(Tracked("assemble", len(jobs), None, unit="files", group=group)):  # a task per file
        files = sc.parallelize(jobs, len(jobs)).map(task).collect()
    return files, [p[3] for p in parts], points


class DistributedVectors(Vectors):
    """The featurize RDD persisted on the executors' local disks: the CNN runs once, the PCA
    fit and the writes read the cache."""

    name = "distributed"

    def __init__(self, summary: Summary, records):
        super().__init__(summary)
        self.records = records

    @classmethod
    def gather(cls, sc, records) -> "DistributedVectors":
        from pyspark import StorageLevel

        # On disk, not in the executors' heap: Python records are bytes to Spark either way, and
        # this mode is for data that does not fit in memory (a heap full of cached blocks left no
        # room for the PCA's records: an executor OOM at 100,000 vectors on 1 GB executors).
        records.persist(StorageLevel.DISK_ONLY)
        try:
            return cls(summarize(records), records)
        except BaseException:
            records.unpersist()
            raise

    def fit_pca(self, sc, dim: int, k: int | None, variance: float | None, progress=None):
        progress = progress or NoProgress()
        n = sum(self.summary.featurized.values())
        rows = sc.accumulator(0)
        with job_group(sc, "pca", f"PCA moments of {n:,} vectors") as group, \
                progress.track(Tracked("PCA moments", n, lambda: rows.value, group=group)):
            moments_ = fit_moments(sc, self.records, dim, rows_counter=rows)
        return fit_pca_from_moments(moments_, k=k, variance=variance)

    def write(self, sc, writer, cfg, names: dict[str, str], dim: int, pca_model, run_id: str, *,
              per_fruit: int = 1, progress=None) -> list:
        writer.begin()
        total = sum(self.summary.featurized.values()) + sum(self.summary.failed.values())
        try:
            files, staged, points = write_files(
                sc, self.records, cfg=cfg, names=names, dim=dim, pca_model=pca_model,
                staging_prefix=run_staging(cfg.output, run_id).prefix, output_key=cfg.output.key,
                per_fruit=per_fruit, progress=progress, total=total)
        except Exception as exc:
            if is_spark_error(exc):  # keep the one-line error one line
                raise RuntimeError(f"Spark job failed: {failure_summary(exc)}") from exc
            raise
        for relative, _, nbytes, sha256 in files:
            writer.record(relative, nbytes, sha256)
        delete_keys(writer.client, cfg.output.bucket, staged)
        return points

    def release(self) -> None:
        self.records.unpersist()
