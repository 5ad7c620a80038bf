"""The scatter's sample and the report's page, without Spark."""

from collections import Counter

import numpy as np
import pytest

from extractor.results import report, scatter


def rows(n_per_fruit, fruits=("Apple", "Kiwi", "Pear")):
    paths = [f"s3://b/in/{fruit}/{i:03d}.jpg" for fruit in fruits for i in range(n_per_fruit)]
    labels = [fruit for fruit in fruits for _ in range(n_per_fruit)]
    projections = np.random.default_rng(0).normal(size=(len(paths), 3)).astype(np.float32)
    return paths, labels, projections


def test_the_sample_does_not_depend_on_the_partitioning():
    paths, labels, projections = rows(50)
    whole = scatter.lowest_per_fruit(scatter.candidates(paths, labels, projections, 7), 7)
    for cuts in ([40], [10, 75, 76, 120], list(range(5, 150, 11))):
        parts = []
        for start, end in zip([0, *cuts], [*cuts, len(paths)]):
            parts += scatter.candidates(paths[start:end], labels[start:end], projections[start:end], 7)
        assert scatter.lowest_per_fruit(parts, 7) == whole
    assert Counter(p.label for p in whole) == {"Apple": 7, "Kiwi": 7, "Pear": 7}
    ranks = sorted(scatter.rank(p) for p in paths if p.startswith("s3://b/in/Kiwi/"))[:7]
    assert sorted(scatter.rank(p.path) for p in whole if p.label == "Kiwi") == ranks


def test_quota_and_the_points_file_round_trip():
    assert scatter.quota(3) == 1000 and scatter.quota(131) == 22 and scatter.quota(5000) == 1
    paths, labels, projections = rows(4)
    points = scatter.candidates(paths, labels, projections[:, :1], 10)   # one component: y = 0
    assert all(p.y == 0.0 for p in points)
    body = scatter.points_csv(points)
    assert body.startswith(b"path,label,pc_0,pc_1\n")
    assert scatter.read_points_csv(body) == points
    with pytest.raises(ValueError, match="not a pca_scatter.csv"):
        scatter.read_points_csv(b"path,label,dim_0\n")


def test_many_fruits_get_distinct_colours_and_a_legend_in_columns():
    fruits = [f"Fruit {i:03d}" for i in range(70)]
    paths, labels, projections = rows(2, fruits)
    figure = scatter.scatter_figure(scatter.candidates(paths, labels, projections, 2), 2)
    legend = figure.axes[0].get_legend()
    assert len(legend.get_texts()) == 70 and legend._ncols == 3
    colours = {tuple(np.round(c.get_facecolor()[0], 4)) for c in figure.axes[0].collections}
    assert len(colours) == 70
    assert scatter.scatter_png([], 1)[:8] == b"\x89PNG\r\n\x1a\n"   # no point: an empty plot, not a failure


def test_the_report_escapes_what_it_shows_and_groups_reasons():
    manifest = {"status": "succeeded", "output": "s3://b/out/", "counts": {
        "listed": 3, "featurized": 1, "failed": 2,
        "per_fruit": {"<b>Kiwi</b>": {"file": "x.csv", "featurized": 1, "failed": 2}}}}
    errors = (b"path,label,error\n"
              b"s3://b/in/K/1.jpg,<b>Kiwi</b>,too large: 20000x20000 pixels (limit 1)\n"
              b"s3://b/in/K/2.jpg,<b>Kiwi</b>,too large: 30000x30000 pixels (limit 1)\n")
    reasons, failures = report.errors_from_csv(errors)
    assert reasons == {"too large": 2} and len(failures) == 2
    page = report.report_html(manifest, reasons, failures, {"a.png": None}).decode()
    assert "<b>Kiwi</b>" not in page and "&lt;b&gt;Kiwi&lt;/b&gt;" in page
    assert 'data-field="counts.failed" data-value="2"' in page and "<img" not in page
    assert report.reason_kind("cannot decode: ValueError: x") == "cannot decode"
