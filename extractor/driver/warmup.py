"""The warm-up: a Spark job, started in a thread on the driver, whose tasks
(``extractor.executor.worker.warm_up_task``) make every Python worker import TensorFlow and
build and trace the model while the driver loads the weights. Seconds of each worker's start-up
hidden behind the driver's; only an optimisation: if it fails, the featurize tasks build the
model themselves. With one exception: a task that
cannot run as configured (a GPU TensorFlow cannot see, a precision the device cannot run:
gpu.GpuError) is reported back as a value, and ``wait`` ends the run with that one line,
seconds after the start rather than when the first featurize task has failed four times.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial

from extractor.driver.spark import failure_summary
from extractor.errors import JobError
from extractor.executor.worker import warm_up_task


class WarmUp:
    """The driver's half: one task per executor slot, in a thread, cancellable."""

    GROUP = "fruits-warm-up"

    def __init__(self, sc, spec, precision: str, logger: logging.Logger):
        self.sc, self.logger = sc, logger
        self.seconds: float | None = None
        self.workers = 0
        self.problem: str | None = None       # a GpuError's line from a warm-up task
        self.gpu_addresses: list[str] = []
        self.gpu_devices: list[str] = []
        conf = sc.getConf()
        # Without worker reuse every task starts a new Python worker: nothing to warm.
        self.enabled = conf.get("spark.python.worker.reuse", "true").lower() == "true"
        threads = int(conf.get("spark.task.cpus", "1"))
        self.slots = max(1, sc.defaultParallelism // threads)
        self.task = partial(warm_up_task, model_name=spec.name, threads=threads, precision=precision)
        self.thread = threading.Thread(target=self._work, name="warm-up", daemon=True)
        if self.enabled:
            self.thread.start()

    def _work(self) -> None:
        start = time.perf_counter()
        self.sc.setJobGroup(self.GROUP, "warm-up: import TensorFlow, build the model", interruptOnCancel=False)
        try:
            results = self.sc.parallelize(range(self.slots), self.slots).mapPartitions(self.task).collect()
        except Exception as exc:
            self.logger.info("warm-up did not finish (%s); tasks build the model themselves", failure_summary(exc))
            return
        self.seconds = round(time.perf_counter() - start, 3)
        self.workers = len({r["pid"] for r in results})
        self.gpu_addresses = sorted({a for r in results for a in r["gpu_addresses"]})
        self.gpu_devices = sorted({name for r in results for name in r["gpu_devices"]})
        self.problem = next((r["problem"] for r in results if r["problem"]), None)
        if self.problem:
            return
        gpus = (f"; GPU addresses {self.gpu_addresses}, devices {self.gpu_devices or 'none'}"
                if self.gpu_addresses or self.gpu_devices else "")
        self.logger.info("warm-up: %d Python worker(s) imported TensorFlow and built the model in %.1f s%s",
                         self.workers, self.seconds, gpus)

    def wait(self) -> None:
        """Let the warm-up tasks end first (a featurize task beside them would start a second
        worker); JobError, one line, when one found that the tasks cannot run."""
        if self.enabled:
            self.thread.join()
            if self.problem:
                raise JobError(self.problem)

    def cancel(self) -> None:
        if self.enabled and self.thread.is_alive():
            self.sc.cancelJobGroup(self.GROUP)
            self.thread.join(timeout=30)

    def as_dict(self) -> dict:
        return {"enabled": self.enabled, "slots": self.slots, "workers": self.workers, "seconds": self.seconds,
                "gpu_addresses": self.gpu_addresses, "gpu_devices": self.gpu_devices}
