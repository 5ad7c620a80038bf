"""The JSON documents create_cluster.sh hands to ``aws emr``: Spark configuration, bootstrap
action and the job step. Written from argument lists, so every value keeps its exact quoting.

    python -m extractor.emr DIST --code-prefix s3://b/code/ [--weights-uri s3://...] \
        [--driver-memory 10g] [--executor-memory 4g] [--executor-overhead 6g] \
        [--executor-cores 4] [--action-on-failure CONTINUE] -- <driver.py arguments>

writes DIST/configurations.json, DIST/bootstrap-actions.json and DIST/steps.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CLUSTER_PYTHON = "/usr/bin/python3.11"  # EMR 7.1+ ships it beside the default 3.9
STEP_NAME = "fruits-feature-extraction"


def configurations(driver_memory: str, executor_memory: str, executor_overhead: str,
                   executor_cores: int, python: str = CLUSTER_PYTHON) -> list[dict]:
    """Spark on every node uses ``python``; memory sized for one broadcast VGG16 (537 MB; its
    Python worker peaks at 2.7 GB) per executor and for the vectors collected on the driver."""
    return [
        {"Classification": "spark-env", "Configurations": [
            {"Classification": "export", "Properties": {
                "PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python}}]},
        {"Classification": "spark-defaults", "Properties": {
            "spark.pyspark.python": python,
            "spark.pyspark.driver.python": python,
            "spark.yarn.appMasterEnv.PYSPARK_PYTHON": python,
            "spark.executorEnv.PYSPARK_PYTHON": python,
            "spark.executorEnv.TF_CPP_MIN_LOG_LEVEL": "2",
            "spark.driver.memory": driver_memory,
            # The job collects every vector on purpose; the driver's memory is the bound.
            "spark.driver.maxResultSize": "0",
            "spark.executor.memory": executor_memory,
            # Python workers (TensorFlow + one VGG16 each) live outside the JVM heap.
            "spark.executor.memoryOverhead": executor_overhead,
            "spark.executor.cores": str(executor_cores),
            # One task at a time per executor, with every core as a TensorFlow thread: one VGG16
            # per executor (a Python worker peaks at 2.7 GB) and the same speed as one task per core.
            "spark.task.cpus": str(executor_cores),
            "spark.python.worker.reuse": "true",
            # 537 MB of float32 weights do not compress; LZ4 would only cost time.
            "spark.broadcast.compress": "false",
        }},
    ]


def bootstrap_actions(code_prefix: str, weights_uri: str | None) -> list[dict]:
    args = ["--requirements", f"{code_prefix}requirements.txt"]
    if weights_uri:
        args += ["--weights", weights_uri]
    return [{"Name": "install-python-packages", "Path": f"{code_prefix}bootstrap/install_packages.sh",
             "Args": args}]


def spark_submit_args(code_prefix: str, driver_args: list[str], driver_memory: str) -> list[str]:
    return ["spark-submit", "--deploy-mode", "cluster", "--driver-memory", driver_memory,
            "--py-files", f"{code_prefix}extractor.zip", f"{code_prefix}driver.py", *driver_args]


def job_steps(code_prefix: str, driver_args: list[str], driver_memory: str,
              action_on_failure: str = "CONTINUE") -> list[dict]:
    """One step running spark-submit through command-runner.jar, arguments passed as a list."""
    return [{"Type": "CUSTOM_JAR", "Name": STEP_NAME, "ActionOnFailure": action_on_failure,
             "Jar": "command-runner.jar", "Args": spark_submit_args(code_prefix, driver_args, driver_memory)}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extractor.emr")
    parser.add_argument("dist", type=Path)
    parser.add_argument("--code-prefix", required=True)
    parser.add_argument("--weights-uri")
    parser.add_argument("--driver-memory", default="10g")
    parser.add_argument("--executor-memory", default="4g")
    parser.add_argument("--executor-overhead", default="6g")
    parser.add_argument("--executor-cores", type=int, default=4)
    parser.add_argument("--action-on-failure", default="CONTINUE",
                        choices=["CONTINUE", "CANCEL_AND_WAIT", "TERMINATE_CLUSTER"])
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    driver_args = argv[split + 1:]
    code = args.code_prefix if args.code_prefix.endswith("/") else args.code_prefix + "/"
    if not code.startswith("s3://"):
        parser.error(f"--code-prefix must be an s3:// URI, got {args.code_prefix!r}")
    args.dist.mkdir(parents=True, exist_ok=True)
    documents = {
        "configurations.json": configurations(args.driver_memory, args.executor_memory,
                                              args.executor_overhead, args.executor_cores),
        "bootstrap-actions.json": bootstrap_actions(code, args.weights_uri),
        "steps.json": job_steps(code, driver_args, args.driver_memory, args.action_on_failure),
    }
    for name, document in documents.items():
        (args.dist / name).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
