"""Build ``extractor.zip`` for ``spark-submit --py-files``: the package's .py files that run on
the cluster, nothing of ``extractor/dev/`` (demo, benchmarks, prototype, generated images), of
``extractor/deploy/`` (what creates the cluster) nor of ``extractor/forget/`` (erasure, run by
whoever may delete photos, not by the cluster's instance profile).

The archive is reproducible (sorted entries, fixed timestamps), so the same code gives the
same bytes and the same S3 ETag. ``ship_to_workers`` lets a driver started without
``--py-files`` (from any folder, on any master) send the same zip itself.

    python -m extractor.driver.package DIST_DIR      # prints DIST_DIR/extractor.zip
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent   # extractor/, this module lives in extractor/driver/
LEFT_OUT = ("dev", "deploy", "forget", "__pycache__")  # folders of the package that never reach a cluster node
FIXED_TIME = (2020, 1, 1, 0, 0, 0)
ZIP_NAME = "extractor.zip"


def sources() -> list[Path]:
    """The package's shipped .py files, sorted."""
    return sorted(p for p in PACKAGE.rglob("*.py") if not set(p.relative_to(PACKAGE).parts[:-1]) & set(LEFT_OUT))


def build_zip(dist: Path) -> Path:
    """Write ``dist/extractor.zip`` holding ``sources()``; returns its path."""
    dist.mkdir(parents=True, exist_ok=True)
    target = dist / ZIP_NAME
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sources():
            info = zipfile.ZipInfo(str(path.relative_to(PACKAGE.parent)), date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return target


def ship_to_workers(sc) -> Path | None:
    """``sc.addPyFile`` of a freshly built zip when this driver runs the package from its source
    folder: the workers' Python then imports it whatever their working folder (without it, a
    spark-submit started outside the repository fails in the first task). None, and nothing
    shipped, when the package already comes from a zip, or spark-submit ships one of the same
    name (``--py-files .../extractor.zip``, as on EMR: the driver imports the sources it started
    beside, the workers the zip)."""
    if not PACKAGE.is_dir() or ZIP_NAME in submitted_py_files(sc):
        return None
    dist = Path(tempfile.mkdtemp(prefix="extractor-zip-"))
    atexit.register(shutil.rmtree, dist, ignore_errors=True)
    target = build_zip(dist)
    sc.addPyFile(str(target))
    return target


def submitted_py_files(sc) -> set[str]:
    """The file names spark-submit's ``--py-files`` gave (``spark.submit.pyFiles``)."""
    listed = sc.getConf().get("spark.submit.pyFiles", "")
    return {entry.rstrip("/").rsplit("/", 1)[-1] for entry in listed.split(",") if entry.strip()}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m extractor.driver.package DIST_DIR\n")
        return 2
    print(build_zip(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
