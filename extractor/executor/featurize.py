"""Featurize one partition of image keys: download, decode, batch, forward pass.

``featurize_partition`` and ``plan_task`` take plain values and injected callables, so they run
(and are tested) without Spark. ``spark_task`` is the thin wrapper Spark calls on the executors;
``extractor.driver.featurizing`` builds, on the driver, the RDD of those tasks.
"""

from __future__ import annotations

import itertools
import resource
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from extractor.executor.feeding import CPU_BATCH_SIZE, CPU_DECODE_THREADS
from extractor.executor.gpu import task_gpu_addresses
from extractor.executor.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from extractor.executor.models import ModelSpec, get_spec
from extractor.executor.worker import cached_model
from extractor.records import FeatureBlock, Fold, ImageFailure, Record, TaskStats
from extractor.storage import state as state_store
from extractor.storage.s3 import RetryLog
from extractor.storage.snapshot import RangePlan, load_plan


@dataclass(frozen=True)
class PartitionSettings:
    bucket: str
    batch_size: int = CPU_BATCH_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS
    prefetch_threads: int = CPU_DECODE_THREADS   # download + decode, one batch ahead (--decode-threads)
    draft: bool = True    # --decode draft: large JPEGs decoded at a reduced DCT scale (images.decode_image)


def featurize_partition(refs: Iterable[tuple[str, ...]], *, settings: PartitionSettings,
                        spec: ModelSpec, client, predict: Callable[[np.ndarray], np.ndarray]
                        ) -> Iterator[Record]:
    """``(key, label)`` or ``(key, label, listed ETag)`` tuples -> FeatureBlocks of up to
    ``batch_size`` rows, one ImageFailure per image that could not be featurized, then TaskStats.
    Its counts include ``deleted_since_listed`` (NoSuchKey) and ``changed_since_listed`` (the
    object's ETag is no longer the listed one: featurized as it is now).

    One client serves the whole partition. Downloads and decodes run in a small thread pool
    one batch ahead of the forward pass, so the model does not wait on S3.
    """
    stats = PartitionStats()

    def load(ref):
        key, label, *listed = ref
        start = time.perf_counter()
        try:
            data, etag = _download(client, settings.bucket, key)
            stats.count("downloaded")
            if listed and listed[0] and etag and etag != listed[0]:
                stats.count("changed_since_listed")
            return key, label, decode_image(data, spec.input_size, settings.max_pixels, settings.draft), None
        except ObjectGone as exc:
            stats.count("deleted_since_listed")
            return key, label, None, str(exc)
        except ImageError as exc:
            return key, label, None, str(exc)
        except Exception as exc:  # one odd file must not fail the partition
            return key, label, None, f"cannot decode: {type(exc).__name__}: {exc}"[:300]
        finally:
            stats.add("load_s", time.perf_counter() - start)

    retry_log = RetryLog.of_task(client)
    with ThreadPoolExecutor(max_workers=settings.prefetch_threads) as pool:
        in_flight: deque = deque()
        for chunk in _chunks(refs, settings.batch_size):
            in_flight.append([pool.submit(load, ref) for ref in chunk])
            if len(in_flight) > 1:
                yield from _run_batch(in_flight.popleft(), spec, predict, stats)
        while in_flight:
            yield from _run_batch(in_flight.popleft(), spec, predict, stats)
    stats.finish(retry_log)
    yield TaskStats(stats.as_dict())


class PartitionStats:
    """Where a partition's time went (seconds), when it forwarded its first image (epoch s),
    its S3 retries and its Python worker's peak memory: for the manifest and the benchmark."""

    def __init__(self):
        self.seconds: Counter = Counter()   # load_s (summed over threads), wait_s, forward_s
        self._lock = threading.Lock()
        self.first_forward_at: float | None = None
        self.finished_at: float | None = None
        self.retries: dict[str, int] = {}
        self.peak_rss_mb = 0.0
        self.counts: Counter = Counter()    # downloaded, forwarded (images through the CNN)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:  # the prefetch threads add too
            self.seconds[name] += seconds

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def finish(self, retry_log) -> None:
        self.finished_at = time.time()
        self.retries = dict(retry_log.by_operation) if retry_log is not None else {}
        self.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    def as_dict(self) -> dict:
        return {"seconds": dict(self.seconds), "first_forward_at": self.first_forward_at,
                "finished_at": self.finished_at, "retries": self.retries, "peak_rss_mb": self.peak_rss_mb,
                "counts": dict(self.counts)}


def _run_batch(futures, spec: ModelSpec, predict, stats: PartitionStats) -> Iterator[Record]:
    keys, labels, arrays = [], [], []
    waited = time.perf_counter()
    for future in futures:
        key, label, array, reason = future.result()
        if reason is not None:
            yield ImageFailure(key, label, reason)
        else:
            keys.append(key)
            labels.append(label)
            arrays.append(array)
    stats.add("wait_s", time.perf_counter() - waited)  # the model idle, waiting on S3 and decoding
    if arrays:
        if stats.first_forward_at is None:
            stats.first_forward_at = time.time()
        start = time.perf_counter()
        vectors = np.asarray(predict(spec.preprocess(np.stack(arrays))), dtype=np.float32)
        stats.add("forward_s", time.perf_counter() - start)
        stats.count("forwarded", len(arrays))
        if vectors.shape != (len(keys), spec.output_dim):
            raise RuntimeError(f"model returned shape {vectors.shape}, "
                               f"expected {(len(keys), spec.output_dim)}")
        yield FeatureBlock(keys, labels, vectors)


class ObjectGone(ImageError):
    """The listed object was deleted before its download."""


def _download(client, bucket: str, key: str) -> tuple[bytes, str]:
    """(the object's bytes, its ETag without quotes); an object S3 will not give us becomes an
    ImageError (an error row)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        if code in ("NoSuchKey", "404"):
            raise ObjectGone("object deleted since it was listed (NoSuchKey)") from None
        attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
        raise ImageError(f"S3 read failed after {attempts} attempts: {code}") from None
    except BotoCoreError as exc:
        raise ImageError(f"S3 read failed after retries: {type(exc).__name__}") from None
    try:
        return response["Body"].read(), response.get("ETag", "").strip('"')
    except Exception as exc:  # botocore does not retry a body cut off mid-stream
        raise ImageError(f"S3 connection dropped while reading the object: {type(exc).__name__}") from None


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def spark_task(plans, *, settings: PartitionSettings, model_name: str, weights_id: str,
               weights_broadcast, s3_settings, threads: int, precision: str = "float32", builds_counter=None,
               state_location=None, state_version: str | None = None, progress_counters=None,
               snapshot_bucket: str | None = None):
    """mapPartitions entry point over ``PartitionPlan`` elements, or ``snapshot.RangePlan`` ones whose
    keys are read from the snapshot in ``snapshot_bucket`` (one per partition): everything
    arrives as plain values, a broadcast and accumulators (``progress_counters``: images done,
    images failed). With ``state_location`` the partition reuses the stored vectors of
    unchanged keys and stores its rows for the next run. The GPUs Spark gave the task, if any,
    are the only ones its model may use (gpu.GpuError when it cannot)."""
    spec = get_spec(model_name)
    client = s3_settings.client()
    on_progress = _adder(*progress_counters) if progress_counters is not None else None
    addresses = task_gpu_addresses()

    def predict(batch):  # the model is only built if some image of the partition is new
        return cached_model(spec, weights_id, weights_broadcast, threads, precision,
                            on_build=(lambda: builds_counter.add(1)) if builds_counter is not None else None,
                            gpu_addresses=addresses)(batch)

    for plan in plans:
        if isinstance(plan, RangePlan):  # its keys are in the run's listing snapshot (storage/snapshot.py)
            plan = load_plan(client, snapshot_bucket, plan)
        yield from plan_task(plan, settings=settings, spec=spec, client=client, predict=predict,
                             s3_settings=s3_settings, state_location=state_location, state_version=state_version,
                             on_progress=on_progress)


def _adder(done_counter, failed_counter) -> Callable[[int, int], None]:
    def add(done: int, failed: int) -> None:
        done_counter.add(done)
        if failed:
            failed_counter.add(failed)

    return add


def plan_task(plan, *, settings: PartitionSettings, spec: ModelSpec, client, predict, s3_settings=None,
              state_location=None, state_version: str | None = None,
              on_progress: Callable[[int, int], None] | None = None) -> Iterator[Record]:
    """One partition: stored rows reused where key and ETag match, the rest featurized; with a
    state location, the partition's rows stored for the next run. The TaskStats gain
    ``counts``: reused, removed (stored keys no longer listed), stored. ``on_progress(images
    done, of which failed)`` is called per batch (a FeatureBlock) and per failed image."""
    stored = (state_store.read_rows(client, state_location.bucket, plan.state_parts, plan)
              if plan.state_parts else None)
    reused, new = _reusable(plan.refs, stored)
    listed = {key for key, _, _ in plan.refs}
    removed = 0 if stored is None else sum(1 for key in stored.keys if key not in listed)
    keep = state_location is not None and state_version is not None
    seen, kept = Fold(keep_vectors=False), Fold()
    records = featurize_partition(new, settings=settings, spec=spec, client=client, predict=predict)
    if reused:
        records = itertools.chain([FeatureBlock([stored.keys[i] for i in reused], [stored.labels[i] for i in reused],
                                                stored.vectors[reused])], records)
    for record in records:
        if not isinstance(record, TaskStats):
            seen.add(record)
            if on_progress is not None:
                failed = isinstance(record, ImageFailure)
                on_progress(1 if failed else len(record.keys), int(failed))
            if keep and isinstance(record, FeatureBlock):
                kept.add(record)
            yield record
            continue
        if seen.returned != len(plan.refs):  # every listed key comes back exactly once
            raise RuntimeError(f"partition {plan.index}: {len(plan.refs)} keys in, {seen.returned} out")
        stats = record.stats
        stats["counts"].update(reused=len(reused), removed=removed)
        stats["partition"] = plan.index
        if keep:
            rows = kept.rows(spec.output_dim)
            etags = {key: etag for key, _, etag in plan.refs}
            stats["state_part"] = state_store.write_part(
                client, s3_settings, state_location, state_version, plan.index, rows.keys,
                [etags[key] for key in rows.keys], rows.labels, rows.vectors)
            stats["counts"]["stored"] = len(rows.keys)
        yield record


def _reusable(refs, stored) -> tuple[list[int], list[tuple[str, str, str]]]:
    """(rows of ``stored`` to reuse: same key and ETag, the ``(key, label, etag)`` of the others)."""
    reused, new = [], []
    for key, label, etag in refs:
        row = stored.find(key) if stored is not None and etag else None
        if row is not None and stored.etags[row] == etag:
            reused.append(row)
        else:
            new.append((key, label, etag))
    return reused, new
