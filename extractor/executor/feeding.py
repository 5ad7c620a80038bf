"""How many images a forward pass takes and how many threads download and decode them: the
figures of a CPU run as they always were, and, when Spark gives tasks GPUs, sized so the GPU
does not wait on S3 or on JPEG decoding (``size_decode_pool``).

Driver side, plain values only: the Spark conf arrives as a dict.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from extractor.executor.gpu import pooled_workers_problem, requested_gpus
from extractor.executor.rates import RATES
from extractor.storage.s3 import MAX_POOL_CONNECTIONS

CPU_BATCH_SIZE = 32
CPU_DECODE_THREADS = 4
GPU_BATCH_SIZE = 256          # per whole GPU; a task sharing one (amount 0.25) takes its share
# VGG16 fp16 on an A10G (g5.xlarge), the cost table's estimate (extractor.executor.rates.RATES;
# not measurable here: no GPU), a parameter of the sizing and this its default.
GPU_IMAGES_PER_S = RATES[("g5.xlarge", "float16")].images_s
# Measured with ``python -m extractor.dev.bench --decode-rate`` (AMD EPYC, 2 vCPUs, Pillow
# 11.3, 2026-12-03; medians of 5, three runs on a quiet machine): decode + RGB + nearest resize
# to 224x224 of a 100x100 JPEG (Fruits-360; synthetic and the real sample alike) 2,480-3,150
# images/s on one thread, and two threads no faster (2,460-2,850 in all: serial share
# 0.86-1.0, small images are Python overhead under the GIL); a 4000x3000 q90 camera JPEG
# (1.7 MB) 21-26 images/s per thread, two threads 40-48 (serial share 0.1: the decoder
# releases the GIL).
DECODE_PER_CORE = 2500.0
DECODE_SERIAL_SHARE = 0.9
# botocore's CPU per GET on the calling thread (signing, HTTP, parsing; Python under the GIL),
# measured by the same benchmark against a local server: 1.9-2.3 ms (2.8 on a loaded machine).
GET_CPU_S = 0.0022
S3_LATENCY_S = 0.030          # S3 GET of a small object in-region: 20-50 ms to the last byte
HEADROOM = 1.25               # latency has a tail; the pool runs one batch ahead to absorb it
MAX_THREADS = MAX_POOL_CONNECTIONS   # a task's download threads share its S3 client's connections


@dataclass(frozen=True)
class PoolSize:
    threads: int
    images_per_s: float       # what the pool can feed the model
    limit: str                # what bounds it: "gpu" (the target: the GPU is the bottleneck),
                              # "cores", "gil" (one Python worker) or "threads" (MAX_THREADS)


def size_decode_pool(target_images_per_s: float, decode_images_per_s_per_core: float, cores: float,
                     s3_latency_s: float, *, get_cpu_s: float = GET_CPU_S, serial_share: float = DECODE_SERIAL_SHARE,
                     headroom: float = HEADROOM, max_threads: int = MAX_THREADS) -> PoolSize:
    """Threads for one task's download + decode pool, so that it feeds ``target_images_per_s``.

    A thread spends per image ``w = s3_latency_s + get_cpu_s + d`` seconds, ``d = 1 /
    decode_images_per_s_per_core``; only ``get_cpu_s + d`` is CPU, the latency is a wait,
    so threads > cores is right. The rate it can reach is the least of: the target; the task's
    cores, ``cores / (get_cpu_s + d)``; and the GIL of its one Python worker, ``1 / (get_cpu_s
    + serial_share x d)``. By Little's law the pool needs ``rate x w`` threads busy; times
    ``headroom``, rounded up, at most ``max_threads``.

    With 1,500 images/s, 2,500 decodes/s per core, 30 ms, 2.2 ms of botocore CPU, serial
    share 0.9 and 4 cores: w = 32.6 ms, the GIL bounds a task at ~390 images/s -> 16 threads
    (hence two tasks per GPU on EMR, extractor.deploy.instances.TASKS_PER_GPU). Camera-size JPEGs (22 decodes/s per core, serial share 0.1), 4 cores: the
    cores bound it at ~84 images/s -> 9 threads. Units: images/s, seconds, cores (may be
    fractional).
    """
    for name, value in (("target_images_per_s", target_images_per_s),
                        ("decode_images_per_s_per_core", decode_images_per_s_per_core), ("cores", cores),
                        ("headroom", headroom), ("max_threads", max_threads)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    if not (s3_latency_s >= 0 and get_cpu_s >= 0 and 0 <= serial_share <= 1):
        raise ValueError(f"s3_latency_s and get_cpu_s must be >= 0 and serial_share in [0, 1], got "
                         f"{s3_latency_s!r}, {get_cpu_s!r}, {serial_share!r}")
    decode_s = 1.0 / decode_images_per_s_per_core
    per_image_s = s3_latency_s + get_cpu_s + decode_s
    ceilings = {"gpu": target_images_per_s, "cores": cores / (get_cpu_s + decode_s),
                "gil": 1.0 / (get_cpu_s + serial_share * decode_s)}
    limit = min(ceilings, key=ceilings.get)
    rate = ceilings[limit]
    threads = math.ceil(rate * per_image_s * headroom)
    if threads > max_threads:
        threads, limit = max_threads, "threads"
        rate = min(rate, max_threads / per_image_s)
    return PoolSize(max(1, threads), round(rate, 1), limit)


def cores_per_task(conf: dict[str, str], gpus: dict) -> float:
    """vCPUs a GPU task's pool may use: its executor's cores over the tasks that run there at
    once (GPUs bound those, not only cores); the task's own spark.task.cpus when the executor's
    cores are not set (YARN's default executor is 1 core)."""
    task_cpus = int(conf.get("spark.task.cpus", "1"))
    executor_cores = int(conf.get("spark.executor.cores", "0"))
    if executor_cores <= 0:
        return float(task_cpus)
    at_once = max(1, executor_cores // task_cpus)
    if gpus.get("executor") and gpus.get("task"):
        at_once = max(1, min(at_once, math.floor(gpus["executor"] / gpus["task"] + 1e-9)))
    return max(float(task_cpus), executor_cores / at_once)


@dataclass(frozen=True)
class Feeding:
    batch_size: int
    decode_threads: int
    gpus: dict | None                # requested_gpus(conf)
    auto: tuple[str, ...]            # the options left at "auto"
    pool: PoolSize | None = None     # the sizing behind decode_threads, on GPUs
    target_images_per_s: float | None = None   # this task's share of the GPU's rate
    cores: float | None = None

    def as_dict(self) -> dict:
        pool = self.pool
        return {"requested": self.gpus, "batch_size": self.batch_size, "decode_threads": self.decode_threads,
                "auto": list(self.auto), "target_images_per_s": self.target_images_per_s,
                "cores_per_task": self.cores, "estimated_feed_images_per_s": pool.images_per_s if pool else None,
                "feed_limit": pool.limit if pool else None}

    def log(self, logger: logging.Logger) -> None:
        if self.gpus is None:
            logger.info("no GPUs requested: batch %d, %d download/decode threads per task", self.batch_size,
                        self.decode_threads)
            return
        logger.info("GPUs requested: %s per executor, %s per task (Spark GPU-aware scheduling); batch %d, %d "
                    "download/decode threads per task%s", _amount(self.gpus["executor"]), _amount(self.gpus["task"]),
                    self.batch_size, self.decode_threads, f" ({', '.join(self.auto)}: auto)" if self.auto else "")
        if self.pool is not None and self.pool.limit != "gpu":
            logger.warning("a task can feed its GPU about %.0f images/s of the %.0f it could take (estimate; bound "
                           "by %s)%s", self.pool.images_per_s, self.target_images_per_s, _LIMITS[self.pool.limit],
                           _ADVICE.get(self.pool.limit, ""))


_LIMITS = {"cores": "the task's vCPUs decoding JPEGs", "threads": f"{MAX_THREADS} S3 connections per task",
           "gil": "one Python worker's GIL: botocore's GETs and small-JPEG decoding are Python code"}
_ADVICE = {"gil": "; several tasks per GPU feed it faster: spark.task.resource.gpu.amount=0.5 or 0.25, "
                  "with executor cores to match"}


def _amount(value) -> str:
    return "?" if value is None else f"{value:g}"


def plan_feeding(conf: dict[str, str], batch_size: int | None, decode_threads: int | None, *,
                 gpu_images_per_s: float = GPU_IMAGES_PER_S) -> Feeding:
    """Batch size and pool threads for the run (None: auto). CPU: 32 and 4, as always. GPUs
    requested: 256 images per whole GPU, threads from ``size_decode_pool``. ValueError (one
    line) for a GPU request that cannot work."""
    gpus = requested_gpus(conf)
    problem = pooled_workers_problem(gpus, conf.get("spark.python.worker.reuse", "true").lower() == "true")
    if problem:
        raise ValueError(problem)
    auto = tuple(name for name, value in (("batch size", batch_size), ("decode threads", decode_threads))
                 if value is None)
    if gpus is None or not gpus["task"]:
        return Feeding(batch_size or CPU_BATCH_SIZE, decode_threads or CPU_DECODE_THREADS, gpus, auto)
    share = min(1.0, gpus["task"])
    target = gpu_images_per_s * share
    cores = cores_per_task(conf, gpus)
    pool = size_decode_pool(target, DECODE_PER_CORE, cores, S3_LATENCY_S)
    return Feeding(batch_size or max(CPU_BATCH_SIZE, int(GPU_BATCH_SIZE * share)), decode_threads or pool.threads,
                   gpus, auto, pool, target, cores)
