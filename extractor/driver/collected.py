"""The collect mode: every vector on the driver, the PCA fitted and the files written there.

Right while the vectors fit the driver (90,000 x 4096 float32 = 1.5 GB with --driver-memory
10g); ``collect_misfit`` says when they would not, before any compute.
"""

from __future__ import annotations

import math
import time
from collections import Counter

from extractor.driver.vectors import Summary, Vectors
from extractor.errors import JobError
from extractor.records import FAILURE_EXAMPLES, FeatureBlock, ImageFailure, fold
from extractor.results.formats import get_format
from extractor.results.outputs import KINDS, by_fruit, error_rows, format_errors
from extractor.results.pca import fit_pca
from extractor.results.report import reason_kind
from extractor.results.scatter import candidates, lowest_per_fruit
from extractor.storage.layout import ERRORS_FILE, FEATURES, PCA, vectors_file

# Spark keeps 300 MB of the heap for itself; collected results are built in what is left, and
# the Python driver then holds the pickled blocks, their concatenation and the sorted copy.
SPARK_RESERVED = 300 * 2**20
HEAP_SHARE_FOR_RESULTS = 0.5
PYTHON_COPIES = 3


def collect_need(n_images: int, dim: int) -> tuple[int, int]:
    """(driver JVM bytes, driver Python bytes) that collecting ``n_images`` ``dim``-d vectors needs."""
    payload = n_images * (dim * 4 + 256)  # float32 rows + key, label and pickling overhead
    return payload, PYTHON_COPIES * payload


def collect_misfit(n_images: int, dim: int, driver_memory: str, heap_bytes: int,
                   max_result: tuple[str, int] = ("0", 0)) -> str | None:
    """Why collecting ``n_images`` ``dim``-d vectors would not fit a driver of ``heap_bytes``
    (``driver_memory`` as set, for the message) whose ``max_result`` (spark.driver.maxResultSize
    as set and in bytes, 0 for no limit) caps what one action may return, or None if it fits."""
    usable = max(0, heap_bytes - SPARK_RESERVED) * HEAP_SHARE_FOR_RESULTS
    jvm_need, python_need = collect_need(n_images, dim)
    available = _memory_available()
    if jvm_need > usable:
        needed_gb = math.ceil((jvm_need / HEAP_SHARE_FOR_RESULTS + SPARK_RESERVED) / 2**30)
        return (f"collecting {n_images} vectors of {dim} float32 needs about {jvm_need / 1e9:.1f} GB of "
                f"driver heap, more than spark.driver.memory={driver_memory} allows: run with "
                f"spark-submit --driver-memory {needed_gb}g or more, or with --collect never")
    limit_text, limit = max_result
    if limit and jvm_need > limit:
        # Spark would fail the collect only once every task had run, discarding their results.
        return (f"collecting {n_images} vectors of {dim} float32 returns about {jvm_need / 2**20:,.0f} MiB of "
                f"task results, more than spark.driver.maxResultSize={limit_text} allows: raise it (0 is no "
                f"limit), or run with --collect never")
    if available is not None and python_need > available:
        return (f"collecting {n_images} vectors of {dim} float32 needs about {python_need / 1e9:.1f} GB "
                f"in the Python driver, only {available / 1e9:.1f} GB of memory is available: use a "
                f"driver machine with more memory, or --collect never")
    return None


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


class CollectedVectors(Vectors):
    """Every featurized row (sorted by key) and every failure (sorted), on the driver."""

    name = "collect"

    def __init__(self, summary: Summary, rows: FeatureBlock, failures: list[ImageFailure]):
        super().__init__(summary)
        self.rows = rows
        self.failures = failures

    @classmethod
    def gather(cls, sc, records) -> "CollectedVectors":
        folded = fold(records.collect())
        collected_at = time.time()
        # Summary.counts compares the counts per fruit with the listing's; what only the keys
        # show is a key come back twice (which another key's loss would hide from the counts).
        returned = folded.keys + [failure.key for failure in folded.failures]
        twice = sorted(key for key, n in Counter(returned).items() if n > 1)
        if twice:
            raise JobError(f"accounting failed: {len(twice)} keys came back twice, e.g. {twice[:3]}")
        failures = sorted(folded.failures)
        summary = Summary(Counter(folded.labels), Counter(failure.label for failure in failures),
                          failures[:FAILURE_EXAMPLES], folded.stats, collected_at,
                          Counter(reason_kind(failure.reason) for failure in failures))
        return cls(summary, folded.rows(), failures)

    def fit_pca(self, sc, dim: int, k: int | None, variance: float | None, progress=None):
        return fit_pca(self.rows.vectors, k=k, variance=variance)

    def write(self, sc, writer, cfg, names: dict[str, str], dim: int, pca_model, run_id: str, *,
              per_fruit: int = 1, progress=None) -> list:
        fmt = get_format(cfg.format)
        rows = self.rows
        projections = pca_model.transform(rows.vectors) if pca_model is not None else None
        points = []
        for label, indices, paths in by_fruit(cfg.input.bucket, rows.keys, rows.labels):
            labels = [label] * len(indices)
            writer.put(vectors_file(FEATURES, names[label], fmt.extension),
                       fmt.encode(paths, labels, rows.vectors[indices], KINDS[FEATURES]), fmt.content_type)
            if projections is not None:
                writer.put(vectors_file(PCA, names[label], fmt.extension),
                           fmt.encode(paths, labels, projections[indices], KINDS[PCA]), fmt.content_type)
                points += candidates(paths, labels, projections[indices], per_fruit)
        writer.put(ERRORS_FILE, format_errors(error_rows(cfg.input.bucket, self.failures)), "text/csv")
        return lowest_per_fruit(points, per_fruit)
