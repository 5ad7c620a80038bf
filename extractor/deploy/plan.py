"""create_cluster.sh's settings, checked and completed before anything is uploaded or created.

The script reads its flags (and their environment variables) and hands them here. This module
refuses in one line (exit 2, which the script reports as its own usage error) a setting the
cluster or the job would refuse later, works out the defaults that depend on other settings
(the code prefix, EMR's log URI, the archives' prefix, where the weights go and where the job
logs), and prints the script's variables as shell assignments: driver.py's arguments and those
of ``extractor.deploy.emr`` and ``extractor.deploy.iam``.

    python -m extractor.deploy.plan --mode create --bucket B --input S3_URI --output S3_URI \\
        [the script's other settings] -- [driver.py options]
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from extractor.errors import OneLineParser
from extractor.storage import layout

MODES = ("create", "submit", "policy")
# Settings the script passes to driver.py itself: given again after --, the job would use the
# last one while the upload, the bootstrap and the policy follow the script's.
OWN_JOB_OPTIONS = ("--input", "--output", "--weights", "--sse-kms-key-id")
WEIGHTS_DIR = "/mnt/fruits/weights"   # where the bootstrap stages a weights file on every node
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
IDLE_TIMEOUT_RANGE = (60, 604800)     # seconds: what EMR's auto-termination accepts


def job_option(job_args: list[str], name: str) -> str:
    """The value driver.py will use for ``name`` among ``job_args`` (``NAME VALUE`` or
    ``NAME=VALUE``; argparse keeps the last one); '' if absent."""
    value, i = "", 0
    while i < len(job_args):
        if job_args[i] == name:
            value = job_args[i + 1] if i + 1 < len(job_args) else ""
            i += 1
        elif job_args[i].startswith(name + "="):
            value = job_args[i][len(name) + 1:]
        i += 1
    return value


def check_numbers(args) -> None:
    """The cluster's counts and sizes, as the flags gave them (strings); ValueError naming the flag."""
    if not args.region.startswith("eu-") and not args.allow_non_eu_region:
        raise ValueError(f"region '{args.region}' is outside the EU; photos may be personal data "
                         f"(add --allow-non-eu-region to insist)")
    if not re.fullmatch(r"[1-9][0-9]*", args.core_count):
        raise ValueError(f"--core-count must be a positive integer, got '{args.core_count}'")
    if not re.fullmatch(r"[0-9]+", args.task_count):
        raise ValueError(f"--task-count must be a non-negative integer, got '{args.task_count}'")
    if args.executor_cores and not re.fullmatch(r"[1-9][0-9]*", args.executor_cores):
        raise ValueError(f"--executor-cores must be a positive integer, got '{args.executor_cores}'")
    low, high = IDLE_TIMEOUT_RANGE
    if not re.fullmatch(r"[0-9]+", args.idle_timeout) or not low <= int(args.idle_timeout) <= high:
        raise ValueError(f"--idle-timeout must be {low}-{high} seconds, got '{args.idle_timeout}'")
    if not re.fullmatch(r"emr-7\.[0-9]+\.[0-9]+", args.release):
        raise ValueError(f"--release must be an EMR 7.x label (Spark 3.5), got '{args.release}'")


def check_sources(args) -> None:
    """Where the code, the logs and the weights come from, and the job options the script owns."""
    for arg in args.job_args:
        if arg.split("=", 1)[0] in OWN_JOB_OPTIONS:
            raise ValueError(f"give {arg.split('=', 1)[0]} to {args.prog} itself, before --, not to driver.py after it")
    if not args.bucket and not (args.code_prefix and args.log_uri):
        raise ValueError("--bucket is required (or both --code-prefix and --log-uri)")
    if args.bucket and not BUCKET_NAME.fullmatch(args.bucket):
        raise ValueError(f"invalid bucket name '{args.bucket}'")
    weights = args.weights
    if weights.endswith(".h5") and not weights.startswith("s3://") and not Path(weights).is_file():
        raise ValueError(f"--weights file not found: '{weights}'")
    if weights not in ("imagenet", "random") and not weights.endswith(".h5"):
        raise ValueError(f"--weights must be imagenet, random, a .h5 file or s3://....h5, got '{weights}'")


@dataclass
class Plan:
    """What the script goes on with: every value a shell variable of the same name."""

    CODE_PREFIX: str
    LOG_URI: str
    ENV_PREFIX: str
    JOB_LOG: str
    WEIGHTS_S3: str
    DRIVER_ARGS: list[str]
    POLICY_ARGS: list[str]
    CLUSTER_ARGS: list[str]

    def as_shell(self) -> str:
        lines = []
        for name, value in vars(self).items():
            quoted = (f"({' '.join(shlex.quote(v) for v in value)})" if isinstance(value, list)
                      else shlex.quote(value))
            lines.append(f"{name}={quoted}")
        return "\n".join(lines) + "\n"


def prefixes(args) -> tuple[str, str, str]:
    """(code prefix, EMR's log URI, the archives' prefix), each ending in '/'."""
    code = args.code_prefix
    if not code:
        # The policy covers every upload's timestamped folder; an upload gets one of its own.
        stamp = "" if args.mode == "policy" else datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "/"
        code = f"s3://{args.bucket}/fruits-code/{stamp}"
    code = code.rstrip("/") + "/"
    log_uri = args.log_uri or f"s3://{args.bucket}/emr-logs/"
    # Beside the timestamped code folders, so that one upload serves every later cluster.
    env = args.env_prefix or (f"s3://{args.bucket}/fruits-code/env/" if args.bucket else f"{code}env/")
    env = env.rstrip("/") + "/"
    if not re.match(r"s3://[a-z0-9][a-z0-9.-]+/", env):
        raise ValueError(f"--env-prefix must be an s3://bucket/prefix/ URI, got '{env}'")
    return code, log_uri, env


def job_log(args, emr_log_uri: str) -> str:
    """Where the job will log, once ``layout`` accepted every location the job will use (the rules
    the job applies at its start: checked here, before a cluster is paid for)."""
    return layout.job_locations(args.input, args.output, job_option(args.job_args, "--state"),
                                job_option(args.job_args, "--log-uri"), emr_log_uri)["job_log"]


def weights_locations(args, code_prefix: str) -> tuple[str, str]:
    """(the weights' S3 URI, '' for imagenet or random; what the job's --weights names). A local
    file is uploaded under the code prefix; a new cluster's bootstrap stages it on every node."""
    weights = args.weights
    if weights in ("imagenet", "random"):
        return "", weights
    s3_uri = weights if weights.startswith("s3://") else f"{code_prefix}weights/{Path(weights).name}"
    if args.mode == "create":
        return s3_uri, f"{WEIGHTS_DIR}/{Path(s3_uri).name}"
    return s3_uri, s3_uri  # a running cluster had no chance to stage it


def policy_args(args, code: str, log_uri: str, env: str, weights_s3: str) -> list[str]:
    """``extractor.deploy.iam``'s arguments: every prefix this run reads or writes."""
    kms = args.sse_kms_key_id
    if args.mode == "policy" and kms and not kms.startswith("arn:aws:kms:"):
        # IAM names a KMS key by its ARN only: a key id or alias there would grant nothing.
        raise ValueError(f"--print-policy needs --sse-kms-key-id as a key ARN (arn:aws:kms:...), got '{kms}'")
    result = ["--input", args.input, "--output", args.output, "--code", code, "--emr-log-uri", log_uri]
    for flag, value in (("--weights", weights_s3), ("--kms-key-arn", kms),
                        ("--log-uri", job_option(args.job_args, "--log-uri")),
                        ("--state", job_option(args.job_args, "--state")),
                        ("--inventory", job_option(args.job_args, "--inventory")),
                        ("--packed-env", env if args.packed_env else "")):
        if value:
            result += [flag, value]
    return result


def cluster_args(args, weights_s3: str) -> list[str]:
    """``extractor.deploy.emr``'s arguments but the folder, the code prefix and driver.py's."""
    result = ["--primary-type", args.instance_type, "--core-type", args.core_type, "--core-count", args.core_count,
              "--task-count", args.task_count, "--release", args.release, "--driver-memory", args.driver_memory]
    for flag, value in (("--task-type", args.task_type), ("--executor-cores", args.executor_cores),
                        ("--precision", job_option(args.job_args, "--precision"))):
        if value:
            result += [flag, value]
    if args.spot:
        result.append("--spot")
    if args.executor_memory or args.executor_overhead:
        result += ["--executor-memory", args.executor_memory, "--executor-overhead", args.executor_overhead]
    if args.mode == "create" and weights_s3:
        result += ["--weights-uri", weights_s3]
    return result + ["--action-on-failure", "TERMINATE_CLUSTER" if args.auto_terminate else "CONTINUE"]


def make_plan(args) -> Plan:
    """Every check, in the order the script used to make them, then the derived values."""
    check_numbers(args)
    check_sources(args)
    code, log_uri, env = prefixes(args)
    log = job_log(args, log_uri)
    weights_s3, weights_for_job = weights_locations(args, code)
    driver_args = ["--input", args.input, "--output", args.output, "--weights", weights_for_job,
                   "--region", args.region]
    if args.sse_kms_key_id:
        driver_args += ["--sse-kms-key-id", args.sse_kms_key_id]
    return Plan(code, log_uri, env, log, weights_s3, driver_args + args.job_args,
                policy_args(args, code, log_uri, env, weights_s3), cluster_args(args, weights_s3))


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m extractor.deploy.plan",
                           description="Check create_cluster.sh's settings; print its variables.")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--prog", default="create_cluster.sh", help="the script's name, for its messages")
    parser.add_argument("--input", default="", metavar="S3_URI")
    parser.add_argument("--output", default="", metavar="S3_URI")
    for flag in ("--allow-non-eu-region", "--spot", "--packed-env", "--auto-terminate"):
        parser.add_argument(flag, action="store_true")
    for flag, default in (("--region", "eu-west-3"), ("--release", "emr-7.5.0"), ("--instance-type", "m5.xlarge"),
                          ("--core-type", "m5.4xlarge"), ("--core-count", "2"), ("--task-type", ""),
                          ("--task-count", "0"), ("--idle-timeout", "3600"), ("--driver-memory", "10g"),
                          ("--executor-memory", ""), ("--executor-overhead", ""), ("--executor-cores", ""),
                          ("--bucket", ""), ("--code-prefix", ""), ("--log-uri", ""), ("--env-prefix", ""),
                          ("--weights", "imagenet"), ("--sse-kms-key-id", "")):
        parser.add_argument(flag, default=default)
    parser.add_argument("job_args", nargs="*", metavar="-- DRIVER_OPTIONS")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        plan = make_plan(args)
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(plan.as_shell())
    return 0


if __name__ == "__main__":
    sys.exit(main())
