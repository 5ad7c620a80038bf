"""The featurized images, wherever they are kept: what every mode offers the job.

A mode (``collected``: vectors on the driver; ``distributed``: vectors persisted on the
executors) is one subclass of ``Vectors``, registered in ``modes``. The job asks each the same
things, in this order: its summary, a PCA fit, the per-fruit files, then release.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field

from extractor.errors import JobError
from extractor.records import ImageFailure


@dataclass
class Summary:
    """Per-fruit counts of one featurize stage, a few failures for the log, every task's stats."""

    featurized: Counter                      # label -> images featurized
    failed: Counter                          # label -> images that failed
    examples: list[ImageFailure]             # the first failures, sorted by key
    stats: list[dict] = field(default_factory=list)   # one per partition (TaskStats)
    collected_at: float | None = None        # epoch s the vectors reached the driver (collect mode)
    reasons: Counter = field(default_factory=Counter)  # failure reason kind -> images (report.reason_kind)

    def counts(self, listed_by_label: Counter, task_counts: dict) -> dict:
        """The manifest's counts, once every listed image is accounted for, fruit by fruit
        (``listed_by_label``: label -> images listed); ``task_counts``: the tasks' counts summed
        (reused, removed, forwarded, downloaded). JobError otherwise."""
        task = Counter(task_counts)
        featurized, failed = sum(self.featurized.values()), sum(self.failed.values())
        listed = sum(listed_by_label.values())
        # The driver may not hold the keys (the distributed listing, the distributed mode): it
        # compares counts per fruit, so an image lost in one folder while another came back twice
        # in another still fails the run.
        back = self.featurized + self.failed
        wrong = sorted(label for label in set(listed_by_label) | set(back) if back[label] != listed_by_label[label])
        if wrong:   # (equal counts in every folder make equal totals)
            shown = ", ".join(f"{label!r}: listed {listed_by_label[label]}, got back {back[label]}"
                              for label in wrong[:3])
            raise JobError(f"accounting failed: listed {listed}, got back {featurized} featurized + {failed} failed"
                           + (f" ({len(wrong)} folders differ: {shown})" if wrong else ""))
        # new: listed keys without a reusable stored vector (all of them outside --incremental).
        return {"listed": listed, "featurized": featurized, "failed": failed, "new": listed - task["reused"],
                "reused": task["reused"], "removed": task["removed"], "forwarded": task["forwarded"],
                "downloaded": task["downloaded"]}


class Vectors(ABC):
    """One mode's hold on the featurized images. ``gather`` runs the featurize stage's RDD."""

    name: str = ""

    def __init__(self, summary: Summary):
        self.summary = summary

    @classmethod
    @abstractmethod
    def gather(cls, sc, records) -> "Vectors":
        """Compute ``records`` (the featurize RDD) and keep the vectors this mode's way; a
        Spark failure is raised as it comes (the job words it)."""

    @abstractmethod
    def fit_pca(self, sc, dim: int, k: int | None, variance: float | None, progress=None):
        """The PCAModel of every featurized vector (at least 2); ``progress``: a
        ProgressReporter for the Spark jobs this takes, if any."""

    @abstractmethod
    def write(self, sc, writer, cfg, names: dict[str, str], dim: int, pca_model, run_id: str, *,
              per_fruit: int = 1, progress=None) -> list:
        """``features/``, ``pca/`` (when ``pca_model``) and ``errors.csv`` through ``writer``
        (an OutputWriter), in the order: per fruit features then pca, fruits sorted, errors last.
        Returns the scatter's points (``scatter.Point``, at most ``per_fruit`` per fruit, the
        same in every mode; none without ``pca_model``)."""

    def release(self) -> None:
        """Free what the mode holds (cached blocks); called once, whatever happened."""
