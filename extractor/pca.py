"""PCA with numpy on the driver: centred SVD when n <= d, else eigendecomposition of the covariance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRAM_CHUNK_ROWS = 8192  # bounds the float64 copy made while accumulating the covariance


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
    n, d = x.shape
    if n < 2:
        raise ValueError(f"PCA needs at least 2 vectors, got {n}")
    mean = x.mean(axis=0, dtype=np.float64)
    if n <= d:
        centred = x.astype(np.float64) - mean
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        # The last of n centred rows is a combination of the others: rank <= n - 1.
        variances = singular[: n - 1] ** 2 / (n - 1)
        directions = vt[: n - 1]
    else:
        variances, directions = _covariance_eigen(x, mean)
    total = variances.sum()
    ratios = variances / total if total > 0 else np.zeros_like(variances)
    kept = choose_k(ratios, k, variance)
    components = _fix_signs(directions[:kept])
    return PCAModel(mean, components, variances, ratios, n)


def _covariance_eigen(x: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, d = x.shape
    gram = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, GRAM_CHUNK_ROWS):
        chunk = x[start:start + GRAM_CHUNK_ROWS].astype(np.float64) - mean
        gram += chunk.T @ chunk
    values, vectors = np.linalg.eigh(gram / (n - 1))
    order = np.argsort(values)[::-1]
    return np.clip(values[order], 0, None), vectors[:, order].T


def _fix_signs(components: np.ndarray) -> np.ndarray:
    """Make the largest-magnitude coefficient of each component positive (like sklearn)."""
    pivots = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(len(components)), pivots])
    signs[signs == 0] = 1
    return components * signs[:, None]
