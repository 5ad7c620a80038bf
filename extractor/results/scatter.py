"""The PCA scatter: a reproducible sample of the images on the first two principal components.

Which images are drawn depends on nothing but their paths: each fruit keeps the ``quota``
images whose sha256(path) ranks lowest. A partition can pick its own candidates (its lowest
``quota`` per fruit) without seeing the others, so in the distributed mode the executors
sample and only the candidates reach the driver, which keeps the lowest ``quota`` overall:
the same points whatever the partitioning or the mode.

``pca_scatter.csv`` holds the points drawn (``path,label,pc_0,pc_1``), so that ``forget`` can
take an erased photo's point out of it and redraw ``pca_scatter.png`` from it.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import io
import math
from typing import Iterable, NamedTuple, Sequence

import numpy as np

MAX_POINTS = 3000            # over all fruits; each fruit gets an equal share
HEADER = "path,label,pc_0,pc_1"


class Point(NamedTuple):
    path: str                # s3:// URI of the photo
    label: str
    x: float                 # first principal component
    y: float                 # second (0 when the PCA kept one component)


def quota(n_fruits: int, max_points: int = MAX_POINTS) -> int:
    """Points per fruit: an equal share of ``max_points``, at least 1."""
    return max(1, max_points // max(1, n_fruits))


def axis_ratios(explained_variance_ratio) -> list[float]:
    """The first two components' shares of variance as the manifest keeps them (and the axes show)."""
    return [round(float(r), 6) for r in list(explained_variance_ratio)[:2]]


def rank(path: str) -> int:
    """The sampling order of a photo: the first 8 bytes of sha256(path)."""
    return int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big")


def lowest_per_fruit(points: Iterable[Point], per_fruit: int) -> list[Point]:
    """The ``per_fruit`` points of lowest rank of each fruit, sorted by (label, path)."""
    by_label: dict[str, list[Point]] = {}
    for point in points:
        by_label.setdefault(point.label, []).append(point)
    chosen = []
    for label in sorted(by_label):
        chosen += sorted(heapq.nsmallest(per_fruit, by_label[label], key=lambda p: (rank(p.path), p.path)),
                         key=lambda p: p.path)
    return chosen


def candidates(paths: Sequence[str], labels: Sequence[str], projections: np.ndarray, per_fruit: int) -> list[Point]:
    """The points of these rows (``projections``: (n, k) float32, k >= 1) that could be drawn."""
    if not len(paths):
        return []
    xy = np.zeros((len(paths), 2), dtype=np.float64)
    width = min(2, projections.shape[1])
    xy[:, :width] = projections[:, :width]
    return lowest_per_fruit((Point(p, l, _as_written(x), _as_written(y))
                             for p, l, (x, y) in zip(paths, labels, xy.tolist())), per_fruit)


def _as_written(value: float) -> float:
    """The value as pca_scatter.csv holds it: the job and ``forget`` draw the very same numbers."""
    return float(f"{np.float32(value):.9g}")


def points_csv(points: Sequence[Point]) -> bytes:
    """``pca_scatter.csv``: float32 coordinates written with 9 significant digits (exact)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    out.write(HEADER + "\n")
    for point in points:
        writer.writerow([point.path, point.label, f"{np.float32(point.x):.9g}", f"{np.float32(point.y):.9g}"])
    return out.getvalue().encode("utf-8")


def read_points_csv(body: bytes) -> list[Point]:
    """The points of a ``pca_scatter.csv``; ValueError naming what is wrong."""
    rows = list(csv.reader(io.StringIO(body.decode("utf-8"))))
    if not rows or ",".join(rows[0]) != HEADER:
        raise ValueError(f"not a pca_scatter.csv: header {rows[0] if rows else None!r}, expected {HEADER!r}")
    try:
        return [Point(path, label, float(x), float(y)) for path, label, x, y in rows[1:]]
    except ValueError as exc:
        raise ValueError(f"not a pca_scatter.csv: {exc}") from None


def colours(n: int) -> list:
    """One colour per fruit: the qualitative tables while they suffice, then evenly spread hues."""
    import matplotlib

    if n <= 10:
        return list(matplotlib.colormaps["tab10"].colors[:n])
    if n <= 20:
        return list(matplotlib.colormaps["tab20"].colors[:n])
    return list(matplotlib.colormaps["turbo"](np.linspace(0.0, 1.0, n)))


def scatter_figure(points: Sequence[Point], per_fruit: int, variance_ratios: Sequence[float] = ()):
    """The matplotlib Figure: one colour and one legend entry per fruit (labels sorted)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    labels = sorted({point.label for point in points})
    columns = max(1, math.ceil(len(labels) / 30))
    figure = Figure(figsize=(7.5 + 2.4 * columns, 6), dpi=100)
    axes = figure.subplots()
    for label, colour in zip(labels, colours(len(labels))):
        xy = np.array([(p.x, p.y) for p in points if p.label == label], dtype=np.float64)
        axes.scatter(xy[:, 0], xy[:, 1], s=10, color=colour, alpha=0.75, linewidths=0, label=label)
    names = [f"PC{i + 1}" + (f" ({variance_ratios[i]:.1%} of variance)" if i < len(variance_ratios) else "")
             for i in range(2)]
    axes.set_xlabel(names[0])
    axes.set_ylabel(names[1])
    axes.set_title(f"{len(points):,} images on the first two principal components "
                   f"(at most {per_fruit:,} per fruit, sampled by path)", fontsize=10)
    axes.grid(alpha=0.3)
    if labels:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=columns, fontsize=8 if len(labels) <= 20 else 6,
                    markerscale=1.5, frameon=False, title="fruit")
    return figure


def scatter_png(points: Sequence[Point], per_fruit: int, variance_ratios: Sequence[float] = ()) -> bytes:
    buffer = io.BytesIO()
    scatter_figure(points, per_fruit, variance_ratios).savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()
