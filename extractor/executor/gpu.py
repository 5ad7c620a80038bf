"""GPUs under Spark's GPU-aware scheduling: which GPU a task's TensorFlow may use, and the
checks that make a GPU run that cannot work fail in seconds with one line.

On the executors: ``task_gpu_addresses`` reads what Spark gave the task, ``select_process_gpus``
pins this Python worker's TensorFlow to it (CUDA_VISIBLE_DEVICES) before TensorFlow starts,
and ``configure_tensorflow`` checks, right after the import, that TensorFlow sees that GPU and
can run the precision asked for. On the driver: ``requested_gpus`` reads the amounts asked.

The decisions are pure functions of plain values (addresses, an environment, device
details), tested without Spark, TensorFlow or a GPU. TensorFlow is never imported here.
"""

from __future__ import annotations

import os
import re

# Spark's discovery script for NVIDIA GPUs (getGpusResources.sh) reports nvidia-smi's indices;
# CUDA_VISIBLE_DEVICES also takes the UUIDs nvidia-smi -L prints (GPU-..., MIG-...).
_ADDRESS = re.compile(r"^(\d+|(GPU|MIG)-[0-9A-Za-z-]+)$")
BFLOAT16_MIN_CAPABILITY = (8, 0)  # Ampere: bfloat16 tensor cores (A100, A10G, L4, ...)
KERAS_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
_REQUEST_FIX = "spark.executor.resource.gpu.amount=1, spark.task.resource.gpu.amount=1"


class GpuError(RuntimeError):
    """This task cannot run as configured; the message is one line that names the fix."""


# --- driver --------------------------------------------------------------------------------------

def requested_gpus(conf: dict[str, str]) -> dict | None:
    """``{"executor": GPUs per executor, "task": GPUs per task}`` asked in the Spark conf
    (``spark.{executor,task}.resource.gpu.amount``), or None when neither is set; a task
    amount below 1 means tasks share a GPU (0.25: four per GPU)."""
    amounts = {}
    for name in ("executor", "task"):
        key = f"spark.{name}.resource.gpu.amount"
        text = conf.get(key)
        if text is None:
            continue
        try:
            amounts[name] = float(text)
        except ValueError:
            raise ValueError(f"{key} must be a number of GPUs, got {text!r}") from None
        if not amounts[name] > 0:
            raise ValueError(f"{key} must be > 0, got {text!r}")
    if not amounts:
        return None
    return {"executor": amounts.get("executor"), "task": amounts.get("task")}


def pooled_workers_problem(requested: dict | None, worker_reuse: bool) -> str | None:
    """Why this GPU request cannot work (one line), or None. With several GPUs per executor
    and Python workers reused, a worker pinned to one GPU is later handed tasks holding
    another (the executor's workers are one pool): ``select_process_gpus`` would refuse them."""
    if requested is None or not worker_reuse:
        return None
    executor, task = requested["executor"] or 0, requested["task"] or 0
    if executor >= 2 and task < executor:
        return (f"spark.executor.resource.gpu.amount={executor:g} with spark.task.resource.gpu.amount={task:g}: "
                f"a reused Python worker's TensorFlow stays on the first GPU it was given, and its executor's "
                f"other tasks hold other GPUs; give each executor one GPU (spark.executor.resource.gpu.amount=1) "
                f"or set spark.python.worker.reuse=false")
    return None


# --- executor: which GPU ---------------------------------------------------------------------------

def task_gpu_addresses() -> tuple[str, ...]:
    """The GPU addresses Spark gave the running task; () outside a task or without GPUs."""
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is None:
        return ()
    gpu = context.resources().get("gpu")
    return tuple(gpu.addresses) if gpu is not None else ()


def visible_devices_env(addresses, environ) -> dict[str, str]:
    """The environment changes that make CUDA (so TensorFlow) see only ``addresses``: {} when
    the task was given no GPU (TensorFlow then sees whatever the machine has, as before).

    Spark's addresses are nvidia-smi's indices, which count in PCI bus order; CUDA counts
    fastest-first unless CUDA_DEVICE_ORDER says otherwise, so that is set too (an order the
    environment already chose is kept). A CUDA_VISIBLE_DEVICES already there is replaced: the
    addresses are physical indices (nvidia-smi ignores that variable), not positions in it."""
    addresses = tuple(addresses)
    for address in addresses:
        if not isinstance(address, str) or not _ADDRESS.match(address):
            raise ValueError(f"a GPU address must be an index or a GPU-/MIG- UUID, got {address!r}")
    if not addresses:
        return {}
    changes = {"CUDA_VISIBLE_DEVICES": ",".join(addresses)}
    if "CUDA_DEVICE_ORDER" not in environ:
        changes["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return changes


def repin_problem(pinned: tuple[str, ...], addresses) -> str | None:
    """Why a task given ``addresses`` cannot run in a process whose TensorFlow was pinned to
    ``pinned`` (one line), or None when they are the same GPUs (in any order).

    Refused rather than run on the pinned GPU: TensorFlow cannot change GPUs once started, and
    running there would put two tasks on one GPU while the one the scheduler reserved idles.
    With one GPU per executor (the cluster's configuration) it cannot happen: every task of an
    executor is given that same GPU."""
    if set(pinned) == set(addresses):
        return None
    return (f"this Python worker's TensorFlow runs on GPU {_names(pinned)} but Spark gave this task GPU "
            f"{_names(addresses)}: TensorFlow cannot change GPUs once started; give each executor one GPU "
            f"(spark.executor.resource.gpu.amount=1) or set spark.python.worker.reuse=false")


class _Process:
    """What this Python worker's TensorFlow was pinned to (None: not yet) and the GPUs it saw."""

    pinned: tuple[str, ...] | None = None
    devices: list[dict] = []


def select_process_gpus(addresses, environ=None) -> None:
    """Pin this process's TensorFlow to ``addresses`` the first time (call it before importing
    TensorFlow); afterwards only check that a task's addresses are the pinned ones."""
    addresses = tuple(addresses)
    if _Process.pinned is None:
        target = os.environ if environ is None else environ
        target.update(visible_devices_env(addresses, target))
        _Process.pinned = addresses
        return
    problem = repin_problem(_Process.pinned, addresses)
    if problem:
        raise GpuError(problem)


def process_devices() -> list[dict]:
    """The GPUs this process's TensorFlow saw (``device_facts``), [] before it started or on CPU."""
    return list(_Process.devices)


# --- executor: what TensorFlow sees ----------------------------------------------------------------

def configure_tensorflow(tf, addresses, precision: str) -> list[dict]:
    """Right after importing TensorFlow in a process pinned to ``addresses``: memory growth on
    for each visible GPU (several Python workers may share one), then the checks. Returns the
    GPUs' facts; GpuError, one line, when the task cannot run."""
    addresses = tuple(addresses)
    gpus = tf.config.list_physical_devices("GPU")
    if addresses and not gpus:
        raise GpuError(no_gpu_message(addresses, tf.__version__, tf.test.is_built_with_cuda(), _distribution(),
                                      tf.sysconfig.get_build_info().get("cuda_version")))
    if addresses and len(gpus) > len(addresses):
        raise GpuError(f"Spark gave this task GPU {_names(addresses)} but TensorFlow sees {len(gpus)} GPUs: it "
                       f"started before the task's GPU was selected (CUDA_VISIBLE_DEVICES="
                       f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the GPU is already initialised in this process: too late, harmless
            pass
    devices = [device_facts(tf.config.experimental.get_device_details(gpu)) for gpu in gpus]
    check_precision(precision, devices, addresses, tf.__version__)
    _Process.devices = devices
    return devices


def device_facts(details: dict) -> dict:
    """TensorFlow's device details -> {"name": "NVIDIA A10G", "compute_capability": [8, 6] or None}."""
    capability = details.get("compute_capability")
    return {"name": details.get("device_name", "unknown GPU"),
            "compute_capability": list(capability) if capability else None}


def no_gpu_message(addresses, version: str, built_with_cuda: bool, distribution: str | None,
                   cuda_version: str | None = None) -> str:
    """The one line for a task that was given a GPU TensorFlow cannot see."""
    given = f"GPU requested but TensorFlow sees none: Spark gave this task GPU {_names(addresses)}"
    if not built_with_cuda:
        return (f"{given}, and TensorFlow {version} here is a CPU-only build ({distribution or 'tensorflow'}); "
                f"install the CUDA build, tensorflow[and-cuda]=={version}, on the GPU nodes in its place")
    return (f"{given}, and TensorFlow {version} (built for CUDA {cuda_version or '?'}) found no GPU at "
            f"CUDA_VISIBLE_DEVICES={','.join(addresses)}; check the NVIDIA driver (nvidia-smi) and install the "
            f"CUDA libraries with tensorflow[and-cuda]=={version}")


def check_precision(precision: str, devices: list[dict], addresses=(), version: str = "") -> None:
    """GpuError (one line) for a precision this task cannot run fast: float16 without a GPU
    (emulated on CPUs), bfloat16 on a GPU older than compute capability 8.0 (no bfloat16
    tensor cores: T4 is 7.5, V100 7.0)."""
    if precision not in KERAS_POLICIES:
        raise ValueError(f"precision must be one of {sorted(KERAS_POLICIES)}, got {precision!r}")
    if precision == "float16" and not devices:
        raise GpuError(f"--precision float16 needs a GPU and TensorFlow {version} sees none in this task: float16 "
                       f"on a CPU is emulated, many times slower than float32; use --precision float32 (or "
                       f"bfloat16 on CPUs with AVX512-BF16/AMX), or give each task a GPU ({_REQUEST_FIX})")
    if precision == "bfloat16":
        for index, device in enumerate(devices):
            capability = device["compute_capability"]
            if capability is not None and tuple(capability) < BFLOAT16_MIN_CAPABILITY:
                address = addresses[index] if index < len(addresses) else str(index)
                raise GpuError(f"--precision bfloat16 needs a GPU of compute capability 8.0 or newer, and this "
                               f"task's GPU {address} is {device['name']} ({capability[0]}.{capability[1]}): "
                               f"use --precision float16")


def _names(addresses) -> str:
    return ",".join(addresses) if addresses else "none"


def _distribution() -> str | None:
    """Which pip distribution provides the tensorflow module (tensorflow-cpu is CPU-only)."""
    from importlib import metadata

    for name in ("tensorflow-cpu", "tensorflow", "tensorflow-gpu"):
        try:
            metadata.version(name)
            return name
        except metadata.PackageNotFoundError:
            pass
    return None
