"""What "the same vectors" means between two runs, stated once for the whole suite.

TensorFlow's CPU kernels (oneDNN) pick their blocking and summation order by the batch size, an
image's position in its batch and the CPU's instruction set, so one image's float32 vector can
differ in its last bits between batchings. Measured 2026-12-06 with the job's own forward on 8
photos (one batch of 8 against one at a time, 3 + 3 + 2, reversed), on an AVX-512 Xeon and with
oneDNN held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``, as on the AMD EPYC without AVX-512 where the
suite used to fail): the largest difference is 3.8e-6 of the row's largest value (VGG16, one at
a time), 1.9e-7 for the tiny test model (which on AVX-512 does not depend on its batch at all).
Element by element, a value near zero can differ by 0.2 % of itself: only the row's scale bounds
the error. Hence two guarantees, and each test says which one it checks:

- **byte-identical** where the images met the same batches (a re-run of the same input, collect
  vs distributed on the same partitions, a task retried elsewhere, vectors reused from the state
  and written again): ``==`` on bytes;
- **within float32 rounding** where they did not (incremental vs full, another ``--batch-size``
  or ``--partitions``, the job's forward vs Keras' ``predict``): element-wise
  ``|got - want| <= RTOL * |want| + ATOL * max|want row|``, ATOL five times the largest
  difference measured (about 170 float32 ulps of the row's largest value): far below what a real
  change does (bfloat16 moves vectors by ~1 %, draft decoding by ~2 %).

PCA outputs move more than the vectors they come from (a component is an eigenvector: its
perturbation grows as the eigenvalue gap shrinks), so they are compared on the leading
components only, with a looser bound relative to the largest projection (PCA_RTOL).
"""

from __future__ import annotations

import io

import numpy as np

RTOL = 1e-5       # of the value itself
ATOL = 2e-5       # of the largest |value| of the row it is in
PCA_RTOL = 1e-4   # of the largest |value| of the compared projections
COMPONENT_ATOL = 1e-5   # a leading component (a unit vector), value by value
VARIANCE_ATOL = 1e-6    # a leading explained-variance ratio
PCA_COMPONENTS = 3


def assert_within_rounding(got, want, what: str = "") -> None:
    """``got`` and ``want`` (n, d) or (d,) equal within RTOL and ATOL (see the module doc)."""
    got, want = np.atleast_2d(np.asarray(got, np.float64)), np.atleast_2d(np.asarray(want, np.float64))
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bound = RTOL * np.abs(want) + ATOL * np.abs(want).max(axis=1, keepdims=True)
    excess = np.abs(got - want) - bound
    assert (excess <= 0).all(), (f"{what}: {int((excess > 0).sum())} of {got.size} values differ by more than "
                                 f"float32 rounding; worst at {np.unravel_index(excess.argmax(), got.shape)}: "
                                 f"{got.flat[excess.argmax()]!r} vs {want.flat[excess.argmax()]!r}")


def assert_same_table(got: bytes, want: bytes, fmt: str = "csv", what: str = "") -> None:
    """Two features files (CSV or Parquet bytes): the same paths and labels in the same order,
    vectors within float32 rounding."""
    from extractor.results.formats import read_table

    got_paths, got_labels, got_values = read_table(got, fmt)
    want_paths, want_labels, want_values = read_table(want, fmt)
    assert (got_paths, got_labels) == (want_paths, want_labels), what
    assert_within_rounding(got_values, want_values, what)


def assert_same_projections(got, want, what: str = "") -> None:
    """PCA projections (n, k): the first PCA_COMPONENTS columns within PCA_RTOL of the largest."""
    got, want = np.asarray(got)[:, :PCA_COMPONENTS], np.asarray(want)[:, :PCA_COMPONENTS]
    np.testing.assert_allclose(got, want, rtol=0, atol=PCA_RTOL * np.abs(want).max(), err_msg=what)


def assert_same_pca(got: dict[str, bytes], want: dict[str, bytes], fruits, fmt: str = "csv") -> None:
    """Two runs' PCA outputs (relative name -> bytes, as read from --output): the model's leading
    components and variance ratios, each fruit's projections and the scatter's points."""
    from extractor.results.formats import read_table
    from extractor.results.scatter import read_points_csv

    def arrays(body):
        with np.load(io.BytesIO(body)) as npz:
            return {name: npz[name] for name in npz.files}

    a, b = arrays(got["pca_model.npz"]), arrays(want["pca_model.npz"])
    assert a["components"].shape == b["components"].shape
    np.testing.assert_allclose(a["explained_variance_ratio"][:5], b["explained_variance_ratio"][:5],
                               rtol=0, atol=VARIANCE_ATOL)
    np.testing.assert_allclose(a["components"][:PCA_COMPONENTS], b["components"][:PCA_COMPONENTS],
                               rtol=0, atol=COMPONENT_ATOL)
    for fruit in fruits:
        pa, la, xa = read_table(got[f"pca/{fruit}.{fmt}"], fmt)
        pb, lb, xb = read_table(want[f"pca/{fruit}.{fmt}"], fmt)
        assert (pa, la) == (pb, lb), fruit
        assert_same_projections(xa, xb, fruit)
    sa, sb = read_points_csv(got["pca_scatter.csv"]), read_points_csv(want["pca_scatter.csv"])
    assert [(p.path, p.label) for p in sa] == [(p.path, p.label) for p in sb]
    assert_same_projections([(p.x, p.y) for p in sa], [(p.x, p.y) for p in sb], "pca_scatter.csv")
