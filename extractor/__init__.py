"""Fruits! feature extraction: S3 images -> CNN features -> PCA -> one CSV per fruit."""

from extractor.zipimports import install as _install_zipimport_cache

__version__ = "0.1.0"

# Here, not in each executor-side function: a Python worker imports this package when it unpickles
# any task of ours, so every stage's tasks after the first in a process start without re-reading
# Spark's jar (see zipimports.py).
_install_zipimport_cache()
