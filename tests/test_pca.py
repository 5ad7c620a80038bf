import numpy as np
import pytest

from extractor.pca import choose_k, fit_pca


def reference(x):
    """Straight from the definition: eigenvectors of np.cov, sorted by decreasing variance."""
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order].T


def assert_same_up_to_sign(a, b, atol):
    for row_a, row_b in zip(a, b):
        sign = np.sign(row_a @ row_b)
        np.testing.assert_allclose(row_a, sign * row_b, atol=atol)


@pytest.mark.parametrize("n,d", [(30, 50), (400, 20)])  # SVD path (n <= d), covariance path (n > d)
def test_matches_numpy_definition(n, d):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(n, d)) * np.linspace(5, 0.5, d)).astype(np.float32) + 3
    model = fit_pca(x, k=5)
    values, vectors = reference(x.astype(np.float64))
    assert model.k == 5
    np.testing.assert_allclose(model.mean, x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(model.explained_variance[:5], values[:5], rtol=1e-6)
    np.testing.assert_allclose(model.explained_variance_ratio[:5], values[:5] / values.sum(), rtol=1e-6)
    assert_same_up_to_sign(model.components, vectors[:5], atol=1e-6)
    projected = (x - x.mean(axis=0)) @ model.components.T
    np.testing.assert_allclose(model.transform(x), projected, rtol=1e-4, atol=1e-4)


def test_svd_and_covariance_paths_agree():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 40)) @ rng.normal(size=(40, 40))
    via_svd = fit_pca(x, k=10)                     # n == d -> SVD
    via_cov = fit_pca(np.vstack([x, x]), k=10)    # duplicated rows: same directions, n > d
    np.testing.assert_allclose(via_svd.explained_variance_ratio[:10], via_cov.explained_variance_ratio[:10], rtol=1e-6)
    np.testing.assert_allclose(via_svd.components, via_cov.components, atol=1e-6)  # signs fixed the same way


def test_variance_target_picks_the_smallest_k():
    rng = np.random.default_rng(3)
    scales = np.array([10.0, 6.0, 3.0, 1.0, 0.5, 0.1])
    x = rng.normal(size=(5000, 6)) * scales
    model = fit_pca(x, variance=0.95)
    cumulative = np.cumsum(model.explained_variance_ratio)
    assert cumulative[model.k - 1] >= 0.95 > cumulative[model.k - 2]
    assert model.k == 3  # 100+36+9 of 146.26 = 99.2 %; 136/146.26 = 93 % is not enough
    assert fit_pca(x, variance=1.0).k == 6
    assert fit_pca(x, variance=0.5).k == 1


def test_choose_k_bounds():
    ratios = np.array([0.5, 0.3, 0.2])
    assert choose_k(ratios, k=10) == 3
    assert choose_k(ratios, variance=0.8) == 2
    assert choose_k(np.zeros(3), variance=0.9) == 1
    with pytest.raises(ValueError, match="got 0"):
        choose_k(ratios, k=0)
    with pytest.raises(ValueError, match="got 1.5"):
        choose_k(ratios, variance=1.5)


def test_needs_two_vectors():
    with pytest.raises(ValueError, match="at least 2"):
        fit_pca(np.ones((1, 4)))


def test_signs_are_deterministic():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 8))
    a, b = fit_pca(x, k=4), fit_pca(x[::-1].copy(), k=4)
    np.testing.assert_allclose(a.components, b.components, atol=1e-9)
    assert all(row[np.argmax(np.abs(row))] > 0 for row in a.components)
