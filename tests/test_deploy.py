"""create_cluster.sh and bootstrap/ for real: the AWS CLI against moto's server on 127.0.0.1."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from extractor.package import build_zip

from conftest import FAKE_ENV, REGION, REPO, recorded_requests, run_env, spark_submit, unique_bucket

VENV_BIN = Path(sys.executable).parent
SCRIPT = REPO / "create_cluster.sh"
BOOTSTRAP = REPO / "bootstrap" / "install_packages.sh"


def script_env(endpoint=None, **extra):
    env = dict(os.environ, AWS_CLI=str(VENV_BIN / "aws"), PYTHON=sys.executable, **FAKE_ENV)
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
    assert groups == {"MASTER": (1, "m5.2xlarge"), "CORE": (3, "m5.2xlarge")}
    assert cluster["ServiceRole"] == "EMR_DefaultRole"
    assert cluster["Ec2InstanceAttributes"]["IamInstanceProfile"] == "EMR_EC2_DefaultRole"
    spark_defaults = next(c for c in cluster["Configurations"] if c["Classification"] == "spark-defaults")["Properties"]
    assert spark_defaults["spark.pyspark.python"] == "/usr/bin/python3.11"
    assert spark_defaults["spark.driver.memory"] == "10g" and spark_defaults["spark.driver.maxResultSize"] == "0"
    # One Python worker (one VGG16) per executor, using all its cores.
    assert spark_defaults["spark.task.cpus"] == spark_defaults["spark.executor.cores"] == "4"
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


def test_dry_run_prints_every_command_and_changes_nothing(clients, s3_server):
    s3, emr, bucket = clients
    before = len(emr.list_clusters()["Clusters"])
    result = create_cluster("--bucket", bucket, "--input", "s3://p/in/", "--output", "s3://p/out/",
                            "--dry-run", endpoint=s3_server)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stderr.splitlines() if line.startswith("+ ")]
    assert sum(" s3 cp " in c for c in commands) == 4
    create = [c for c in commands if " emr create-cluster " in c]
    assert len(create) == 1
    for part in ["--release-label emr-7.5.0", "--region eu-west-3", "--auto-termination-policy IdleTimeout=3600",
                 f"--log-uri s3://{bucket}/emr-logs/", "--no-auto-terminate", "--bootstrap-actions file://"]:
        assert part in create[0]
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
        f"create_cluster.sh: error: could not check the job's locations with {broken} -m extractor.layout: "
        "Traceback: no extractor here"]


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
    # A state among the inputs is refused, as the job would refuse it.
    refused = create_cluster(*base, "--", "--incremental", "--state", "s3://photos/in/state/")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and refused.stdout == "" and len(lines) == 1
    assert "--state s3://photos/in/state/ and --input s3://photos/in/ overlap" in lines[0]


def test_help_lists_every_setting():
    result = create_cluster("--help")
    assert result.returncode == 0
    for option in ["--region", "--release", "--instance-type", "--core-count", "--idle-timeout", "--auto-terminate",
                   "--submit", "--terminate", "--dry-run", "--sse-kms-key-id", "--print-policy"]:
        assert option in result.stdout


def test_shellcheck_is_clean():
    scripts = [SCRIPT, *sorted((REPO / "bootstrap").glob("*.sh")), REPO / ".ci" / "run"]
    result = subprocess.run([str(VENV_BIN / "shellcheck"), *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# ---- bootstrap ---------------------------------------------------------------------------------

def cluster_pins():
    result = subprocess.run([str(BOOTSTRAP), "--print-requirements", str(REPO / "requirements.txt")],
                            capture_output=True, text=True, check=True)
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


def test_pins_resolve_to_wheels_for_emr_python_3_11(tmp_path):
    """What a node would install: wheels for CPython 3.11 on manylinux x86_64 (EMR 7 = Amazon Linux 2023)."""
    pins = tmp_path / "cluster-requirements.txt"
    pins.write_text("\n".join(cluster_pins()) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-cache-dir",
         "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
         "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
         "--platform", "manylinux_2_28_x86_64", "--target", str(tmp_path / "target"), "-r", str(pins)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    would = result.stdout.split("Would install", 1)[1].split()
    resolved = {name.lower().replace("-", "_"): version for name, version in (w.rsplit("-", 1) for w in would)}
    for pin in cluster_pins():
        name, version = pin.split("==")
        assert resolved.get(name.lower().replace("-", "_")) == version, (pin, resolved)

def shim(folder, name, body):
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_bootstrap(tmp_path, pip_exit=0):
    """The bootstrap with `aws`, `sudo` and the interpreter replaced by recording shims."""
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
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = subprocess.run([str(BOOTSTRAP), "--requirements", "s3://code/v1/requirements.txt",
                             "--weights", "s3://code/v1/weights/vgg16.h5", "--weights-dir", str(tmp_path / "w")],
                            env=env, capture_output=True, text=True, timeout=60)
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


def test_bootstrap_fails_loudly_when_pip_fails(tmp_path):
    result, _ = run_bootstrap(tmp_path, pip_exit=1)
    assert result.returncode == 1
    assert "ERROR: pip install failed" in result.stderr
    assert not (tmp_path / "w").exists()


# ---- the shipped zip -----------------------------------------------------------------------------

def test_zip_works_as_py_files_where_extractor_is_not_importable(s3_server, server_bucket, tmp_path):
    client, bucket = server_bucket
    from extractor.dev.synthetic import fruit_dataset

    for key, body in fruit_dataset(2, ["Lemon", "Lime"]).items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=body)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    shutil.copy(REPO / "driver.py", workdir / "driver.py")
    archive = build_zip(tmp_path / "dist")
    env = run_env(s3_server)
    env.pop("PYTHONPATH", None)
    probe = subprocess.run([sys.executable, "-c", "import extractor"], cwd=workdir, env=env, capture_output=True)
    assert probe.returncode != 0  # without the zip, nothing provides the package here

    result = subprocess.run([spark_submit(), "--master", "local[2]", "--py-files", str(archive), "driver.py",
                             "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
                             "--model", "tiny", "--weights", "random", "--log-dir", str(tmp_path / "logs")],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads(client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    assert manifest["counts"]["featurized"] == 4
    assert client.head_object(Bucket=bucket, Key="out/_SUCCESS")


def test_deployment_tools_need_only_the_standard_library():
    """create_cluster.sh runs them with whatever python3 the operator has."""
    code = ("import sys; import extractor.package, extractor.emr, extractor.iam, extractor.layout; "
            "print(sorted(m for m in ('numpy', 'PIL', 'boto3', 'tensorflow', 'pyspark') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_zip_is_reproducible_and_holds_only_the_package(tmp_path):
    import zipfile

    a = build_zip(tmp_path / "a").read_bytes()
    b = build_zip(tmp_path / "b").read_bytes()
    assert a == b
    names = zipfile.ZipFile(tmp_path / "a" / "extractor.zip").namelist()
    assert "extractor/__init__.py" in names and "extractor/job.py" in names
    assert all(n.startswith("extractor/") and n.endswith(".py") for n in names)

