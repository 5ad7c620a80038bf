"""The instance-profile policy: its shape, a small IAM evaluator, and the job's real S3 calls.

The last tests run the real driver under spark-submit against moto's server (twice with the
defaults, twice with --collect never --format parquet --incremental), record every S3 request it
makes (moto's recorder), turn each into (IAM action, resource, context) and check that the policy
built for that run allows all of them, and nothing needed is missing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from extractor.storage import layout
from extractor.deploy.iam import instance_profile_policy, main
from extractor.storage.multipart import MultipartWriter
from extractor.storage.s3 import S3Settings, parse_s3_uri
from extractor.dev.inventory_files import inventory_from_bucket
from extractor.dev.synthetic import fruit_dataset

from conftest import REPO, recorded_requests, save_full_model

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
            elif operator == "StringNotEquals":  # true when the key is absent, like every negated operator
                holds = not present or value not in expected
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


def test_evaluator_negated_string_condition_holds_when_the_key_is_absent():
    """IAM: StringNotEquals is true without the key; only a Null "false" beside it limits a Deny to
    requests that carry the key (the form DenyJobWritesWithOtherSse relies on)."""
    allow = {"Effect": "Allow", "Action": "s3:PutObject", "Resource": "*"}
    not_equals = {"StringNotEquals": {"s3:x-amz-server-side-encryption": ["AES256", "aws:kms"]}}
    alone = {"Statement": [allow, {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "*",
                                   "Condition": not_equals}]}
    present = {"Statement": [allow, {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "*",
                                     "Condition": {**not_equals, "Null": {"s3:x-amz-server-side-encryption": "false"}}}]}
    assert not allowed(alone, "s3:PutObject", "arn:aws:s3:::b/k")                    # no header: denied
    assert allowed(present, "s3:PutObject", "arn:aws:s3:::b/k")                      # no header: not this Deny's
    for policy in (alone, present):
        assert allowed(policy, "s3:PutObject", "arn:aws:s3:::b/k", sse="AES256")
        assert allowed(policy, "s3:PutObject", "arn:aws:s3:::b/k", sse="aws:kms")
        assert not allowed(policy, "s3:PutObject", "arn:aws:s3:::b/k", sse="aws:kms:dsse")


# ---------------------------------------------------------------------------------------------
# The policy for a typical deployment.

INPUT, OUTPUT = "s3://photos/fruits/Test/", "s3://results/features/run1/"
CODE, EMR_LOGS = "s3://deploy/code/", "s3://cluster-logs/emr/"
WEIGHTS = "s3://deploy/models/vgg16.h5"
STATE = "s3://job-state/fruits/"
KMS = "arn:aws:kms:eu-west-3:111122223333:key/0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
S3_OBJECT_ACTIONS = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"}


def build(**changes):
    args = dict(input_uri=INPUT, output_uri=OUTPUT, code_uri=CODE, log_uri=None,
                emr_log_uri=EMR_LOGS, weights_uri=WEIGHTS, kms_key_arn=None, state_uri=None)
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
        ("s3:AbortMultipartUpload", "arn:aws:s3:::results/features/run1/*", "null"),
        ("s3:GetObject", "arn:aws:s3:::results/features/run1/_staging/*", "null"),  # --collect never's parts
        ("s3:GetObject", "arn:aws:s3:::results/features/run1/_lock.json", "null"),  # the run lock's holder
        ("s3:PutObject", "arn:aws:s3:::results/features/run1/logs/*", "null"),  # default --log-uri
        ("s3:PutObject", "arn:aws:s3:::cluster-logs/emr/*", "null"),
    }
    # --state adds its listing, its objects and asking where its bucket is (the preflight refuses
    # a state bucket outside the job's region, as it does for the input and output), nothing else.
    assert allow_pairs(build(state_uri=STATE)) - allow_pairs(policy) == {
        ("s3:GetBucketLocation", "arn:aws:s3:::job-state", "null"),
        ("s3:ListBucket", "arn:aws:s3:::job-state", like("fruits/", "fruits/*")),
        ("s3:GetObject", "arn:aws:s3:::job-state/fruits/*", "null"),
        ("s3:PutObject", "arn:aws:s3:::job-state/fruits/*", "null"),
        ("s3:DeleteObject", "arn:aws:s3:::job-state/fruits/*", "null"),
    }
    assert allow_pairs(policy) <= allow_pairs(build(state_uri=STATE))


def test_every_allow_is_narrow():
    given = [INPUT, OUTPUT, CODE, EMR_LOGS, "s3://job-logs/run1/", STATE]
    allowed_arns = tuple(f"arn:aws:s3:::{uri[len('s3://'):]}" for uri in given)
    policy = build(log_uri="s3://job-logs/run1/", kms_key_arn=KMS, state_uri=STATE)
    for statement in (s for s in policy["Statement"] if s["Effect"] == "Allow"):
        for action in _as_list(statement["Action"]):
            assert "*" not in action and "?" not in action, statement
        for resource in _as_list(statement["Resource"]):
            assert resource != "*", statement
            if any(a.startswith("s3:") for a in _as_list(statement["Action"])):
                bucket_only = resource.count("/") == 0
                assert (resource.startswith(allowed_arns) or resource == "arn:aws:s3:::deploy/models/vgg16.h5"
                        or (bucket_only and resource in ("arn:aws:s3:::photos", "arn:aws:s3:::results",
                                                         "arn:aws:s3:::job-state"))), resource
                if bucket_only and _as_list(statement["Action"]) != ["s3:GetBucketLocation"]:
                    # listing is always held to the prefix
                    assert _as_list(statement["Action"]) == ["s3:ListBucket"] and "StringLike" in statement["Condition"]


def test_deny_statements_are_present():
    denies = [s for s in build()["Statement"] if s["Effect"] == "Deny"]
    tls = [s for s in denies if s["Action"] == "s3:*"]
    assert len(tls) == 1 and tls[0]["Resource"] == "*"
    assert tls[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    sse = [s for s in denies if s["Action"] == "s3:PutObject"]
    assert len(sse) == 1 and sse[0]["Condition"] == {
        "Null": {"s3:x-amz-server-side-encryption": "false"},
        "StringNotEquals": {"s3:x-amz-server-side-encryption": ["AES256", "aws:kms"]}}
    assert set(_as_list(sse[0]["Resource"])) == {"arn:aws:s3:::results/features/run1/*",
                                                 "arn:aws:s3:::results/features/run1/logs/*"}
    [with_state] = [s for s in build(state_uri=STATE)["Statement"] if s["Sid"] == sse[0]["Sid"]]
    assert set(_as_list(with_state["Resource"])) == set(_as_list(sse[0]["Resource"])) | {"arn:aws:s3:::job-state/fruits/*"}
    [with_kms] = [s for s in build(kms_key_arn=KMS)["Statement"] if s["Sid"] == sse[0]["Sid"]]
    assert with_kms["Condition"]["StringNotEquals"] == {"s3:x-amz-server-side-encryption": ["aws:kms"]}


# What S3 authorises as s3:PutObject with which header: PutObject and CreateMultipartUpload carry
# the job's SSE header; UploadPart and CompleteMultipartUpload never carry one.
@pytest.mark.parametrize("kms,sse,ok", [
    (False, "AES256", True), (False, "aws:kms", True), (False, None, True),
    (False, "aws:kms:dsse", False), (False, "aes256", False),
    (True, "aws:kms", True), (True, None, True), (True, "AES256", False),   # no fallback from the key
])
def test_sse_deny_refuses_another_encryption_but_never_a_part_upload(kms, sse, ok):
    policy = build(state_uri=STATE, kms_key_arn=KMS if kms else None, log_uri="s3://job-logs/run1/")
    for resource in ("arn:aws:s3:::results/features/run1/features/Lemon.parquet",
                     "arn:aws:s3:::job-logs/run1/r.log", "arn:aws:s3:::job-state/fruits/v-r1/part-00000.npz"):
        assert allowed(policy, "s3:PutObject", resource, sse=sse) is ok, resource


def test_a_deny_on_a_missing_sse_header_would_refuse_multipart_parts():
    """Why the deny is not Null "true" (the earlier form) or StringNotEquals alone."""
    part = ("s3:PutObject", "arn:aws:s3:::results/features/run1/features/Lemon.parquet")
    assert allowed(build(), *part)                                            # UploadPart: no header
    for condition in ({"Null": {"s3:x-amz-server-side-encryption": "true"}},
                      {"StringNotEquals": {"s3:x-amz-server-side-encryption": ["AES256", "aws:kms"]}}):
        policy = build()
        [deny] = [s for s in policy["Statement"] if s["Sid"] == "DenyJobWritesWithOtherSse"]
        deny["Condition"] = condition
        assert not allowed(policy, *part)
        assert allowed(policy, *part, sse="AES256")                         # CreateMultipartUpload still passes


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


def test_packed_environment_is_readable_only_when_used():
    archive = "arn:aws:s3:::deploy/env/fruits-env-cpu-0123456789abcdef.tar.gz"
    assert not allowed(build(), "s3:GetObject", archive)
    policy = build(packed_env_uri="s3://deploy/env/")
    assert allowed(policy, "s3:GetObject", archive)  # spark-submit reads it to stage it for YARN
    assert not allowed(policy, "s3:PutObject", archive, sse="AES256")
    assert not allowed(policy, "s3:GetObject", "arn:aws:s3:::deploy/env2/x.tar.gz")


def test_an_inventory_is_readable_only_when_used_every_day_of_its_configuration():
    manifest = "s3://inventories/fruits/photos-bucket/daily/2026-12-05T01-00Z/manifest.json"
    data = "arn:aws:s3:::inventories/fruits/photos-bucket/daily/data/0f1e.csv.gz"
    assert not allowed(build(), "s3:GetObject", data)
    policy = build(inventory_uri=manifest)
    assert allowed(policy, "s3:GetObject", "arn:aws:s3:::" + manifest[len("s3://"):])
    assert allowed(policy, "s3:GetObject", data)
    assert allowed(policy, "s3:GetObject", "arn:aws:s3:::inventories/fruits/photos-bucket/daily/2026-12-06T01-00Z/"
                                           "manifest.json")
    assert not allowed(policy, "s3:GetObject", "arn:aws:s3:::inventories/fruits/photos-bucket/weekly/data/x.csv.gz")
    assert not allowed(policy, "s3:ListBucket", "arn:aws:s3:::inventories")
    assert not allowed(policy, "s3:PutObject", data, sse="AES256")
    with pytest.raises(ValueError, match="--inventory: expected s3://bucket/.../<configuration>/<date>/manifest.json"):
        build(inventory_uri="s3://inventories/manifest.json")


def test_whole_bucket_input_lists_without_condition():
    policy = build(input_uri="s3://photos")
    assert allowed(policy, "s3:ListBucket", "arn:aws:s3:::photos")
    assert allowed(policy, "s3:GetObject", "arn:aws:s3:::photos/Apple/1.jpg")
    assert not allowed(policy, "s3:ListBucket", "arn:aws:s3:::results")


POLICY = build(state_uri=STATE)
P, R, D, L = "arn:aws:s3:::photos", "arn:aws:s3:::results", "arn:aws:s3:::deploy", "arn:aws:s3:::cluster-logs"
S = "arn:aws:s3:::job-state"


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
    # --collect never: staged parts written, read back, deleted; files streamed in parts
    ("s3:PutObject", f"{R}/features/run1/_staging/20260101T000000Z/features/Lemon/part-00003", {"sse": "AES256"}),
    ("s3:GetObject", f"{R}/features/run1/_staging/20260101T000000Z/features/Lemon/part-00003", {}),
    ("s3:DeleteObject", f"{R}/features/run1/_staging/20260101T000000Z/features/Lemon/part-00003", {}),
    ("s3:PutObject", f"{R}/features/run1/features/Lemon.parquet", {}),          # UploadPart, Complete
    ("s3:AbortMultipartUpload", f"{R}/features/run1/features/Lemon.parquet", {}),
    # --incremental --state
    ("s3:ListBucket", S, {"prefix": "fruits/"}),
    ("s3:GetObject", f"{S}/fruits/state.json", {}),
    ("s3:GetObject", f"{S}/fruits/v-20260101T000000Z/part-00001.npz", {}),
    ("s3:PutObject", f"{S}/fruits/v-20260102T000000Z/part-00001.npz", {"sse": "AES256"}),
    ("s3:PutObject", f"{S}/fruits/state.json", {"sse": "AES256"}),
    ("s3:DeleteObject", f"{S}/fruits/v-20260101T000000Z/part-00001.npz", {}),
    # the run locks: conditional PutObjects, and a read of the holder when the prefix is taken
    ("s3:PutObject", f"{R}/features/run1/_lock.json", {"sse": "AES256"}),
    ("s3:GetObject", f"{R}/features/run1/_lock.json", {}),
    ("s3:PutObject", f"{S}/fruits/_lock.json", {"sse": "AES256"}),
    ("s3:GetObject", f"{S}/fruits/_lock.json", {}),
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
    ("s3:GetObject", f"{R}/features/run1/_lock.json.old", {}),                     # ... but its run lock
    ("s3:GetObject", f"{R}/features/_lock.json", {}),
    ("s3:DeleteObject", f"{S}/other/_lock.json", {}),
    ("s3:GetObject", f"{R}/features/run1/_staging2/x", {}),                        # ... but its staged parts
    ("s3:GetObject", f"{R}/features/run1/features/_staging/x", {}),
    ("s3:PutObject", f"{R}/features/run1/features/Lemon.csv", {"sse": "aws:kms:dsse"}),  # another encryption
    ("s3:AbortMultipartUpload", f"{P}/fruits/Test/Apple Red/new.jpg", {}),
    ("s3:AbortMultipartUpload", f"{S}/fruits/state.json", {}),                     # the state is never multipart
    ("s3:ListBucket", S, {}),
    ("s3:ListBucket", S, {"prefix": "fruits2/"}),
    ("s3:GetObject", f"{S}/fruits2/state.json", {}),
    ("s3:PutObject", f"{S}/other/state.json", {"sse": "AES256"}),
    ("s3:DeleteObject", f"{S}/other/x", {}),
    ("s3:PutObject", f"{S}/fruits/state.json", {"sse": "AES256", "tls": False}),
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
    ({"state_uri": "state/"}, "--state: expected an s3://bucket/prefix URI, got 'state/'"),
    ({"state_uri": "s3://job-state"}, "--state needs a prefix, not a whole bucket (each run deletes the older "
                                      "versions under it), got 's3://job-state/'"),
    ({"state_uri": "s3://photos/fruits/"}, "--state s3://photos/fruits/ and --input s3://photos/fruits/Test/ overlap"),
    ({"state_uri": "s3://photos/fruits/Test/state/"}, "--state s3://photos/fruits/Test/state/ and --input"),
    ({"state_uri": "s3://results/features/"}, "--output s3://results/features/run1/ is inside --state s3://results/features/"),
    ({"state_uri": "s3://job-state/$(x)/"}, "wildcard"),
])
def test_bad_values_are_refused(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(**changes)


@pytest.mark.parametrize("changes", [
    {"output_uri": "s3://results"}, {"output_uri": "s3://photos/fruits/Test/out/"}, {"input_uri": "s3://results"},
    {"log_uri": "s3://photos/fruits/Test/logs/"}, {"emr_log_uri": "s3://photos/"}, {"state_uri": "s3://job-state"},
    {"state_uri": "s3://photos/fruits/"}, {"state_uri": "s3://results/features/"},
])
def test_the_layout_rules_are_the_jobs_own(changes):
    """iam refuses what extractor.storage.layout refuses, in its words: one owner of the rules."""
    uris = {"input_uri": INPUT, "output_uri": OUTPUT, "log_uri": None, "emr_log_uri": EMR_LOGS,
            "state_uri": None, **changes}
    output = parse_s3_uri(uris["output_uri"])
    log = parse_s3_uri(uris["log_uri"]) if uris["log_uri"] else layout.default_log_location(output)
    with pytest.raises(ValueError) as from_layout:
        layout.check_locations(parse_s3_uri(uris["input_uri"]), output,
                               state=parse_s3_uri(uris["state_uri"]) if uris["state_uri"] else None,
                               written=[("--log-uri", log), ("--emr-log-uri", parse_s3_uri(uris["emr_log_uri"]))])
    with pytest.raises(ValueError) as from_iam:
        build(**changes)
    assert str(from_iam.value) == str(from_layout.value)


def test_staging_and_default_log_follow_the_layout():
    output = parse_s3_uri(OUTPUT)
    policy = {s["Sid"]: s for s in build()["Statement"]}
    assert policy["ReadStagedParts"]["Resource"] == f"arn:aws:s3:::{output.bucket}/{layout.staging(output).prefix}*"
    assert policy["ReadRunLock"]["Resource"] == f"arn:aws:s3:::{output.bucket}/{layout.lock_key(output)}"
    log = layout.default_log_location(output)
    assert policy["WriteJobLog"]["Resource"] == f"arn:aws:s3:::{log.bucket}/{log.prefix}*"


# ---------------------------------------------------------------------------------------------
# The CLI the deployment script calls.

CLI_ARGS = ["--input", INPUT, "--output", OUTPUT, "--code", CODE, "--emr-log-uri", EMR_LOGS]


def test_cli_prints_the_policy_as_json():
    result = subprocess.run([sys.executable, "-m", "extractor.deploy.iam", *CLI_ARGS, "--weights", WEIGHTS,
                             "--kms-key-arn", KMS, "--state", STATE], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('{\n  "Version": "2012-10-17",\n  "Statement": [\n')  # indent 2
    assert json.loads(result.stdout) == build(kms_key_arn=KMS, state_uri=STATE)
    assert "ListStatePrefix" in result.stdout


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
    ([*CLI_ARGS, "--state", INPUT + "state/"], "--state s3://photos/fruits/Test/state/ and --input"),
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

    ``method`` is the HTTP method, with the query that names a multipart step appended
    ("POST?uploads", "PUT?partNumber", "POST?uploadId", "DELETE?uploadId"): S3 authorises
    CreateMultipartUpload, UploadPart and CompleteMultipartUpload as s3:PutObject and
    AbortMultipartUpload as s3:AbortMultipartUpload ("Multipart upload API and permissions",
    Amazon S3 User Guide). Requests this mapping does not know are returned apart, so that a
    new kind of call fails.
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
        if CALL_SSE_HEADER in headers:  # S3 sets the condition key from the request's header, whatever the call
            context[f"s3:{CALL_SSE_HEADER}"] = headers[CALL_SSE_HEADER]
        copy = "x-amz-copy-source" in headers
        if key and method in ("GET", "HEAD") and set(query) <= {"partNumber", "versionId"}:
            calls.append(("s3:GetObject", arn, context, method, key))
        elif key and method == "PUT" and not query and not copy:
            calls.append(("s3:PutObject", arn, context, method, key))
        elif key and method == "POST" and set(query) == {"uploads"}:            # CreateMultipartUpload
            calls.append(("s3:PutObject", arn, context, "POST?uploads", key))
        elif key and method == "PUT" and set(query) == {"partNumber", "uploadId"} and not copy:  # UploadPart
            calls.append(("s3:PutObject", arn, context, "PUT?partNumber", key))
        elif key and method == "POST" and set(query) == {"uploadId"}:           # CompleteMultipartUpload
            calls.append(("s3:PutObject", arn, context, "POST?uploadId", key))
        elif key and method == "DELETE" and set(query) == {"uploadId"}:         # AbortMultipartUpload
            calls.append(("s3:AbortMultipartUpload", arn, context, "DELETE?uploadId", key))
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


def test_multipart_requests_are_mapped_to_their_iam_actions(server_bucket, tmp_path):
    """MultipartWriter's real requests (one object completed, one aborted), recorded on moto's server.
    The job's test data is too small for multipart (files under 8 MiB go up in one PutObject)."""
    client, bucket = server_bucket
    with recorded_requests(tmp_path / "mpu.jsonl") as entries:
        with MultipartWriter(client, S3Settings(), bucket, "out/features/big.parquet", part_size=5 * 2**20) as sink:
            sink.write(b"x" * (5 * 2**20 + 10))
        with pytest.raises(RuntimeError, match="stop"):
            with MultipartWriter(client, S3Settings(), bucket, "out/features/lost.parquet", part_size=5 * 2**20) as sink:
                sink.write(b"y" * (5 * 2**20))
                raise RuntimeError("stop")
    calls, unknown = recorded_calls(entries, bucket)
    assert unknown == []
    assert [(action, method, key, context.get(f"s3:{CALL_SSE_HEADER}")) for action, _, context, method, key in calls] == [
        ("s3:PutObject", "POST?uploads", "out/features/big.parquet", "AES256"),
        ("s3:PutObject", "PUT?partNumber", "out/features/big.parquet", None),
        ("s3:PutObject", "PUT?partNumber", "out/features/big.parquet", None),
        ("s3:PutObject", "POST?uploadId", "out/features/big.parquet", None),
        ("s3:PutObject", "POST?uploads", "out/features/lost.parquet", "AES256"),
        ("s3:PutObject", "PUT?partNumber", "out/features/lost.parquet", None),
        ("s3:AbortMultipartUpload", "DELETE?uploadId", "out/features/lost.parquet", None),
    ]
    uri = f"s3://{bucket}"
    policy = instance_profile_policy(f"{uri}/in/", f"{uri}/out/", f"{uri}/code/", None, f"{uri}/emr-logs/")
    assert all(decide(policy, a, r, c)[0] for a, r, c, _, _ in calls)
    # The earlier SSE deny (Null "true") refused exactly the parts and the completion.
    old = json.loads(json.dumps(policy))
    [deny] = [s for s in old["Statement"] if s["Sid"] == "DenyJobWritesWithOtherSse"]
    deny["Condition"] = {"Null": {f"s3:{CALL_SSE_HEADER}": "true"}}
    assert [m for a, r, c, m, _ in calls if not decide(old, a, r, c)[0]] == ["PUT?partNumber", "PUT?partNumber",
                                                                             "POST?uploadId", "PUT?partNumber"]
    # Without s3:AbortMultipartUpload the abort is refused (and the parts would stay stored).
    no_abort = json.loads(json.dumps(policy))
    [writes] = [s for s in no_abort["Statement"] if s["Sid"] == "WriteAndReplaceOutputs"]
    writes["Action"] = ["s3:PutObject", "s3:DeleteObject"]
    assert [m for a, r, c, m, _ in calls if not decide(no_abort, a, r, c)[0]] == ["DELETE?uploadId"]


def test_unknown_requests_are_returned_apart():
    base = "http://127.0.0.1:1/b/out/k"
    entries = [{"method": "GET", "url": base + "?uploadId=u1", "headers": {}},               # ListParts
               {"method": "PUT", "url": base + "?partNumber=1&uploadId=u1",                  # UploadPartCopy
                "headers": {"x-amz-copy-source": "b/in/a.jpg"}},
               {"method": "PUT", "url": base + "?tagging", "headers": {}},
               {"method": "GET", "url": "http://127.0.0.1:1/b?uploads", "headers": {}}]     # ListMultipartUploads
    calls, unknown = recorded_calls(entries, "b")
    assert calls == [] and [u["url"] for u in unknown] == [e["url"] for e in entries]


def submit(run, *args, endpoint, log_dir):
    """One real run (driver.main, in this process: the requests are the subject, not the process)."""
    assert run(endpoint, *args, log_dir=log_dir) == 0, sorted(log_dir.glob("*.log"))[-1].read_text()[-3000:]


def upload_inputs(client, bucket, tmp_path) -> dict[str, bytes]:
    """3 fruits x 3 images, a truncated image, a non-image key and the weights object; returns the images."""
    images = fruit_dataset(3, ["Apple Red", "Lemon", "Lime"])
    images["Lemon/bad.jpg"] = images["Lemon/lemon_000.jpg"][:600]  # truncated: the job GETs it, then fails it
    for key, body in images.items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=body)
    client.put_object(Bucket=bucket, Key="in/Lemon/notes.txt", Body=b"listed, never read")
    save_full_model(str(tmp_path / "tiny.weights.h5"), seed=11)
    client.upload_file(str(tmp_path / "tiny.weights.h5"), bucket, "models/tiny.weights.h5")
    return images


def check(policy, calls) -> tuple[list, set]:
    """(the calls the policy denies, the (action, Sid) pairs of the Allows that matched)."""
    denied, seen = [], set()
    for action, resource, context, method, _ in calls:
        ok, sids = decide(policy, action, resource, context)
        if not ok:
            denied.append((method, action, resource, context))
        seen.update((action, sid) for sid in sids)
    return denied, seen


def test_every_call_of_two_real_runs_is_allowed(s3_server, server_bucket, tmp_path, driver_here):
    client, bucket = server_bucket
    images = upload_inputs(client, bucket, tmp_path)

    uri = f"s3://{bucket}"
    args = ["--input", f"{uri}/in/", "--output", f"{uri}/out/", "--log-uri", f"{uri}/joblogs/",
            "--model", "tiny", "--weights", f"{uri}/models/tiny.weights.h5", "--batch-size", "4", "--pca-k", "2"]
    with recorded_requests(tmp_path / "run1.jsonl") as run1:
        submit(driver_here, *args, endpoint=s3_server, log_dir=tmp_path / "run1")
    # Not recorded: the test itself removes one fruit, so that run 2 finds stale outputs.
    lime = [k for k in images if k.startswith("Lime/")]
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": f"in/{k}"} for k in lime]})
    with recorded_requests(tmp_path / "run2.jsonl") as run2:
        submit(driver_here, *args, endpoint=s3_server, log_dir=tmp_path / "run2")
    calls, unknown = recorded_calls(run1 + run2, bucket)

    manifest = json.loads(client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    assert manifest["weights"]["kind"] == "s3" and manifest["counts"]["failed"] == 1
    outputs = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert "out/features/Lemon.csv" in outputs and "out/features/Lime.csv" not in outputs

    assert unknown == []
    policy = instance_profile_policy(f"{uri}/in/", f"{uri}/out/", f"{uri}/code/", f"{uri}/joblogs/",
                                     f"{uri}/emr-logs/", weights_uri=f"{uri}/models/tiny.weights.h5")
    denied, seen = check(policy, calls)
    assert denied == []
    # Each statement the job needs was needed, and the job used no other (code/EMR logs are EMR's).
    assert seen == {("s3:GetBucketLocation", "LocateJobBuckets"), ("s3:ListBucket", "ListInputPrefix"), ("s3:ListBucket", "ListOutputPrefixForStaleFiles"),
                    ("s3:GetObject", "ReadInputImages"), ("s3:GetObject", "ReadWeightsObject"),
                    ("s3:PutObject", "WriteAndReplaceOutputs"), ("s3:DeleteObject", "WriteAndReplaceOutputs"),
                    ("s3:PutObject", "WriteJobLog"), ("s3:GetObject", "ReadRunLock")}

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
    assert all(k.startswith("out/") for k in deleted) and "out/_lock.json" not in deleted
    # The run lock: run 1 creates it (If-None-Match), run 2 finds run 1's released marker, reads it
    # and takes it over (If-Match); every write of it is a conditional PutObject, never a delete.
    lock_calls = [(a, m) for a, r, _, m, k in calls if k == "out/_lock.json"]
    assert ("s3:GetObject", "GET") in lock_calls and {a for a, _ in lock_calls} == {"s3:PutObject", "s3:GetObject"}

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


def test_every_call_of_two_distributed_incremental_runs_is_allowed(s3_server, server_bucket, tmp_path,
                                                                     driver_here):
    """--collect never --format parquet --incremental: staged parts read back, state read and written;
    run 1 lists on the executors (--listing distributed: its snapshot read back), run 2 reads an
    S3 Inventory report (--inventory)."""
    client, bucket = server_bucket
    images = upload_inputs(client, bucket, tmp_path)
    uri = f"s3://{bucket}"
    args = ["--input", f"{uri}/in/", "--output", f"{uri}/out/", "--log-uri", f"{uri}/joblogs/",
            "--model", "tiny", "--weights", f"{uri}/models/tiny.weights.h5", "--batch-size", "4", "--pca-k", "2",
            "--collect", "never", "--format", "parquet", "--incremental", "--state", f"{uri}/state/"]
    with recorded_requests(tmp_path / "run1.jsonl") as run1:
        submit(driver_here, *args, "--listing", "distributed", endpoint=s3_server, log_dir=tmp_path / "run1")
    # Not recorded: one image removed, one added, so that run 2 reuses, drops and adds vectors,
    # then the inventory of the input that run 2 reads.
    client.delete_object(Bucket=bucket, Key="in/Lime/lime_000.jpg")
    client.put_object(Bucket=bucket, Key="in/Lime/lime_new.jpg", Body=images["Lime/lime_001.jpg"])
    inventory = f"{uri}/" + inventory_from_bucket(client, bucket, "in/", dest_prefix="inv")
    with recorded_requests(tmp_path / "run2.jsonl") as run2:
        submit(driver_here, *args, "--inventory", inventory, endpoint=s3_server, log_dir=tmp_path / "run2")
    calls1, unknown1 = recorded_calls(run1, bucket)
    calls2, unknown2 = recorded_calls(run2, bucket)
    calls = calls1 + calls2

    manifest = json.loads(client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    assert manifest["collect"]["used"] == "distributed" and manifest["format"] == "parquet"
    assert manifest["listing"]["mode"] == "inventory"
    assert manifest["counts"]["reused"] == 8 and manifest["counts"]["removed"] == 1
    state_keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="state/")["Contents"]}
    version = manifest["incremental"]["version"]
    assert "state/state.json" in state_keys and all(k in ("state/state.json", "state/_lock.json")
                                                    or k.startswith(f"state/v-{version}/") for k in state_keys)
    assert "state/_lock.json" in state_keys  # the state's run lock survives the commit

    assert unknown1 == unknown2 == []
    policy = instance_profile_policy(f"{uri}/in/", f"{uri}/out/", f"{uri}/code/", f"{uri}/joblogs/",
                                     f"{uri}/emr-logs/", weights_uri=f"{uri}/models/tiny.weights.h5",
                                     state_uri=f"{uri}/state/", inventory_uri=inventory)
    denied, seen = check(policy, calls)
    assert denied == []
    # Each new statement was needed, and no statement the job does not use was matched.
    assert seen == {("s3:GetBucketLocation", "LocateJobBuckets"), ("s3:ListBucket", "ListInputPrefix"),
                    ("s3:ListBucket", "ListOutputPrefixForStaleFiles"), ("s3:GetObject", "ReadInputImages"),
                    ("s3:GetObject", "ReadWeightsObject"), ("s3:PutObject", "WriteAndReplaceOutputs"),
                    ("s3:DeleteObject", "WriteAndReplaceOutputs"), ("s3:PutObject", "WriteJobLog"),
                    ("s3:GetObject", "ReadStagedParts"), ("s3:ListBucket", "ListStatePrefix"),
                    ("s3:GetObject", "ReadWriteState"), ("s3:PutObject", "ReadWriteState"),
                    ("s3:DeleteObject", "ReadWriteState"), ("s3:GetObject", "ReadRunLock"),
                    ("s3:GetObject", "ReadInventoryReport")}
    # Run 1's listing snapshot was read by its featurize tasks; run 2 listed nothing under --input.
    assert any(k.startswith("out/_staging/") and "/listing/" in k for a, _, _, _, k in calls1 if a == "s3:GetObject")
    assert not [c for a, _, c, _, _ in calls2 if a == "s3:ListBucket" and c.get("s3:prefix", "").startswith("in/")]

    # Run 1 asked for a state.json that did not exist yet (NoSuchKey needs the state listing on AWS);
    # run 2 read it and the parts of run 1, and deleted those parts after its commit.
    gets1 = {k for a, _, _, m, k in calls1 if a == "s3:GetObject"}
    gets2 = {k for a, _, _, m, k in calls2 if a == "s3:GetObject"}
    assert "state/state.json" in gets1 and "state/state.json" in gets2
    assert any(k.startswith("state/v-") for k in gets2) and not any(k.startswith("state/v-") for k in gets1)
    deleted2 = {k for a, _, _, _, k in calls2 if a == "s3:DeleteObject"}
    assert any(k.startswith("state/v-") and not k.startswith(f"state/v-{version}/") for k in deleted2)
    # Outputs read back are the staged parts only (and the run lock); every part was deleted again.
    out_gets = {k for a, _, _, _, k in calls if a == "s3:GetObject" and k.startswith("out/") and k != "out/_lock.json"}
    assert out_gets and all(k.startswith("out/_staging/") for k in out_gets)
    assert out_gets <= {k for a, _, _, _, k in calls if a == "s3:DeleteObject"}
    # Every write that can carry the SSE header did (parts of a multipart upload cannot).
    for action, _, context, method, key in calls:
        if action == "s3:PutObject" and method in ("PUT", "POST?uploads"):
            assert context.get(f"s3:{CALL_SSE_HEADER}") == "AES256", (method, key)
    multipart = sorted({m for _, _, _, m, _ in calls if "?" in m})
    print("\nmultipart requests in the recording:", multipart or "none (every file under 8 MiB)", file=sys.stderr)

    # The check can fail: without --state, with the state elsewhere, or without the staging read.
    without_staging = json.loads(json.dumps(policy))
    without_staging["Statement"] = [s for s in policy["Statement"] if s["Sid"] != "ReadStagedParts"]
    for narrower in (instance_profile_policy(f"{uri}/in/", f"{uri}/out/", f"{uri}/code/", f"{uri}/joblogs/",
                                             f"{uri}/emr-logs/", weights_uri=f"{uri}/models/tiny.weights.h5"),
                     instance_profile_policy(f"{uri}/in/", f"{uri}/out/", f"{uri}/code/", f"{uri}/joblogs/",
                                             f"{uri}/emr-logs/", weights_uri=f"{uri}/models/tiny.weights.h5",
                                             state_uri=f"{uri}/state2/", inventory_uri=inventory),
                     instance_profile_policy(f"{uri}/in/", f"{uri}/out/", f"{uri}/code/", f"{uri}/joblogs/",
                                             f"{uri}/emr-logs/", weights_uri=f"{uri}/models/tiny.weights.h5",
                                             state_uri=f"{uri}/state/"),
                     without_staging):
        denied, _ = check(narrower, calls)
        assert denied and len(denied) < len(calls)
    assert {r for _, _, r, _ in check(without_staging, calls)[0]} == {f"arn:aws:s3:::{bucket}/{k}" for k in out_gets}
