"""The model inside each Python worker: built and traced once per process, its weights set from
the broadcast only when they change.

Spark reuses Python workers across tasks (``spark.python.worker.reuse``, on by default), so
every task after the first in a process finds its model here. TensorFlow is imported on the
first call, never at import time, after the process was pinned to the task's GPU (gpu.py):
the pin holds for the life of the process, so every call checks the task's GPU against it.
"""

from __future__ import annotations

import gc
import os
import time

import numpy as np

from extractor.executor import gpu
from extractor.executor.gpu import GpuError, process_devices, task_gpu_addresses
from extractor.executor.models import ModelSpec, get_spec

# One model per process, keyed by (model, precision), with the fingerprint of its weights.
_MODELS: dict[tuple[str, str], "Forward"] = {}


class Forward:
    """Keeps the Keras model alive beside its compiled call: ``(n, h, w, 3) float32 -> (n, d) float32``."""

    def __init__(self, model, compiled):
        self.model = model
        self.compiled = compiled
        self.weights_id: str | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.compiled(batch).numpy()


def compiled_model(spec: ModelSpec, threads: int, precision: str = "float32", gpu_addresses=()) -> Forward:
    """This process's compiled model for (spec, precision), built and traced once; its weights
    are whatever was set last (zeros when new). ``gpu_addresses``: the GPUs Spark gave the
    task (() without GPU scheduling); gpu.GpuError when the task cannot run on them."""
    gpu.select_process_gpus(gpu_addresses)  # before TensorFlow starts; afterwards only a check
    key = (spec.name, precision)
    forward = _MODELS.get(key)
    if forward is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        # The daemon runs gc.collect() after every task of a reused worker: over TensorFlow's
        # and Keras' module objects that took ~0.2 s a task here (a trivial 7-task job: 2.0 s
        # against 1.0 s). They live as long as the process, so they leave the collector's
        # view; the model built below stays in it (a replaced one must still be collectable).
        gc.freeze()
        try:
            # Only possible before TensorFlow runs its first op in this process.
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
        except RuntimeError:
            pass
        gpu.configure_tensorflow(tf, gpu_addresses, precision)  # seconds after start, not after the first batch
        _MODELS.clear()  # never hold two VGG16s in one worker
        # Mixed precision: bfloat16 or float16 compute (AMX on recent Xeons, tensor cores on
        # GPUs), float32 variables; the compiled call casts the vectors back to float32.
        keras.mixed_precision.set_global_policy(gpu.KERAS_POLICIES[precision])
        model = spec.build_features()
        height, width = spec.input_size
        # One trace for every batch size (the last batch of a partition is smaller), done now.
        compiled = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32),
                               input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)])
        compiled.get_concrete_function()
        forward = Forward(model, compiled)
        _MODELS[key] = forward
    return forward


def cached_model(spec: ModelSpec, weights_id: str, weights_broadcast, threads: int, precision: str = "float32",
                 on_build=None, gpu_addresses=()) -> Forward:
    """This process's model for (spec, weights, precision). The broadcast is read, and
    ``on_build`` called, only when the process does not hold these weights yet."""
    forward = compiled_model(spec, threads, precision, gpu_addresses)
    if forward.weights_id != weights_id:
        forward.model.set_weights(weights_broadcast.value)
        forward.weights_id = weights_id
        if on_build is not None:
            on_build()
    return forward


def warm_up_task(partition, *, model_name: str, threads: int, precision: str, addresses=None):
    """mapPartitions entry point: imports TensorFlow and builds and traces the model in this
    Python worker, so the first real task only sets weights. Yields one dict: pid, seconds,
    the task's GPU addresses (``addresses``, else Spark's), the GPUs TensorFlow saw, and
    ``problem``: the GpuError's line when the task cannot run, else None. Not raised: a failed
    task would print its traceback, and Spark would retry it."""
    start = time.perf_counter()
    for _ in partition:
        pass
    addresses = task_gpu_addresses() if addresses is None else tuple(addresses)
    problem = None
    try:
        compiled_model(get_spec(model_name), threads, precision, addresses)
    except GpuError as exc:
        problem = str(exc)
    yield {"pid": os.getpid(), "seconds": round(time.perf_counter() - start, 3), "gpu_addresses": list(addresses),
           "gpu_devices": [device["name"] for device in process_devices()], "problem": problem}
