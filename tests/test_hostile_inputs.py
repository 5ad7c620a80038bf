"""Odd and hostile inputs through the real job on the local S3, accounted for file by file.

The run is deployed as on EMR: driver.py alone in a folder where nothing provides the package,
the package given as ``--py-files extractor.zip`` (the zip create_cluster.sh uploads)."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from extractor.driver.package import build_zip

from conftest import REPO, outside_the_repository, submit_driver
from images import bomb_png, encode, gradient_rgb

pytestmark = pytest.mark.slow

BIG = (3000, 2000)


def odd_but_valid() -> dict[str, bytes]:
    """key under the input prefix -> bytes; every one of these must be featurized."""
    rgb = gradient_rgb(100, 100)
    deep = Image.fromarray((np.arange(100 * 100, dtype=np.uint32).reshape(100, 100) * 6).astype(np.uint16))
    return {
        "Gray/gray.jpg": encode(rgb.convert("L"), "JPEG"),
        "Palette/palette.png": encode(rgb.convert("P"), "PNG"),
        "Alpha/rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "Cmyk/cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "Deep/sixteen-bit.png": encode(deep, "PNG"),
        "Upper/UPPER.JPG": encode(rgb, "JPEG"),
        "Upper/long.jpeg": encode(rgb, "JPEG"),
        "Upper/LONG.JPEG": encode(rgb, "JPEG"),
        "Upper/shout.PNG": encode(rgb, "PNG"),
        "Big/large.jpg": encode(gradient_rgb(*BIG), "JPEG", quality=80),
        "Pomme d'été/photo n° 1.jpg": encode(rgb, "JPEG"),
        "Plus+Percent%20/a+b%2Fc=d&e.jpg": encode(rgb, "JPEG"),
        "Comma, \"Quoted\"/x,y.jpg": encode(rgb, "JPEG"),
        "Question?Hash#/q.jpg": encode(rgb, "JPEG"),
        "果物/りんご.jpg": encode(rgb, "JPEG"),
        # Folder names that must not escape the output prefix or collide once made safe.
        "../escape.jpg": encode(rgb, "JPEG"),
        "a:b/one.jpg": encode(rgb, "JPEG"),
        "a*b/two.jpg": encode(rgb, "JPEG"),
        ".hidden/three.jpg": encode(rgb, "JPEG"),
    }


def hostile() -> dict[str, tuple[bytes, str]]:
    """key -> (bytes, expected words in the errors.csv reason)."""
    jpeg = encode(gradient_rgb(400, 400), "JPEG")
    return {
        "Lemon/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "Lemon/empty.jpg": (b"", "empty object"),
        "Lemon/not-an-image.jpg": (b"%PDF-1.4 this is a document", "not an image"),
        "Lemon/bomb.png": (bomb_png(40000, 40000), "too large"),
        "Lemon/small-bomb.png": (bomb_png(9000, 9000), "too large: 9000x9000 pixels"),
        "Lemon/svg.png": (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not an image"),
    }


@pytest.fixture(scope="module")
def run(s3_server, tmp_path_factory):
    import boto3

    from conftest import REGION, unique_bucket

    client = boto3.client("s3", endpoint_url=s3_server, region_name=REGION)
    bucket = unique_bucket("hostile")
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    valid, bad = odd_but_valid(), hostile()
    for key, body in valid.items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=body)
    for key, (body, _) in bad.items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=body)
    listed = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="in/")
              for o in page.get("Contents", [])}
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copy(REPO / "driver.py", elsewhere / "driver.py")
    result = submit_driver(s3_server, "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
                           "--model", "tiny", "--weights", "random", "--batch-size", "4",
                           log_dir=tmp_path_factory.mktemp("logs"), env=outside_the_repository(s3_server, elsewhere),
                           cwd=elsewhere, driver="driver.py", py_files=build_zip(tmp_path_factory.mktemp("dist")))
    return client, bucket, valid, bad, listed, result


def read_csv(client, bucket, key):
    text = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    return list(csv.reader(io.StringIO(text)))


def test_every_key_was_stored_as_given(run):
    _, bucket, valid, bad, listed, _ = run
    # The test is only meaningful if S3 kept the odd keys verbatim (no '..' folding, no decoding).
    assert listed == {f"in/{k}" for k in list(valid) + list(bad)}


def test_the_run_succeeds_and_accounts_for_every_image(run):
    client, bucket, valid, bad, _, result = run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert client.head_object(Bucket=bucket, Key="out/_SUCCESS")
    manifest = json.loads(client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    counts = manifest["counts"]
    assert counts["listed"] == len(valid) + len(bad) == counts["featurized"] + counts["failed"]
    assert (counts["featurized"], counts["failed"]) == (len(valid), len(bad))

    # Featurized: each valid key exactly once, in the CSV of its own folder, with its folder as label.
    seen = []
    for label, row in counts["per_fruit"].items():
        if not row["featurized"]:
            continue
        rows = read_csv(client, bucket, f"out/features/{row['file']}")[1:]
        assert len(rows) == row["featurized"]
        for path, row_label, *values in rows:
            key = path[len(f"s3://{bucket}/in/"):]
            assert key.rsplit("/", 1)[0] == label == row_label
            assert len(values) == 64 and all(np.isfinite(float(v)) for v in values)
            seen.append(key)
        pca_rows = read_csv(client, bucket, f"out/pca/{row['file']}")[1:]
        assert [r[0] for r in pca_rows] == [r[0] for r in rows]
    assert sorted(seen) == sorted(valid)

    # Failed: each hostile key exactly once in errors.csv, with a specific reason.
    errors = read_csv(client, bucket, "out/errors.csv")
    assert errors[0] == ["path", "label", "error"]
    reasons = {path[len(f"s3://{bucket}/in/"):]: reason for path, _, reason in errors[1:]}
    assert len(errors) - 1 == len(reasons) == len(bad)
    for key, (_, expected) in bad.items():
        assert expected in reasons[key], (key, reasons[key])


def test_outputs_stay_under_the_output_prefix_with_safe_distinct_names(run):
    client, bucket, _, _, _, result = run
    assert result.returncode == 0
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="")["Contents"]]
    written = [k for k in keys if not k.startswith("in/")]
    assert written and all(k.startswith("out/") for k in written)
    names = [k.split("/", 2)[2] for k in written if k.startswith("out/features/")]
    assert len(names) == len(set(n.casefold() for n in names))
    for name in names:
        assert ".." not in name and "/" not in name and not name.startswith(".")
        assert not set(name) & set(':*?"<>|\\%#')
    manifest = json.loads(client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    files = {label: row["file"] for label, row in manifest["counts"]["per_fruit"].items()}
    assert files["a:b"] != files["a*b"] and files["a:b"].startswith("a_b-") and files["a*b"].startswith("a_b-")
    assert files[".."].startswith("_-") and files["Pomme d'été"] == "Pomme d'été.csv"
    assert files["果物"] == "果物.csv"


def test_the_large_image_was_resized_not_refused(run):
    client, bucket, _, _, _, _ = run
    rows = read_csv(client, bucket, "out/errors.csv")
    assert not any("large.jpg" in r[0] for r in rows)
