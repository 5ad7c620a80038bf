"""create_cluster.sh and bootstrap/ for real: the AWS CLI against moto's server on 127.0.0.1."""

import atexit
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import pytest

from extractor.driver.package import build_zip
from extractor.deploy.packed_env import PIP_TARGET

from conftest import FAKE_ENV, REGION, REPO, recorded_requests, unique_bucket

VENV_BIN = Path(sys.executable).parent
SCRIPT = REPO / "create_cluster.sh"
BOOTSTRAP = REPO / "bootstrap" / "install_packages.sh"


# --dry-run keeps the documents it names in a folder under $TMPDIR: the suite's own, removed at exit.
DRY_RUN_TMP = tempfile.mkdtemp(prefix="fruits-deploy-tests-")
atexit.register(shutil.rmtree, DRY_RUN_TMP, True)


def script_env(endpoint=None, **extra):
    env = dict(os.environ, AWS_CLI=str(VENV_BIN / "aws"), PYTHON=sys.executable, TMPDIR=DRY_RUN_TMP, **FAKE_ENV)
    env.update(extra)  # may replace PYTHON
    env.pop("AWS_ENDPOINT_URL", None)
    env.pop("REGION", None)
    return env


def create_cluster(*args, endpoint=None, **env):
    command = [str(SCRIPT), *(["--endpoint-url", endpoint] if endpoint else []), *args]
    return subprocess.run(command, cwd=REPO, env=script_env(**env), capture_output=True, text=True, timeout=300)


def header(entry, name):
    return {k.lower(): v for k, v in entry["headers"].items()}.get(name.lower())


@pytest.fixture
def clients(s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name=REGION)
    emr = boto3.client("emr", endpoint_url=s3_server, region_name=REGION)
    bucket = unique_bucket("code")
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    return s3, emr, bucket


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "tiny.weights.h5"
    path.write_bytes(b"not read by the script, only uploaded")
    return path


def code_keys(s3, bucket):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_creates_the_cluster_uploads_the_code_and_adds_the_step(clients, s3_server, weights_file, tmp_path):
    s3, emr, bucket = clients
    with recorded_requests(tmp_path / "rec.jsonl") as requests:
        result = create_cluster(
            "--bucket", bucket, "--code-prefix", f"s3://{bucket}/code/v1/", "--input", "s3://photos/in put/",
            "--output", "s3://photos/runs/r1/", "--weights", str(weights_file), "--core-count", "3",
            "--instance-type", "m5.2xlarge", "--idle-timeout", "1800", "--auto-terminate",
            "--", "--batch-size", "16", "--pca-k", "50", endpoint=s3_server)
    assert result.returncode == 0, result.stderr
    cluster_id = result.stdout.split("cluster:")[1].split()[0]
    step_id = result.stdout.split("step:")[1].split()[0]
    assert f"aws emr wait step-complete --region eu-west-3 --endpoint-url {s3_server} --cluster-id {cluster_id} --step-id {step_id}" in result.stdout

    cluster = emr.describe_cluster(ClusterId=cluster_id)["Cluster"]
    assert cluster["ReleaseLabel"] == "emr-7.5.0"
    assert cluster["LogUri"] == f"s3://{bucket}/emr-logs/"
    assert [a["Name"] for a in cluster["Applications"]] == ["Spark"]
    groups = {g["InstanceGroupType"]: (g["RequestedInstanceCount"], g["InstanceType"]) for g in emr.list_instance_groups(ClusterId=cluster_id)["InstanceGroups"]}
    assert groups == {"MASTER": (1, "m5.2xlarge"), "CORE": (3, "m5.4xlarge")}  # --instance-type: the primary
    assert cluster["ServiceRole"] == "EMR_DefaultRole"
    assert cluster["Ec2InstanceAttributes"]["IamInstanceProfile"] == "EMR_EC2_DefaultRole"
    spark_defaults = next(c for c in cluster["Configurations"] if c["Classification"] == "spark-defaults")["Properties"]
    assert spark_defaults["spark.pyspark.python"] == "/usr/bin/python3.11"
    assert spark_defaults["spark.driver.memory"] == "10g" and spark_defaults["spark.driver.maxResultSize"] == "0"
    # One Python worker (one VGG16) per executor, using all its cores; 4 executors fill an
    # m5.4xlarge's 16 vCPUs and 57344 MiB of YARN memory, the driver's node included.
    assert spark_defaults["spark.task.cpus"] == spark_defaults["spark.executor.cores"] == "4"
    assert (spark_defaults["spark.executor.memory"], spark_defaults["spark.executor.memoryOverhead"]) == ("3840m", "7680m")
    assert 11264 + 4 * (3840 + 7680) == 57344  # the driver's container (10g + 10 %) and 4 executors
    assert not any(k.startswith("spark.executor.resource.gpu") for k in spark_defaults)
    assert "featurizing: 48 of 56 paid vCPUs (86 %)" in result.stderr
    env = next(c for c in cluster["Configurations"] if c["Classification"] == "spark-env")
    assert env["Configurations"][0]["Properties"]["PYSPARK_PYTHON"] == "/usr/bin/python3.11"

    code = f"s3://{bucket}/code/v1/"
    actions = emr.list_bootstrap_actions(ClusterId=cluster_id)["BootstrapActions"]
    assert [(a["ScriptPath"], a["Args"]) for a in actions] == [
        (f"{code}bootstrap/install_packages.sh",
         ["--requirements", f"{code}requirements.txt", "--weights", f"{code}weights/tiny.weights.h5"])]

    steps = emr.list_steps(ClusterId=cluster_id)["Steps"]
    assert [s["Id"] for s in steps] == [step_id]
    assert steps[0]["ActionOnFailure"] == "TERMINATE_CLUSTER"
    assert steps[0]["Config"]["Jar"] == "command-runner.jar"
    assert steps[0]["Config"]["Args"] == [
        "spark-submit", "--deploy-mode", "cluster", "--driver-memory", "10g",
        "--py-files", f"{code}extractor.zip", f"{code}driver.py",
        "--input", "s3://photos/in put/", "--output", "s3://photos/runs/r1/",
        "--weights", "/mnt/fruits/weights/tiny.weights.h5", "--region", "eu-west-3",
        "--batch-size", "16", "--pca-k", "50"]

    # What moto does not keep, the recorded request shows: region, auto-termination, tags.
    run = [r for r in requests if "RunJobFlow" in (header(r, "X-Amz-Target") or "")]
    assert len(run) == 1
    body = json.loads(run[0]["body"])
    assert body["AutoTerminationPolicy"] == {"IdleTimeout": 1800}
    assert body["Instances"]["KeepJobFlowAliveWhenNoSteps"] is False
    assert "/eu-west-3/elasticmapreduce/aws4_request" in header(run[0], "Authorization")
    assert {"Key": "data", "Value": "personal-photos"} in body["Tags"]
    assert [(g["InstanceRole"], g["InstanceType"], g["InstanceCount"], g["Market"]) for g in body["Instances"]["InstanceGroups"]] \
        == [("MASTER", "m5.2xlarge", 1, "ON_DEMAND"), ("CORE", "m5.4xlarge", 3, "ON_DEMAND")]
    yarn = next(c for c in body["Configurations"] if c["Classification"] == "yarn-site")["Properties"]
    # EMR 7.2+: the ApplicationMaster, which holds the driver in cluster mode, only on on-demand nodes.
    assert yarn == {"yarn.node-labels.enabled": "true", "yarn.node-labels.am.default-node-label-expression": "ON_DEMAND"}

    uploaded = code_keys(s3, bucket)
    assert uploaded == sorted(f"code/v1/{k}" for k in [
        "driver.py", "extractor.zip", "requirements.txt", "bootstrap/install_packages.sh", "weights/tiny.weights.h5"])
    for key in uploaded:
        assert s3.head_object(Bucket=bucket, Key=key)["ServerSideEncryption"] == "AES256"
    zipped = s3.get_object(Bucket=bucket, Key="code/v1/extractor.zip")["Body"].read()
    assert zipped == build_zip(tmp_path / "dist").read_bytes()
    puts = [r for r in requests if r["method"] == "PUT" and f"/{bucket}/code/" in r["url"]]
    assert len(puts) == 5 and all(header(r, "x-amz-server-side-encryption") == "AES256" for r in puts)


def test_kms_key_is_used_for_uploads_and_passed_to_the_job(clients, s3_server, tmp_path):
    s3, emr, bucket = clients
    with recorded_requests(tmp_path / "rec.jsonl") as requests:
        result = create_cluster("--bucket", bucket, "--input", "s3://p/in/", "--output", "s3://p/out/",
                                "--weights", "random", "--sse-kms-key-id", "arn:aws:kms:eu-west-3:1:key/k",
                                endpoint=s3_server)
    assert result.returncode == 0, result.stderr
    puts = [r for r in requests if r["method"] == "PUT" and f"/{bucket}/" in r["url"]]
    assert len(puts) == 4
    assert all(header(r, "x-amz-server-side-encryption") == "aws:kms" for r in puts)
    cluster_id = result.stdout.split("cluster:")[1].split()[0]
    args = emr.list_steps(ClusterId=cluster_id)["Steps"][0]["Config"]["Args"]
    assert args[-4:] == ["--region", "eu-west-3", "--sse-kms-key-id", "arn:aws:kms:eu-west-3:1:key/k"]


def classification(configurations, name):
    return next(c for c in configurations if c["Classification"] == name)


def run_job_flow(requests):
    run = [r for r in requests if "RunJobFlow" in (header(r, "X-Amz-Target") or "")]
    assert len(run) == 1
    return json.loads(run[0]["body"])


def test_gpu_task_nodes_on_spot_keep_the_driver_on_an_on_demand_core_node(clients, s3_server, tmp_path):
    s3, emr, bucket = clients
    with recorded_requests(tmp_path / "rec.jsonl") as requests:
        result = create_cluster("--bucket", bucket, "--input", "s3://p/in/", "--output", "s3://p/out/",
                                "--weights", "random", "--core-type", "m5.xlarge", "--core-count", "1",
                                "--task-type", "g5.xlarge", "--task-count", "3", "--spot",
                                "--", "--precision", "float16", endpoint=s3_server)
    assert result.returncode == 0, result.stderr
    body = run_job_flow(requests)
    assert body["Instances"]["InstanceGroups"] == [
        {"Name": "primary", "InstanceRole": "MASTER", "InstanceType": "m5.xlarge", "InstanceCount": 1, "Market": "ON_DEMAND"},
        {"Name": "core", "InstanceRole": "CORE", "InstanceType": "m5.xlarge", "InstanceCount": 1, "Market": "ON_DEMAND"},
        # No BidPrice: Spot capped at the on-demand price.
        {"Name": "task", "InstanceRole": "TASK", "InstanceType": "g5.xlarge", "InstanceCount": 3, "Market": "SPOT"}]
    configs = body["Configurations"]
    assert len({c["Classification"] for c in configs}) == len(configs)  # EMR refuses a classification twice
    assert classification(configs, "yarn-site")["Properties"] == {
        "yarn.resource-types": "yarn.io/gpu",
        "yarn.nodemanager.resource-plugins": "yarn.io/gpu",
        "yarn.nodemanager.resource-plugins.gpu.allowed-gpu-devices": "auto",
        "yarn.nodemanager.resource-plugins.gpu.path-to-discovery-executables": "/usr/bin",
        "yarn.nodemanager.linux-container-executor.cgroups.mount": "true",
        "yarn.nodemanager.linux-container-executor.cgroups.mount-path": "/spark-rapids-cgroup",
        "yarn.nodemanager.linux-container-executor.cgroups.hierarchy": "yarn",
        "yarn.nodemanager.container-executor.class": "org.apache.hadoop.yarn.server.nodemanager.LinuxContainerExecutor",
        "yarn.node-labels.enabled": "true",
        "yarn.node-labels.am.default-node-label-expression": "ON_DEMAND"}
    assert classification(configs, "container-executor")["Configurations"] == [
        {"Classification": "gpu", "Properties": {"module.enabled": "true"}},
        {"Classification": "cgroups", "Properties": {"root": "/spark-rapids-cgroup", "yarn-hierarchy": "yarn"}}]
    assert classification(configs, "capacity-scheduler")["Properties"] == {
        "yarn.scheduler.capacity.resource-calculator": "org.apache.hadoop.yarn.util.resource.DominantResourceCalculator"}
    spark = classification(configs, "spark-defaults")["Properties"]
    assert {k: spark[k] for k in spark if "resource.gpu" in k} == {
        "spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "0.5",
        "spark.executor.resource.gpu.discoveryScript": "/usr/lib/spark/scripts/gpu/getGpusResources.sh"}
    # One executor per GPU with the node's 4 vCPUs decoding for it, two tasks (two Python
    # workers, two GILs) of 2 vCPUs feeding it at once.
    assert (spark["spark.executor.cores"], spark["spark.task.cpus"]) == ("4", "2")
    assert (spark["spark.executor.memory"], spark["spark.executor.memoryOverhead"]) == ("4096m", "8192m")
    assert "featurizing: 3 of 3 paid GPUs (100 %)" in result.stderr
    step_args = body["Steps"][0]["HadoopJarStep"]["Args"]
    assert step_args[-2:] == ["--precision", "float16"]
    assert "task:      " not in result.stdout and "(Spot)" in result.stdout


def test_gpu_core_nodes_say_that_the_drivers_node_leaves_its_gpu_idle(clients, s3_server):
    s3, emr, bucket = clients
    result = create_cluster("--bucket", bucket, "--input", "s3://p/in/", "--output", "s3://p/out/",
                            "--core-type", "g6.xlarge", "--core-count", "3", "--dry-run", endpoint=s3_server)
    assert result.returncode == 0, result.stderr
    assert "core: 3 x g6.xlarge (on-demand): executors 1 per node, 0 beside the driver" in result.stderr
    assert "featurizing: 2 of 3 paid GPUs (67 %)" in result.stderr
    assert "warning: the driver's container leaves no room for an executor on its core node" in result.stderr
    assert code_keys(s3, bucket) == []


def fake_builder_python(folder):
    """A PYTHON for create_cluster.sh that runs every module for real but extractor.deploy.packed_env,
    which it records and answers with a small archive (the real build: tests/test_packed_env.py)."""
    calls = folder / "packed_env_calls.log"
    wrapper = folder / "python"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$1 $2" == "-m extractor.deploy.packed_env" ]]; then\n'
        f'    echo "$*" >> {calls}\n'
        '    out="$(sed -n \'s/.*--out \\([^ ]*\\).*/\\1/p\' <<<"$*")"\n'
        '    pins="$(sed -n \'s/.*--pins \\([^ ]*\\).*/\\1/p\' <<<"$*")"\n'
        f'    cp "$pins" {folder / "pins-seen.txt"}\n'
        '    mkdir -p "$out" && printf fake-env > "$out/fruits-env-cpu-0123456789abcdef.tar.gz"\n'
        '    echo "$out/fruits-env-cpu-0123456789abcdef.tar.gz"; exit 0\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, calls


def test_packed_env_is_built_uploaded_once_and_used_instead_of_pip(clients, s3_server, tmp_path):
    s3, emr, bucket = clients
    python, calls = fake_builder_python(tmp_path)
    cache = tmp_path / "cache"
    args = ["--bucket", bucket, "--input", "s3://p/in/", "--output", "s3://p/out/", "--weights", "random",
            "--packed-env"]
    with recorded_requests(tmp_path / "rec.jsonl") as requests:
        first = create_cluster(*args, endpoint=s3_server, PYTHON=str(python), PACKED_ENV_CACHE=str(cache))
    assert first.returncode == 0, first.stderr
    [call] = calls.read_text().splitlines()
    assert call.split()[2:] == ["--pins", call.split()[3], "--out", str(cache), "--wheels", f"{cache}/wheels",
                                "--label", "cpu"]
    uri = f"s3://{bucket}/fruits-code/env/fruits-env-cpu-0123456789abcdef.tar.gz"
    assert s3.get_object(Bucket=bucket, Key=uri.split("/", 3)[3])["Body"].read() == b"fake-env"
    body = run_job_flow(requests)
    # Every package from the archive, for the driver (the ApplicationMaster) and the executors ...
    step = body["Steps"][0]["HadoopJarStep"]["Args"]
    assert step[:12] == ["spark-submit", "--deploy-mode", "cluster", "--driver-memory", "10g",
                         "--conf", f"spark.archives={uri}#pyenv",
                         "--conf", "spark.yarn.appMasterEnv.PYTHONPATH=./pyenv/site-packages",
                         "--conf", "spark.executorEnv.PYTHONPATH=./pyenv/site-packages", "--py-files"]
    # ... and a bootstrap that installs nothing.
    assert [a["ScriptBootstrapAction"]["Args"] for a in body["BootstrapActions"]] == [["--no-install"]]
    # The next cluster finds the same archive in S3 and does not upload it again.
    with recorded_requests(tmp_path / "rec2.jsonl") as again:
        second = create_cluster(*args, endpoint=s3_server, PYTHON=str(python), PACKED_ENV_CACHE=str(cache))
    assert second.returncode == 0, second.stderr
    assert f"packed environment already in {uri}" in second.stderr
    assert not [r for r in again if r["method"] == "PUT" and "/fruits-code/env/" in r["url"]]
    assert any(r["method"] == "HEAD" and "/fruits-code/env/" in r["url"] for r in again)


def test_packed_env_on_a_gpu_cluster_packs_the_cuda_build(clients, s3_server, tmp_path):
    s3, emr, bucket = clients
    python, calls = fake_builder_python(tmp_path)
    result = create_cluster("--bucket", bucket, "--input", "s3://p/in/", "--output", "s3://p/out/", "--weights",
                            "random", "--packed-env", "--core-type", "m5.xlarge", "--core-count", "1",
                            "--task-type", "g6.xlarge", "--task-count", "2", endpoint=s3_server,
                            PYTHON=str(python), PACKED_ENV_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    call = calls.read_text().split()
    assert call[call.index("--label") + 1] == "gpu"
    assert (tmp_path / "pins-seen.txt").read_text().split() == cluster_pins(gpu=True)


def test_dry_run_with_packed_env_builds_and_uploads_nothing(clients, s3_server, tmp_path):
    s3, emr, bucket = clients
    python, calls = fake_builder_python(tmp_path)
    result = create_cluster("--bucket", bucket, "--input", "s3://p/in/", "--output", "s3://p/out/", "--packed-env",
                            "--dry-run", endpoint=s3_server, PYTHON=str(python), PACKED_ENV_CACHE=str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    assert not calls.exists() and not (tmp_path / "c").exists()
    assert "the packed environment (cpu) is not built" in result.stderr
    assert f"spark.archives=s3://{bucket}/fruits-code/env/fruits-env-DRY-RUN.tar.gz#pyenv" in result.stderr
    assert code_keys(s3, bucket) == []


def test_dry_run_prints_every_command_and_changes_nothing(clients, s3_server):
    s3, emr, bucket = clients
    before = len(emr.list_clusters()["Clusters"])
    result = create_cluster("--bucket", bucket, "--input", "s3://p/in/", "--output", "s3://p/out/",
                            "--dry-run", endpoint=s3_server)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stderr.splitlines() if line.startswith("+ ")]
    uploads = [c for c in commands if " s3 cp " in c]  # the code folder, in one call
    assert len(uploads) == 1 and " --recursive " in uploads[0], uploads
    assert re.search(rf" s3://{bucket}/fruits-code/\d{{8}}T\d{{6}}Z/$", uploads[0]), uploads
    create = [c for c in commands if " emr create-cluster " in c]
    assert len(create) == 1
    for part in ["--release-label emr-7.5.0", "--region eu-west-3", "--auto-termination-policy IdleTimeout=3600",
                 f"--log-uri s3://{bucket}/emr-logs/", "--no-auto-terminate", "--bootstrap-actions file://"]:
        assert part in create[0]
    # Every document the printed create-cluster names is kept, and shown: a review of the cluster
    # before paying for it needs them (instance groups, configurations, bootstrap, the step).
    named = re.findall(r"file://(\S+\.json)", create[0])
    assert sorted(Path(path).name for path in named) == ["bootstrap-actions.json", "configurations.json",
                                                         "instance-groups.json", "steps.json"]
    for path in named:
        document = json.loads(Path(path).read_text())
        assert document and f"--- file://{path}\n" in result.stderr
        assert json.dumps(document, indent=2).splitlines()[1].strip() in result.stderr
    assert f"kept in {Path(named[0]).parent}/" in result.stderr
    assert Path(named[0]).parent.parent == Path(DRY_RUN_TMP)
    assert '"--deploy-mode"' in result.stderr  # the step document is shown
    assert len(emr.list_clusters()["Clusters"]) == before
    assert code_keys(s3, bucket) == []


def test_submit_to_a_running_cluster_then_terminate(clients, s3_server):
    s3, emr, bucket = clients
    first = create_cluster("--bucket", bucket, "--input", "s3://p/in/", "--output", "s3://p/out/",
                           "--weights", "random", endpoint=s3_server)
    cluster_id = first.stdout.split("cluster:")[1].split()[0]
    second = create_cluster("--submit", cluster_id, "--bucket", bucket, "--input", "s3://p/in2/",
                            "--output", "s3://p/out2/", "--weights", "s3://models/vgg16.h5", endpoint=s3_server)
    assert second.returncode == 0, second.stderr
    steps = emr.list_steps(ClusterId=cluster_id)["Steps"]
    assert len(steps) == 2
    newest = next(s for s in steps if "s3://p/in2/" in s["Config"]["Args"])
    # A running cluster staged nothing: the job reads the weights from S3 itself.
    assert newest["Config"]["Args"][newest["Config"]["Args"].index("--weights") + 1] == "s3://models/vgg16.h5"

    end = create_cluster("--terminate", cluster_id, endpoint=s3_server)
    assert end.returncode == 0, end.stderr
    assert emr.describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]["State"] in ("TERMINATING", "TERMINATED")


CHEAP = ["--bucket", "b-1", "--input", "s3://p/in/", "--output", "s3://p/out/"]


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--bucket", "b-1", "--output", "s3://p/out/"], "the following arguments are required: --input"),
    (["--bucket", "b-1", "--input", "p/in/", "--output", "s3://p/out/"], "expected an s3://bucket/prefix URI, got 'p/in/'"),
    (["--bucket", "b-1", "--input", "s3://p/in/", "--output", "s3://p"], "--output needs a prefix, not a whole bucket"),
    (["--bucket", "b-1", "--input", "s3://p/in/", "--output", "s3://p/out/", "--region", "us-east-1"],
     "outside the EU"),
    (["--bucket", "b-1", "--input", "s3://p/in/", "--output", "s3://p/out/", "--core-count", "two"],
     "--core-count must be a positive integer, got 'two'"),
    (["--bucket", "b-1", "--input", "s3://p/in/", "--output", "s3://p/out/", "--idle-timeout", "5"],
     "--idle-timeout must be 60-604800 seconds, got '5'"),
    (["--bucket", "b-1", "--input", "s3://p/in/", "--output", "s3://p/out/", "--release", "emr-6.15.0"],
     "EMR 7.x"),
    (["--bucket", "b-1", "--input", "s3://p/in/", "--output", "s3://p/out/", "--weights", "/nope.h5"],
     "--weights file not found"),
    (["--input", "s3://p/in/", "--output", "s3://p/out/"], "--bucket is required"),
    (["--terminate", "cluster-1"], "cluster id must look like j-XXXXXXXX"),
    # Combinations that would cost money for nothing: refused by extractor.deploy.instances / extractor.deploy.emr.
    ([*CHEAP, "--spot"],
     "--spot puts task nodes on Spot; core nodes hold the driver and stay on-demand: add --task-count N"),
    ([*CHEAP, "--core-type", "g5.xlarge",
      "--task-type", "m5.xlarge", "--task-count", "2"], "GPU core nodes (g5.xlarge) with CPU task nodes (m5.xlarge)"),
    ([*CHEAP, "--", "--precision", "float16"],
     "--precision float16 needs GPU nodes"),
    ([*CHEAP, "--core-type", "g4dn.xlarge",
      "--", "--precision=bfloat16"], "bfloat16 needs GPUs of compute capability 8.0+, g4dn.xlarge has T4 (7.5)"),
    ([*CHEAP, "--release", "emr-7.1.0",
      "--task-count", "2", "--spot"], "--spot needs EMR 7.2.0 or later"),
    ([*CHEAP, "--core-type", "g4ad.xlarge"],
     "instance type 'g4ad.xlarge' is not supported here (AMD GPUs (no CUDA))"),
    ([*CHEAP, "--task-count", "-1"],
     "--task-count must be a non-negative integer, got '-1'"),
    ([*CHEAP, "--executor-memory", "4g"],
     "give both --executor-memory and --executor-overhead, or neither"),
    (["--bucket"], "--bucket needs a value"),
    # The script's own settings may not be given again to driver.py: the job would follow the last one.
    (["--bucket", "b-1", "--input", "s3://p/in/", "--output", "s3://p/out/", "--", "--output", "s3://p/other/"],
     "give --output to create_cluster.sh itself, before --"),
    (["--bucket", "b-1", "--input", "s3://p/in/", "--output", "s3://p/out/", "--", "--weights=s3://m/x.h5"],
     "give --weights to create_cluster.sh itself"),
    (["--print-policy", "--bucket", "b-1", "--input", "s3://p/in/", "--output", "s3://p/out/",
      "--", "--sse-kms-key-id", "arn:aws:kms:eu-west-3:1:key/k"], "give --sse-kms-key-id to create_cluster.sh itself"),
    (["--submit", "j-ABC", "--bucket", "b-1", "--input", "s3://p/in/", "--output", "s3://p/out/", "--", "--input=s3://q/"],
     "give --input to create_cluster.sh itself"),
])
def test_bad_flags_one_line_exit_2(args, message):
    result = create_cluster(*args, endpoint="http://127.0.0.1:9")  # never reached: checks come first
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


# Each a layout the job would refuse at its start, once the cluster is up and paid for.
@pytest.mark.parametrize("args,message", [
    (["--input", "s3://photos/in/", "--output", "s3://photos/in/out/"],
     "--output s3://photos/in/out/ and --input s3://photos/in/ overlap; outputs must not land among the inputs"),
    (["--input", "s3://photos", "--output", "s3://photos/out/"],
     "--output s3://photos/out/ and --input s3://photos/ overlap"),
    (["--input", "s3://photos/in/", "--output", "s3://photos/out/", "--", "--incremental", "--state", "s3://photos/in/st/"],
     "--state s3://photos/in/st/ and --input s3://photos/in/ overlap"),
    (["--input", "s3://photos/in/", "--output", "s3://photos/runs/r1/", "--", "--incremental", "--state=s3://photos/runs"],
     "--output s3://photos/runs/r1/ is inside --state s3://photos/runs/; keep them apart"),
    (["--input", "s3://photos/in/", "--output", "s3://photos/out/", "--", "--incremental", "--state", "s3://job-state"],
     "--state needs a prefix, not a whole bucket"),
    (["--input", "s3://photos/in/", "--output", "s3://photos/out/", "--", "--log-uri", "s3://photos/in/logs/"],
     "--log-uri s3://photos/in/logs/ and --input s3://photos/in/ overlap"),
    (["--input", "s3://photos/in/", "--output", "s3://photos/out/", "--log-uri", "s3://photos/in/emr/"],
     "--emr-log-uri s3://photos/in/emr/ and --input s3://photos/in/ overlap"),
    (["--submit", "j-ABC", "--input", "s3://photos/in/", "--output", "s3://photos/in/out/"], "overlap"),
])
def test_a_layout_the_job_would_refuse_is_refused_before_anything_is_uploaded(clients, s3_server, tmp_path,
                                                                             args, message):
    s3, emr, bucket = clients
    before = len(emr.list_clusters()["Clusters"])
    with recorded_requests(tmp_path / "rec.jsonl") as requests:
        result = create_cluster("--bucket", bucket, "--weights", "random", *args, endpoint=s3_server)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert len(lines) == 1 and lines[0].startswith("create_cluster.sh: error: ") and message in lines[0], result.stderr
    assert requests == []  # not one AWS call: nothing uploaded, nothing created
    assert code_keys(s3, bucket) == [] and len(emr.list_clusters()["Clusters"]) == before


def test_the_job_log_line_follows_the_jobs_log_uri(clients, s3_server):
    s3, emr, bucket = clients
    base = ["--bucket", bucket, "--input", "s3://photos/in/", "--output", "s3://photos/out/", "--weights", "random"]
    given = create_cluster(*base, "--", "--log-uri", "s3://job-logs/fruits", endpoint=s3_server)
    assert given.returncode == 0, given.stderr
    assert "job log:   s3://job-logs/fruits/\n" in given.stdout  # where the job writes: a folder
    default = create_cluster(*base, "--", "--pca-k", "50", endpoint=s3_server)
    assert default.returncode == 0, default.stderr
    assert "job log:   s3://photos/out/logs/\n" in default.stdout


def test_terminate_checks_no_locations_and_a_broken_checker_stops_the_script(tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/usr/bin/env bash\necho 'Traceback: no extractor here' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    end = create_cluster("--terminate", "j-ABC", "--dry-run", PYTHON=str(broken))
    assert end.returncode == 0 and "termination requested for j-ABC" in end.stdout, end.stderr
    create = create_cluster("--bucket", "b-1", "--input", "s3://p/in/", "--output", "s3://p/out/", "--dry-run",
                            PYTHON=str(broken))
    assert create.returncode == 1 and " s3 cp " not in create.stderr
    assert create.stderr.strip().splitlines() == [
        f"create_cluster.sh: error: could not check the settings with {broken} -m extractor.deploy.plan: "
        "Traceback: no extractor here"]


def test_what_a_module_says_on_stderr_is_shown_never_evaluated(tmp_path):
    """The plan's stdout is evaluated by the script; a warning a Python prints on stderr (here a
    line that would run a command) must pass through to the user, not into that eval."""
    marker = tmp_path / "evaluated"
    noisy = tmp_path / "python"
    noisy.write_text("#!/usr/bin/env bash\n"
                     f"echo 'touch {marker}; WEIGHTS_S3=s3://elsewhere/x.h5' >&2\n"
                     f'exec {sys.executable} "$@"\n')
    noisy.chmod(0o755)
    result = create_cluster("--bucket", "b-1", "--input", "s3://p/in/", "--output", "s3://p/out/", "--dry-run",
                            PYTHON=str(noisy))
    assert result.returncode == 0, result.stderr
    assert not marker.exists() and f"touch {marker}; WEIGHTS_S3=s3://elsewhere/x.h5" in result.stderr
    assert "s3://elsewhere" not in "".join(line for line in result.stderr.splitlines() if line.startswith("+ "))


def test_print_policy_is_the_least_privilege_document_for_these_prefixes():
    result = create_cluster("--print-policy", "--bucket", "code-b", "--code-prefix", "s3://code-b/code/v2/",
                            "--input", "s3://photos/in/", "--output", "s3://photos/out/",
                            "--weights", "s3://models/vgg16.h5")
    assert result.returncode == 0, result.stderr
    policy = json.loads(result.stdout)
    resources = {r for st in policy["Statement"] if st["Effect"] == "Allow"
                 for r in ([st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"])}
    assert "arn:aws:s3:::code-b/code/v2/*" in resources
    assert "arn:aws:s3:::photos/in/*" in resources and "arn:aws:s3:::models/vgg16.h5" in resources
    assert "arn:aws:s3:::code-b/emr-logs/*" in resources
    assert not any(r.endswith(":::photos/*") or r == "*" for r in resources)
    default = json.loads(create_cluster("--print-policy", "--bucket", "code-b", "--input", "s3://photos/in/",
                                        "--output", "s3://photos/out/").stdout)
    # Without --code-prefix, uploads go to fruits-code/<UTC time>/: the policy covers them all.
    assert any(st.get("Resource") == "arn:aws:s3:::code-b/fruits-code/*" for st in default["Statement"])
    refused = create_cluster("--print-policy", "--bucket", "code-b", "--input", "s3://photos/in/",
                             "--output", "s3://photos/out/", "--sse-kms-key-id", "alias/fruits")
    assert refused.returncode == 2 and "key ARN" in refused.stderr


JOB_OPTIONS = ["--collect", "never", "--format", "parquet", "--incremental", "--state", "s3://photos/state/run a/",
               "--log-uri", "s3://job-logs/fruits/"]


def statements_by_sid(policy):
    return {st["Sid"]: st for st in policy["Statement"]}


def test_job_options_after_the_dashes_reach_the_step_unchanged(clients, s3_server):
    s3, emr, bucket = clients
    result = create_cluster("--bucket", bucket, "--input", "s3://photos/in/", "--output", "s3://photos/out/",
                            "--weights", "random", "--", *JOB_OPTIONS, endpoint=s3_server)
    assert result.returncode == 0, result.stderr
    cluster_id = result.stdout.split("cluster:")[1].split()[0]
    args = emr.list_steps(ClusterId=cluster_id)["Steps"][0]["Config"]["Args"]
    assert args[-len(JOB_OPTIONS) - 2:] == ["--region", "eu-west-3", *JOB_OPTIONS]


def test_print_policy_covers_the_state_and_log_uri_given_to_the_job():
    base = ["--print-policy", "--bucket", "code-b", "--input", "s3://photos/in/", "--output", "s3://photos/out/"]
    result = create_cluster(*base, "--", *JOB_OPTIONS)
    assert result.returncode == 0, result.stderr
    policy = statements_by_sid(json.loads(result.stdout))
    assert policy["ListStatePrefix"]["Resource"] == "arn:aws:s3:::photos"
    assert policy["ListStatePrefix"]["Condition"] == {"StringLike": {"s3:prefix": ["state/run a/", "state/run a/*"]}}
    assert policy["ReadWriteState"]["Resource"] == "arn:aws:s3:::photos/state/run a/*"
    assert policy["WriteJobLog"]["Resource"] == "arn:aws:s3:::job-logs/fruits/*"
    assert "arn:aws:s3:::photos/state/run a/*" in policy["DenyJobWritesWithOtherSse"]["Resource"]
    # NAME=VALUE is the same option; of two, the job keeps the last, and so does the policy.
    same = create_cluster(*base, "--", "--incremental", "--state=s3://photos/state/run a/", "--log-uri=s3://job-logs/fruits/")
    assert json.loads(same.stdout) == json.loads(result.stdout)
    last = statements_by_sid(json.loads(create_cluster(*base, "--", "--incremental", "--state", "s3://photos/old/",
                                                       "--state", "s3://photos/new/").stdout))
    assert last["ReadWriteState"]["Resource"] == "arn:aws:s3:::photos/new/*"
    # Without them: no state statement, the job's log under the output.
    plain = statements_by_sid(json.loads(create_cluster(*base, "--", "--pca-k", "50").stdout))
    assert "ListStatePrefix" not in plain and "ReadWriteState" not in plain
    assert plain["WriteJobLog"]["Resource"] == "arn:aws:s3:::photos/out/logs/*"
    # --packed-env: the archives beside the code folders, read-only.
    packed = statements_by_sid(json.loads(create_cluster(*base, "--packed-env", "--", "--pca-k", "50").stdout))
    assert packed["ReadPackedEnvironment"] == {"Sid": "ReadPackedEnvironment", "Effect": "Allow",
                                               "Action": "s3:GetObject", "Resource": "arn:aws:s3:::code-b/fruits-code/env/*"}
    assert "ReadPackedEnvironment" not in plain
    # A state among the inputs is refused, as the job would refuse it.
    refused = create_cluster(*base, "--", "--incremental", "--state", "s3://photos/in/state/")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and refused.stdout == "" and len(lines) == 1
    assert "--state s3://photos/in/state/ and --input s3://photos/in/ overlap" in lines[0]


def test_help_lists_every_setting():
    result = create_cluster("--help")
    assert result.returncode == 0
    for option in ["--region", "--release", "--instance-type", "--core-type", "--core-count", "--task-type",
                   "--task-count", "--spot", "--packed-env", "--env-prefix", "--idle-timeout", "--auto-terminate",
                   "--submit", "--terminate", "--dry-run", "--sse-kms-key-id", "--print-policy"]:
        assert option in result.stdout


def test_shellcheck_is_clean():
    scripts = [SCRIPT, *sorted((REPO / "bootstrap").glob("*.sh")), REPO / ".ci" / "run"]
    result = subprocess.run([str(VENV_BIN / "shellcheck"), *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# ---- bootstrap ---------------------------------------------------------------------------------

def cluster_pins(gpu=False):
    result = subprocess.run([str(BOOTSTRAP), "--print-requirements", str(REPO / "requirements.txt"),
                             *(["--gpu"] if gpu else [])], capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_bootstrap_installs_exactly_the_pins_not_marked_local_only():
    lines = [line for line in (REPO / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    expected = [line.split("#")[0].strip() for line in lines if "local-only" not in line]
    assert cluster_pins() == expected
    assert all("==" in pin for pin in expected)  # every package pinned
    names = {pin.split("==")[0] for pin in expected}
    assert {"tensorflow-cpu", "keras", "numpy", "pillow", "boto3", "matplotlib"} <= names
    assert not names & {"pyspark", "moto[server]", "pytest", "awscli"}


def test_gpu_nodes_get_the_cuda_build_of_the_very_same_tensorflow():
    cpu, gpu = cluster_pins(), cluster_pins(gpu=True)
    version = next(p.split("==")[1] for p in cpu if p.startswith("tensorflow-cpu=="))
    assert gpu == [f"tensorflow[and-cuda]=={version}" if p.startswith("tensorflow-cpu==") else p for p in cpu]


@pytest.mark.slow  # pip fetches every wheel of the CUDA set (~3 GB: the index has no PEP 658 metadata)
def test_gpu_pins_resolve_to_wheels_for_emr_python_3_11(tmp_path):
    """What a GPU node would install: wheels for CPython 3.11 on manylinux x86_64 (EMR 7 = Amazon
    Linux 2023). The CPU nodes' set is resolved by the packed environment's build, which runs
    ``pip download`` of the same pins for the same target (test_packed_env: every pin then
    imports from the archive at its pinned version), so it is not resolved twice."""
    pins = tmp_path / "cluster-requirements.txt"
    pins.write_text("\n".join(cluster_pins(gpu=True)) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-cache-dir", *PIP_TARGET,
         "--target", str(tmp_path / "target"), "-r", str(pins)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    would = result.stdout.split("Would install", 1)[1].split()
    resolved = {name.lower().replace("-", "_"): version for name, version in (w.rsplit("-", 1) for w in would)}
    for pin in cluster_pins(gpu=True):
        name, version = pin.split("==")
        assert resolved.get(name.split("[")[0].lower().replace("-", "_")) == version, (pin, resolved)
    # The CUDA build brings its CUDA libraries as wheels: nothing to install on the node besides the driver.
    assert "nvidia_cudnn_cu12" in resolved and "tensorflow_cpu" not in resolved


def shim(folder, name, body):
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_bootstrap(tmp_path, pip_exit=0, gpu=False, args=None):
    """The bootstrap with `aws`, `sudo` and the interpreter replaced by recording shims; with
    ``gpu``, an `nvidia-smi` that lists one GPU and recording `mount`/`mountpoint`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    shim(bin_dir, "aws", f'echo "aws $*" >> {calls}\n'
                         'src="${@: -2:1}"; dst="${@: -1}"\n'
                         f'if [[ "$src" == *requirements.txt ]]; then cp {REPO / "requirements.txt"} "$dst"; '
                         'else mkdir -p "$dst" && echo weights > "$dst/$(basename "$src")"; fi\n')
    shim(bin_dir, "sudo", 'exec "$@"\n')
    shim(bin_dir, "python3.11", f'echo "python $*" >> {calls}\n'
                                f'if [[ "$*" == *"pip install"* ]]; then cat "${{@: -1}}" >> {calls}; exit {pip_exit}; fi\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", GPU_CGROUP=str(tmp_path / "cgroup"),
               NVIDIA_SMI=str(bin_dir / "nvidia-smi"))
    if gpu:
        shim(bin_dir, "nvidia-smi", 'echo "GPU 0: NVIDIA A10G (UUID: GPU-1)"\n')
        shim(bin_dir, "mountpoint", f'echo "mountpoint $*" >> {calls}; exit 1\n')
        shim(bin_dir, "mount", f'echo "mount $*" >> {calls}\n')
    if args is None:
        args = ["--requirements", "s3://code/v1/requirements.txt"]
    result = subprocess.run([str(BOOTSTRAP), *args, "--weights", "s3://code/v1/weights/vgg16.h5",
                             "--weights-dir", str(tmp_path / "w")], env=env, capture_output=True, text=True, timeout=60)
    return result, calls.read_text() if calls.exists() else ""


def test_bootstrap_flow_with_shims(tmp_path):
    result, calls = run_bootstrap(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "aws s3 cp --only-show-errors s3://code/v1/requirements.txt" in calls
    assert "pip install --quiet --no-cache-dir --only-binary=:all: -r" in calls
    for pin in cluster_pins():
        assert pin in calls
    assert "pyspark" not in calls.split("pip install", 1)[1]
    assert (tmp_path / "w" / "vgg16.h5").read_text() == "weights\n"


def test_bootstrap_on_a_gpu_node_mounts_the_devices_cgroup_and_installs_cuda_tensorflow(tmp_path):
    result, calls = run_bootstrap(tmp_path, gpu=True)
    assert result.returncode == 0, result.stderr
    assert "GPU node: GPU 0: NVIDIA A10G" in result.stderr
    cgroup = tmp_path / "cgroup"
    assert f"mount -t cgroup -o devices cgroupv1-devices {cgroup}/devices" in calls
    installed = calls.split("pip install", 1)[1]
    assert "tensorflow[and-cuda]==" in installed and "tensorflow-cpu" not in installed
    for pin in cluster_pins(gpu=True):
        assert pin in installed


def test_bootstrap_with_a_packed_environment_installs_nothing(tmp_path):
    result, calls = run_bootstrap(tmp_path, args=["--no-install"])
    assert result.returncode == 0, result.stderr
    assert "pip" not in calls and "requirements.txt" not in calls
    assert (tmp_path / "w" / "vgg16.h5").read_text() == "weights\n"  # the weights still staged


def test_bootstrap_fails_loudly_when_pip_fails(tmp_path):
    result, _ = run_bootstrap(tmp_path, pip_exit=1)
    assert result.returncode == 1
    assert "ERROR: pip install failed" in result.stderr
    assert not (tmp_path / "w").exists()


# ---- the shipped zip -----------------------------------------------------------------------------
# As --py-files where nothing else provides the package: test_hostile_inputs.py's spark-submit.

def test_deployment_tools_need_only_the_standard_library():
    """create_cluster.sh runs them with whatever python3 the operator has."""
    code = ("import sys; import extractor.driver.package, extractor.deploy.emr, extractor.deploy.iam, extractor.storage.layout, "
            "extractor.deploy.instances, extractor.deploy.packed_env; "
            "print(sorted(m for m in ('numpy', 'PIL', 'boto3', 'tensorflow', 'pyspark') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_zip_is_reproducible_and_holds_only_the_package(tmp_path):
    import zipfile

    a = build_zip(tmp_path / "a").read_bytes()
    b = build_zip(tmp_path / "b").read_bytes()
    assert a == b
    names = zipfile.ZipFile(tmp_path / "a" / "extractor.zip").namelist()
    assert "extractor/__init__.py" in names and "extractor/driver/job.py" in names
    assert all(n.startswith("extractor/") and n.endswith(".py") for n in names)

