"""Past one driver: a run whose vectors would not fit its driver completes in distributed mode
on local-cluster[2,1,1024] (separate executor JVMs), with correct per-fruit outputs.

The driver is kept small two ways: 512 MB of heap, and a spark.driver.maxResultSize of 24 MiB
that also makes any action returning more than that (a gather of the vectors by mistake) fail
the run; the distributed mode's largest result, a block of the PCA's moments, is 17 MiB."""

import io
import json
import random

import numpy as np
import pytest

from extractor.driver.collected import collect_need
from extractor.dev.bench_scale import submit, upload_images
from extractor.driver.distributed import largest_result_bytes
from extractor.results.formats import read_table
from extractor.executor.images import decode_image
from extractor.executor.models import feature_model, get_spec
from extractor.driver.weights import load_weights

from conftest import store_on_server
from rounding import assert_within_rounding

pytestmark = pytest.mark.slow

MAX_RESULT = 24 * 2**20
# The smallest round count whose vectors need more than MAX_RESULT (1,513 do): the subject is a
# run past its driver's limits, which does not take 7,000 images once the limit is the result size.
COUNT = 1600


def test_vectors_that_do_not_fit_the_driver_go_distributed(s3_server, server_bucket, tmp_path):
    client, bucket = server_bucket
    per_fruit = upload_images(client, bucket, "in/", COUNT, store=store_on_server)
    assert collect_need(COUNT - 100, 4096)[0] <= MAX_RESULT < collect_need(COUNT, 4096)[0]
    assert largest_result_bytes(4096) < MAX_RESULT
    run = submit(s3_server, bucket, "in/", "out/", tmp_path, conf={"spark.driver.maxResultSize": str(MAX_RESULT)})
    assert run["returncode"] == 0, run["output"]
    manifest = run["manifest"]
    print(f"\n{COUNT} vectors: wall {run['wall_s']:.1f} s, stages {manifest['timings_s']}, "
          f"driver peak RSS {manifest['driver_peak_rss_mb']} MB")
    assert manifest["collect"]["used"] == "distributed"
    assert manifest["collect"]["reason"] == "the vectors would not fit the driver"
    assert manifest["counts"]["featurized"] == COUNT and manifest["counts"]["failed"] == 0
    assert manifest["spark"]["master"].startswith("local-cluster")

    spec = get_spec("probe4096")
    model = feature_model(spec)
    model.set_weights(load_weights(spec, "random").arrays)
    with np.load(io.BytesIO(client.get_object(Bucket=bucket, Key="out/pca_model.npz")["Body"].read())) as npz:
        mean, components = npz["mean"], npz["components"]
    rng = random.Random(0)
    for fruit, expected in per_fruit.items():
        body = client.get_object(Bucket=bucket, Key=f"out/features/{fruit}.csv")["Body"].read()
        assert manifest["files"][f"features/{fruit}.csv"]["bytes"] == len(body)
        paths, labels, vectors = read_table(body, "csv")
        keys = [p.split("/", 3)[3] for p in paths]
        # One file per fruit, every image once, in key order, each row its own image's vector.
        assert len(keys) == expected and keys == sorted(keys) and set(labels) == {fruit}
        assert all(k.startswith(f"in/{fruit}/") for k in keys)
        sample = rng.sample(range(len(keys)), 5)
        images = np.stack([decode_image(client.get_object(Bucket=bucket, Key=keys[i])["Body"].read(),
                                        spec.input_size) for i in sample])
        want = model.predict(spec.preprocess(images), verbose=0)
        assert_within_rounding(vectors[sample], want, fruit)
        pca_paths, _, projections = read_table(
            client.get_object(Bucket=bucket, Key=f"out/pca/{fruit}.csv")["Body"].read(), "csv")
        assert pca_paths == paths
        np.testing.assert_allclose(projections[sample], (vectors[sample] - mean) @ components.T,
                                   rtol=1e-3, atol=1e-3 * np.abs(projections).max())
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]]
    assert not any("_staging" in key for key in listed)
    assert json.loads(client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())["status"] == "succeeded"
