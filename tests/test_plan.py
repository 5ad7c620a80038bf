"""extractor.deploy.plan without the script: what create_cluster.sh evaluates, and the values it
works out (the script itself, against moto: test_deploy.py)."""

import re
import subprocess
import sys

import pytest

from extractor.deploy.plan import build_parser, job_option, make_plan

from conftest import REPO

BASE = ["--bucket", "code-b", "--input", "s3://photos/in/", "--output", "s3://photos/out/", "--weights", "random"]


def plan(*args):
    return make_plan(build_parser().parse_args(list(args)))


@pytest.mark.parametrize("job_args, value", [
    ([], ""),
    (["--state", "s3://a/"], "s3://a/"),
    (["--state=s3://a/", "--pca-k", "5"], "s3://a/"),
    (["--state", "s3://a/", "--state=s3://b/"], "s3://b/"),     # argparse keeps the last one
    (["--state-x", "s3://a/"], ""),
    (["--state"], ""),
])
def test_job_option_is_the_value_driver_py_will_use(job_args, value):
    assert job_option(job_args, "--state") == value


def test_the_shell_assignments_give_back_every_value_byte_for_byte():
    odd = ["it's", 'say "hi"', "$(touch /tmp/plan-injected)", "a b\nc", "`x`", "", "--x=é"]
    result = plan("--mode", "create", *BASE, "--", "--pca-k", "5", *[f"--note={v}" for v in odd])
    script = 'eval "$1"; printf "%s\\0" "${DRIVER_ARGS[@]}"; printf "%s\\0" "$JOB_LOG"'
    out = subprocess.run(["bash", "-c", script, "bash", result.as_shell()], capture_output=True, check=True).stdout
    values = out.decode().split("\0")[:-1]
    assert values[:-1] == result.DRIVER_ARGS and values[-1] == "s3://photos/out/logs/"
    assert values[-len(odd) - 1:-1] == [f"--note={v}" for v in odd]


def test_the_derived_values():
    created = plan("--mode", "create", *BASE, "--auto-terminate", "--", "--precision=float32")
    assert re.fullmatch(r"s3://code-b/fruits-code/\d{8}T\d{6}Z/", created.CODE_PREFIX)
    assert (created.LOG_URI, created.ENV_PREFIX) == ("s3://code-b/emr-logs/", "s3://code-b/fruits-code/env/")
    assert created.CLUSTER_ARGS[-2:] == ["--action-on-failure", "TERMINATE_CLUSTER"]
    assert created.CLUSTER_ARGS[created.CLUSTER_ARGS.index("--precision") + 1] == "float32"
    # The policy covers every upload's timestamped folder.
    assert plan("--mode", "policy", *BASE).CODE_PREFIX == "s3://code-b/fruits-code/"
    # Without a bucket: the archives beside the code.
    given = plan("--mode", "submit", *BASE[2:], "--code-prefix", "s3://cc/code", "--log-uri", "s3://cc/logs/")
    assert (given.CODE_PREFIX, given.ENV_PREFIX) == ("s3://cc/code/", "s3://cc/code/env/")


def test_weights_are_staged_on_a_new_cluster_and_read_from_s3_by_a_running_one(tmp_path):
    weights = tmp_path / "vgg16.h5"
    weights.write_bytes(b"h5")
    args = [*BASE[:-1], str(weights), "--code-prefix", "s3://code-b/v1/"]
    created, submitted = plan("--mode", "create", *args), plan("--mode", "submit", *args)
    assert created.WEIGHTS_S3 == submitted.WEIGHTS_S3 == "s3://code-b/v1/weights/vgg16.h5"
    job_weights = [p.DRIVER_ARGS[p.DRIVER_ARGS.index("--weights") + 1] for p in (created, submitted)]
    assert job_weights == ["/mnt/fruits/weights/vgg16.h5", "s3://code-b/v1/weights/vgg16.h5"]
    assert created.CLUSTER_ARGS[created.CLUSTER_ARGS.index("--weights-uri") + 1] == created.WEIGHTS_S3
    assert "--weights-uri" not in submitted.CLUSTER_ARGS


@pytest.mark.parametrize("args, message", [
    (["--env-prefix", "code-b/env"], "--env-prefix must be an s3://bucket/prefix/ URI, got 'code-b/env/'"),
    (["--sse-kms-key-id", "alias/k"], "--print-policy needs --sse-kms-key-id as a key ARN"),
    (["--bucket", "B_ad"], "invalid bucket name 'B_ad'"),
    (["--executor-cores", "0"], "--executor-cores must be a positive integer, got '0'"),
])
def test_a_bad_setting_is_a_value_error_naming_it(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan("--mode", "policy", *BASE, *args)


@pytest.mark.parametrize("module, args", [
    ("extractor.deploy.plan", ["--mode", "create", *BASE, "--", "--incremental", "--state", "s3://photos/state/"]),
    ("extractor.storage.layout", ["--input", "s3://photos/in/", "--output", "s3://photos/out/"]),
    ("extractor.driver.package", ["{tmp}"]),
    ("extractor.deploy.emr", ["{tmp}", "--code-prefix", "s3://code-b/v1/", "--", "--input", "s3://photos/in/"]),
    ("extractor.deploy.iam", ["--input", "s3://photos/in/", "--output", "s3://photos/out/", "--code", "s3://code-b/v1/",
                              "--emr-log-uri", "s3://code-b/emr-logs/"]),
])
def test_the_modules_create_cluster_runs_need_only_the_standard_library(tmp_path, module, args):
    """The README's promise for create_cluster.sh: any python3, no package installed. ``-S``: no
    site-packages (the venv's boto3, numpy... are out of reach)."""
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = subprocess.run([sys.executable, "-S", "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
