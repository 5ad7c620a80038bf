"""The distributed mode's executor tasks (``extractor.driver.distributed`` runs them): a
partition's summary, its PCA moments, its output parts, and the assembly of one file from its
parts. Plain functions of plain values, testable without Spark."""

from __future__ import annotations

from collections import Counter

import numpy as np

from extractor.records import FAILURE_EXAMPLES, FeatureBlock, fold
from extractor.results.formats import get_format
from extractor.results.outputs import (
    ERRORS_HEADER,
    KINDS,
    by_fruit,
    error_rows,
    format_error_rows,
)
from extractor.results.pca import merge, moment_blocks, moments
from extractor.results.report import reason_kind
from extractor.results.scatter import candidates
from extractor.storage.layout import ERRORS_PARTS, FEATURES, PCA, staged_part
from extractor.storage.multipart import MultipartWriter
from extractor.storage.s3 import put_bytes

# One reduce record: 512 x 4096 float64 = 17 MB, 8 blocks for VGG16. Each block the driver
# pulls is a Spark job of its own (toLocalIterator: fewer is faster), and each record is a
# byte array outside Spark's memory accounting on the executors (smaller is safer).
MOMENT_BLOCK_ROWS = 512
MOMENT_BUFFER_ROWS = 2048    # rows gathered before a (d, d) update: fewer, larger BLAS calls


def summarize_partition(records) -> list[dict]:
    """A partition's records -> one small dict: per-fruit counts, failure reasons (kind ->
    images), its first failures by key (the run's first are among the partitions' first), its stats."""
    folded = fold(records, keep_vectors=False)
    return [{"featurized": dict(Counter(folded.labels)), "failed": dict(Counter(f.label for f in folded.failures)),
             "reasons": dict(Counter(reason_kind(f.reason) for f in folded.failures)),
             "examples": sorted(folded.failures)[:FAILURE_EXAMPLES],
             "stats": folded.stats[0] if folded.stats else None}]


def partition_moments(records, block_rows: int = MOMENT_BLOCK_ROWS, buffer_rows: int = MOMENT_BUFFER_ROWS,
                      rows_counter=None):
    """FeatureBlocks -> (block index, MomentBlock) pairs of their count, mean and scatter matrix;
    streamed: a coalesced task reads many partitions, only ``buffer_rows`` rows held at a time.
    ``rows_counter`` (an accumulator, for progress) gets the rows read, per flush."""
    total, buffer = None, []

    def flush():
        nonlocal total
        part = moments(np.concatenate(buffer))
        total = part if total is None else merge(total, part)
        if rows_counter is not None:
            rows_counter.add(part.n)
        buffer.clear()

    for record in records:
        if isinstance(record, FeatureBlock) and len(record.keys):
            buffer.append(record.vectors)
            if sum(len(b) for b in buffer) >= buffer_rows:
                flush()
    if buffer:
        flush()
    if total is not None:
        yield from moment_blocks(total, block_rows)


def write_parts(index: int, records, *, s3_settings, input_bucket: str, output_bucket: str, staging_prefix: str,
                format_name: str, names: dict[str, str], pca_broadcast=None, per_fruit: int = 1,
                rows_counter=None) -> list[tuple[list[tuple], list]]:
    """One partition's rows -> one part object per (kind, fruit) with its rows sorted by key.
    Returns one pair: ``(kind, label, partition, s3 key)`` of each part written, and the
    partition's scatter candidates (``per_fruit`` at most per fruit; none without PCA).
    ``rows_counter`` (an accumulator, for progress) gets the images written."""
    fmt = get_format(format_name)
    folded = fold(records)
    points = []
    client = s3_settings.client()
    written = []

    def put(kind: str, label, body: bytes) -> None:
        key = staged_part(staging_prefix, kind, names[label] if label is not None else None, index)
        put_bytes(client, s3_settings, output_bucket, key, body, "application/octet-stream")
        written.append((kind, label, index, key))

    if folded.keys:
        rows = folded.rows()
        projections = pca_broadcast.value.transform(rows.vectors) if pca_broadcast is not None else None
        for label, indices, paths in by_fruit(input_bucket, rows.keys, rows.labels):
            labels = [label] * len(indices)
            put(FEATURES, label, fmt.part(paths, labels, rows.vectors[indices], KINDS[FEATURES]))
            if projections is not None:
                put(PCA, label, fmt.part(paths, labels, projections[indices], KINDS[PCA]))
                points += candidates(paths, labels, projections[indices], per_fruit)
    if folded.failures:
        put(ERRORS_PARTS, None, format_error_rows(error_rows(input_bucket, sorted(folded.failures))))
    if rows_counter is not None:
        rows_counter.add(len(folded.keys) + len(folded.failures))
    return [(written, points)]


def assemble_file(job: tuple, *, s3_settings, bucket: str, format_name: str) -> tuple[str, str, int, str]:
    """``(relative name, final key, kind, dim, part keys in order)`` -> the one final object,
    streamed part by part into a multipart upload. Returns (relative name, key, bytes, sha256)."""
    relative, key, kind, dim, part_keys = job
    client = s3_settings.client()

    def parts():
        for part_key in part_keys:
            yield client.get_object(Bucket=bucket, Key=part_key)["Body"].read()

    if kind == ERRORS_PARTS:
        with MultipartWriter(client, s3_settings, bucket, key, "text/csv") as sink:
            sink.write(ERRORS_HEADER)
            for body in parts():
                sink.write(body)
    else:
        fmt = get_format(format_name)
        with MultipartWriter(client, s3_settings, bucket, key, fmt.content_type) as sink:
            fmt.assemble(parts(), sink, KINDS[kind], dim)
    return relative, key, sink.nbytes, sink.sha256
