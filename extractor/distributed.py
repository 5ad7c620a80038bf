"""The path that never collects the vectors: PCA from statistics aggregated on the executors,
projections and per-fruit files written by the executors.

The driver holds the listing, per-fruit counts and the O(d^2) PCA statistics; no fruit's rows
pass through it. Executor-side functions take plain values and are testable without Spark.
"""

from __future__ import annotations

from collections import Counter
from functools import partial

import numpy as np

from .featurize import ERROR, FEATURES, STATS
from .formats import get_format
from .outputs import ERRORS_HEADER, KINDS, by_fruit, error_rows, format_error_rows
from .pca import assemble_blocks, merge, merge_blocks, moment_blocks, moments
from .s3 import MultipartWriter, put_bytes

# One reduce record: 512 x 4096 float64 = 17 MB, 8 blocks for VGG16. Each block the driver
# pulls is a Spark job of its own (toLocalIterator: fewer is faster), and each record is a
# byte array outside Spark's memory accounting on the executors (smaller is safer).
MOMENT_BLOCK_ROWS = 512
MOMENT_BUFFER_ROWS = 2048    # rows gathered before a (d, d) update: fewer, larger BLAS calls
ERROR_EXAMPLES = 3           # per partition, for the driver's log


# --- executor side -------------------------------------------------------------------------

def summarize_partition(records) -> list[dict]:
    """A partition's records -> one small dict: per-fruit counts, error examples, its STATS."""
    featurized, failed, examples, stats = Counter(), Counter(), [], None
    for record in records:
        if record[0] == FEATURES:
            featurized.update(record[2])
        elif record[0] == ERROR:
            failed[record[2]] += 1
            if len(examples) < ERROR_EXAMPLES:
                examples.append(tuple(record[1:]))
        elif record[0] == STATS:
            stats = record[1]
    return [{"featurized": dict(featurized), "failed": dict(failed), "examples": examples, "stats": stats}]


def partition_moments(records, block_rows: int = MOMENT_BLOCK_ROWS, buffer_rows: int = MOMENT_BUFFER_ROWS):
    """FEATURES records -> (block index, MomentBlock) pairs of their count, mean and scatter matrix."""
    total, buffer = None, []

    def flush():
        nonlocal total
        part = moments(np.concatenate(buffer))
        total = part if total is None else merge(total, part)
        buffer.clear()

    for record in records:
        if record[0] == FEATURES and len(record[1]):
            buffer.append(record[3])
            if sum(len(b) for b in buffer) >= buffer_rows:
                flush()
    if buffer:
        flush()
    if total is not None:
        yield from moment_blocks(total, block_rows)


def write_parts(index: int, records, *, s3_settings, input_bucket: str, output_bucket: str, staging_prefix: str,
                format_name: str, names: dict[str, str], pca_broadcast=None) -> list[tuple]:
    """One partition's rows -> one part object per (kind, fruit) with its rows sorted by key;
    returns ``(kind, label, partition, s3 key)`` for each part written."""
    fmt = get_format(format_name)
    keys, labels, blocks, errors = [], [], [], []
    for record in records:
        if record[0] == FEATURES:
            keys.extend(record[1])
            labels.extend(record[2])
            blocks.append(record[3])
        elif record[0] == ERROR:
            errors.append(tuple(record[1:]))
    client = s3_settings.client()
    written = []

    def put(kind: str, label, body: bytes) -> None:
        key = f"{staging_prefix}{kind}/{names[label] if label is not None else '_'}/part-{index:05d}"
        put_bytes(client, s3_settings, output_bucket, key, body, "application/octet-stream")
        written.append((kind, label, index, key))

    if keys:
        order = sorted(range(len(keys)), key=keys.__getitem__)
        vectors = np.concatenate(blocks)[order]
        keys, labels = [keys[i] for i in order], [labels[i] for i in order]
        projections = pca_broadcast.value.transform(vectors) if pca_broadcast is not None else None
        for label, rows, row_paths in by_fruit(input_bucket, keys, labels):
            row_labels = [label] * len(rows)
            put("features", label, fmt.part(row_paths, row_labels, vectors[rows], KINDS["features"]))
            if projections is not None:
                put("pca", label, fmt.part(row_paths, row_labels, projections[rows], KINDS["pca"]))
    if errors:
        put("errors", None, format_error_rows(error_rows(input_bucket, sorted(errors))))
    return written


def assemble_file(job: tuple, *, s3_settings, bucket: str, format_name: str) -> tuple[str, str, int, str]:
    """``(relative name, final key, kind, dim, part keys in order)`` -> the one final object,
    streamed part by part into a multipart upload. Returns (relative name, key, bytes, sha256)."""
    relative, key, kind, dim, part_keys = job
    client = s3_settings.client()

    def parts():
        for part_key in part_keys:
            yield client.get_object(Bucket=bucket, Key=part_key)["Body"].read()

    if kind == "errors":
        with MultipartWriter(client, s3_settings, bucket, key, "text/csv") as sink:
            sink.write(ERRORS_HEADER)
            for body in parts():
                sink.write(body)
    else:
        fmt = get_format(format_name)
        with MultipartWriter(client, s3_settings, bucket, key, fmt.content_type) as sink:
            fmt.assemble(parts(), sink, KINDS[kind], dim)
    return relative, key, sink.nbytes, sink.sha256


# --- driver side ---------------------------------------------------------------------------

def summarize(records_rdd) -> dict:
    """Run the featurize stage (the RDD is persisted: this pass fills the cache) and sum the
    partitions' summaries on the driver."""
    featurized, failed, examples, stats = Counter(), Counter(), [], []
    for item in records_rdd.mapPartitions(summarize_partition).collect():
        featurized.update(item["featurized"])
        failed.update(item["failed"])
        examples.extend(item["examples"])
        if item["stats"] is not None:
            stats.append(item["stats"])
    return {"featurized": featurized, "failed": failed, "examples": sorted(examples), "stats": stats}


def fit_moments(sc, records_rdd, dim: int, block_rows: int = MOMENT_BLOCK_ROWS):
    """Count, mean and scatter matrix of every vector, aggregated on the executors; the driver
    receives them one (block_rows, d) block at a time."""
    slots = max(1, min(records_rdd.getNumPartitions(), sc.defaultParallelism))
    n_blocks = -(-dim // block_rows)
    blocks = (records_rdd.coalesce(slots)  # one (d, d) partial per core, not per partition
              .mapPartitions(partial(partition_moments, block_rows=block_rows))
              .reduceByKey(merge_blocks, numPartitions=n_blocks))
    return assemble_blocks(blocks.toLocalIterator(prefetchPartitions=True), dim, block_rows)


def write_files(sc, records_rdd, *, cfg, names: dict[str, str], dim: int, pca_model, staging_prefix: str,
                output_key) -> tuple[list[tuple[str, str, int, str]], list[str]]:
    """Executors write parts, then one task per output file assembles it. Returns the files as
    (relative name, key, bytes, sha256) and the staging keys to delete."""
    fmt = get_format(cfg.format)
    pca_broadcast = sc.broadcast(pca_model) if pca_model is not None else None
    try:
        task = partial(write_parts, s3_settings=cfg.s3, input_bucket=cfg.input.bucket,
                       output_bucket=cfg.output.bucket, staging_prefix=staging_prefix, format_name=cfg.format,
                       names=names, pca_broadcast=pca_broadcast)
        parts = records_rdd.mapPartitionsWithIndex(lambda i, records: task(i, records)).collect()
    finally:
        if pca_broadcast is not None:
            pca_broadcast.unpersist()
    grouped: dict[tuple, list] = {}
    for kind, label, index, key in sorted(parts, key=lambda p: (p[0], p[1] or "", p[2])):
        grouped.setdefault((kind, label), []).append(key)
    jobs = []
    for label, name in sorted(names.items()):
        for kind in ("features", "pca") if pca_model is not None else ("features",):
            relative = f"{kind}/{name}{fmt.extension}"
            width = dim if kind == "features" else pca_model.k
            jobs.append((relative, output_key(relative), kind, width, grouped.get((kind, label), [])))
    jobs.append(("errors.csv", output_key("errors.csv"), "errors", 0, grouped.get(("errors", None), [])))
    task = partial(assemble_file, s3_settings=cfg.s3, bucket=cfg.output.bucket, format_name=cfg.format)
    files = sc.parallelize(jobs, len(jobs)).map(task).collect()
    return files, [p[3] for p in parts]
