"""What a featurize task yields, as named types, and the one fold of them.

A partition's task yields ``FeatureBlock`` records (up to a batch of rows), one ``ImageFailure``
per listed image that could not be featurized, and one ``TaskStats`` last. They are pickled
between the executors and the driver, so they stay plain tuples underneath.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Union

import numpy as np

FAILURE_EXAMPLES = 20   # the first failures by key a run names: in its summary, its log and report.html


class FeatureBlock(NamedTuple):
    keys: list[str]
    labels: list[str]
    vectors: np.ndarray        # (len(keys), d) float32


class ImageFailure(NamedTuple):
    key: str
    label: str
    reason: str                # one line for errors.csv


class TaskStats(NamedTuple):
    stats: dict                # featurize.PartitionStats.as_dict(), plus the partition's counts


Record = Union[FeatureBlock, ImageFailure, TaskStats]


def key_order(keys: list[str]) -> np.ndarray:
    """Indices that sort ``keys`` as Python sorts strings (code points), ties in input order."""
    return np.argsort(np.asarray(keys, dtype=object), kind="stable")


@dataclass
class Fold:
    """Records gathered: rows (keys, labels and, unless ``keep_vectors`` is off, their vector
    blocks), failures and task stats, in arrival order."""

    keep_vectors: bool = True
    keys: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    blocks: list[np.ndarray] = field(default_factory=list)
    failures: list[ImageFailure] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)

    def add(self, record: Record) -> None:
        if isinstance(record, FeatureBlock):
            self.keys.extend(record.keys)
            self.labels.extend(record.labels)
            if self.keep_vectors:
                self.blocks.append(record.vectors)
        elif isinstance(record, ImageFailure):
            self.failures.append(record)
        elif isinstance(record, TaskStats):
            self.stats.append(record.stats)
        else:
            raise TypeError(f"not a featurize record: {type(record).__name__}")

    @property
    def returned(self) -> int:
        """Listed images accounted for: featurized rows plus failures."""
        return len(self.keys) + len(self.failures)

    def rows(self, dim: int = 0) -> FeatureBlock:
        """Every row sorted by key, as one block: vectors ``(n, d)`` float32 (``(0, dim)`` if none)."""
        order = key_order(self.keys)
        vectors = np.concatenate(self.blocks) if self.blocks else np.zeros((0, dim), np.float32)
        return FeatureBlock([self.keys[i] for i in order], [self.labels[i] for i in order], vectors[order])


def fold(records: Iterable[Record], keep_vectors: bool = True) -> Fold:
    """All of ``records`` in one ``Fold``."""
    folded = Fold(keep_vectors)
    for record in records:
        folded.add(record)
    return folded
