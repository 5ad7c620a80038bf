import numpy as np
import pytest

from extractor.results.pca import (assemble_blocks, choose_k, fit_pca, fit_pca_from_moments, merge, merge_blocks, moment_blocks,
                           moments)


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


# --- Moments: the covariance from statistics that Spark partitions compute and reduce ---

def random_tree_reduce(items, combine, rng):
    """Combine ``items`` pairwise in a random tree shape and argument order, as a shuffle may."""
    items = list(items)
    while len(items) > 1:
        i, j = sorted(rng.choice(len(items), size=2, replace=False))
        b, a = items.pop(j), items.pop(i)
        items.append(combine(a, b) if rng.random() < 0.5 else combine(b, a))
    return items[0]


def through_blocks(parts, d, rng, block_rows):
    """Moments per partition -> blocks -> reduce by block index -> assemble in shuffled order."""
    by_index = {}
    for part in parts:
        for index, block in moment_blocks(moments(part), block_rows):
            by_index.setdefault(index, []).append(block)
    merged = [(index, random_tree_reduce(blocks, merge_blocks, rng)) for index, blocks in by_index.items()]
    order = rng.permutation(len(merged))
    return assemble_blocks((merged[i] for i in order), d, block_rows)


def split(x, sizes):
    """Rows of ``x`` cut into consecutive partitions of the given sizes (0 for an empty one)."""
    assert sum(sizes) == len(x)
    return np.split(x, np.cumsum(sizes)[:-1])


def assert_same_moments(got, want, rtol=1e-9):
    assert got.n == want.n
    np.testing.assert_allclose(got.mean, want.mean, rtol=rtol, atol=rtol * np.abs(want.mean).max())
    # Off-diagonal entries can be ~0: measure the error against the matrix's scale.
    np.testing.assert_allclose(got.m2, want.m2, rtol=0, atol=rtol * np.abs(want.m2).max())


def offset_data(rng, n=600, d=12):
    return (rng.normal(size=(n, d)) * np.linspace(4, 0.5, d) + rng.normal(size=d) * 3 + 7).astype(np.float32)


def test_moments_match_the_definition():
    rng = np.random.default_rng(10)
    x = offset_data(rng)
    for chunk_rows in (8192, 50, 1):  # one chunk, several, one row per chunk
        m = moments(x, chunk_rows=chunk_rows)
        assert m.n == 600 and m.mean.dtype == m.m2.dtype == np.float64
        np.testing.assert_allclose(m.mean, x.astype(np.float64).mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(m.m2 / (m.n - 1), np.cov(x, rowvar=False), rtol=1e-10)
    empty = moments(np.empty((0, 12), dtype=np.float32))
    assert empty.n == 0 and not empty.mean.any() and not empty.m2.any()


@pytest.mark.parametrize("sizes", [
    [600],
    [300, 300],
    [1, 599],
    [0, 200, 0, 150, 250, 0],  # empty partitions are neutral
    [37] * 16 + [8],
])
def test_merge_equals_direct(sizes):
    rng = np.random.default_rng(11)
    x = offset_data(rng)
    direct = moments(x)
    parts = [moments(p) for p in split(x, sizes)]
    folded = parts[0]
    for p in parts[1:]:
        folded = merge(folded, p)
    assert_same_moments(folded, direct)
    assert_same_moments(random_tree_reduce(parts, merge, rng), direct)


def test_merge_with_empty_is_identity_and_checks_d():
    rng = np.random.default_rng(12)
    m = moments(offset_data(rng))
    empty = moments(np.empty((0, 12)))
    assert merge(m, empty) is m and merge(empty, m) is m
    assert merge(empty, empty).n == 0
    with pytest.raises(ValueError, match="d=12 and d=5"):
        merge(m, moments(np.ones((3, 5))))


@pytest.mark.parametrize("block_rows", [1, 5, 12, 256])  # last block shorter with 5; one block with 12, 256
def test_blocks_assembled_in_any_order_equal_direct(block_rows):
    rng = np.random.default_rng(13)
    x = offset_data(rng)
    direct = moments(x)
    for sizes in ([600], [0, 120, 80, 0, 400], [25] * 24):
        assert_same_moments(through_blocks(split(x, sizes), 12, rng, block_rows), direct)


def test_moment_blocks_cut_m2_by_rows():
    m = moments(np.random.default_rng(14).normal(size=(40, 12)))
    pairs = list(moment_blocks(m, block_rows=5))
    assert [i for i, _ in pairs] == [0, 1, 2]
    assert [(b.start, b.rows.shape) for _, b in pairs] == [(0, (5, 12)), (5, (5, 12)), (10, (2, 12))]
    np.testing.assert_array_equal(np.vstack([b.rows for _, b in pairs]), m.m2)


def test_assemble_rejects_missing_duplicate_and_mismatched_blocks():
    rng = np.random.default_rng(15)
    pairs = list(moment_blocks(moments(offset_data(rng)), block_rows=5))  # blocks 0, 1, 2
    with pytest.raises(ValueError, match=r"missing blocks \[1\] of 3"):
        assemble_blocks([pairs[0], pairs[2]], 12, block_rows=5)
    with pytest.raises(ValueError, match="block 2 arrived more than once"):
        assemble_blocks([pairs[2], pairs[0], pairs[1], pairs[2]], 12, block_rows=5)
    with pytest.raises(ValueError, match="block index 3 is outside 0..2"):
        assemble_blocks(pairs + [(3, pairs[2][1])], 12, block_rows=5)
    with pytest.raises(ValueError, match="block 0 should hold rows 0:4"):  # assembled with other block_rows
        assemble_blocks(pairs, 12, block_rows=4)
    other = moments(offset_data(rng, n=599))
    mixed = [pairs[0], pairs[1], list(moment_blocks(other, block_rows=5))[2]]
    with pytest.raises(ValueError, match="block 2 has n=599, earlier blocks n=600"):
        assemble_blocks(mixed, 12, block_rows=5)
    with pytest.raises(ValueError, match="cannot merge blocks of rows 0:5"):
        merge_blocks(pairs[0][1], pairs[1][1])


def test_fit_from_moments_equals_fit_pca_when_n_exceeds_d():
    rng = np.random.default_rng(16)
    x = offset_data(rng, n=2000, d=20)
    assembled = through_blocks(split(x, [0, 700, 13, 1287]), 20, rng, block_rows=6)
    for k, variance in ((None, 0.95), (20, None)):  # the chosen k, then every component
        want = fit_pca(x, k=k, variance=variance)
        got = fit_pca_from_moments(assembled, k=k, variance=variance)
        assert got.k == want.k and got.n_samples == 2000
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12)
        np.testing.assert_allclose(got.explained_variance_ratio, want.explained_variance_ratio, rtol=1e-9)
        np.testing.assert_allclose(got.components, want.components, rtol=0, atol=1e-8)
    assert 1 < fit_pca_from_moments(assembled).k < 20
    every = fit_pca_from_moments(assembled, k=20)  # and both are the PCA of the definition
    values, vectors = reference(x.astype(np.float64))
    np.testing.assert_allclose(every.explained_variance, values, rtol=1e-9)
    assert_same_up_to_sign(every.components, vectors, atol=1e-8)


def test_fit_from_moments_agrees_with_the_svd_path_when_n_is_at_most_d():
    rng = np.random.default_rng(17)
    x = offset_data(rng, n=30, d=50)
    m = through_blocks(split(x, [10, 0, 20]), 50, rng, block_rows=16)
    via_svd, via_moments = fit_pca(x), fit_pca_from_moments(m)
    # Rank n - 1: both find 29 components, not 50 (the rest are rounding around 0).
    assert via_svd.explained_variance.shape == via_moments.explained_variance.shape == (29,)
    assert via_moments.k == via_svd.k
    np.testing.assert_allclose(via_moments.explained_variance_ratio, via_svd.explained_variance_ratio,
                               rtol=1e-8, atol=1e-12)
    gaps = -np.diff(via_svd.explained_variance[:6]) / via_svd.explained_variance[0]
    assert (gaps > 1e-3).all()  # the top 5 are distinct, so their directions are defined
    top_svd, top_moments = fit_pca(x, k=5), fit_pca_from_moments(m, k=5)
    np.testing.assert_allclose(top_moments.components, top_svd.components, rtol=0, atol=1e-8)


def test_fit_from_moments_needs_two_vectors():
    with pytest.raises(ValueError, match="moments of 1"):
        fit_pca_from_moments(moments(np.ones((1, 4))))


def naive_covariance(x):
    """Uncentred sums in x's own dtype: sum x x^T - n mean mean^T, the formula to avoid."""
    n = len(x)
    total, squares = x.sum(axis=0), x.T @ x
    return (squares - np.outer(total, total) / x.dtype.type(n)) / x.dtype.type(n - 1)


@pytest.mark.parametrize("dtype,offset", [(np.float32, 1e3), (np.float64, 1e6)])
def test_covariance_survives_a_large_common_offset(dtype, offset):
    rng = np.random.default_rng(18)
    x = (offset + rng.normal(size=(6000, 8))).astype(dtype)  # std 1 under a large mean
    want = np.cov(x.astype(np.float64), rowvar=False)

    def error(cov):
        return np.linalg.norm(cov - want) / np.linalg.norm(want)

    assert error(naive_covariance(x)) > 1e-6  # the bound below is not met by accident
    m = moments(x, chunk_rows=1000)
    assert error(m.m2 / (m.n - 1)) < 1e-6
    merged = random_tree_reduce([moments(p) for p in split(x, [2500, 0, 1, 3499])], merge, rng)
    assert error(merged.m2 / (merged.n - 1)) < 1e-6


def test_realistic_shape_4096_by_300_in_7_partitions():
    rng = np.random.default_rng(19)
    d = 4096
    x = np.abs(rng.normal(size=(300, d))).astype(np.float32) * 2  # fc2 outputs are ReLUs: >= 0
    sizes = [61, 0, 44, 90, 1, 57, 47]
    # Reduce as Spark's map-side combine would: one running block per index, partitions in any
    # order, so that this test holds two (d, d) matrices at a time rather than seven.
    running = {}
    for p in rng.permutation(len(sizes)):
        for index, block in moment_blocks(moments(split(x, sizes)[p])):
            running[index] = merge_blocks(running[index], block) if index in running else block
    assert sorted(running) == list(range(16))  # 4096 / 256
    assembled = assemble_blocks(((i, running[i]) for i in rng.permutation(16)), d)
    assert_same_moments(assembled, moments(x))
    np.testing.assert_allclose(assembled.m2[:64, :64] / 299, np.cov(x[:, :64], rowvar=False), rtol=1e-9, atol=1e-12)
