"""A run watched while it runs (progress lines, the log in S3 during featurize, named Spark jobs),
and its pictures: scatter and report deterministic, an erased photo gone from both."""

import html.parser
import json
import logging
import re

import boto3
import pytest

from extractor.driver import job
from extractor.results import report, scatter
from extractor.driver.config import parse_args
from extractor.dev.synthetic import fruit_dataset
from extractor.forget.command import forget
from extractor.driver.logs import FORMAT, LogShipper
from extractor.storage.s3 import S3Location, S3Settings

from conftest import REGION
from faulty_s3 import FaultyProxy

FRUITS = ["Lemon", "Lime", "Orange"]
PROGRESS = re.compile(r": (?P<stage>[A-Za-z][A-Za-z ]*): (?P<done>[\d,]+) / (?P<total>[\d,]+) (?P<unit>images|files) \(")


class RecordingShipper(LogShipper):
    """Reads the S3 copy back after every upload: what `aws s3 cp s3://.../run.log -` showed then."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def ship(self, only_if_changed=False):
        uploads = self.uploads
        ok = super().ship(only_if_changed)
        if self.uploads > uploads:
            self.seen.append(self.client.get_object(Bucket=self.location.bucket, Key=self.key)["Body"].read().decode())
        return ok


def watched_run(spark, endpoint, client, bucket, out, tmp_path, *extra):
    path = tmp_path / f"{out}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger(f"test.watch.{out}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    cfg = parse_args(["--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/{out}/", "--model", "tiny",
                      "--weights", "random", "--batch-size", "4", "--endpoint-url", endpoint, *extra])
    shipper = RecordingShipper(client, S3Settings(region=REGION), cfg.log_location, str(path), logger)
    build = job.manifests.build

    def build_and_note(*args, **kwargs):
        # The manifest counts the uploads made until it is built; the progress thread may upload
        # the log again before the run ends, so the test compares with what it had seen by then.
        shipper.seen_at_manifest = len(shipper.seen)
        return build(*args, **kwargs)

    job.manifests.build = build_and_note
    try:
        manifest = job.run(spark.sparkContext, cfg, s3_client=cfg.s3.client(), logger=logger, shipper=shipper,
                           run_id=out)
    finally:
        job.manifests.build = build
    handler.close()
    return manifest, path.read_text(), shipper


def progress(log: str, stage: str) -> list[tuple[int, int]]:
    found = [PROGRESS.search(line) for line in log.splitlines() if " test.watch." in line]
    return [(int(m["done"].replace(",", "")), int(m["total"].replace(",", ""))) for m in found
            if m and m["stage"] == stage]


def job_descriptions(sc) -> list[str]:
    """The descriptions of every Spark job so far, from Spark's own status store."""
    sc._jsc.sc().listenerBus().waitUntilEmpty()
    jobs = sc._jsc.sc().statusStore().jobsList(None)   # a Scala Seq of v1.JobData
    found = [jobs.apply(i).description() for i in range(jobs.length())]
    return [description.get() for description in found if description.isDefined()]


WATCHED = 96  # images: featurize takes >= 96 x 0.25 s / 8 download threads = 3 s, six progress intervals


@pytest.fixture
def slow_input(s3_server, server_bucket):
    """WATCHED images behind a proxy that makes every download of a photo take 0.25 s."""
    client, bucket = server_bucket
    for key, body in fruit_dataset(WATCHED // len(FRUITS), FRUITS).items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=body)
    with FaultyProxy(s3_server) as proxy:
        proxy.add_latency(0.25, method="GET", path=rf"^/{bucket}/in/")
        yield client, bucket, proxy.url


def test_a_long_stage_is_watched_in_the_log_in_s3_and_in_spark(spark, slow_input, tmp_path):
    client, bucket, endpoint = slow_input
    manifest, log, shipper = watched_run(spark, endpoint, client, bucket, "w", tmp_path, "--collect", "never",
                                         "--partitions", "12", "--progress-interval", "0.5",
                                         "--log-ship-interval", "0.5")
    featurize = progress(log, "featurize")
    assert len(featurize) >= 4, log                   # several intervals
    done = [n for n, _ in featurize]
    assert done == sorted(done) and done[-1] == WATCHED and {t for _, t in featurize} == {WATCHED}
    assert len(set(done)) >= 3                         # it moved while it was watched
    # The S3 copy showed progress while featurize was still running.
    during = [body for body in shipper.seen if progress(body, "featurize") and "stage featurize: done" not in body]
    assert during, [body[-300:] for body in shipper.seen]
    # The distributed stages report too, each up to its total.
    for stage, total in (("PCA moments", WATCHED), ("write parts", WATCHED), ("assemble", 3 * 2 + 1)):
        assert progress(log, stage)[-1] == (total, total), stage
    assert manifest["progress"]["lines"] >= len(featurize) and manifest["progress"]["interval_s"] == 0.5
    assert manifest["progress"]["log"]["uploads"] >= shipper.seen_at_manifest > 5
    assert manifest["progress"]["log"]["upload_failures"] == 0
    descriptions = job_descriptions(spark.sparkContext)
    for wanted in (f"featurize {WATCHED} images", f"PCA moments of {WATCHED} vectors",
                   f"write the features/ and pca/ parts of {WATCHED} images", "assemble 7 files from their parts",
                   "warm-up: import TensorFlow, build the model"):
        assert wanted in descriptions, descriptions


class Figures(html.parser.HTMLParser):
    """data-field -> data-value of the report's figure cells, and its per-fruit rows."""

    def __init__(self):
        super().__init__()
        self.fields, self.fruits, self.sources, self._fruit = {}, {}, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-fruit" in attrs:
            self._fruit = attrs["data-fruit"]
            self.fruits[self._fruit] = {}
        if "data-field" in attrs:
            value = json.loads(attrs["data-value"])
            if self._fruit is not None and attrs["data-field"] in ("featurized", "failed"):
                self.fruits[self._fruit][attrs["data-field"]] = value
            elif attrs["data-field"] != "images":
                self.fields[attrs["data-field"]] = value
        for name in ("src", "href"):
            if name in attrs:
                self.sources.append(attrs[name])

    def handle_endtag(self, tag):
        if tag == "tr":
            self._fruit = None


def outputs(client, bucket, prefix):
    out = {}
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        relative = obj["Key"][len(prefix):]
        if not relative.startswith(("logs/", "audit/")):
            out[relative] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def test_scatter_and_report_are_deterministic_and_forget_an_erased_photo(spark, s3_server, server_bucket, tmp_path):
    client, bucket = server_bucket
    images = fruit_dataset(6, FRUITS)
    images["Lime/broken.jpg"] = b"not an image"
    for key, body in images.items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=body)
    first, _, _ = watched_run(spark, s3_server, client, bucket, "p", tmp_path, "--partitions", "3")
    a = outputs(client, bucket, "p/")
    second, _, _ = watched_run(spark, s3_server, client, bucket, "p", tmp_path, "--partitions", "3")
    b = outputs(client, bucket, "p/")
    for name in ("pca_scatter.png", "pca_scatter.csv", "report.html"):
        assert a[name] == b[name], name               # a re-run writes the same bytes
    assert first["run_id"] == second["run_id"] and first["timings_s"] != second["timings_s"]

    points = scatter.read_points_csv(a["pca_scatter.csv"])
    assert sorted({p.label for p in points}) == FRUITS and len(points) == 18
    figure = scatter.scatter_figure(points, second["pca"]["scatter_per_fruit"], second["pca"]["pc_variance_ratio"])
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == FRUITS
    assert [len(c.get_offsets()) for c in axes.collections] == [6, 6, 6]

    page = Figures()
    page.feed(a["report.html"].decode())
    manifest = json.loads(a["manifest.json"])
    assert page.fields and all(report.lookup(manifest, field) == value for field, value in page.fields.items())
    assert {"counts.listed", "counts.featurized", "counts.failed", "pca.k", "model.name"} <= set(page.fields)
    assert page.fruits == {label: {"featurized": row["featurized"], "failed": row["failed"]}
                           for label, row in manifest["counts"]["per_fruit"].items()}
    assert all(source.startswith("data:image/png;base64,") for source in page.sources) and len(page.sources) == 2
    assert b"<script" not in a["report.html"] and b"not an image" in a["report.html"]
    # The page forget would build from these files is the one the job wrote.
    rebuilt = report.rebuild({k: v for k, v in manifest.items() if k != "files"}, a["errors.csv"], None,
                             {name: a[name] for name in ("explained_variance.png", "pca_scatter.png")})
    assert rebuilt["report.html"] == a["report.html"]

    erased = points[0]
    broken = f"s3://{bucket}/in/Lime/broken.jpg"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name=REGION)
    forget(s3, S3Settings(endpoint_url=s3_server, region=REGION), S3Location(bucket, "in/"), S3Location(bucket, "p/"),
           [erased.path, broken], S3Location(bucket, "p/audit/erasures.jsonl"), "req-1")
    c = outputs(client, bucket, "p/")
    left = scatter.read_points_csv(c["pca_scatter.csv"])
    assert left == points[1:]
    assert c["pca_scatter.png"] != a["pca_scatter.png"]
    assert c["pca_scatter.png"] == scatter.scatter_png(left, second["pca"]["scatter_per_fruit"],
                                                       second["pca"]["pc_variance_ratio"])
    page = Figures()
    page.feed(c["report.html"].decode())
    assert erased.path.encode() not in c["report.html"] and broken.encode() not in c["report.html"]
    assert page.fruits[erased.label]["featurized"] == 5 and page.fruits["Lime"]["failed"] == 0
    after = json.loads(c["manifest.json"])
    assert page.fields["counts.featurized"] == after["counts"]["featurized"] == 17
    assert page.fields["counts.failed"] == after["counts"]["failed"] == 0
    import hashlib
    for name in ("report.html", "pca_scatter.png", "pca_scatter.csv"):
        assert after["files"][name]["sha256"] == hashlib.sha256(c[name]).hexdigest(), name
