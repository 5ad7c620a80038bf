"""Featurize one partition of image keys: download, decode, batch, forward pass.

``featurize_partition`` takes plain values and injected callables, so it runs (and is tested)
without Spark. ``spark_task`` is the thin wrapper Spark calls on the executors.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from .models import ModelSpec, get_spec
from .s3 import RetryLog

# Records a partition yields; plain tuples keep the pickling to the driver cheap.
FEATURES = "features"   # (FEATURES, keys: list[str], labels: list[str], vectors (m, d) float32)
ERROR = "error"         # (ERROR, key, label, reason)
STATS = "stats"         # (STATS, PartitionStats as a dict), once per partition


@dataclass(frozen=True)
class PartitionSettings:
    bucket: str
    batch_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    prefetch_threads: int = 4


def featurize_partition(refs: Iterable[tuple[str, str]], *, settings: PartitionSettings,
                        spec: ModelSpec, client, predict: Callable[[np.ndarray], np.ndarray]
                        ) -> Iterator[tuple]:
    """``(key, label)`` pairs -> FEATURES blocks of up to ``batch_size`` rows, and ERROR rows.

    One client serves the whole partition. Downloads and decodes run in a small thread pool
    one batch ahead of the forward pass, so the model does not wait on S3.
    """
    stats = PartitionStats()

    def load(ref):
        key, label = ref
        start = time.perf_counter()
        try:
            data = _download(client, settings.bucket, key)
            stats.count("downloaded")
            return key, label, decode_image(data, spec.input_size, settings.max_pixels), None
        except ImageError as exc:
            return key, label, None, str(exc)
        except Exception as exc:  # one odd file must not fail the partition
            return key, label, None, f"cannot decode: {type(exc).__name__}: {exc}"[:300]
        finally:
            stats.add("load_s", time.perf_counter() - start)

    retry_log = RetryLog().attach(client) if hasattr(client, "meta") else None
    with ThreadPoolExecutor(max_workers=settings.prefetch_threads) as pool:
        in_flight: deque = deque()
        for chunk in _chunks(refs, settings.batch_size):
            in_flight.append([pool.submit(load, ref) for ref in chunk])
            if len(in_flight) > 1:
                yield from _run_batch(in_flight.popleft(), spec, predict, stats)
        while in_flight:
            yield from _run_batch(in_flight.popleft(), spec, predict, stats)
    stats.finish(retry_log)
    yield (STATS, stats.as_dict())


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


def _run_batch(futures, spec: ModelSpec, predict, stats: PartitionStats) -> Iterator[tuple]:
    keys, labels, arrays = [], [], []
    waited = time.perf_counter()
    for future in futures:
        key, label, array, reason = future.result()
        if reason is not None:
            yield (ERROR, key, label, reason)
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
        yield (FEATURES, keys, labels, vectors)


def _download(client, bucket: str, key: str) -> bytes:
    """The object's bytes; an object S3 will not give us becomes an ImageError (an error row)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        if code in ("NoSuchKey", "404"):
            raise ImageError("object disappeared before download (NoSuchKey)") from None
        attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
        raise ImageError(f"S3 read failed after {attempts} attempts: {code}") from None
    except BotoCoreError as exc:
        raise ImageError(f"S3 read failed after retries: {type(exc).__name__}") from None
    try:
        return response["Body"].read()
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


# --- executor side -------------------------------------------------------------------------

# One model per Python worker process, keyed by model and precision, with the fingerprint of
# the weights it holds. Spark reuses Python workers across tasks (spark.python.worker.reuse, on
# by default), so every task after the first in a process finds the model here.
_MODELS: dict[tuple[str, str], "_Forward"] = {}


def compiled_model(spec: ModelSpec, threads: int, precision: str = "float32") -> "_Forward":
    """This process's compiled model for (spec, precision), built and traced once; its weights
    are whatever was set last (zeros when new)."""
    key = (spec.name, precision)
    forward = _MODELS.get(key)
    if forward is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        try:
            # Only possible before TensorFlow runs its first op in this process.
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
        except RuntimeError:
            pass
        _MODELS.clear()  # never hold two VGG16s in one worker
        # bfloat16 compute (AMX on recent Xeons, tensor cores on GPUs), float32 variables.
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
        model = spec.build_features()
        height, width = spec.input_size
        # One trace for every batch size (the last batch of a partition is smaller), done now.
        compiled = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32),
                               input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)])
        compiled.get_concrete_function()
        forward = _Forward(model, compiled)
        _MODELS[key] = forward
    return forward


def cached_model(spec: ModelSpec, weights_id: str, weights_broadcast, threads: int, precision: str = "float32",
                 on_build=None):
    """This process's model for (spec, weights, precision): a callable
    ``(n, h, w, 3) float32 -> (n, d) float32``. The broadcast is read, and ``on_build`` called,
    only when the process does not hold these weights yet."""
    forward = compiled_model(spec, threads, precision)
    if forward.weights_id != weights_id:
        forward.model.set_weights(weights_broadcast.value)
        forward.weights_id = weights_id
        if on_build is not None:
            on_build()
    return forward


def warm_up_task(partition, *, model_name: str, threads: int, precision: str):
    """mapPartitions entry point run while the driver loads the weights: imports TensorFlow and
    builds and traces the model in this Python worker, so the first real task only sets weights.
    Yields (pid, seconds)."""
    start = time.perf_counter()
    for _ in partition:
        pass
    compiled_model(get_spec(model_name), threads, precision)
    yield os.getpid(), round(time.perf_counter() - start, 3)


class _Forward:
    """Keeps the Keras model alive beside its compiled call."""

    def __init__(self, model, compiled):
        self.model = model
        self.compiled = compiled
        self.weights_id: str | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.compiled(batch).numpy()


def spark_task(plans, *, settings: PartitionSettings, model_name: str, weights_id: str,
               weights_broadcast, s3_settings, threads: int, precision: str = "float32", builds_counter=None,
               state_location=None, state_version: str | None = None):
    """mapPartitions entry point over ``PartitionPlan`` elements (one per partition): everything
    arrives as plain values, a broadcast and an accumulator. With ``state_location`` the
    partition reuses the stored vectors of unchanged keys and stores its rows for the next run."""
    spec = get_spec(model_name)
    client = s3_settings.client()

    def predict(batch):  # the model is only built if some image of the partition is new
        return cached_model(spec, weights_id, weights_broadcast, threads, precision,
                            on_build=(lambda: builds_counter.add(1)) if builds_counter is not None else None)(batch)

    for plan in plans:
        yield from plan_task(plan, settings=settings, spec=spec, client=client, predict=predict,
                             s3_settings=s3_settings, state_location=state_location, state_version=state_version)


def plan_task(plan, *, settings: PartitionSettings, spec: ModelSpec, client, predict, s3_settings=None,
              state_location=None, state_version: str | None = None) -> Iterator[tuple]:
    """One partition: stored rows reused where key and ETag match, the rest featurized; with a
    state location, the partition's rows stored for the next run. The STATS record gains
    ``counts``: reused, removed (stored keys no longer listed), stored."""
    from . import state as state_store

    stored = (state_store.read_rows(client, state_location.bucket, plan.state_parts, plan)
              if plan.state_parts else None)
    etags = {key: etag for key, _, etag in plan.refs}
    reused, new = [], []
    for key, label, etag in plan.refs:
        row = stored.find(key) if stored is not None and etag else None
        if row is not None and stored.etags[row] == etag:
            reused.append(row)
        else:
            new.append((key, label))
    removed = 0 if stored is None else sum(1 for key in stored.keys if key not in etags)
    keep = state_location is not None and state_version is not None
    rows_keys, rows_labels, rows_vectors = [], [], []

    def remember(record):
        if keep:
            rows_keys.extend(record[1])
            rows_labels.extend(record[2])
            rows_vectors.append(record[3])

    if reused:
        record = (FEATURES, [stored.keys[i] for i in reused], [stored.labels[i] for i in reused],
                  stored.vectors[reused])
        remember(record)
        yield record
    returned = len(reused)
    for record in featurize_partition(new, settings=settings, spec=spec, client=client, predict=predict):
        if record[0] == FEATURES:
            remember(record)
            returned += len(record[1])
        elif record[0] == ERROR:
            returned += 1
        elif record[0] == STATS:
            if returned != len(plan.refs):  # every listed key comes back exactly once
                raise RuntimeError(f"partition {plan.index}: {len(plan.refs)} keys in, {returned} out")
            stats = record[1]
            stats["counts"].update(reused=len(reused), removed=removed)
            stats["partition"] = plan.index
            if keep:
                vectors = np.concatenate(rows_vectors) if rows_vectors else np.zeros((0, spec.output_dim), np.float32)
                stats["state_part"] = state_store.write_part(
                    client, s3_settings, state_location, state_version, plan.index, rows_keys,
                    [etags[key] for key in rows_keys], rows_labels, vectors)
                stats["counts"]["stored"] = len(rows_keys)
        yield record
