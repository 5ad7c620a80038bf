"""``report.html``: one self-contained page for a person, made from what the run wrote.

The run's figures come from the manifest (so that the page and ``manifest.json`` cannot
disagree), the error reasons from ``errors.csv``, the pictures are embedded as data URIs: no
network asset, no script. Only figures that the inputs and options decide are shown (not the
run id, the clock times or the rates, which are in the manifest and the log), so that a re-run
on the same inputs writes the same bytes, like every other output. Every figure cell carries ``data-field="<manifest path>"`` and
``data-value="<its JSON>"``, for readers and tests. ``forget`` rebuilds the page (and the
scatter) after an erasure through ``rebuild``.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections import Counter
from typing import Sequence

from extractor.records import FAILURE_EXAMPLES
from extractor.results.scatter import read_points_csv, scatter_png
from extractor.storage.layout import (
    ERRORS_FILE,
    REPORT_FILE,
    SCATTER_PLOT_FILE,
    VARIANCE_PLOT_FILE,
)

# (heading, manifest path) of the figures shown; a path the manifest lacks is left out.
FIGURES = [
    ("status", "status"), ("input", "input"), ("output", "output"),
    ("images listed", "counts.listed"), ("featurized", "counts.featurized"), ("failed", "counts.failed"),
    ("reused from the state", "counts.reused"), ("through the CNN", "counts.forwarded"),
    ("non-image keys skipped", "counts.skipped_non_image_keys"),
    ("model", "model.name"), ("output layer", "model.output_layer"), ("vector size", "model.output_dim"),
    ("weights", "weights.source"), ("weights warning", "weights.warning"), ("format", "format"),
    ("mode", "collect.used"), ("precision", "precision"), ("batch size", "batch_size"),
    ("PCA components", "pca.k"), ("PCA explained variance", "pca.explained_variance"),
    ("partitions", "partitions"), ("Spark master", "spark.master"), ("erasures applied since", "erasures"),
]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:72em}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:0.8em;background:#4c78a8}.bar.f{background:#e45756}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
"""


def reason_kind(reason: str) -> str:
    """A failure reason without its particulars: ``too large: 20000x20000 pixels (...)`` -> ``too large``."""
    return reason.split(": ", 1)[0]


def errors_from_csv(body: bytes) -> tuple[Counter, list[tuple[str, str, str]]]:
    """(reason kind -> images, the first FAILURE_EXAMPLES rows as (path, label, reason)) of errors.csv."""
    reasons, first = Counter(), []
    rows = csv.reader(io.StringIO(body.decode("utf-8", "replace")))
    next(rows, None)  # header
    for row in rows:
        if len(row) >= 3:
            reasons[reason_kind(row[2])] += 1
            if len(first) < FAILURE_EXAMPLES:
                first.append((row[0], row[1], row[2]))
    return reasons, first


def lookup(manifest: dict, path: str):
    value = manifest
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return len(value) if path == "erasures" and isinstance(value, list) else value


def _shown(value) -> str:
    if isinstance(value, bool) or value is None:
        return html.escape(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.6g}"
    return html.escape(str(value))


def _cell(path: str, value) -> str:
    data = html.escape(json.dumps(value, ensure_ascii=False), quote=True)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td{" class=n" if numeric else ""} data-field="{path}" data-value="{data}">{_shown(value)}</td>'


def _figures(manifest: dict) -> str:
    rows = [f"<tr><th>{html.escape(name)}</th>{_cell(path, lookup(manifest, path))}</tr>"
            for name, path in FIGURES if lookup(manifest, path) is not None]
    return "<table>" + "".join(rows) + "</table>"


def _fruits(manifest: dict) -> str:
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    per_fruit = counts.get("per_fruit") if isinstance(counts.get("per_fruit"), dict) else {}
    widest = max([row.get("featurized", 0) + row.get("failed", 0) for row in per_fruit.values()] or [1]) or 1
    rows = []
    for label, row in per_fruit.items():
        ok, bad = row.get("featurized", 0), row.get("failed", 0)
        bars = (f'<span class="bar" style="width:{20 * ok / widest:.2f}em"></span>'
                f'<span class="bar f" style="width:{20 * bad / widest:.2f}em"></span>')
        rows.append(f'<tr data-fruit="{html.escape(label, quote=True)}"><td>{html.escape(label)}</td>'
                    f'{_cell("featurized", ok)}{_cell("failed", bad)}<td>{bars}</td></tr>')
    return ("<table><tr><th>fruit</th><th>featurized</th><th>failed</th><th>"
            '<span class="bar" style="width:1em"></span> featurized <span class="bar f" style="width:1em"></span> '
            "failed</th></tr>" + "".join(rows) + "</table>")


def _errors(reasons: Counter, failures: Sequence[tuple[str, str, str]], failed: int) -> str:
    if not reasons:
        return "<p>No image failed.</p>"
    rows = "".join(f'<tr><td>{html.escape(kind)}</td>{_cell("images", n)}</tr>'
                   for kind, n in sorted(reasons.items(), key=lambda item: (-item[1], item[0])))
    first = "".join(f"<tr><td>{html.escape(path)}</td><td>{html.escape(label)}</td><td>{html.escape(reason)}</td></tr>"
                    for path, label, reason in failures)
    return (f"<table><tr><th>reason</th><th>images</th></tr>{rows}</table>"
            f"<p>The first {len(failures)} of {failed:,} failures (all of them in {ERRORS_FILE}):</p>"
            f"<table><tr><th>photo</th><th>fruit</th><th>reason</th></tr>{first}</table>")


def _picture(name: str, png: bytes | None) -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<h3>{html.escape(name)}</h3><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'


def report_html(manifest: dict, reasons: Counter, failures: Sequence[tuple[str, str, str]],
                pictures: dict[str, bytes | None]) -> bytes:
    """The page (UTF-8). ``manifest``: as written (its ``files`` are not shown); ``reasons``:
    reason kind -> images; ``failures``: the first rows of errors.csv; ``pictures``: file name -> PNG."""
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    title = f"Feature extraction: {manifest.get('output') or ''}".strip()
    body = [f"<h1>{html.escape(title)}</h1>",
            '<section id="run"><h2>Run</h2>', _figures(manifest), "</section>",
            '<section id="fruits"><h2>Images per fruit</h2>', _fruits(manifest), "</section>",
            '<section id="errors"><h2>Errors</h2>', _errors(reasons, failures, counts.get("failed", 0) or 0),
            "</section>",
            '<section id="pictures"><h2>Pictures</h2>',
            *(_picture(name, png) for name, png in pictures.items() if png), "</section>"]
    page = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    return page.encode("utf-8")


def rebuild(manifest: dict, errors_csv: bytes | None, points_csv: bytes | None,
            pictures: dict[str, bytes | None]) -> dict[str, bytes]:
    """After an erasure: ``pca_scatter.png`` redrawn from ``points_csv`` (None: unchanged, the one
    in ``pictures`` is kept) and ``report.html`` from the new manifest (without ``files``),
    errors.csv and the pictures. Returns relative name -> new body."""
    pca = manifest.get("pca") if isinstance(manifest.get("pca"), dict) else {}
    files, shown = {}, {name: pictures.get(name) for name in (VARIANCE_PLOT_FILE, SCATTER_PLOT_FILE)}
    if points_csv is not None:
        files[SCATTER_PLOT_FILE] = shown[SCATTER_PLOT_FILE] = scatter_png(
            read_points_csv(points_csv), int(pca.get("scatter_per_fruit") or 1), pca.get("pc_variance_ratio") or ())
    reasons, failures = errors_from_csv(errors_csv) if errors_csv is not None else (Counter(), [])
    files[REPORT_FILE] = report_html(manifest, reasons, failures, shown)
    return files
