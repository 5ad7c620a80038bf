"""PCA with numpy on the driver: centred SVD when n <= d, else eigendecomposition of the covariance.

The covariance can also come from ``Moments`` computed per Spark partition, cut into row
blocks (``moment_blocks``), reduced by block index (``merge_blocks``) and put back together on
the driver (``assemble_blocks``) for ``fit_pca_from_moments``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

GRAM_CHUNK_ROWS = 8192  # bounds the float64 copy made while accumulating the covariance
BLOCK_ROWS = 256  # rows of m2 per Spark record: 256 x 4096 float64 = 8 MB


@dataclass
class PCAModel:
    mean: np.ndarray                      # (d,) float64
    components: np.ndarray                # (k, d) float64, unit rows, by decreasing variance
    explained_variance: np.ndarray        # (r,) float64, every component found, decreasing
    explained_variance_ratio: np.ndarray  # (r,) float64
    n_samples: int

    @property
    def k(self) -> int:
        return self.components.shape[0]

    @property
    def cumulative_ratio(self) -> float:
        """Share of the total variance kept by the first k components."""
        return float(self.explained_variance_ratio[: self.k].sum())

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(n, d)`` -> ``(n, k)`` float32 projections."""
        return ((np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T).astype(np.float32)


def choose_k(ratios: np.ndarray, k: int | None = None, variance: float | None = None) -> int:
    """``k`` if given (at most the number of components), else the smallest k whose
    cumulative explained variance ratio reaches ``variance``."""
    available = len(ratios)
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return min(k, available)
    if variance is None or not 0 < variance <= 1:
        raise ValueError(f"variance must be in (0, 1], got {variance!r}")
    cumulative = np.cumsum(ratios)
    if cumulative[-1] <= 0:  # every vector identical: one component says all there is
        return 1
    # A small tolerance so that variance=1.0 is reached despite rounding.
    return int(min(np.searchsorted(cumulative, variance - 1e-9) + 1, available))


def fit_pca(x: np.ndarray, k: int | None = None, variance: float | None = 0.95) -> PCAModel:
    """Fit on ``(n, d)`` vectors (n >= 2); components' signs fixed so runs are reproducible."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"fit_pca needs (n, d) vectors, got shape {x.shape}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 vectors, got {n}")
    if n > d:
        return fit_pca_from_moments(moments(x), k, variance)
    mean = x.mean(axis=0, dtype=np.float64)
    centred = x.astype(np.float64) - mean
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    # The last of n centred rows is a combination of the others: rank <= n - 1.
    variances = singular[: n - 1] ** 2 / (n - 1)
    return _model(mean, variances, vt[: n - 1], n, k, variance)


def fit_pca_from_moments(m: Moments, k: int | None = None, variance: float | None = 0.95) -> PCAModel:
    """Fit from the moments of n >= 2 vectors; the same model as ``fit_pca`` on those vectors."""
    if m.n < 2:
        raise ValueError(f"PCA needs at least 2 vectors, got moments of {m.n}")
    # eigh of m2 rather than of m2 / (n - 1): same eigenvectors, and no second (d, d) copy.
    values, vectors = np.linalg.eigh(m.m2)
    rank = min(m.n - 1, len(values))  # n centred rows span at most n - 1 directions
    order = np.argsort(values)[::-1][:rank]
    # Rounding leaves tiny negative eigenvalues where the true ones are 0.
    variances = np.clip(values[order] / (m.n - 1), 0, None)
    return _model(m.mean, variances, vectors[:, order].T, m.n, k, variance)


def _model(mean: np.ndarray, variances: np.ndarray, directions: np.ndarray, n: int,
           k: int | None, variance: float | None) -> PCAModel:
    """The model from every component found: ``variances`` (r,) decreasing, ``directions`` (r, d)."""
    total = variances.sum()
    ratios = variances / total if total > 0 else np.zeros_like(variances)
    kept = choose_k(ratios, k, variance)
    return PCAModel(mean, _fix_signs(directions[:kept]), variances, ratios, n)


@dataclass(eq=False)  # == on arrays is ambiguous; compare fields with numpy
class Moments:
    """Sufficient statistics of n vectors for their covariance: ``m2 / (n - 1)``.

    ``mean`` (d,) float64; ``m2`` (d, d) float64 = sum over rows of (x - mean)(x - mean)^T.
    n = 0 (mean and m2 zeros) is the neutral element of ``merge``.
    """
    n: int
    mean: np.ndarray
    m2: np.ndarray

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"Moments n must be >= 0, got {self.n}")
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if d < 0 or self.m2.shape != (d, d):
            raise ValueError(f"Moments need mean (d,) and m2 (d, d), got {self.mean.shape} and {self.m2.shape}")

    @property
    def d(self) -> int:
        return self.mean.shape[0]


@dataclass(eq=False)  # == on arrays is ambiguous; compare fields with numpy
class MomentBlock:
    """Rows ``start:start + r`` of a ``Moments``' m2, with its n and full mean.

    ``mean`` (d,) float64; ``rows`` (r, d) float64. Small enough to be one Spark record
    (256 rows of d = 4096: 8 MB) where the whole m2 (134 MB) is not.
    """
    n: int
    mean: np.ndarray
    start: int
    rows: np.ndarray

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"MomentBlock n must be >= 0, got {self.n}")
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if d < 0 or self.rows.ndim != 2 or self.rows.shape[1] != d:
            raise ValueError(f"MomentBlock needs mean (d,) and rows (r, d), got {self.mean.shape} and {self.rows.shape}")
        if not 0 <= self.start <= self.start + self.rows.shape[0] <= d:
            raise ValueError(f"MomentBlock rows {self.start}:{self.start + self.rows.shape[0]} are outside 0:{d}")


def moments(x: np.ndarray, chunk_rows: int = GRAM_CHUNK_ROWS) -> Moments:
    """Moments of ``(n, d)`` vectors (any float dtype; n = 0 allowed), accumulated in float64
    ``chunk_rows`` rows at a time."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"moments needs (n, d) vectors, got shape {x.shape}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    n_total, d = x.shape
    n, mean, m2 = 0, np.zeros(d), np.zeros((d, d))
    for start in range(0, n_total, chunk_rows):
        chunk = x[start:start + chunk_rows].astype(np.float64)  # the one float64 copy of the chunk
        chunk_mean = chunk.mean(axis=0)
        # Centring on the chunk's own mean before squaring keeps a large common offset
        # from swamping the variance (an uncentred sum of squares loses it to rounding).
        chunk -= chunk_mean
        m2 += chunk.T @ chunk
        n, mean, delta, weight = _combine(n, mean, len(chunk), chunk_mean)
        m2 += np.outer(delta * weight, delta)
    return Moments(n, mean, m2)


def merge(a: Moments, b: Moments) -> Moments:
    """Moments of the union of both sets of vectors; inputs are not modified (the result
    may be one of them when the other is empty)."""
    if a.d != b.d:
        raise ValueError(f"cannot merge moments of d={a.d} and d={b.d}")
    if b.n == 0:
        return a
    if a.n == 0:
        return b
    n, mean, delta, weight = _combine(a.n, a.mean, b.n, b.mean)
    m2 = a.m2 + b.m2
    m2 += np.outer(delta * weight, delta)
    return Moments(n, mean, m2)


def moment_blocks(m: Moments, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, MomentBlock]]:
    """``(index, block)`` for each ``block_rows`` rows of ``m.m2`` (the last may be shorter);
    blocks are views of ``m``."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    for index, start in enumerate(range(0, m.d, block_rows)):
        yield index, MomentBlock(m.n, m.mean, start, m.m2[start:start + block_rows])


def merge_blocks(a: MomentBlock, b: MomentBlock) -> MomentBlock:
    """The block of ``merge`` of the two blocks' moments; both must cover the same rows."""
    if a.start != b.start or a.rows.shape != b.rows.shape:
        raise ValueError(f"cannot merge blocks of rows {a.start}:{a.start + len(a.rows)} (d={a.mean.shape[0]}) "
                         f"and {b.start}:{b.start + len(b.rows)} (d={b.mean.shape[0]})")
    if b.n == 0:
        return a
    if a.n == 0:
        return b
    n, mean, delta, weight = _combine(a.n, a.mean, b.n, b.mean)
    rows = a.rows + b.rows
    rows += np.outer(delta[a.start:a.start + len(a.rows)] * weight, delta)
    return MomentBlock(n, mean, a.start, rows)


def assemble_blocks(pairs: Iterable[tuple[int, MomentBlock]], d: int, block_rows: int = BLOCK_ROWS) -> Moments:
    """``Moments`` of dimension d from its ``moment_blocks`` (same ``block_rows``), in any order,
    consumed one at a time: the only (d, d) float64 held is the result."""
    if d < 1 or block_rows < 1:
        raise ValueError(f"d and block_rows must be >= 1, got d={d}, block_rows={block_rows}")
    expected = -(-d // block_rows)
    m2 = np.empty((d, d))
    seen = np.zeros(expected, dtype=bool)
    n, mean = None, None
    for index, block in pairs:
        if not 0 <= index < expected:
            raise ValueError(f"block index {index} is outside 0..{expected - 1} (d={d}, block_rows={block_rows})")
        if seen[index]:
            raise ValueError(f"block {index} arrived more than once")
        start = index * block_rows
        shape = (min(block_rows, d - start), d)
        if block.start != start or block.rows.shape != shape:
            raise ValueError(f"block {index} should hold rows {start}:{start + shape[0]} of width {d}, "
                             f"got rows {block.start}:{block.start + len(block.rows)} of shape {block.rows.shape}")
        if n is None:
            n, mean = block.n, block.mean
        elif block.n != n:
            raise ValueError(f"block {index} has n={block.n}, earlier blocks n={n}")
        m2[start:start + shape[0]] = block.rows
        seen[index] = True
    if not seen.all():
        missing = np.flatnonzero(~seen).tolist()
        raise ValueError(f"missing blocks {missing} of {expected}")
    return Moments(n, np.array(mean, dtype=np.float64), m2)


def _combine(n_a: int, mean_a: np.ndarray, n_b: int, mean_b: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, float]:
    """Chan et al.'s parallel update (n_a + n_b > 0): merged count and mean, and ``delta``
    and ``weight`` such that m2 = m2_a + m2_b + weight * outer(delta, delta)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), delta, n_a * n_b / n


def _fix_signs(components: np.ndarray) -> np.ndarray:
    """Make the largest-magnitude coefficient of each component positive (like sklearn)."""
    pivots = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(len(components)), pivots])
    signs[signs == 0] = 1
    return components * signs[:, None]
