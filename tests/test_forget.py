import hashlib
import json
from datetime import datetime, timezone

import numpy as np
import pytest

from extractor.forget import forget, main, remove_rows
from extractor.outputs import format_errors, format_rows
from extractor.s3 import S3Settings, parse_s3_uri

from conftest import REGION, unique_bucket

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


# --- remove_rows ---------------------------------------------------------------------------

def test_remove_rows_removes_only_the_matching_record():
    text = "path,label,dim_0\ns3://b/in/A/1.jpg,A,0.5\ns3://b/in/A/2.jpg,A,1.25\ns3://b/in/A/3.jpg,A,-2\n"
    new, n = remove_rows(text, {"s3://b/in/A/2.jpg"})
    assert (new, n) == ("path,label,dim_0\ns3://b/in/A/1.jpg,A,0.5\ns3://b/in/A/3.jpg,A,-2\n", 1)


def test_remove_rows_quoted_path_with_newline_and_crlf():
    path = 's3://b/in/A/we"ird\r\nna,me.jpg'
    quoted = '"s3://b/in/A/we""ird\r\nna,me.jpg"'
    text = ("path,label,error\r\n"
            's3://b/in/A/1.jpg,A,"bad\r\nheader"\r\n'
            f"{quoted},A,empty\r\n"
            "s3://b/in/A/3.jpg,A,x\r\n")
    new, n = remove_rows(text, {path})
    assert n == 1
    assert new == text.replace(f"{quoted},A,empty\r\n", "")
    # The record before it held a quoted newline too: it must not have been split or touched.
    assert 's3://b/in/A/1.jpg,A,"bad\r\nheader"\r\n' in new


def test_remove_rows_matches_the_whole_first_field_only():
    text = ('path,label\n'
            's3://b/in/A/1.jpg.bak,A\n'           # the key as a prefix
            'x,"s3://b/in/A/1.jpg"\n'             # the key in another field
            '"s3://b/in/A/1.jpg",A\n'             # quoted without need: still the same path
            's3://b/in/A/1.jpg,A')                # last record without a newline
    new, n = remove_rows(text, {"s3://b/in/A/1.jpg"})
    assert n == 2
    assert new == 'path,label\ns3://b/in/A/1.jpg.bak,A\nx,"s3://b/in/A/1.jpg"\n'


def test_remove_rows_keeps_the_header_and_text_without_a_match():
    text = "path,label\ns3://b/in/A/1.jpg,A\n"
    assert remove_rows(text, {"path"}) == (text, 0)
    assert remove_rows(text, {"s3://b/in/A/9.jpg"}) == (text, 0)
    assert remove_rows("", {"s3://b/in/A/1.jpg"}) == ("", 0)


# --- a realistic run's output, built by hand -------------------------------------------------

class Run:
    """An input prefix and the outputs of one job run over it, in one bucket."""

    def __init__(self, client, versioned_input=False, versioned_output=False):
        self.client = client
        self.bucket = unique_bucket()
        self.out_bucket = unique_bucket("out") if versioned_output != versioned_input else self.bucket
        for bucket, versioned in {self.bucket: versioned_input, self.out_bucket: versioned_output}.items():
            client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
            if versioned:
                client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        self.input = parse_s3_uri(f"s3://{self.bucket}/in/")
        self.output = parse_s3_uri(f"s3://{self.out_bucket}/out/")
        u = f"s3://{self.bucket}/in/"
        self.target = u + 'Apple/erase "me", please.jpg'
        self.failed_target = u + "Pêche/broken.jpg"
        self.featurized = {
            "Apple": [u + "Apple/a1.jpg", u + "Apple/a,2.jpg", self.target, u + "Apple/a4.jpg"],
            "Pêche": [u + 'Pêche/p"1".jpg', u + "Pêche/p2.jpg"],
        }
        self.errors = [(u + "Pêche/bad,one.jpg", "Pêche", "cannot decode: broken header"),
                       (self.failed_target, "Pêche", 'empty object, "0" bytes')]
        rng = np.random.default_rng(7)
        self.files = {}
        for label, paths in self.featurized.items():
            features = rng.normal(size=(len(paths), 6)).astype(np.float32)
            projections = rng.normal(size=(len(paths), 3)).astype(np.float32)
            self.files[f"features/{label}.csv"] = (paths, [label] * len(paths), features, "dim_")
            self.files[f"pca/{label}.csv"] = (paths, [label] * len(paths), projections, "pc_")
        self.manifest = {
            "run_id": "20250101T000000Z", "status": "succeeded",
            "input": self.input.uri, "output": self.output.uri,
            "counts": {"listed": 8, "featurized": 6, "failed": 2, "skipped_non_image_keys": 1,
                       "per_fruit": {"Apple": {"file": "Apple.csv", "featurized": 4, "failed": 0},
                                     "Pêche": {"file": "Pêche.csv", "featurized": 2, "failed": 2}}},
            "pca": {"k": 3, "explained_variance": 0.9},
        }
        # Written without SSE, so that an object carrying SSE afterwards was rewritten by forget.
        for relative, (paths, labels, values, prefix) in self.files.items():
            self.put_out(relative, format_rows(paths, labels, values, prefix), "text/csv")
        self.put_out("errors.csv", format_errors(self.errors), "text/csv")
        self.put_out("manifest.json", json.dumps(self.manifest, indent=2, ensure_ascii=False).encode(),
                     "application/json")
        self.put_out("pca_model.npz", b"npz bytes")
        self.put_out("_SUCCESS", b"", "text/plain")
        for paths in self.featurized.values():
            for path in paths:
                client.put_object(Bucket=self.bucket, Key=self.key_of(path), Body=b"jpeg " + path.encode())
        for path, _, _ in self.errors:
            client.put_object(Bucket=self.bucket, Key=self.key_of(path), Body=b"")

    def put_out(self, relative, body, content_type="application/octet-stream"):
        self.client.put_object(Bucket=self.out_bucket, Key=self.output.key(relative), Body=body,
                               ContentType=content_type)

    def key_of(self, uri):
        return parse_s3_uri(uri, folder=False).prefix

    def expected(self, relative, without):
        """The file as the job would have written it without the photos in ``without``."""
        if relative == "errors.csv":
            return format_errors([e for e in self.errors if e[0] not in without])
        paths, labels, values, prefix = self.files[relative]
        keep = [i for i, p in enumerate(paths) if p not in without]
        return format_rows([paths[i] for i in keep], [labels[i] for i in keep], values[keep], prefix)

    def out(self, relative):
        return self.client.get_object(Bucket=self.out_bucket, Key=self.output.key(relative))

    def audit(self):
        return self.client.get_object(Bucket=self.out_bucket, Key=self.output.key("audit/erasures.jsonl"))

    def exists(self, uri):
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.key_of(uri))
        return any(o["Key"] == self.key_of(uri) for o in listed.get("Contents", ()))

    def snapshot(self):
        """Every version of every object in the buckets, with its bytes."""
        state = {}
        for bucket in {self.bucket, self.out_bucket}:
            listed = self.client.list_object_versions(Bucket=bucket)
            for v in listed.get("Versions", []) + listed.get("DeleteMarkers", []):
                body = self.client.get_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])["Body"].read() \
                    if "ETag" in v else None
                state[(bucket, v["Key"], v["VersionId"])] = body
        return state

    def forget(self, uris, **kwargs):
        kwargs.setdefault("audit_location", parse_s3_uri(self.output.uri + "audit/erasures.jsonl", folder=False))
        kwargs.setdefault("request_id", "REQ-1")
        kwargs.setdefault("now", NOW)
        return forget(self.client, S3Settings(), self.input, self.output, uris, **kwargs)

    def argv(self, *keys, extra=()):
        args = ["--input", self.input.uri, "--output", self.output.uri, "--region", REGION]
        for key in keys:
            args += ["--key", key]
        return args + list(extra)


def record_puts(client):
    """Keys written by ``client`` from now on."""
    puts = []
    client.meta.events.register("before-parameter-build.s3.PutObject",
                                lambda params, **_: puts.append(params["Key"]))
    return puts


def sha(uri):
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()


# --- forget ----------------------------------------------------------------------------------

def test_erasure_removes_the_photo_its_rows_and_counts(s3_mock):
    run = Run(s3_mock)
    old = {rel: run.out(rel)["Body"].read() for rel in list(run.files) + ["errors.csv"]}
    puts = record_puts(s3_mock)

    report = run.forget([run.target])

    assert not run.exists(run.target)
    assert run.exists(run.featurized["Apple"][0])
    # Exactly that record gone, every other byte as the job wrote it.
    for rel in ("features/Apple.csv", "pca/Apple.csv"):
        new = run.out(rel)
        body = new["Body"].read()
        assert body == run.expected(rel, {run.target}) != old[rel]
        row = run.expected(rel, set()).split(b"\n")[3] + b"\n"
        assert row.startswith(b'"s3://') and body == old[rel].replace(row, b"")
        assert new["ServerSideEncryption"] == "AES256"
        assert new["ContentType"] == "text/csv"
    for rel in ("features/Pêche.csv", "pca/Pêche.csv", "errors.csv"):
        assert run.out(rel)["Body"].read() == old[rel]
    assert sorted(puts) == sorted(run.output.key(r) for r in
                                  ["features/Apple.csv", "pca/Apple.csv", "manifest.json", "audit/erasures.jsonl"])

    manifest_object = run.out("manifest.json")
    manifest_bytes = manifest_object["Body"].read()
    manifest = json.loads(manifest_bytes)
    assert manifest["counts"]["listed"] == 7 and manifest["counts"]["featurized"] == 5
    assert manifest["counts"]["failed"] == 2
    assert manifest["counts"]["per_fruit"]["Apple"] == {"file": "Apple.csv", "featurized": 3, "failed": 0}
    assert manifest["counts"]["per_fruit"]["Pêche"] == run.manifest["counts"]["per_fruit"]["Pêche"]
    assert manifest["erasures"] == [{"at": "2025-03-01T12:00:00+00:00", "key_sha256": sha(run.target),
                                     "request_id": "REQ-1"}]
    assert manifest_bytes == json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8")
    assert "Pêche".encode() in manifest_bytes
    assert manifest_object["ServerSideEncryption"] == "AES256"

    assert report["keys"] == [{"uri": run.target, "key_sha256": sha(run.target), "object_existed": True,
                               "versions_deleted": 1,
                               "files_rewritten": {"features/Apple.csv": 1, "pca/Apple.csv": 1}}]


def test_failed_photo_is_removed_from_errors_csv(s3_mock):
    run = Run(s3_mock)
    old_features = run.out("features/Pêche.csv")["Body"].read()

    run.forget([run.failed_target])

    errors = run.out("errors.csv")
    assert errors["Body"].read() == run.expected("errors.csv", {run.failed_target})
    assert errors["ServerSideEncryption"] == "AES256"
    assert run.out("features/Pêche.csv")["Body"].read() == old_features
    assert not run.exists(run.failed_target)
    counts = json.loads(run.out("manifest.json")["Body"].read())["counts"]
    assert (counts["listed"], counts["featurized"], counts["failed"]) == (7, 6, 1)
    assert counts["per_fruit"]["Pêche"] == {"file": "Pêche.csv", "featurized": 2, "failed": 1}


def test_audit_log_has_one_hashed_line_per_key_and_appends(s3_mock):
    run = Run(s3_mock)
    nowhere = f"s3://{run.bucket}/in/Apple/never-existed.jpg"

    run.forget([run.target, nowhere])
    run.forget([run.failed_target], request_id="REQ-2")

    audit = run.audit()
    text = audit["Body"].read().decode("utf-8")
    assert audit["ServerSideEncryption"] == "AES256"
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["key_sha256"] for line in lines] == [sha(run.target), sha(nowhere), sha(run.failed_target)]
    assert [line["request_id"] for line in lines] == ["REQ-1", "REQ-1", "REQ-2"]
    assert lines[0] == {"at": "2025-03-01T12:00:00+00:00", "request_id": "REQ-1", "input": run.input.uri,
                        "output": run.output.uri, "key_sha256": sha(run.target), "object_existed": True,
                        "versions_deleted": 1,
                        "files_rewritten": {"features/Apple.csv": 1, "pca/Apple.csv": 1}}
    # A key found nowhere is still recorded, with zeros.
    assert (lines[1]["object_existed"], lines[1]["versions_deleted"], lines[1]["files_rewritten"]) == (False, 0, {})
    assert lines[2]["files_rewritten"] == {"errors.csv": 1}
    # No trace of the names themselves: a file name can be personal data.
    for name in ("erase", "never-existed", "broken.jpg"):
        assert name not in text
    erasures = json.loads(run.out("manifest.json")["Body"].read())["erasures"]
    assert [e["key_sha256"] for e in erasures] == [sha(run.target), sha(run.failed_target)]


def test_versioned_bucket_loses_every_version_of_the_photo(s3_mock):
    run = Run(s3_mock, versioned_input=True, versioned_output=True)
    key = run.key_of(run.target)
    s3_mock.put_object(Bucket=run.bucket, Key=key, Body=b"second version")
    s3_mock.delete_object(Bucket=run.bucket, Key=key)  # a delete marker hides the versions
    s3_mock.put_object(Bucket=run.bucket, Key=key, Body=b"third version")
    s3_mock.put_object(Bucket=run.bucket, Key=key + ".bak", Body=b"not this one")

    report = run.forget([run.target])

    listed = s3_mock.list_object_versions(Bucket=run.bucket, Prefix=key)
    assert [v["Key"] for v in listed.get("Versions", []) + listed.get("DeleteMarkers", [])] == [key + ".bak"]
    assert report["keys"][0]["versions_deleted"] == 4 and report["keys"][0]["object_existed"]
    # The older versions of the rewritten CSVs still hold the row: say so.
    assert any("versioned" in w for w in report["warnings"])


def test_unversioned_output_gives_no_warning(s3_mock):
    run = Run(s3_mock)
    assert run.forget([run.target])["warnings"] == []


def test_dry_run_changes_nothing(s3_mock, capsys):
    run = Run(s3_mock, versioned_input=True)
    before = run.snapshot()

    assert main(run.argv(run.target, extra=["--dry-run"])) == 0

    assert run.snapshot() == before
    out = capsys.readouterr().out
    assert "dry run" in out and "would be deleted" in out
    assert "features/Apple.csv 1" in out and "pca/Apple.csv 1" in out


def test_main_erases_and_prints_a_summary(s3_mock, capsys):
    run = Run(s3_mock)
    nowhere = f"s3://{run.bucket}/in/Apple/never-existed.jpg"

    assert main(run.argv(run.target, nowhere, extra=["--request-id", "ticket-42"])) == 0

    captured = capsys.readouterr()
    assert captured.err == ""
    assert "photo: deleted" in captured.out and "features/Apple.csv 1, pca/Apple.csv 1" in captured.out
    assert "found nowhere" in captured.out and "ticket-42" in captured.out
    assert not run.exists(run.target)
    assert run.out("features/Apple.csv")["Body"].read() == run.expected("features/Apple.csv", {run.target})
    lines = run.audit()["Body"].read().decode().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["ticket-42", "ticket-42"]


def test_custom_audit_log_under_the_output(s3_mock):
    run = Run(s3_mock)
    audit_uri = run.output.uri + "audit/2025/requests.jsonl"
    assert main(run.argv(run.target, extra=["--audit-log", audit_uri])) == 0
    body = s3_mock.get_object(Bucket=run.out_bucket, Key=run.output.key("audit/2025/requests.jsonl"))["Body"]
    assert json.loads(body.read())["key_sha256"] == sha(run.target)


REFUSALS = {
    "key outside the input prefix": lambda run: run.argv(f"s3://{run.bucket}/elsewhere/Apple/a1.jpg"),
    "key in another bucket": lambda run: run.argv(f"s3://other-{run.bucket}/in/Apple/a1.jpg"),
    "key is the input prefix": lambda run: run.argv(f"s3://{run.bucket}/in/"),
    "key is a folder": lambda run: run.argv(f"s3://{run.bucket}/in/Apple/"),
    "key is not an s3 uri": lambda run: run.argv("in/Apple/a1.jpg"),
    "audit log outside the output": lambda run: run.argv(
        run.target, extra=["--audit-log", f"s3://{run.bucket}/audit/erasures.jsonl"]),
    "audit log where a re-run deletes it": lambda run: run.argv(
        run.target, extra=["--audit-log", run.output.uri + "erasures.jsonl"]),
    "output overlapping input": lambda run: [
        "--input", run.input.uri, "--output", run.input.uri + "out/", "--key", run.target],
    "output without a prefix": lambda run: [
        "--input", run.input.uri, "--output", f"s3://{run.bucket}", "--key", run.target],
    "multi-line request id": lambda run: run.argv(run.target, extra=["--request-id", "a\nb"]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_exit_2_and_touch_nothing(s3_mock, capsys, case):
    run = Run(s3_mock)
    before = run.snapshot()

    with pytest.raises(SystemExit) as exit_info:
        main(REFUSALS[case](run))

    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err
    assert run.snapshot() == before


def test_s3_failure_exits_1_with_one_line(s3_mock, capsys):
    run = Run(s3_mock)
    missing = unique_bucket("gone")  # never created
    argv = ["--input", f"s3://{missing}/in/", "--output", run.output.uri, "--region", REGION,
            "--key", f"s3://{missing}/in/Apple/a.jpg"]
    before = run.snapshot()

    assert main(argv) == 1

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and missing in err
    assert run.snapshot() == before
