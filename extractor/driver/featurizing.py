"""The featurize stage on the driver: how many partitions, the weights broadcast once, and the
RDD of ``extractor.executor.featurize.spark_task`` over the listing's key ranges."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

from extractor.executor.featurize import PartitionSettings, spark_task
from extractor.executor.feeding import CPU_BATCH_SIZE
from extractor.executor.models import ModelSpec
from extractor.storage import state as state_store

IMAGES_PER_PARTITION = 256
BATCHES_PER_PARTITION = 8   # a partition's first batch waits on S3 with the model idle: make it a small share


def default_partitions(n_images: int, parallelism: int, batch_size: int = CPU_BATCH_SIZE) -> int:
    """Enough partitions to keep every core busy and make a retried task cheap, each of at
    least BATCHES_PER_PARTITION batches when they are large (GPU batches of 256)."""
    per_partition = max(IMAGES_PER_PARTITION, BATCHES_PER_PARTITION * batch_size)
    return max(1, min(n_images, max(2 * parallelism, math.ceil(n_images / per_partition))))


@dataclass
class Featurizing:
    """The featurize stage once started: its records RDD (computed by whoever reads it first),
    the weights' broadcast, the accumulator counting the workers that set the weights, and the
    two counting images done and failed (for progress only: a retried task adds twice)."""

    records: object
    broadcast: object
    weight_loads: object
    partitions: int
    task_cpus: int
    images_done: object = None
    images_failed: object = None

    def release(self) -> None:
        self.broadcast.unpersist()


def resolved(cfg):
    """``cfg`` once job.feeding_for resolved its "auto" batch size and decode threads; a
    ValueError for one that was not (a parsed config: no function here guesses which it holds)."""
    if cfg.batch_size is None or cfg.decode_threads is None:
        raise ValueError(f"the batch size and decode threads must be resolved first (job.feeding_for), got "
                         f"{cfg.batch_size} and {cfg.decode_threads}")
    return cfg


def task_partitions(cfg, parallelism: int) -> Callable[[int], int]:
    """How many featurize partitions for ``n`` images: --partitions, else ``default_partitions``
    at the run's (resolved) batch size."""
    batch_size = resolved(cfg).batch_size
    return lambda n: cfg.partitions or default_partitions(n, parallelism, batch_size)


def featurize_rdd(sc, cfg, spec: ModelSpec, weights, ranges, logger, warm_up=None, incremental=None) -> Featurizing:
    """Broadcast the weights and build the RDD of featurize tasks over ``ranges``' partitions
    (``scan.KeyRanges``: contiguous key ranges), each with the stored state parts that may hold
    its keys when incremental."""
    parallelism = sc.defaultParallelism
    batch_size, decode_threads = resolved(cfg).batch_size, cfg.decode_threads
    threads = int(sc.getConf().get("spark.task.cpus", "1"))
    broadcast = sc.broadcast(weights.arrays)
    weights.arrays = []  # the broadcast holds them now; don't keep a second copy
    builds, done, failed = sc.accumulator(0), sc.accumulator(0), sc.accumulator(0)
    plans = state_store.with_state_parts(ranges.plans, incremental.previous if incremental else None, cfg.state)
    task = partial(
        spark_task,
        settings=PartitionSettings(bucket=cfg.input.bucket, batch_size=batch_size, max_pixels=cfg.max_pixels,
                                   prefetch_threads=decode_threads, draft=cfg.decode == "draft"),
        model_name=spec.name, weights_id=weights.sha256, weights_broadcast=broadcast,
        s3_settings=cfg.s3, threads=threads, precision=cfg.precision, builds_counter=builds,
        state_location=cfg.state, state_version=incremental.version if incremental else None,
        progress_counters=(done, failed), snapshot_bucket=cfg.output.bucket)
    logger.info("featurizing %d images in %d partitions (default parallelism %d, batch %d, %d download/decode "
                "threads and %d TF threads per task)", ranges.count, len(plans), parallelism, batch_size,
                decode_threads, threads)
    if warm_up is not None:
        warm_up.wait()  # a featurize task beside a warm-up task would start a second Python worker
    records = sc.parallelize(plans, len(plans)).mapPartitions(task)
    return Featurizing(records, broadcast, builds, len(plans), threads, done, failed)
