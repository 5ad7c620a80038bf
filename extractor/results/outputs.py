"""Everything the job writes: per-fruit CSVs, errors, PCA model, plot, manifest, _SUCCESS.

Formatting functions return bytes and touch no network; ``OutputWriter`` puts them in S3.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import unicodedata
import zipfile
from contextlib import contextmanager
from typing import Callable, Iterable, Sequence

import numpy as np

from extractor.errors import JobError
from extractor.storage.layout import (
    FEATURES,
    MANIFEST_FILE,
    PCA,
    PCA_MODEL_FILE,
    REPORT_FILE,
    SCATTER_PLOT_FILE,
    SCATTER_POINTS_FILE,
    SUCCESS_FILE,
    VARIANCE_PLOT_FILE,
)
from extractor.storage.s3 import (
    S3Location,
    S3Settings,
    delete_keys,
    describe_s3_error,
    list_keys,
    put_bytes,
)

# Characters unsafe in file names once downloaded (Windows included) or in URLs (%, #, ?).
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|%#]')


def safe_names(labels: Iterable[str]) -> dict[str, str]:
    """label -> a file-name stem, unique even case-insensitively, with no '/', no '..'.

    Readable labels ('Apple Braeburn', 'Pêche') are kept as they are; a label that had to be
    changed, or that collides with another ignoring case, gets a short hash of the original.
    """
    labels = sorted(set(labels))
    cleaned = {}
    for label in labels:
        name = _UNSAFE.sub("_", unicodedata.normalize("NFC", label)).strip().lstrip(".")
        cleaned[label] = name or "_"
    folded: dict[str, int] = {}
    for name in cleaned.values():
        folded[name.casefold()] = folded.get(name.casefold(), 0) + 1
    result = {}
    for label, name in cleaned.items():
        if name != label or folded[name.casefold()] > 1:
            name = f"{name[:100]}-{hashlib.sha1(label.encode('utf-8')).hexdigest()[:8]}"
        result[label] = name
    return result


def _csv_fields(values: Sequence[str]) -> str:
    """One CSV record's text fields (at least two), quoted where needed, without the line ending."""
    out = io.StringIO()
    # csv quotes a field holding a character of the line terminator: "\r\n" covers both.
    csv.writer(out, lineterminator="\r\n").writerow(values)
    return out.getvalue()[:-2]


def format_rows(paths: Sequence[str], labels: Sequence[str], values: np.ndarray, column_prefix: str) -> bytes:
    """CSV bytes: ``path,label,<prefix>0,...``; float32 values written with 9 significant
    digits, which round-trips float32 exactly."""
    values = np.asarray(values, dtype=np.float32)
    d = values.shape[1]
    header = ",".join(["path", "label"] + [f"{column_prefix}{i}" for i in range(d)])
    row_format = ",".join(["%.9g"] * d)
    out = io.StringIO()
    out.write(header + "\n")
    for path, label, row in zip(paths, labels, values.tolist()):
        out.write(_csv_fields((path, label)) + "," + (row_format % tuple(row)) + "\n")
    return out.getvalue().encode("utf-8")


ERRORS_HEADER = b"path,label,error\n"

# Output folder -> the column prefix of its vectors (CSV header, Parquet metadata).
KINDS = {FEATURES: "dim_", PCA: "pc_"}


def by_fruit(bucket: str, keys: Sequence[str], labels: Sequence[str]):
    """``(label, row indices, s3:// paths of those rows)`` for each label, labels sorted; rows keep
    the order of ``keys`` (both write paths pass them sorted)."""
    array = np.asarray(labels, dtype=object)
    for label in sorted(set(labels)):
        rows = np.flatnonzero(array == label)
        yield label, rows, [f"s3://{bucket}/{keys[i]}" for i in rows]


def error_rows(bucket: str, errors: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """``(key, label, reason)`` -> errors.csv rows ``(s3:// path, label, reason)``."""
    return [(f"s3://{bucket}/{key}", label, reason) for key, label, reason in errors]


def format_error_rows(rows: Sequence[tuple[str, str, str]]) -> bytes:
    """errors.csv rows without the header (the executors write them in parts)."""
    return "".join(_csv_fields(row) + "\n" for row in rows).encode("utf-8")


def format_errors(rows: Sequence[tuple[str, str, str]]) -> bytes:
    return ERRORS_HEADER + format_error_rows(rows)


def pca_model_bytes(model) -> bytes:
    """An .npz (np.load reads it) with fixed entry times, so that the same model gives the same bytes."""
    arrays = {"mean": model.mean, "components": model.components,
              "explained_variance_ratio": model.explained_variance_ratio,
              "explained_variance": model.explained_variance}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            entry = io.BytesIO()
            np.lib.format.write_array(entry, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), entry.getvalue())
    return buffer.getvalue()


def variance_plot_png(ratios: np.ndarray, k: int, target: float | None) -> bytes:
    """PNG of the cumulative explained variance against the number of components, k marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cumulative = np.cumsum(ratios)
    figure = Figure(figsize=(7, 4.5), dpi=100)
    axes = figure.subplots()
    axes.plot(np.arange(1, len(cumulative) + 1), cumulative, color="tab:blue")
    axes.axvline(k, color="tab:red", linestyle="--", label=f"k = {k} ({cumulative[k - 1]:.1%})")
    if target is not None:
        axes.axhline(target, color="tab:gray", linestyle=":", label=f"target {target:.0%}")
    axes.set_xlabel("number of components")
    axes.set_ylabel("cumulative explained variance")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


class OutputWriter:
    """Writes one run's files under ``location``; the run's result is final only once
    ``finish`` has removed stale files and written the manifest and ``_SUCCESS``."""

    def __init__(self, client, settings: S3Settings, location: S3Location, keep_prefixes: Sequence[str] = (),
                 guard: Callable[[], None] | None = None):
        self.client = client
        self.settings = settings
        self.location = location
        self.keep_prefixes = tuple(keep_prefixes)  # e.g. the log folder, which accumulates
        self.guard = guard  # called before every change under the prefix (the run lock's raise_if_lost)
        self.files: dict[str, dict] = {}  # relative name -> {"bytes", "sha256"}, in write order
        self._started = False

    @property
    def written(self) -> list[str]:
        return list(self.files)

    def begin(self) -> None:
        """Before the first file is replaced: an old _SUCCESS or manifest next to half-replaced
        files would vouch for a mix of two runs."""
        if not self._started:
            self._guard()
            delete_keys(self.client, self.location.bucket,
                        [self.location.key(SUCCESS_FILE), self.location.key(MANIFEST_FILE)])
            self._started = True

    def put(self, relative: str, body: bytes, content_type: str = "application/octet-stream") -> None:
        self.begin()
        self._guard()
        put_bytes(self.client, self.settings, self.location.bucket, self.location.key(relative), body, content_type)
        self.record(relative, len(body), hashlib.sha256(body).hexdigest())

    def _guard(self) -> None:
        if self.guard is not None:
            self.guard()

    def record(self, relative: str, nbytes: int, sha256: str) -> None:
        """A file of this run written by someone else (the executors), after ``begin``."""
        self.files[relative] = {"bytes": nbytes, "sha256": sha256}

    def finish(self, manifest: dict) -> list[str]:
        """Delete what an earlier run left that this run did not write, then manifest (given its
        ``files``: name -> bytes and sha256), then _SUCCESS.

        Returns the relative names of the stale files removed.
        """
        current = set(self.written) | {MANIFEST_FILE, SUCCESS_FILE}
        stale = []
        for key in list_keys(self.client, self.location.bucket, self.location.prefix):
            relative = key[len(self.location.prefix):]
            if relative not in current and not key.startswith(self.keep_prefixes):
                stale.append(relative)
        self._guard()
        delete_keys(self.client, self.location.bucket, [self.location.key(r) for r in stale])
        manifest["files"] = dict(self.files)  # what this run wrote, for readers to verify
        self.put(MANIFEST_FILE, json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8"),
                 "application/json")
        self.put(SUCCESS_FILE, b"", "text/plain")
        return stale

    @contextmanager
    def failures_in_one_line(self, logger: logging.Logger):
        """A failure inside the block ends the run with one line (a JobError naming the output),
        after a warning of what was written so far; JobErrors pass as they are."""
        try:
            yield
        except JobError:
            raise
        except Exception as exc:
            written = self.written
            # A warning: the run's one ERROR line is the driver's, from the JobError below.
            logger.warning("writing the outputs failed after %d files (%s); no _SUCCESS was written, so "
                           "%s holds a partial result that readers must ignore; re-run the job to replace it",
                           len(written), ", ".join(written[:10]) + (" ..." if len(written) > 10 else ""),
                           self.location.uri)
            raise JobError(describe_s3_error(exc, f"cannot write the outputs to {self.location.uri}")) from exc

    def put_pca_files(self, pca_model, target_variance: float | None, points=(), per_fruit: int = 1
                      ) -> dict[str, bytes]:
        """``pca_model.npz``, ``explained_variance.png``, and the scatter of ``points``
        (``pca_scatter.csv`` and ``.png``); nothing without a model. Returns the PNGs by name."""
        from extractor.results.scatter import axis_ratios, points_csv, scatter_png

        if pca_model is None:
            return {}
        self.put(PCA_MODEL_FILE, pca_model_bytes(pca_model))
        pictures = {VARIANCE_PLOT_FILE: variance_plot_png(pca_model.explained_variance_ratio, pca_model.k,
                                                          target_variance),
                    SCATTER_PLOT_FILE: scatter_png(points, per_fruit, axis_ratios(pca_model.explained_variance_ratio))}
        self.put(VARIANCE_PLOT_FILE, pictures[VARIANCE_PLOT_FILE], "image/png")
        self.put(SCATTER_POINTS_FILE, points_csv(points), "text/csv")
        self.put(SCATTER_PLOT_FILE, pictures[SCATTER_PLOT_FILE], "image/png")
        return pictures

    def put_report(self, manifest: dict, reasons, failures, pictures: dict[str, bytes]) -> None:
        """``report.html`` from the manifest (before its ``files``), the errors and the pictures."""
        from extractor.results.report import report_html

        self.put(REPORT_FILE, report_html(manifest, reasons, failures, pictures), "text/html; charset=utf-8")
