"""The JSON documents create_cluster.sh hands to ``aws emr``: instance groups, Spark and YARN
configuration, bootstrap action and the job step. Written from argument lists, so every value
keeps its exact quoting.

    python -m extractor.deploy.emr DIST --code-prefix s3://b/code/ [--weights-uri s3://...] \
        [--primary-type m5.xlarge] [--core-type m5.4xlarge] [--core-count 2] \
        [--task-type g5.xlarge --task-count 4 [--spot]] [--release emr-7.5.0] \
        [--packed-env-uri s3://b/env/fruits-env-....tar.gz] [--precision float32] \
        [--driver-memory 10g] [--executor-memory M --executor-overhead M] [--executor-cores 4] \
        [--action-on-failure CONTINUE] -- <driver.py arguments>

writes DIST/instance-groups.json, DIST/configurations.json, DIST/bootstrap-actions.json,
DIST/steps.json and DIST/node-kind (gpu or cpu: what the executors run on), and prints the executor layout (extractor.deploy.instances) on stderr; a cluster that
cannot work is one line and exit 2.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from extractor.deploy import instances
from extractor.errors import OneLineParser
from extractor.executor.gpu import BFLOAT16_MIN_CAPABILITY

CLUSTER_PYTHON = "/usr/bin/python3.11"  # EMR 7.1+ ships it beside the default 3.9
STEP_NAME = "fruits-feature-extraction"
GPU_DISCOVERY_SCRIPT = "/usr/lib/spark/scripts/gpu/getGpusResources.sh"  # shipped by EMR
GPU_CGROUP = "/spark-rapids-cgroup"  # mounted by the bootstrap on GPU nodes (devices controller)
PACKED_ENV_DIR = "pyenv"             # where YARN unpacks spark.archives in every container
AM_LABELS_RELEASE = (7, 2)           # first EMR release with ON_DEMAND/SPOT node labels for the AM


def release_version(release: str) -> tuple[int, int]:
    match = re.fullmatch(r"emr-([0-9]+)\.([0-9]+)\.[0-9]+", release)
    if not match:
        raise ValueError(f"--release must look like emr-7.5.0, got {release!r}")
    return int(match[1]), int(match[2])


def instance_groups(layout: instances.Layout) -> list[dict]:
    """The cluster's instance groups for ``aws emr create-cluster --instance-groups``: the
    primary and the core nodes on-demand (they hold the driver and HDFS), task nodes on Spot
    when asked (executors only: a reclaimed node costs a retry, not data)."""
    groups = [{"Name": "primary", "InstanceGroupType": "MASTER", "InstanceCount": 1,
               "InstanceType": layout.primary.name}]
    for group in layout.groups:
        groups.append({"Name": group.role.lower(), "InstanceGroupType": group.role, "InstanceCount": group.count,
                       "InstanceType": group.type.name})
        if group.spot:
            # The AWS CLI's way to say Market=SPOT, capped at the on-demand price: never pay more.
            groups[-1]["BidPrice"] = "OnDemandPrice"
    return groups


def gpu_configurations() -> list[dict]:
    """YARN schedules GPUs as a resource (yarn.io/gpu, isolated with cgroups, which needs the
    dominant resource calculator), the way EMR documents it for GPU instance types."""
    return [
        {"Classification": "yarn-site", "Properties": {
            "yarn.resource-types": "yarn.io/gpu",
            "yarn.nodemanager.resource-plugins": "yarn.io/gpu",
            "yarn.nodemanager.resource-plugins.gpu.allowed-gpu-devices": "auto",
            "yarn.nodemanager.resource-plugins.gpu.path-to-discovery-executables": "/usr/bin",
            "yarn.nodemanager.linux-container-executor.cgroups.mount": "true",
            "yarn.nodemanager.linux-container-executor.cgroups.mount-path": GPU_CGROUP,
            "yarn.nodemanager.linux-container-executor.cgroups.hierarchy": "yarn",
            "yarn.nodemanager.container-executor.class":
                "org.apache.hadoop.yarn.server.nodemanager.LinuxContainerExecutor"}},
        {"Classification": "container-executor", "Properties": {}, "Configurations": [
            {"Classification": "gpu", "Properties": {"module.enabled": "true"}},
            {"Classification": "cgroups", "Properties": {"root": GPU_CGROUP, "yarn-hierarchy": "yarn"}}]},
        {"Classification": "capacity-scheduler", "Properties": {
            "yarn.scheduler.capacity.resource-calculator":
                "org.apache.hadoop.yarn.util.resource.DominantResourceCalculator"}},
    ]


def _merge(configs: list[dict]) -> list[dict]:
    """One entry per classification (EMR refuses a classification given twice)."""
    merged: dict[str, dict] = {}
    for config in configs:
        entry = merged.setdefault(config["Classification"], {"Classification": config["Classification"],
                                                             "Properties": {}})
        entry["Properties"].update(config.get("Properties", {}))
        if "Configurations" in config:
            entry.setdefault("Configurations", []).extend(config["Configurations"])
    return list(merged.values())


def configurations(driver_memory: str, executor_memory: str, executor_overhead: str,
                   executor_cores: int, python: str = CLUSTER_PYTHON, *, gpu: bool = False,
                   am_on_demand: bool = False) -> list[dict]:
    """Spark on every node uses ``python``; memory sized for one broadcast VGG16 (537 MB; its
    Python worker peaks at 2.7 GB) per executor and for the vectors collected on the driver.
    ``gpu``: one GPU per executor and per task; ``am_on_demand``: the ApplicationMaster (the
    driver, in cluster mode) only on on-demand nodes."""
    extra: dict[str, str] = {}
    configs: list[dict] = []
    if gpu:
        # One GPU per executor (a reused Python worker cannot change GPUs), shared by
        # TASKS_PER_GPU tasks: one worker alone cannot download and decode fast enough for it.
        extra.update({"spark.executor.resource.gpu.amount": "1",
                      "spark.task.resource.gpu.amount": f"{1 / instances.TASKS_PER_GPU:g}",
                      "spark.task.cpus": str(max(1, executor_cores // instances.TASKS_PER_GPU)),
                      "spark.executor.resource.gpu.discoveryScript": GPU_DISCOVERY_SCRIPT})
        configs += gpu_configurations()
    if am_on_demand:
        configs.append({"Classification": "yarn-site", "Properties": {
            "yarn.node-labels.enabled": "true", "yarn.node-labels.am.default-node-label-expression": "ON_DEMAND"}})
    return _merge(configs + [
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
            **extra,
        }},
    ])


def bootstrap_actions(code_prefix: str, weights_uri: str | None, install: bool = True) -> list[dict]:
    """The bootstrap on every node: pip-installs the pins unless ``install`` is False (a packed
    environment), prepares GPU nodes for YARN, stages the weights."""
    args = ["--requirements", f"{code_prefix}requirements.txt"] if install else ["--no-install"]
    if weights_uri:
        args += ["--weights", weights_uri]
    return [{"Name": "install-python-packages", "Path": f"{code_prefix}bootstrap/install_packages.sh",
             "Args": args}]


def packed_env_conf(packed_env_uri: str) -> list[str]:
    """spark-submit options that make the driver (the ApplicationMaster) and every executor import
    from the packed environment: YARN unpacks the archive into each container as ./pyenv/."""
    site = f"./{PACKED_ENV_DIR}/site-packages"
    return ["--conf", f"spark.archives={packed_env_uri}#{PACKED_ENV_DIR}",
            "--conf", f"spark.yarn.appMasterEnv.PYTHONPATH={site}",
            "--conf", f"spark.executorEnv.PYTHONPATH={site}"]


def spark_submit_args(code_prefix: str, driver_args: list[str], driver_memory: str,
                      packed_env_uri: str | None = None) -> list[str]:
    """The step's command line; the packed environment rides on it, so that --submit to a running
    cluster uses it too."""
    env = packed_env_conf(packed_env_uri) if packed_env_uri else []
    return ["spark-submit", "--deploy-mode", "cluster", "--driver-memory", driver_memory, *env,
            "--py-files", f"{code_prefix}extractor.zip", f"{code_prefix}driver.py", *driver_args]


def job_steps(code_prefix: str, driver_args: list[str], driver_memory: str,
              action_on_failure: str = "CONTINUE", packed_env_uri: str | None = None) -> list[dict]:
    """One step running spark-submit through command-runner.jar, arguments passed as a list."""
    return [{"Type": "CUSTOM_JAR", "Name": STEP_NAME, "ActionOnFailure": action_on_failure,
             "Jar": "command-runner.jar",
             "Args": spark_submit_args(code_prefix, driver_args, driver_memory, packed_env_uri)}]


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m extractor.deploy.emr")
    parser.add_argument("dist", type=Path)
    parser.add_argument("--code-prefix", required=True)
    parser.add_argument("--weights-uri")
    parser.add_argument("--primary-type", default="m5.xlarge")
    parser.add_argument("--core-type", default="m5.4xlarge")
    parser.add_argument("--core-count", type=int, default=2)
    parser.add_argument("--task-type")
    parser.add_argument("--task-count", type=int, default=0)
    parser.add_argument("--spot", action="store_true")
    parser.add_argument("--release", default="emr-7.5.0")
    parser.add_argument("--precision", default="float32", help="the job's --precision (checked against the nodes)")
    parser.add_argument("--packed-env-uri")
    parser.add_argument("--driver-memory", default="10g")
    parser.add_argument("--executor-memory", help="default: sized by extractor.deploy.instances to fill the nodes")
    parser.add_argument("--executor-overhead", help="default: sized by extractor.deploy.instances to fill the nodes")
    parser.add_argument("--executor-cores", type=int, help="default 4; on GPU nodes, the vCPUs per GPU")
    parser.add_argument("--action-on-failure", default="CONTINUE",
                        choices=["CONTINUE", "CANCEL_AND_WAIT", "TERMINATE_CLUSTER"])
    return parser


def cluster_layout(args) -> instances.Layout:
    """The executor layout, after the checks that need the whole cluster; ValueError says why not."""
    layout = instances.plan(args.primary_type, args.core_type, args.core_count, args.task_type, args.task_count,
                            args.spot, args.executor_cores, args.driver_memory)
    release = release_version(args.release)
    if args.spot and release < AM_LABELS_RELEASE:
        raise ValueError(f"--spot needs EMR 7.2.0 or later (ApplicationMaster kept off Spot nodes), "
                         f"got {args.release}")
    gpus = [g.type for g in layout.groups if g.type.gpus]
    if args.precision == "float16" and not gpus:
        raise ValueError("--precision float16 needs GPU nodes (e.g. --task-type g5.xlarge); "
                         "on CPUs use float32 or bfloat16")
    oldest = min(gpus, key=lambda t: t.compute_capability, default=None)
    if args.precision == "bfloat16" and oldest and oldest.compute_capability < BFLOAT16_MIN_CAPABILITY:
        raise ValueError(f"--precision bfloat16 needs GPUs of compute capability 8.0+, {oldest.name} has "
                         f"{oldest.gpu_model} ({'.'.join(map(str, oldest.compute_capability))}); use float16")
    return layout


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    driver_args = argv[split + 1:]
    code = args.code_prefix if args.code_prefix.endswith("/") else args.code_prefix + "/"
    if not code.startswith("s3://"):
        parser.error(f"--code-prefix must be an s3:// URI, got {args.code_prefix!r}")
    if args.packed_env_uri and not re.fullmatch(r"s3://[^/]+/.+\.tar\.gz", args.packed_env_uri):
        parser.error(f"--packed-env-uri must be the s3:// URI of a .tar.gz, got {args.packed_env_uri!r}")
    if bool(args.executor_memory) != bool(args.executor_overhead):
        parser.error("give both --executor-memory and --executor-overhead, or neither (sized to the nodes)")
    try:
        layout = cluster_layout(args)
    except ValueError as exc:
        parser.error(str(exc))
    memory = args.executor_memory or f"{layout.executor_memory_mb}m"
    overhead = args.executor_overhead or f"{layout.executor_overhead_mb}m"
    print("\n".join(instances.describe(layout, args.precision)), file=sys.stderr)
    args.dist.mkdir(parents=True, exist_ok=True)
    documents = {
        "instance-groups.json": instance_groups(layout),
        "configurations.json": configurations(
            args.driver_memory, memory, overhead, layout.executor_cores, gpu=layout.gpu,
            am_on_demand=release_version(args.release) >= AM_LABELS_RELEASE),
        "bootstrap-actions.json": bootstrap_actions(code, args.weights_uri, install=not args.packed_env_uri),
        "steps.json": job_steps(code, driver_args, args.driver_memory, args.action_on_failure, args.packed_env_uri),
    }
    for name, document in documents.items():
        (args.dist / name).write_text(json.dumps(document, indent=2) + "\n")
    (args.dist / "node-kind").write_text("gpu\n" if layout.gpu else "cpu\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
