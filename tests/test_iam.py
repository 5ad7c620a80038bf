"""The instance-profile policy: its shape, a small IAM evaluator, and the job's real S3 calls.

The last test runs the real driver twice under spark-submit against moto's server, records
every S3 request it makes (moto's recorder), turns each into (IAM action, resource, context)
and checks that the policy built for that run allows all of them, and nothing needed is missing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from extractor.iam import instance_profile_policy, main
from extractor.synthetic import fruit_dataset

from conftest import REPO, recorded_requests, save_full_model, submit_driver

# ---------------------------------------------------------------------------------------------
# A small IAM policy evaluator: explicit Deny wins, then any matching Allow, else implicit deny.


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _glob(pattern: str, value: str) -> bool:
    """IAM wildcards: '*' any run of characters ('/' included), '?' exactly one."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def _condition_holds(condition: dict, context: dict) -> bool:
    """Every operator and every key must hold (AND); the values of one key are ORed."""
    for operator, tests in condition.items():
        for key, expected in tests.items():
            expected = [str(e) for e in _as_list(expected)]
            present = key in context
            value = context.get(key)
            if operator == "StringLike":
                holds = present and any(_glob(p, value) for p in expected)
            elif operator == "StringEquals":
                holds = present and value in expected
            elif operator == "Bool":
                holds = present and str(value).lower() in [e.lower() for e in expected]
            elif operator == "Null":  # "true": the key is absent; "false": it is present
                holds = any((e == "true") == (not present) for e in expected)
            else:
                raise AssertionError(f"the test evaluator does not know the operator {operator}")
            if not holds:
                return False
    return True


def matching_statements(policy: dict, action: str, resource: str, context: dict) -> list[dict]:
    found = []
    for statement in policy["Statement"]:
        unsupported = set(statement) & {"NotAction", "NotResource", "Principal", "NotPrincipal"}
        assert not unsupported, f"the test evaluator does not handle {unsupported}"
        if (any(_glob(a.lower(), action.lower()) for a in _as_list(statement["Action"]))
                and any(_glob(r, resource) for r in _as_list(statement["Resource"]))
                and _condition_holds(statement.get("Condition", {}), context)):
            found.append(statement)
    return found


def decide(policy: dict, action: str, resource: str, context: dict) -> tuple[bool, list[str]]:
    """(allowed, Sids of the Allow statements that matched)."""
    statements = matching_statements(policy, action, resource, context)
    if any(s["Effect"] == "Deny" for s in statements):
        return False, []
    allows = [s.get("Sid", "") for s in statements if s["Effect"] == "Allow"]
    return bool(allows), allows


def allowed(policy, action, resource, *, prefix=None, sse=None, tls=True) -> bool:
    context = {"aws:SecureTransport": "true" if tls else "false"}
    if prefix is not None:
        context["s3:prefix"] = prefix
    if sse is not None:
        context["s3:x-amz-server-side-encryption"] = sse
    return decide(policy, action, resource, context)[0]


def test_evaluator_explicit_deny_wins_and_nothing_is_allowed_by_default():
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::b/*"},
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::b",
         "Condition": {"StringLike": {"s3:prefix": ["a/", "a/*"]}}},
        {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::b/secret/*"},
        {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "*",
         "Condition": {"Null": {"s3:x-amz-server-side-encryption": "true"}}},
    ]}
    assert allowed(policy, "s3:GetObject", "arn:aws:s3:::b/x/y.jpg")
    assert allowed(policy, "S3:getobject", "arn:aws:s3:::b/x")          # actions ignore case
    assert not allowed(policy, "s3:GetObject", "arn:aws:s3:::c/x")      # no Allow matches
    assert not allowed(policy, "s3:GetObject", "arn:aws:s3:::B/x")      # resources do not
    assert allowed(policy, "s3:PutObject", "arn:aws:s3:::b/x", sse="AES256")
    assert not allowed(policy, "s3:PutObject", "arn:aws:s3:::b/x")      # Null condition: no header
    assert not allowed(policy, "s3:PutObject", "arn:aws:s3:::b/secret/k", sse="AES256")
    assert allowed(policy, "s3:ListBucket", "arn:aws:s3:::b", prefix="a/b/")
    assert not allowed(policy, "s3:ListBucket", "arn:aws:s3:::b", prefix="ab/")
    assert not allowed(policy, "s3:ListBucket", "arn:aws:s3:::b")        # absent key: StringLike fails
    assert _glob("arn:aws:s3:::b/a?c", "arn:aws:s3:::b/abc") and not _glob("arn:aws:s3:::b/a?c", "arn:aws:s3:::b/ac")
    assert not _glob("arn:aws:s3:::b/a.c", "arn:aws:s3:::b/abc")         # '.' is literal


# ---------------------------------------------------------------------------------------------
# The policy for a typical deployment.

INPUT, OUTPUT = "s3://photos/fruits/Test/", "s3://results/features/run1/"
CODE, EMR_LOGS = "s3://deploy/code/", "s3://cluster-logs/emr/"
WEIGHTS = "s3://deploy/models/vgg16.h5"
KMS = "arn:aws:kms:eu-west-3:111122223333:key/0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
S3_OBJECT_ACTIONS = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"}


def build(**changes):
    args = dict(input_uri=INPUT, output_uri=OUTPUT, code_uri=CODE, log_uri=None,
                emr_log_uri=EMR_LOGS, weights_uri=WEIGHTS, kms_key_arn=None)
    args.update(changes)
    return instance_profile_policy(**args)


def allow_pairs(policy) -> set[tuple[str, str, str]]:
    """(action, resource, condition JSON) for every Allow."""
    return {(action, resource, json.dumps(s.get("Condition"), sort_keys=True))
            for s in policy["Statement"] if s["Effect"] == "Allow"
            for action in _as_list(s["Action"]) for resource in _as_list(s["Resource"])}


def test_policy_document_structure_and_exact_allows():
    policy = build()
    assert json.loads(json.dumps(policy)) == policy
    assert policy["Version"] == "2012-10-17" and set(policy) == {"Version", "Statement"}
    sids = [s["Sid"] for s in policy["Statement"]]
    assert len(sids) == len(set(sids)) and all(re.fullmatch(r"[A-Za-z0-9]+", sid) for sid in sids)
    for statement in policy["Statement"]:
        assert statement["Effect"] in ("Allow", "Deny")
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource", "Condition"}

    def like(*prefixes):
        return json.dumps({"StringLike": {"s3:prefix": list(prefixes)}}, sort_keys=True)

    assert allow_pairs(policy) == {
        ("s3:GetBucketLocation", "arn:aws:s3:::photos", "null"),
        ("s3:GetBucketLocation", "arn:aws:s3:::results", "null"),
        ("s3:ListBucket", "arn:aws:s3:::photos", like("fruits/Test/", "fruits/Test/*")),
        ("s3:ListBucket", "arn:aws:s3:::results", like("features/run1/", "features/run1/*")),
        ("s3:GetObject", "arn:aws:s3:::photos/fruits/Test/*", "null"),
        ("s3:GetObject", "arn:aws:s3:::deploy/code/*", "null"),
        ("s3:GetObject", "arn:aws:s3:::deploy/models/vgg16.h5", "null"),
        ("s3:PutObject", "arn:aws:s3:::results/features/run1/*", "null"),
        ("s3:DeleteObject", "arn:aws:s3:::results/features/run1/*", "null"),
        ("s3:PutObject", "arn:aws:s3:::results/features/run1/logs/*", "null"),  # default --log-uri
        ("s3:PutObject", "arn:aws:s3:::cluster-logs/emr/*", "null"),
    }


def test_every_allow_is_narrow():
    given = [INPUT, OUTPUT, CODE, EMR_LOGS, "s3://job-logs/run1/"]
    allowed_arns = tuple(f"arn:aws:s3:::{uri[len('s3://'):]}" for uri in given)
    policy = build(log_uri="s3://job-logs/run1/", kms_key_arn=KMS)
    for statement in (s for s in policy["Statement"] if s["Effect"] == "Allow"):
        for action in _as_list(statement["Action"]):
            assert "*" not in action and "?" not in action, statement
        for resource in _as_list(statement["Resource"]):
            assert resource != "*", statement
            if any(a.startswith("s3:") for a in _as_list(statement["Action"])):
                bucket_only = resource.count("/") == 0
                assert (resource.startswith(allowed_arns) or resource == "arn:aws:s3:::deploy/models/vgg16.h5"
                        or (bucket_only and resource in ("arn:aws:s3:::photos", "arn:aws:s3:::results"))), resource
                if bucket_only and _as_list(statement["Action"]) != ["s3:GetBucketLocation"]:
                    # listing is always held to the prefix
                    assert _as_list(statement["Action"]) == ["s3:ListBucket"] and "StringLike" in statement["Condition"]


def test_deny_statements_are_present():
    denies = [s for s in build()["Statement"] if s["Effect"] == "Deny"]
    tls = [s for s in denies if s["Action"] == "s3:*"]
    assert len(tls) == 1 and tls[0]["Resource"] == "*"
    assert tls[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    sse = [s for s in denies if s["Action"] == "s3:PutObject"]
    assert len(sse) == 1 and sse[0]["Condition"] == {"Null": {"s3:x-amz-server-side-encryption": "true"}}
    assert set(_as_list(sse[0]["Resource"])) == {"arn:aws:s3:::results/features/run1/*",
                                                 "arn:aws:s3:::results/features/run1/logs/*"}


def test_kms_statement_only_with_a_key():
    def kms_statements(policy):
        return [s for s in policy["Statement"] if any(a.startswith("kms:") for a in _as_list(s["Action"]))]

    assert kms_statements(build()) == []
    [statement] = kms_statements(build(kms_key_arn=KMS))
    assert statement["Effect"] == "Allow" and statement["Resource"] == KMS
    assert sorted(_as_list(statement["Action"])) == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert not allowed(build(kms_key_arn=KMS), "kms:Decrypt", KMS.replace("0b1c", "ffff"))


def test_weights_statement_only_for_an_s3_object():
    for weights in (None, "imagenet", "random"):
        policy = build(weights_uri=weights)
        assert "ReadWeightsObject" not in [s["Sid"] for s in policy["Statement"]]
        assert not allowed(policy, "s3:GetObject", "arn:aws:s3:::deploy/models/vgg16.h5")
    assert allowed(build(), "s3:GetObject", "arn:aws:s3:::deploy/models/vgg16.h5")


def test_whole_bucket_input_lists_without_condition():
    policy = build(input_uri="s3://photos")
    assert allowed(policy, "s3:ListBucket", "arn:aws:s3:::photos")
    assert allowed(policy, "s3:GetObject", "arn:aws:s3:::photos/Apple/1.jpg")
    assert not allowed(policy, "s3:ListBucket", "arn:aws:s3:::results")


POLICY = build()
P, R, D, L = "arn:aws:s3:::photos", "arn:aws:s3:::results", "arn:aws:s3:::deploy", "arn:aws:s3:::cluster-logs"


@pytest.mark.parametrize("action,resource,context", [
    ("s3:ListBucket", P, {"prefix": "fruits/Test/"}),
    ("s3:ListBucket", P, {"prefix": "fruits/Test/Apple Red/"}),
    ("s3:GetObject", f"{P}/fruits/Test/Apple Red/r_1.jpg", {}),
    ("s3:GetObject", f"{D}/code/driver.py", {}),
    ("s3:GetObject", f"{D}/code/extractor.zip", {}),
    ("s3:GetObject", f"{D}/code/bootstrap.sh", {}),
    ("s3:GetObject", f"{D}/models/vgg16.h5", {}),
    ("s3:ListBucket", R, {"prefix": "features/run1/"}),
    ("s3:PutObject", f"{R}/features/run1/features/Lemon.csv", {"sse": "AES256"}),
    ("s3:PutObject", f"{R}/features/run1/_SUCCESS", {"sse": "aws:kms"}),
    ("s3:DeleteObject", f"{R}/features/run1/pca/Lime.csv", {}),
    ("s3:PutObject", f"{R}/features/run1/logs/20260101T000000Z.log", {"sse": "AES256"}),
    ("s3:PutObject", f"{L}/emr/j-ABC/node/i-1/applications/spark.gz", {}),
])
def test_what_the_job_and_emr_need_is_allowed(action, resource, context):
    assert allowed(POLICY, action, resource, **context)


@pytest.mark.parametrize("action,resource,context", [
    ("s3:PutObject", f"{P}/fruits/Test/Apple Red/new.jpg", {"sse": "AES256"}),   # write into the input
    ("s3:DeleteObject", f"{P}/fruits/Test/Apple Red/r_1.jpg", {}),
    ("s3:GetObject", "arn:aws:s3:::other-bucket/fruits/Test/a.jpg", {}),           # another bucket
    ("s3:GetObject", f"{P}/fruits/Training/a.jpg", {}),                            # a sibling prefix
    ("s3:GetObject", f"{P}/fruits/Test2/a.jpg", {}),                               # Test vs Test2
    ("s3:ListBucket", P, {}),                                                      # the bucket root
    ("s3:ListBucket", P, {"prefix": ""}),
    ("s3:ListBucket", P, {"prefix": "fruits/"}),
    ("s3:ListBucket", "arn:aws:s3:::other-bucket", {"prefix": "fruits/Test/"}),
    ("s3:ListBucket", R, {}),
    ("s3:GetObject", f"{R}/features/run1/manifest.json", {}),                      # the job never reads outputs
    ("s3:PutObject", f"{R}/features/run1/features/Lemon.csv", {}),                 # no SSE header
    ("s3:PutObject", f"{R}/features/run1/features/Lemon.csv", {"sse": "AES256", "tls": False}),
    ("s3:GetObject", f"{P}/fruits/Test/Apple Red/r_1.jpg", {"tls": False}),
    ("s3:PutObject", f"{R}/features/run2/x.csv", {"sse": "AES256"}),
    ("s3:PutObject", f"{D}/code/driver.py", {"sse": "AES256"}),
    ("s3:GetObject", f"{D}/models/other.h5", {}),
    ("s3:PutObject", f"{L}/emr-other/x.gz", {"sse": "AES256"}),
    ("s3:DeleteObject", f"{L}/emr/j-ABC/x.gz", {}),
    ("s3:DeleteBucket", R, {}),
    ("s3:PutBucketPolicy", P, {}),
    ("s3:GetObjectAcl", f"{P}/fruits/Test/a.jpg", {}),
    ("kms:Decrypt", KMS, {}),
])
def test_everything_else_is_denied(action, resource, context):
    assert not allowed(POLICY, action, resource, **context)


@pytest.mark.parametrize("changes,message", [
    ({"input_uri": "photos/fruits/"}, "--input: expected an s3://bucket/prefix URI, got 'photos/fruits/'"),
    ({"output_uri": "s3://results"}, "--output needs a prefix"),
    ({"output_uri": "s3://photos/fruits/Test/out/"}, "overlap"),
    ({"log_uri": "s3://photos/fruits/Test/logs/"}, "--log-uri s3://photos/fruits/Test/logs/ and --input"),
    ({"emr_log_uri": "s3://photos/"}, "--emr-log-uri s3://photos/ and --input"),
    ({"code_uri": "s3:///code/"}, "--code: no bucket name"),
    ({"input_uri": "s3://photos/fruits/*/"}, "wildcard"),
    ({"weights_uri": "s3://deploy/"}, "--weights: no object key"),
    ({"weights_uri": "deploy/models/w.h5"}, "--weights: expected the s3:// URI"),
    ({"kms_key_arn": "alias/fruits"}, "--kms-key-arn: expected arn:aws:kms"),
])
def test_bad_values_are_refused(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(**changes)


# ---------------------------------------------------------------------------------------------
# The CLI the deployment script calls.

CLI_ARGS = ["--input", INPUT, "--output", OUTPUT, "--code", CODE, "--emr-log-uri", EMR_LOGS]


def test_cli_prints_the_policy_as_json():
    result = subprocess.run([sys.executable, "-m", "extractor.iam", *CLI_ARGS, "--weights", WEIGHTS,
                             "--kms-key-arn", KMS], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('{\n  "Version": "2012-10-17",\n  "Statement": [\n')  # indent 2
    assert json.loads(result.stdout) == build(kms_key_arn=KMS)


def test_cli_log_uri_defaults_to_output_logs(capsys):
    assert main([*CLI_ARGS]) == 0
    policy = json.loads(capsys.readouterr().out)
    assert allowed(policy, "s3:PutObject", "arn:aws:s3:::results/features/run1/logs/r.log", sse="AES256")
    assert main([*CLI_ARGS, "--log-uri", "s3://job-logs/fruits/"]) == 0
    policy = json.loads(capsys.readouterr().out)
    assert allowed(policy, "s3:PutObject", "arn:aws:s3:::job-logs/fruits/r.log", sse="AES256")
    assert [s["Resource"] for s in policy["Statement"] if s["Sid"] == "WriteJobLog"] == ["arn:aws:s3:::job-logs/fruits/*"]


@pytest.mark.parametrize("args,message", [
    (["--input", "bucket/in", "--output", OUTPUT, "--code", CODE, "--emr-log-uri", EMR_LOGS],
     "expected an s3://bucket/prefix URI, got 'bucket/in'"),
    ([*CLI_ARGS, "--log-uri", "https://example.com/logs/"], "got 'https://example.com/logs/'"),
    ([*CLI_ARGS, "--weights", "s3://deploy/"], "no object key in 's3://deploy/'"),
    ([*CLI_ARGS, "--kms-key-arn", "1234"], "got '1234'"),
    (["--input", INPUT, "--output", OUTPUT], "the following arguments are required: --code, --emr-log-uri"),
])
def test_cli_bad_arguments_one_line_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and message in lines[0], err


# ---------------------------------------------------------------------------------------------
# The job's real calls, recorded on moto's server, against the policy built for the run.

CALL_SSE_HEADER = "x-amz-server-side-encryption"


def recorded_calls(entries: list[dict], bucket: str):
    """Each recorded request on ``bucket`` -> (IAM action, resource ARN, context, method, key).

    Requests this mapping does not know are returned apart, so that a new kind of call fails.
    """
    calls, unknown = [], []
    for entry in entries:
        url = urlsplit(entry["url"])
        bucket_part, _, key_part = url.path.lstrip("/").partition("/")  # path-style: 127.0.0.1
        if unquote(bucket_part) != bucket:
            continue
        key = unquote(key_part)
        query = parse_qs(url.query, keep_blank_values=True)
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        method = entry["method"]
        context = {"aws:SecureTransport": "true"}  # boto3 uses https on AWS; here moto is plain http
        arn = f"arn:aws:s3:::{bucket}/{key}"
        if key and method in ("GET", "HEAD") and set(query) <= {"partNumber", "versionId"}:
            calls.append(("s3:GetObject", arn, context, method, key))
        elif key and method == "PUT" and not query and "x-amz-copy-source" not in headers:
            if CALL_SSE_HEADER in headers:
                context[f"s3:{CALL_SSE_HEADER}"] = headers[CALL_SSE_HEADER]
            calls.append(("s3:PutObject", arn, context, method, key))
        elif key and method == "DELETE" and not query:
            calls.append(("s3:DeleteObject", arn, context, method, key))
        elif not key and method == "GET" and set(query) == {"location"}:
            calls.append(("s3:GetBucketLocation", f"arn:aws:s3:::{bucket}", context, method, None))
        elif not key and method == "GET" and query.get("list-type") == ["2"]:
            if "prefix" in query:
                context["s3:prefix"] = query["prefix"][0]
            calls.append(("s3:ListBucket", f"arn:aws:s3:::{bucket}", context, method, None))
        elif not key and method == "POST" and "delete" in query:
            body = (entry.get("body") or "").encode("utf-8")
            keys = [element.text for element in ET.fromstring(body).iter()
                    if element.tag.rsplit("}", 1)[-1] == "Key"]
            if not keys:
                unknown.append(entry)
            for deleted in keys:
                calls.append(("s3:DeleteObject", f"arn:aws:s3:::{bucket}/{deleted}", dict(context), method, deleted))
        else:
            unknown.append({k: entry[k] for k in ("method", "url")})
    return calls, unknown


def submit(*args, endpoint, log_dir):
    result = submit_driver(endpoint, *args, log_dir=log_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_every_call_of_two_real_runs_is_allowed(s3_server, server_bucket, tmp_path):
    client, bucket = server_bucket
    images = fruit_dataset(3, ["Apple Red", "Lemon", "Lime"])
    images["Lemon/bad.jpg"] = images["Lemon/lemon_000.jpg"][:600]  # truncated: the job GETs it, then fails it
    for key, body in images.items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=body)
    client.put_object(Bucket=bucket, Key="in/Lemon/notes.txt", Body=b"listed, never read")
    save_full_model(str(tmp_path / "tiny.weights.h5"), seed=11)
    client.upload_file(str(tmp_path / "tiny.weights.h5"), bucket, "models/tiny.weights.h5")

    uri = f"s3://{bucket}"
    args = ["--input", f"{uri}/in/", "--output", f"{uri}/out/", "--log-uri", f"{uri}/joblogs/",
            "--model", "tiny", "--weights", f"{uri}/models/tiny.weights.h5", "--batch-size", "4", "--pca-k", "2"]
    with recorded_requests(tmp_path / "run1.jsonl") as run1:
        submit(*args, endpoint=s3_server, log_dir=tmp_path / "run1")
    # Not recorded: the test itself removes one fruit, so that run 2 finds stale outputs.
    lime = [k for k in images if k.startswith("Lime/")]
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": f"in/{k}"} for k in lime]})
    with recorded_requests(tmp_path / "run2.jsonl") as run2:
        submit(*args, endpoint=s3_server, log_dir=tmp_path / "run2")
    calls, unknown = recorded_calls(run1 + run2, bucket)

    manifest = json.loads(client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    assert manifest["weights"]["kind"] == "s3" and manifest["counts"]["failed"] == 1
    outputs = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert "out/features/Lemon.csv" in outputs and "out/features/Lime.csv" not in outputs

    assert unknown == []
    policy = instance_profile_policy(f"{uri}/in/", f"{uri}/out/", f"{uri}/code/", f"{uri}/joblogs/",
                                     f"{uri}/emr-logs/", weights_uri=f"{uri}/models/tiny.weights.h5")
    denied, seen = [], set()
    for action, resource, context, method, _ in calls:
        ok, sids = decide(policy, action, resource, context)
        if not ok:
            denied.append((method, action, resource, context))
        seen.update((action, sid) for sid in sids)
    assert denied == []
    # Each statement the job needs was needed, and the job used no other (code/EMR logs are EMR's).
    assert seen == {("s3:GetBucketLocation", "LocateJobBuckets"), ("s3:ListBucket", "ListInputPrefix"), ("s3:ListBucket", "ListOutputPrefixForStaleFiles"),
                    ("s3:GetObject", "ReadInputImages"), ("s3:GetObject", "ReadWeightsObject"),
                    ("s3:PutObject", "WriteAndReplaceOutputs"), ("s3:DeleteObject", "WriteAndReplaceOutputs"),
                    ("s3:PutObject", "WriteJobLog")}

    by_action = {}
    for action, resource, context, method, key in calls:
        by_action.setdefault(action, []).append((method, key, context))
    # Every write carried SSE; every image (the bad one too) was read; the listings used the prefixes.
    assert all(c.get(f"s3:{CALL_SSE_HEADER}") == "AES256" for _, _, c in by_action["s3:PutObject"])
    assert {f"in/{k}" for k in images} <= {k for m, k, _ in by_action["s3:GetObject"] if m == "GET"}
    assert "in/Lemon/notes.txt" not in {k for _, k, _ in by_action["s3:GetObject"]}
    assert {m for m, k, _ in by_action["s3:GetObject"] if k == "models/tiny.weights.h5"} >= {"GET"}
    assert {c.get("s3:prefix") for _, _, c in by_action["s3:ListBucket"]} == {"in/", "out/"}
    deleted = {k for _, k, _ in by_action["s3:DeleteObject"]}
    assert {"out/_SUCCESS", "out/features/Lime.csv", "out/pca/Lime.csv"} <= deleted
    assert all(k.startswith("out/") for k in deleted)

    # The check can fail: without the weights statement, or with the job's output elsewhere, calls are denied.
    for narrower in (instance_profile_policy(f"{uri}/in/", f"{uri}/out/", f"{uri}/code/", f"{uri}/joblogs/",
                                             f"{uri}/emr-logs/"),
                     instance_profile_policy(f"{uri}/in/", f"{uri}/out2/", f"{uri}/code/", f"{uri}/joblogs/",
                                             f"{uri}/emr-logs/", weights_uri=f"{uri}/models/tiny.weights.h5")):
        assert any(not decide(narrower, a, r, c)[0] for a, r, c, _, _ in calls)
    # And a call the job never makes is denied by the run's policy.
    assert not allowed(policy, "s3:PutObject", f"arn:aws:s3:::{bucket}/in/Lemon/new.jpg", sse="AES256")
    assert not allowed(policy, "s3:GetObject", f"arn:aws:s3:::{bucket}/out/manifest.json")

    # For the report: the (action, resource pattern) pairs the job was seen to use.
    patterns = sorted({(a, re.sub(r"/(in|out|joblogs)/.*", r"/\1/*", r)) for a, r, _, _, _ in calls})
    print("\nrecorded:", len(calls), "calls;", json.dumps(patterns), file=sys.stderr)
