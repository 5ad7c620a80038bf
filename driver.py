"""spark-submit entry point: parse arguments, build the SparkContext, run the job, exit.

    spark-submit --master 'local[*]' path/to/driver.py --input s3://b/in/ --output s3://b/out/
    spark-submit --deploy-mode cluster --driver-memory 10g --py-files extractor.zip driver.py ...

Started from any folder: without --py-files the driver ships the package to the workers itself.

Exit status: 0 success, 1 the run failed (one line on stderr, details in the log), 2 bad arguments.
"""

from __future__ import annotations

import os
import sys

from extractor.driver.config import parse_args
from extractor.driver.logs import LogShipper, setup_logging, utc_run_id
from extractor.driver.package import ship_to_workers
from extractor.errors import JobError


def build_spark_context():
    from pyspark import SparkConf, SparkContext

    # Start (or join spark-submit's) JVM first, so that SparkConf sees --master and --conf.
    SparkContext._ensure_initialized()
    conf = SparkConf().setIfMissing("spark.app.name", "fruits-feature-extraction")
    conf.setIfMissing("spark.master", "local[*]")  # `python driver.py` works too
    # The job collects every vector by design (90,000 x 4096 float32 = 1.5 GB): Spark's 1 GB
    # default cap on collected results would kill it; the driver's memory is the real bound.
    conf.setIfMissing("spark.driver.maxResultSize", "0")
    # The broadcast is 537 MB of float32 weights: LZ4 saves nothing on them and costs seconds.
    conf.setIfMissing("spark.broadcast.compress", "false")
    if conf.get("spark.master").startswith("local") and not os.environ.get("PYSPARK_PYTHON") \
            and not conf.contains("spark.pyspark.python"):
        # Local workers must run this interpreter (the venv's), not whatever python3 is on PATH.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sc = SparkContext.getOrCreate(conf)
    sc.setLogLevel("WARN")
    # Without --py-files the workers would find the package only when started in its folder.
    ship_to_workers(sc)
    return sc


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    run_id = utc_run_id()
    logger, log_path = setup_logging(cfg.log_dir, run_id)
    s3_client = cfg.s3.client()
    shipper = LogShipper(s3_client, cfg.s3, cfg.log_location, log_path, logger)
    logger.info("log file %s, uploaded to %s", log_path, shipper.uri)
    shipper.ship()
    sc = None
    try:
        from extractor.driver import job

        sc = build_spark_context()
        manifest = job.run(sc, cfg, s3_client=s3_client, logger=logger, shipper=shipper, run_id=run_id)
        logger.info("run %s succeeded: %d featurized, %d failed, outputs in %s", run_id,
                    manifest["counts"]["featurized"], manifest["counts"]["failed"], cfg.output.uri)
        return 0
    except JobError as exc:
        logger.error("run %s failed: %s", run_id, exc, exc_info=exc.__cause__ is not None)
        return 1
    except Exception as exc:  # unexpected: one line on stderr, the traceback in the log file
        logger.error("run %s failed: %s: %s (traceback in %s)", run_id, type(exc).__name__, exc,
                     shipper.uri, exc_info=True)
        return 1
    finally:
        shipper.ship()
        if sc is not None:
            sc.stop()


if __name__ == "__main__":
    sys.exit(main())
