"""driver.py against moto's S3 server on 127.0.0.1: once under spark-submit, end to end, started
in a folder where nothing provides the package (the driver ships it to the workers itself: no
--py-files); the other runs through driver.main in this process, on the suite's SparkContext."""

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from extractor.dev.synthetic import fruit_dataset

from conftest import REPO, outside_the_repository, submit_driver
from images import encode, gradient_rgb
from rounding import assert_within_rounding


submit = submit_driver


def read(client, bucket, key) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def read_csv(client, bucket, key):
    return list(csv.reader(io.StringIO(read(client, bucket, key).decode("utf-8"))))


@pytest.mark.slow
def test_end_to_end_every_output(s3_server, server_bucket, tmp_path):
    client, bucket = server_bucket
    images = fruit_dataset(4, ["Apple Red", "Lemon"])
    images["Pêche de vigne/p1.JPEG"] = encode(gradient_rgb(100, 100), "JPEG")
    images["Pêche de vigne/p2.png"] = encode(gradient_rgb(80, 100).convert("RGBA"), "PNG")
    images["Lemon/corrupt.jpg"] = encode(gradient_rgb(), "JPEG")[:700]
    images["Lemon/empty.jpg"] = b""
    for key, body in images.items():
        client.put_object(Bucket=bucket, Key=f"data/Test/{key}", Body=body)
    client.put_object(Bucket=bucket, Key="data/Test/Lemon/notes.txt", Body=b"not an image")

    # Started elsewhere, as an operator's shell or a scheduler would: the workers' Python starts in
    # that folder, where only what the driver ships provides the package.
    elsewhere = tmp_path / "elsewhere"
    result = submit(s3_server, "--input", f"s3://{bucket}/data/Test/", "--output", f"s3://{bucket}/run1/",
                    "--model", "tiny", "--weights", "random", "--batch-size", "3", "--pca-k", "4",
                    log_dir=tmp_path, env=outside_the_repository(s3_server, elsewhere), cwd=elsewhere)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    keys = sorted(o["Key"][len("run1/"):] for o in client.list_objects_v2(Bucket=bucket, Prefix="run1/")["Contents"])
    log_keys = [k for k in keys if k.startswith("logs/")]
    assert sorted(set(keys) - set(log_keys)) == sorted([
        "_SUCCESS", "_lock.json", "errors.csv", "explained_variance.png", "manifest.json", "pca_model.npz",
        "pca_scatter.csv", "pca_scatter.png", "report.html", "features/Apple Red.csv", "features/Lemon.csv", "features/Pêche de vigne.csv",
        "pca/Apple Red.csv", "pca/Lemon.csv", "pca/Pêche de vigne.csv"])

    manifest = json.loads(read(client, bucket, "run1/manifest.json"))
    counts = manifest["counts"]
    assert (counts["listed"], counts["featurized"], counts["failed"], counts["skipped_non_image_keys"]) == (12, 10, 2, 1)
    assert counts["per_fruit"]["Lemon"] == {"file": "Lemon.csv", "featurized": 4, "failed": 2}
    assert manifest["pca"]["k"] == 4 and 0 < manifest["pca"]["explained_variance"] <= 1
    assert manifest["model"]["output_layer"] == "fc2" and manifest["weights"]["kind"] == "random"
    assert "carry no meaning" in manifest["warning"]
    assert set(manifest["timings_s"]) == {"preflight", "list", "load_weights", "featurize", "pca", "write"}
    assert manifest["versions"]["pyspark"].startswith("3.5.")

    featurized = []
    for fruit, n in [("Apple Red", 4), ("Lemon", 4), ("Pêche de vigne", 2)]:
        rows = read_csv(client, bucket, f"run1/features/{fruit}.csv")
        assert rows[0] == ["path", "label"] + [f"dim_{i}" for i in range(64)]
        assert len(rows) == n + 1 and all(r[1] == fruit and len(r) == 66 for r in rows[1:])
        assert [r[0] for r in rows[1:]] == sorted(r[0] for r in rows[1:])
        pca_rows = read_csv(client, bucket, f"run1/pca/{fruit}.csv")
        assert pca_rows[0] == ["path", "label", "pc_0", "pc_1", "pc_2", "pc_3"]
        assert [r[0] for r in pca_rows[1:]] == [r[0] for r in rows[1:]]
        featurized += [r[0] for r in rows[1:]]
    errors = read_csv(client, bucket, "run1/errors.csv")
    assert errors[0] == ["path", "label", "error"]
    reasons = {r[0]: r[2] for r in errors[1:]}
    assert sorted(reasons) == [f"s3://{bucket}/data/Test/Lemon/corrupt.jpg", f"s3://{bucket}/data/Test/Lemon/empty.jpg"]
    assert "truncated" in reasons[f"s3://{bucket}/data/Test/Lemon/corrupt.jpg"]
    assert reasons[f"s3://{bucket}/data/Test/Lemon/empty.jpg"] == "empty object (0 bytes)"
    # Every listed image is in exactly one place.
    listed = {f"s3://{bucket}/data/Test/{k}" for k in images}
    assert sorted(featurized + [r[0] for r in errors[1:]]) == sorted(listed)

    npz = np.load(io.BytesIO(read(client, bucket, "run1/pca_model.npz")))
    assert npz["components"].shape == (4, 64) and npz["mean"].shape == (64,)
    assert read(client, bucket, "run1/explained_variance.png")[:8] == b"\x89PNG\r\n\x1a\n"
    head = client.head_object(Bucket=bucket, Key="run1/features/Lemon.csv")
    assert head["ServerSideEncryption"] == "AES256"

    # The log: timestamped lines, uploaded to <output>/logs/ with the same name as the local file.
    assert len(log_keys) == 1
    local_logs = list(tmp_path.glob("*.log"))
    assert [p.name for p in local_logs] == [log_keys[0][len("logs/"):]]
    uploaded = read(client, bucket, f"run1/{log_keys[0]}").decode()
    assert uploaded == local_logs[0].read_text()
    assert "stage featurize: done" in uploaded and "succeeded: 10 featurized, 2 failed" in uploaded
    assert "RANDOM WEIGHTS" in uploaded


def test_vgg16_vectors_equal_single_process_keras(s3_server, server_bucket, tmp_path, driver_here):
    """Parity: the job's fc2 vector == keras load_img + preprocess_input + predict, same weights file."""
    import keras
    from keras.applications import vgg16
    from keras.src.legacy.saving import legacy_h5_format
    import h5py

    client, bucket = server_bucket
    keras.utils.set_random_seed(7)
    full = vgg16.VGG16(weights=None)
    weights_file = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"  # Keras' own file layout
    with h5py.File(weights_file, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, full)
    reference_model = keras.Model(full.input, full.get_layer("fc2").output)

    images = {"Kiwi/k1.jpg": encode(gradient_rgb(100, 100), "JPEG"),
              "Kiwi/k2.jpg": fruit_dataset(1, ["Lime"])["Lime/lime_000.jpg"],
              "Plum/p1.png": encode(gradient_rgb(100, 64).rotate(30), "PNG")}
    for key, body in images.items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=body)
        (tmp_path / key.replace("/", "_")).write_bytes(body)

    code = driver_here(s3_server, "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
                       "--weights", str(weights_file), "--batch-size", "2", log_dir=tmp_path / "logs")
    assert code == 0

    job_vectors = {}
    for fruit in ("Kiwi", "Plum"):
        rows = read_csv(client, bucket, f"out/features/{fruit}.csv")
        assert len(rows[0]) == 2 + 4096
        for row in rows[1:]:
            job_vectors[row[0]] = np.array(row[2:], dtype=np.float32)
    assert len(job_vectors) == 3
    for key in images:
        img = keras.utils.load_img(tmp_path / key.replace("/", "_"), target_size=(224, 224))
        x = vgg16.preprocess_input(np.expand_dims(keras.utils.img_to_array(img), 0))
        expected = reference_model.predict(x, verbose=0)[0]
        got = job_vectors[f"s3://{bucket}/in/{key}"]
        assert np.abs(expected).max() > 0
        assert_within_rounding(got, expected, key)
    manifest = json.loads(read(client, bucket, "out/manifest.json"))
    assert manifest["model"] == {"name": "vgg16", "output_layer": "fc2", "output_dim": 4096,
                                 "input_size": [224, 224], "decode": "draft", "preprocessing": "preprocess_caffe"}
    assert manifest["weights"]["kind"] == "file" and manifest["warning"] is None


def assert_failed_with_one_line(code, stderr, message):
    """Exit 1, exactly one ERROR line from the job, saying ``message``, and no traceback."""
    assert code == 1
    errors = [line for line in stderr.splitlines() if " extractor: " in line and " ERROR " in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert "Traceback" not in stderr


# The startup failures below run driver.main in this process (its exit status and its stderr
# are the subject; test_end_to_end_every_output and test_faults.py run the real spark-submit).

def test_missing_bucket_one_line_and_exit_1(s3_server, tmp_path, driver_here, capsys):
    code = driver_here(s3_server, "--input", "s3://no-such-bucket-here/in/", "--output", "s3://no-such-bucket-here/out/",
                       "--model", "tiny", "--weights", "random", log_dir=tmp_path)
    assert_failed_with_one_line(code, capsys.readouterr().err, "bucket 'no-such-bucket-here' does not exist")


def test_missing_credentials_one_line_and_exit_1(s3_server, server_bucket, tmp_path, driver_here, capsys, monkeypatch):
    _, bucket = server_bucket
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code = driver_here(s3_server, "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
                       "--model", "tiny", "--weights", "random", log_dir=tmp_path)
    assert_failed_with_one_line(code, capsys.readouterr().err, "no AWS credentials found")


def test_empty_prefix_fails_and_still_uploads_its_log(s3_server, server_bucket, tmp_path, driver_here, capsys):
    client, bucket = server_bucket
    code = driver_here(s3_server, "--input", f"s3://{bucket}/empty/", "--output", f"s3://{bucket}/out/",
                       "--model", "tiny", "--weights", "random", log_dir=tmp_path)
    assert_failed_with_one_line(code, capsys.readouterr().err, "no .jpg/.jpeg/.png images under")
    logs = client.list_objects_v2(Bucket=bucket, Prefix="out/logs/")["Contents"]
    text = read(client, bucket, logs[0]["Key"]).decode()
    assert "no .jpg/.jpeg/.png images under" in text and "failed" in text
    assert "out/_SUCCESS" not in [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]]


def run_driver(*args):
    """driver.py with plain python: argument errors are reported before Spark starts."""
    return subprocess.run([sys.executable, str(REPO / "driver.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    ([], "the following arguments are required: --input, --output"),
    (["--input", "bucket/in", "--output", "s3://b/out/"], "expected an s3://bucket/prefix URI, got 'bucket/in'"),
    (["--input", "s3://b/in/", "--output", "s3://b/in/out/"], "overlap"),
    (["--input", "s3://b/in/", "--output", "s3://b"], "--output needs a prefix"),
    (["--input", "s3://b/in/", "--output", "s3://b/out/", "--batch-size", "0"], "--batch-size must be between 1 and 1024, got 0"),
    (["--input", "s3://b/in/", "--output", "s3://b/out/", "--pca-variance", "1.5"], "--pca-variance must be in (0, 1], got 1.5"),
    (["--input", "s3://b/in/", "--output", "s3://b/out/", "--pca-k", "3", "--pca-variance", "0.9"], "not allowed with argument"),
    (["--input", "s3://b/in/", "--output", "s3://b/out/", "--weights", "/nope/w.h5"], "--weights file not found: '/nope/w.h5'"),
    (["--input", "s3://b/in/", "--output", "s3://b/out/", "--weights", "resnet"], "got 'resnet'"),
    (["--input", "s3://b/in/", "--output", "s3://b/out/", "--model", "vgg19"], "invalid choice: 'vgg19'"),
])
def test_bad_arguments_one_line_exit_2(args, message):
    result = run_driver(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
