"""Build ``extractor.zip`` for ``spark-submit --py-files``: the package's .py files only.

The archive is reproducible (sorted entries, fixed timestamps), so the same code gives the
same bytes and the same S3 ETag.

    python -m extractor.package DIST_DIR      # prints DIST_DIR/extractor.zip
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
FIXED_TIME = (2020, 1, 1, 0, 0, 0)


def build_zip(dist: Path) -> Path:
    """Write ``dist/extractor.zip`` holding ``extractor/**/*.py``; returns its path."""
    dist.mkdir(parents=True, exist_ok=True)
    target = dist / "extractor.zip"
    sources = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sources:
            info = zipfile.ZipInfo(str(path.relative_to(PACKAGE.parent)), date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m extractor.package DIST_DIR\n")
        return 2
    print(build_zip(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
