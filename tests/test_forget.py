import hashlib
import io
import json
from datetime import datetime, timezone

import numpy as np
import pytest

from extractor.storage import state as state_store
from extractor.forget.csv_rows import split_out
from extractor.forget.erasure import remove_parquet_rows, split_part
from extractor.errors import JobError
from extractor.results.formats import PREFIX_METADATA_KEY, get_format, read_table
from extractor.forget.command import forget, main
from extractor.results.outputs import format_errors
from extractor.storage.s3 import S3Settings, parse_s3_uri

from conftest import REGION, unique_bucket

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
STATE_VERSION = "20250101T000000Z"


# --- split_out -----------------------------------------------------------------------------

def remove_rows(text, paths):
    """(split_out's text, how many records it took out)."""
    new, removed = split_out(text, paths)
    assert len(new) + sum(map(len, removed)) == len(text)   # every byte kept or taken out, none added
    return new, len(removed)


def test_split_out_removes_only_the_matching_record():
    text = "path,label,dim_0\ns3://b/in/A/1.jpg,A,0.5\ns3://b/in/A/2.jpg,A,1.25\ns3://b/in/A/3.jpg,A,-2\n"
    new, n = remove_rows(text, {"s3://b/in/A/2.jpg"})
    assert (new, n) == ("path,label,dim_0\ns3://b/in/A/1.jpg,A,0.5\ns3://b/in/A/3.jpg,A,-2\n", 1)


def test_split_out_quoted_path_with_newline_and_crlf():
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


def test_split_out_matches_the_whole_first_field_only():
    text = ('path,label\n'
            's3://b/in/A/1.jpg.bak,A\n'           # the key as a prefix
            'x,"s3://b/in/A/1.jpg"\n'             # the key in another field
            '"s3://b/in/A/1.jpg",A\n'             # quoted without need: still the same path
            's3://b/in/A/1.jpg,A')                # last record without a newline
    new, n = remove_rows(text, {"s3://b/in/A/1.jpg"})
    assert n == 2
    assert new == 'path,label\ns3://b/in/A/1.jpg.bak,A\nx,"s3://b/in/A/1.jpg"\n'


def test_split_out_keeps_the_header_and_text_without_a_match():
    text = "path,label\ns3://b/in/A/1.jpg,A\n"
    assert remove_rows(text, {"path"}) == (text, 0)
    assert remove_rows(text, {"s3://b/in/A/9.jpg"}) == (text, 0)
    assert remove_rows("", {"s3://b/in/A/1.jpg"}) == ("", 0)


# --- Parquet files and state parts ------------------------------------------------------

def parquet_prefix(data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_schema(pa.BufferReader(data)).metadata[PREFIX_METADATA_KEY.encode()].decode()


def assert_same_matrix(actual, expected):
    # Bit for bit: -0.0 against 0.0 or a rounded last digit would show.
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


def test_remove_parquet_rows_keeps_every_other_row_exactly():
    paths = ["s3://b/in/A/1.jpg", 's3://b/in/A/we"ird,\nname.jpg', "s3://b/in/A/1.jpg.bak", "s3://b/in/Pêche/4.jpg"]
    labels = ["A", "A", "A", "Pêche"]
    matrix = np.array([[1.5, -0.0, 3e-38], [2, 1e30, -7], [0.1, 0.2, 0.3], [np.inf, 5, 6]], dtype=np.float32)
    data = get_format("parquet").encode(paths, labels, matrix, "pc_")

    new, removed = remove_parquet_rows(data, {paths[1], "s3://b/in/A/1.jp"}, "pc_")

    assert removed == [(paths[1], "A")]
    got_paths, got_labels, got_matrix = read_table(new, "parquet")
    assert got_paths == [paths[0], paths[2], paths[3]] and got_labels == ["A", "A", "Pêche"]
    assert_same_matrix(got_matrix, matrix[[0, 2, 3]])
    assert parquet_prefix(new) == "pc_"
    # Nothing to remove: the very same bytes, never re-encoded.
    assert remove_parquet_rows(data, {"s3://b/in/A/9.jpg"}, "pc_") == (data, [])
    # Every row removed: still a valid file of the same width.
    empty, removed = remove_parquet_rows(data, set(paths), "pc_")
    assert len(removed) == 4 and read_table(empty, "parquet")[2].shape == (0, 3)


def test_split_part_keeps_the_other_rows_in_order():
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = state_store.part_bytes(["in/A/1.jpg", "in/A/2.jpg", "in/A/3.jpg"], ["e1", "e2", "e3"],
                                  ["A", "A", "A"], vectors)

    kept, gone = split_part(data, {"in/A/2.jpg", "in/A/9.jpg", "s3://b/in/A/1.jpg"})

    assert gone == ["in/A/2.jpg"]
    assert kept["keys"].tolist() == ["in/A/1.jpg", "in/A/3.jpg"]
    assert kept["etags"].tolist() == ["e1", "e3"] and kept["labels"].tolist() == ["A", "A"]
    assert_same_matrix(kept["vectors"], vectors[[0, 2]])
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.asarray(["k"]), etags=np.asarray(["e"]), labels=np.asarray(["A"]))
    with pytest.raises(ValueError, match="no array vectors"):
        split_part(buffer.getvalue(), set())


# --- a realistic run's output, built by hand -------------------------------------------------

class Run:
    """An input prefix and the outputs of one job run over it, in one bucket; with ``state``, the
    run was incremental and kept its vectors under s3://<output bucket>/state/ in three parts."""

    def __init__(self, client, versioned_input=False, versioned_output=False, fmt="csv", state=False):
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
        self.fmt = get_format(fmt)
        ext = self.fmt.extension
        rng = np.random.default_rng(7)
        self.files = {}
        for label, paths in self.featurized.items():
            features = rng.normal(size=(len(paths), 6)).astype(np.float32)
            projections = rng.normal(size=(len(paths), 3)).astype(np.float32)
            self.files[f"features/{label}{ext}"] = (paths, [label] * len(paths), features, "dim_")
            self.files[f"pca/{label}{ext}"] = (paths, [label] * len(paths), projections, "pc_")
        self.manifest = {
            "run_id": "20250101T000000Z", "status": "succeeded",
            "input": self.input.uri, "output": self.output.uri,
            "counts": {"listed": 8, "featurized": 6, "failed": 2, "skipped_non_image_keys": 1,
                       "per_fruit": {"Apple": {"file": f"Apple{ext}", "featurized": 4, "failed": 0},
                                     "Pêche": {"file": f"Pêche{ext}", "featurized": 2, "failed": 2}}},
            "format": fmt,
            "pca": {"k": 3, "explained_variance": 0.9},
        }
        if state:
            self.write_state()
        # Written without SSE, so that an object carrying SSE afterwards was rewritten by forget.
        bodies = {relative: self.fmt.encode(paths, labels, values, prefix)
                  for relative, (paths, labels, values, prefix) in self.files.items()}
        bodies["errors.csv"] = format_errors(self.errors)
        for relative, body in bodies.items():
            self.put_out(relative, body, "text/csv" if relative.endswith(".csv") else self.fmt.content_type)
        bodies["pca_model.npz"] = b"npz bytes"
        self.manifest["files"] = {relative: {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
                                  for relative, body in bodies.items()}
        self.put_out("manifest.json", json.dumps(self.manifest, indent=2, ensure_ascii=False).encode(),
                     "application/json")
        self.put_out("pca_model.npz", b"npz bytes")
        self.put_out("_SUCCESS", b"", "text/plain")
        for paths in self.featurized.values():
            for path in paths:
                client.put_object(Bucket=self.bucket, Key=self.key_of(path), Body=b"jpeg " + path.encode())
        for path, _, _ in self.errors:
            client.put_object(Bucket=self.bucket, Key=self.key_of(path), Body=b"")

    def write_state(self):
        """The parts as an incremental run stores them: the featurized keys (input keys, no
        s3://bucket/) with their feature vectors, the target alone in part 1."""
        self.state = parse_s3_uri(f"s3://{self.out_bucket}/state/")
        apple = self.featurized["Apple"]
        groups = [[apple[0], apple[1], apple[3]], [self.target], self.featurized["Pêche"]]
        vectors = {path: self.files[f"features/{label}{self.fmt.extension}"][2][i]
                   for label, paths in self.featurized.items() for i, path in enumerate(paths)}
        self.stored = {}  # key -> (etag, label, vector)
        entries = []
        for index, group in enumerate(groups):
            keys = [self.key_of(uri) for uri in group]
            rows = [(f"etag-{key}", key.split("/")[-2], vectors[uri]) for key, uri in zip(keys, group)]
            self.stored.update(zip(keys, rows))
            entries.append(state_store.write_part(self.client, S3Settings(), self.state, STATE_VERSION, index, keys,
                                                  [r[0] for r in rows], [r[1] for r in rows],
                                                  np.stack([r[2] for r in rows])))
        state_store.commit(self.client, S3Settings(), self.state, STATE_VERSION, {"model": "tiny"}, entries)
        self.parts = [self.state.key(entry["key"]) for entry in entries]
        self.manifest["incremental"] = {"state": self.state.uri, "previous_version": None, "version": STATE_VERSION,
                                        "stored_vectors": 6, "parts": 3}

    def state_json(self):
        body = self.client.get_object(Bucket=self.out_bucket, Key=self.state.key("state.json"))["Body"].read()
        return json.loads(body)

    def part(self, index):
        """The bytes of state part ``index``, or None if it is gone."""
        listed = self.client.list_objects_v2(Bucket=self.out_bucket, Prefix=self.parts[index])
        if not listed.get("Contents"):
            return None
        return self.client.get_object(Bucket=self.out_bucket, Key=self.parts[index])["Body"].read()

    def put_out(self, relative, body, content_type="application/octet-stream"):
        self.client.put_object(Bucket=self.out_bucket, Key=self.output.key(relative), Body=body,
                               ContentType=content_type)

    def key_of(self, uri):
        return parse_s3_uri(uri, folder=False).prefix

    def expected(self, relative, without):
        """The file as the job would have written it without the photos in ``without``."""
        if relative == "errors.csv":
            return format_errors([e for e in self.errors if e[0] not in without])
        paths, labels, values, prefix = self.expected_rows(relative, without)
        return self.fmt.encode(paths, labels, values, prefix)

    def expected_rows(self, relative, without):
        paths, labels, values, prefix = self.files[relative]
        keep = [i for i, p in enumerate(paths) if p not in without]
        return [paths[i] for i in keep], [labels[i] for i in keep], values[keep], prefix

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


def record_puts(client, operation="PutObject"):
    """Keys written (or, with operation="GetObject", read) by ``client`` from now on."""
    puts = []
    client.meta.events.register(f"before-parameter-build.s3.{operation}",
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
                                  ["features/Apple.csv", "pca/Apple.csv", "manifest.json", "audit/erasures.jsonl",
                                   # the run lock: taken, the create-if-absent that must be refused (the
                                   # endpoint's check), renewed by the check before the writes, released
                                   "_lock.json", "_lock.json", "_lock.json", "_lock.json"])

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
    "state and no-state together": lambda run: run.argv(
        run.target, extra=["--state", f"s3://{run.out_bucket}/state/", "--no-state"]),
    "state overlapping the input": lambda run: run.argv(run.target, extra=["--state", run.input.uri + "state/"]),
    "output inside the state": lambda run: run.argv(run.target, extra=["--state", f"s3://{run.out_bucket}/"]),
    "no attempt at all": lambda run: run.argv(run.target, extra=["--s3-max-attempts", "0"]),
}


def test_forget_takes_the_jobs_s3_options():
    """One definition of the S3 client's options (s3.add_s3_options) for driver.py and forget."""
    from extractor.driver.config import build_parser as job_parser
    from extractor.forget.command import build_parser as forget_parser

    def s3_options(parser):
        return {a.dest: (a.option_strings, a.default, a.type) for a in parser._actions
                if a.dest in ("endpoint_url", "region", "s3_max_attempts", "sse_kms_key_id")}

    assert s3_options(forget_parser()) == s3_options(job_parser())
    assert len(s3_options(forget_parser())) == 4


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


# --- Parquet outputs -------------------------------------------------------------------------

def test_parquet_outputs_lose_exactly_the_erased_rows(s3_mock):
    run = Run(s3_mock, fmt="parquet")
    old = {rel: run.out(rel)["Body"].read() for rel in list(run.files) + ["errors.csv"]}

    report = run.forget([run.target])

    for rel in ("features/Apple.parquet", "pca/Apple.parquet"):
        new = run.out(rel)
        body = new["Body"].read()
        paths, labels, values, prefix = run.expected_rows(rel, {run.target})
        got_paths, got_labels, got_values = read_table(body, "parquet")
        assert got_paths == paths and len(paths) == 3 and run.target not in got_paths
        assert got_labels == labels
        assert_same_matrix(got_values, values)
        assert parquet_prefix(body) == prefix
        # The same bytes as the job would have written without the photo.
        assert body == run.expected(rel, {run.target}) != old[rel]
        assert new["ServerSideEncryption"] == "AES256"
        assert new["ContentType"] == "application/vnd.apache.parquet"
    for rel in ("features/Pêche.parquet", "pca/Pêche.parquet", "errors.csv"):
        assert run.out(rel)["Body"].read() == old[rel]
    counts = json.loads(run.out("manifest.json")["Body"].read())["counts"]
    assert (counts["listed"], counts["featurized"], counts["failed"]) == (7, 5, 2)
    assert counts["per_fruit"]["Apple"] == {"file": "Apple.parquet", "featurized": 3, "failed": 0}
    assert report["keys"][0]["files_rewritten"] == {"features/Apple.parquet": 1, "pca/Apple.parquet": 1}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_files_entries_match_the_rewritten_objects(s3_mock, fmt):
    run = Run(s3_mock, fmt=fmt)

    run.forget([run.target, run.failed_target])

    files = json.loads(run.out("manifest.json")["Body"].read())["files"]
    assert set(files) == set(run.manifest["files"])
    rewritten = {f"features/Apple.{fmt}", f"pca/Apple.{fmt}", "errors.csv"}
    for rel, entry in files.items():
        body = run.out(rel)["Body"].read()
        assert entry == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}, rel
        assert (entry != run.manifest["files"][rel]) == (rel in rewritten), rel


# --- incremental state -----------------------------------------------------------------------

def stored_rows(data):
    """A part's rows as {key: (etag, label, vector)}."""
    kept, _ = split_part(data, set())
    return {key: (etag, label, vector) for key, etag, label, vector in
            zip(kept["keys"].tolist(), kept["etags"].tolist(), kept["labels"].tolist(), kept["vectors"])}


def test_state_parts_lose_exactly_the_erased_rows(s3_mock):
    run = Run(s3_mock, state=True)
    apple = run.featurized["Apple"]
    erased = [run.target, apple[3]]   # alone in part 1; last of part 0
    old_state = run.state_json()
    old_parts = [run.part(i) for i in range(3)]
    puts, gets = record_puts(s3_mock), record_puts(s3_mock, "GetObject")

    report = run.forget(erased, state_location=run.state)
    read, written = list(gets), list(puts)   # before the test's own reads

    # Part 0 keeps its other rows, exactly, in the job's own part layout.
    kept_keys = sorted([run.key_of(apple[0]), run.key_of(apple[1])])
    rows = stored_rows(run.part(0))
    assert list(rows) == kept_keys
    for key in kept_keys:
        etag, label, vector = run.stored[key]
        assert rows[key][:2] == (etag, label)
        assert_same_matrix(rows[key][2], vector)
    assert run.part(0) == state_store.part_bytes(kept_keys, [run.stored[k][0] for k in kept_keys],
                                                 [run.stored[k][1] for k in kept_keys],
                                                 np.stack([run.stored[k][2] for k in kept_keys]))
    # Part 1 held only the target: gone. Part 2's range holds no erased key: not even read.
    assert run.part(1) is None
    assert run.part(2) == old_parts[2]
    assert run.parts[2] not in read and run.parts[2] not in written
    assert run.parts[0] in read and run.parts[1] in read
    state = run.state_json()
    assert state["parts"] == [{"key": old_state["parts"][0]["key"], "first": kept_keys[0], "last": kept_keys[1],
                               "rows": 2}, old_state["parts"][2]]
    assert state["rows"] == 4
    assert {k: state[k] for k in ("format", "version", "fingerprint")} == \
        {k: old_state[k] for k in ("format", "version", "fingerprint")}
    assert state["updated_at"] == "2025-03-01T12:00:00+00:00"
    obj = s3_mock.get_object(Bucket=run.out_bucket, Key=run.state.key("state.json"))
    assert obj["ServerSideEncryption"] == "AES256"
    # The job can still read the state: every remaining key and nothing else.
    refs = [(key, run.stored[key][1], run.stored[key][0]) for key in sorted(run.stored)]
    plan = state_store.with_state_parts(state_store.plan_partitions(refs, 1), state, run.state)[0]
    assert state_store.read_rows(s3_mock, run.out_bucket, plan.state_parts, plan).keys == \
        sorted(set(run.stored) - {run.key_of(uri) for uri in erased})

    assert report["state"] == {"uri": run.state.uri, "skipped": False, "found": True, "rows_removed": 2,
                               "parts_rewritten": [old_state["parts"][0]["key"]],
                               "parts_deleted": [old_state["parts"][1]["key"]], "state_json_updated": True}
    assert [k["state_rows_removed"] for k in report["keys"]] == [1, 1]
    # The outputs lost the rows as well.
    assert run.out("features/Apple.csv")["Body"].read() == run.expected("features/Apple.csv", set(erased))


def test_state_without_the_erased_keys_is_left_byte_identical(s3_mock):
    run = Run(s3_mock, state=True)
    before = run.snapshot()
    state_keys = {key for (_, key, _) in before if key.startswith(run.state.prefix)}
    assert len(state_keys) == 4
    # Inside part 0's key range, but never stored; and a photo that failed (never stored either).
    unstored = f"s3://{run.bucket}/in/Apple/a3.jpg"

    report = run.forget([unstored, run.failed_target], state_location=run.state)

    after = run.snapshot()
    assert {k: v for k, v in after.items() if k[1] in state_keys} == \
        {k: v for k, v in before.items() if k[1] in state_keys}
    assert report["state"]["rows_removed"] == 0 and not report["state"]["state_json_updated"]
    assert report["warnings"] == []


def test_another_state_than_the_manifest_records_is_used_with_a_warning(s3_mock):
    run = Run(s3_mock, state=True)
    old_parts = [run.part(i) for i in range(3)]
    elsewhere = parse_s3_uri(f"s3://{run.out_bucket}/moved-state/")

    report = run.forget([run.target], state_location=elsewhere)

    assert [run.part(i) for i in range(3)] == old_parts
    assert report["state"]["found"] is False
    assert any(f"is not the state manifest.json records ({run.state.uri})" in w for w in report["warnings"])
    assert any("no state.json under --state" in w for w in report["warnings"])


def test_audit_and_summary_say_how_many_state_rows_were_removed(s3_mock, capsys):
    run = Run(s3_mock, state=True)

    assert main(run.argv(run.target, run.failed_target, extra=["--state", run.state.uri])) == 0

    lines = [json.loads(line) for line in run.audit()["Body"].read().decode().splitlines()]
    assert [(line["state"], line["state_rows_removed"]) for line in lines] == \
        [(run.state.uri, 1), (run.state.uri, 0)]
    out = capsys.readouterr().out
    assert "state rows removed: 1" in out and "state rows removed: 0" in out
    assert f"state {run.state.uri}: 1 row(s) removed, 0 part(s) rewritten, 1 emptied part(s) deleted" in out
    assert run.part(1) is None


def test_manifest_with_a_state_needs_state_or_no_state(s3_mock, capsys):
    run = Run(s3_mock, state=True)
    before = run.snapshot()

    with pytest.raises(SystemExit) as exit_info:
        main(run.argv(run.target))

    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--state {run.state.uri}" in err and "--no-state" in err
    assert run.snapshot() == before
    with pytest.raises(ValueError, match="records the incremental state"):
        run.forget([run.target])
    assert run.snapshot() == before


def test_no_state_erases_the_rest_and_records_that_the_state_was_left(s3_mock, capsys):
    run = Run(s3_mock, state=True)
    old_parts = [run.part(i) for i in range(3)]
    old_state = run.state_json()

    assert main(run.argv(run.target, extra=["--no-state"])) == 0

    assert [run.part(i) for i in range(3)] == old_parts and run.state_json() == old_state
    assert not run.exists(run.target)
    assert run.out("features/Apple.csv")["Body"].read() == run.expected("features/Apple.csv", {run.target})
    line = json.loads(run.audit()["Body"].read())
    assert (line["state"], line["state_rows_removed"]) == (run.state.uri, None)
    assert f"vectors may remain in {run.state.uri}" in capsys.readouterr().out


def test_dry_run_with_state_changes_nothing(s3_mock, capsys):
    run = Run(s3_mock, state=True)
    before = run.snapshot()

    assert main(run.argv(run.target, extra=["--state", run.state.uri, "--dry-run"])) == 0

    assert run.snapshot() == before
    out = capsys.readouterr().out
    assert "state rows to remove: 1" in out and "1 emptied part(s) to delete" in out


def test_a_failed_state_write_is_completed_by_running_again(s3_mock):
    from botocore.exceptions import ClientError

    run = Run(s3_mock, state=True)
    old_state = run.state_json()

    def fail_state_json(params, **_):
        if params["Key"] == run.state.key("state.json"):
            raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "PutObject")

    s3_mock.meta.events.register("before-parameter-build.s3.PutObject", fail_state_json)
    with pytest.raises(JobError, match="state.json"):
        run.forget([run.target], state_location=run.state)
    s3_mock.meta.events.unregister("before-parameter-build.s3.PutObject", fail_state_json)

    # Already no vector of the photo anywhere; state.json still lists the (now empty) part.
    assert stored_rows(run.part(1)) == {}
    assert run.state_json() == old_state

    report = run.forget([run.target], state_location=run.state)

    assert run.part(1) is None
    assert run.state_json()["parts"] == [old_state["parts"][0], old_state["parts"][2]]
    assert run.state_json()["rows"] == 5
    assert report["state"]["parts_deleted"] == [old_state["parts"][1]["key"]]


# --- the run lock ------------------------------------------------------------------------------

def _job_lock(client, location, run_id="20260101T000000Z", what="--output"):
    """What a running job holds on ``location``."""
    from extractor.storage.lock import RunLock

    return RunLock(client, S3Settings(), location, run_id=run_id, what=what, mode="job", host="emr-driver",
                   pid=4242).acquire()


def _lock_body(client, location):
    return json.loads(client.get_object(Bucket=location.bucket, Key=location.key("_lock.json"))["Body"].read())


def test_forget_takes_the_locks_and_leaves_released_markers(s3_mock, capsys):
    run = Run(s3_mock, state=True)

    assert main(run.argv(run.target, extra=["--state", run.state.uri, "--request-id", "ticket-7"])) == 0

    for location in (run.output, run.state):
        body = _lock_body(s3_mock, location)
        assert (body["mode"], body["released"], body["holder"]["run_id"]) == ("erasure", True, "ticket-7")
    assert "without the run lock" not in capsys.readouterr().out


def test_forget_refuses_while_a_job_holds_the_output_lock(s3_mock, capsys):
    run = Run(s3_mock)
    job = _job_lock(s3_mock, run.output)
    before = run.snapshot()

    assert main(run.argv(run.target)) == 1

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"forget: --output {run.output.uri} is locked by run 20260101T000000Z (job, started ")
    assert "host emr-driver, pid 4242" in err and "re-run with --break-lock" in err
    assert run.snapshot() == before and run.exists(run.target)

    # A dry run reads without the lock, and says so.
    assert main(run.argv(run.target, extra=["--dry-run"])) == 0
    assert "read without the run lock" in capsys.readouterr().out
    assert run.snapshot() == before
    assert job.renew()  # the job's lock is still the job's


def test_forget_with_break_lock_takes_a_dead_jobs_lock(s3_mock, capsys):
    run = Run(s3_mock)
    dead = _job_lock(s3_mock, run.output)

    assert main(run.argv(run.target, extra=["--break-lock"])) == 0

    assert not run.exists(run.target)
    assert _lock_body(s3_mock, run.output)["mode"] == "erasure"
    assert dead.renew() is False and dead.lost_to["mode"] == "erasure"


def test_forget_refused_by_the_state_lock_releases_the_output_lock(s3_mock, capsys):
    run = Run(s3_mock, state=True)
    _job_lock(s3_mock, run.state, what="--state")

    assert main(run.argv(run.target, extra=["--state", run.state.uri])) == 1

    assert f"--state {run.state.uri} is locked by run 20260101T000000Z" in capsys.readouterr().err
    assert run.exists(run.target)
    assert _lock_body(s3_mock, run.output)["released"] is True   # taken first, then given back
    assert _lock_body(s3_mock, run.state)["mode"] == "job"
