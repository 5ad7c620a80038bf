"""Fruits! feature extraction: S3 images -> CNN features -> PCA -> one CSV per fruit.

The folders say where code runs. Data flows one way, keys -> images -> vectors -> PCA -> files::

    driver.py (spark-submit)
      extractor.driver     options, listing, featurize stage, collected | distributed vectors,
                           writes, locks held, progress, logs; the only part with a SparkContext
        | pickles the tasks of
      extractor.executor   inside the executors' Python workers: decode, models, feeding, GPU
                           pinning; the listing, featurize and output tasks
        | both use
      extractor.results    PCA, output files and formats, scatter, report, manifest
      extractor.storage    S3 calls, every name, listing, inventory, snapshot, state, run locks
      extractor            errors, records (what tasks send back), zipimports

      extractor.forget     erasure on request: python -m extractor.forget (laptop or admin host)
      extractor.deploy     create_cluster.sh's Python: EMR, IAM, instances, packed env (laptop only)
      extractor.dev        demo, benchmarks, local S3 (laptop only)

``MAY_IMPORT`` is the import rule (tests/test_package.py checks every import statement against
it): a part imports its own modules and those of the parts listed, nothing else. So executor
code never drags the driver into a worker, and ``deploy``, ``dev`` and ``forget``, which
nothing shipped imports, stay out of the zip sent to the cluster (``extractor.driver.package``).
"""

from extractor.zipimports import install as _install_zipimport_cache

__version__ = "0.1.0"

# "" is this folder's own modules (errors, records, zipimports).
MAY_IMPORT = {
    "": (),
    "storage": ("",),
    "results": ("", "storage"),
    "executor": ("", "storage", "results"),
    "driver": ("", "storage", "results", "executor"),
    "forget": ("", "storage", "results"),
    "deploy": ("", "storage", "executor"),
    "dev": ("", "storage", "results", "executor", "driver", "forget", "deploy"),
}

# Here, not in each executor-side function: a Python worker imports this package when it unpickles
# any task of ours, so every stage's tasks after the first in a process start without re-reading
# Spark's jar (see zipimports.py).
_install_zipimport_cache()
