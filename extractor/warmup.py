"""Both halves of the warm-up: a Spark job, started in a thread on the driver, whose tasks make
every Python worker import TensorFlow and build and trace the model while the driver loads the
weights. Seconds of each worker's start-up hidden behind the driver's; only an optimisation:
if it fails, the featurize tasks build the model themselves.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import partial

from .models import get_spec
from .spark import failure_summary
from .worker import compiled_model


def warm_up_task(partition, *, model_name: str, threads: int, precision: str):
    """mapPartitions entry point: imports TensorFlow and builds and traces the model in this
    Python worker, so the first real task only sets weights. Yields (pid, seconds)."""
    start = time.perf_counter()
    for _ in partition:
        pass
    compiled_model(get_spec(model_name), threads, precision)
    yield os.getpid(), round(time.perf_counter() - start, 3)


class WarmUp:
    """The driver's half: one task per executor slot, in a thread, cancellable."""

    GROUP = "fruits-warm-up"

    def __init__(self, sc, spec, precision: str, logger: logging.Logger):
        self.sc, self.logger = sc, logger
        self.seconds: float | None = None
        self.workers = 0
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
        self.workers = len({pid for pid, _ in results})
        self.logger.info("warm-up: %d Python worker(s) imported TensorFlow and built the model in %.1f s",
                         self.workers, self.seconds)

    def wait(self) -> None:
        """Let the warm-up tasks end first: a featurize task beside them would start a second worker."""
        if self.enabled:
            self.thread.join()

    def cancel(self) -> None:
        if self.enabled and self.thread.is_alive():
            self.sc.cancelJobGroup(self.GROUP)
            self.thread.join(timeout=30)

    def as_dict(self) -> dict:
        return {"enabled": self.enabled, "slots": self.slots, "workers": self.workers, "seconds": self.seconds}
