"""The choice of mode, made once per run: where the vectors are kept (see ``vectors``).

A new mode is one module with a ``Vectors`` subclass, and one line in ``MODES``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from extractor.driver.collected import CollectedVectors, collect_misfit, collect_need
from extractor.driver.distributed import DistributedVectors, largest_result_bytes
from extractor.driver.vectors import Vectors
from extractor.errors import JobError

MODES: dict[str, type[Vectors]] = {mode.name: mode for mode in (CollectedVectors, DistributedVectors)}


@dataclass(frozen=True)
class ModeChoice:
    requested: str               # --collect: auto, always, never
    used: str                    # a key of MODES
    reason: str
    estimate_gb: dict            # what collecting would need: driver_jvm, driver_python

    def gather(self, sc, records) -> Vectors:
        return MODES[self.used].gather(sc, records)

    def as_manifest(self) -> dict:
        return {"requested": self.requested, "used": self.used, "reason": self.reason,
                "estimate_gb": self.estimate_gb}


def choose_mode(collect: str, n_images: int, dim: int, driver_memory: str, heap_bytes: int,
                logger: logging.Logger, max_result: tuple[str, int] = ("0", 0)) -> ModeChoice:
    """The mode for ``--collect`` and a driver of ``heap_bytes`` (``driver_memory`` as set) whose
    actions may return ``max_result`` (spark.driver.maxResultSize as set and in bytes, 0 for no
    limit); refuses, before any compute, a forced collect that would not fit the driver, and a
    distributed run whose largest result (a block of the PCA's moments) the limit would refuse."""
    jvm_need, python_need = collect_need(n_images, dim)
    misfit = collect_misfit(n_images, dim, driver_memory, heap_bytes, max_result)
    logger.info("collect estimate: %d x %d float32 = %.2f GB in the driver JVM (spark.driver.memory %s, "
                "spark.driver.maxResultSize %s) and %.2f GB in the Python driver: %s", n_images, dim,
                jvm_need / 1e9, driver_memory, max_result[0], python_need / 1e9, misfit or "fits")
    if collect == "always" and misfit:
        raise JobError(misfit)
    collected = collect == "always" or (collect == "auto" and not misfit)
    used = CollectedVectors.name if collected else DistributedVectors.name
    largest = largest_result_bytes(dim)
    if not collected and max_result[1] and largest > max_result[1]:
        raise JobError(f"spark.driver.maxResultSize={max_result[0]} is below the "
                       f"{largest / 2**20:.0f} MiB that the distributed mode's largest result "
                       f"(a block of the PCA's {dim} x {dim} moments) needs: raise it (0 is no limit)")
    reason = {"always": "--collect always", "never": "--collect never"}.get(
        collect, "the vectors fit the driver" if not misfit else "the vectors would not fit the driver")
    logger.info("mode: %s (%s)", used, reason)
    return ModeChoice(collect, used, reason,
                      {"driver_jvm": round(jvm_need / 1e9, 3), "driver_python": round(python_need / 1e9, 3)})
