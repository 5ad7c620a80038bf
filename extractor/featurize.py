"""Featurize one partition of image keys: download, decode, batch, forward pass.

``featurize_partition`` takes plain values and injected callables, so it runs (and is tested)
without Spark. ``spark_task`` is the thin wrapper Spark calls on the executors.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from .models import ModelSpec, feature_model, get_spec
from .s3 import RetryLog

# Records a partition yields; plain tuples keep the pickling to the driver cheap.
FEATURES = "features"   # (FEATURES, keys: list[str], labels: list[str], vectors (m, d) float32)
ERROR = "error"         # (ERROR, key, label, reason)
RETRIES = "retries"     # (RETRIES, {S3 operation: retries}), once per partition


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
    def load(ref):
        key, label = ref
        try:
            data = _download(client, settings.bucket, key)
            return key, label, decode_image(data, spec.input_size, settings.max_pixels), None
        except ImageError as exc:
            return key, label, None, str(exc)
        except Exception as exc:  # one odd file must not fail the partition
            return key, label, None, f"cannot decode: {type(exc).__name__}: {exc}"[:300]

    retry_log = RetryLog().attach(client) if hasattr(client, "meta") else None
    with ThreadPoolExecutor(max_workers=settings.prefetch_threads) as pool:
        in_flight: deque = deque()
        for chunk in _chunks(refs, settings.batch_size):
            in_flight.append([pool.submit(load, ref) for ref in chunk])
            if len(in_flight) > 1:
                yield from _run_batch(in_flight.popleft(), spec, predict)
        while in_flight:
            yield from _run_batch(in_flight.popleft(), spec, predict)
    if retry_log is not None and retry_log.total:
        yield (RETRIES, dict(retry_log.by_operation))


def _run_batch(futures, spec: ModelSpec, predict) -> Iterator[tuple]:
    keys, labels, arrays = [], [], []
    for future in futures:
        key, label, array, reason = future.result()
        if reason is not None:
            yield (ERROR, key, label, reason)
        else:
            keys.append(key)
            labels.append(label)
            arrays.append(array)
    if arrays:
        vectors = np.asarray(predict(spec.preprocess(np.stack(arrays))), dtype=np.float32)
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

# One model per Python worker process, keyed by model and weights fingerprint. Spark reuses
# Python workers across tasks (spark.python.worker.reuse, on by default), so every task after
# the first in a process finds the model here.
_MODELS: dict[tuple[str, str], object] = {}


def cached_model(spec: ModelSpec, weights_id: str, weights_broadcast, threads: int, on_build=None):
    key = (spec.name, weights_id)
    model = _MODELS.get(key)
    if model is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        try:
            # Only possible before TensorFlow runs its first op in this process.
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
        except RuntimeError:
            pass
        model = feature_model(spec, None)
        model.set_weights(weights_broadcast.value)
        _MODELS.clear()  # a new weights set replaces the old one; never hold two VGG16s
        _MODELS[key] = model
        if on_build is not None:
            on_build()
    return model


def spark_task(refs, *, settings: PartitionSettings, model_name: str, weights_id: str,
               weights_broadcast, s3_settings, threads: int, builds_counter=None):
    """mapPartitions entry point: everything arrives as plain values, a broadcast and an accumulator."""
    spec = get_spec(model_name)
    model = cached_model(spec, weights_id, weights_broadcast, threads,
                         on_build=(lambda: builds_counter.add(1)) if builds_counter is not None else None)
    client = s3_settings.client()
    return featurize_partition(refs, settings=settings, spec=spec, client=client,
                               predict=lambda x: model.predict_on_batch(x))
