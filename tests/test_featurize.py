"""The per-partition function, with no Spark: fake S3 client, fake or tiny model."""

import io
import threading

import numpy as np
import pytest
from botocore.exceptions import ClientError

from extractor.executor import worker
from extractor.executor.featurize import PartitionSettings, featurize_partition, spark_task
from extractor.records import FeatureBlock, ImageFailure, TaskStats
from extractor.executor.images import decode_image
from extractor.executor.models import get_spec
from extractor.driver.weights import load_weights
from extractor.storage.state import PartitionPlan

from images import encode, gradient_rgb


class FakeS3:
    """get_object over a dict; missing keys raise NoSuchKey like S3."""

    def __init__(self, objects):
        self.objects = objects
        self.gets = []
        self.lock = threading.Lock()

    def get_object(self, Bucket, Key):
        with self.lock:
            self.gets.append(Key)
        if Key not in self.objects:
            raise ClientError({"Error": {"Code": "NoSuchKey", "Message": "gone"}}, "GetObject")
        return {"Body": io.BytesIO(self.objects[Key])}


SPEC = get_spec("tiny")


def channel_means(x):
    """A stand-in model: (n, 224, 224, 3) -> (n, 64), deterministic."""
    means = x.mean(axis=(1, 2))
    return np.tile(means, (1, 64 // 3 + 1))[:, :64]


def good_image(i):
    return encode(gradient_rgb(60 + i, 90), "JPEG")


def test_batches_vectors_and_errors():
    objects = {f"in/Kiwi/{i}.jpg": good_image(i) for i in range(7)}
    objects["in/Kiwi/empty.jpg"] = b""
    objects["in/Kiwi/text.jpg"] = b"hello"
    refs = [(k, "Kiwi") for k in sorted(objects)] + [("in/Kiwi/vanished.jpg", "Kiwi")]
    batches = []

    def predict(x):
        batches.append(len(x))
        return channel_means(x)

    records = list(featurize_partition(refs, settings=PartitionSettings(bucket="b", batch_size=3),
                                       spec=SPEC, client=FakeS3(objects), predict=predict))

    assert max(batches) <= 3 and sum(batches) == 7
    [stats] = [r.stats for r in records if isinstance(r, TaskStats)]
    assert isinstance(records[-1], TaskStats) and stats["seconds"]["forward_s"] > 0 and stats["seconds"]["load_s"] > 0
    assert stats["first_forward_at"] <= stats["finished_at"] and stats["peak_rss_mb"] > 10
    features = [r for r in records if isinstance(r, FeatureBlock)]
    errors = {r.key: r.reason for r in records if isinstance(r, ImageFailure)}
    assert errors == {"in/Kiwi/empty.jpg": "empty object (0 bytes)",
                      "in/Kiwi/text.jpg": "not an image (not one of JPEG, PNG, GIF, BMP, TIFF, WEBP)",
                      "in/Kiwi/vanished.jpg": "object deleted since it was listed (NoSuchKey)"}
    keys = [k for r in features for k in r.keys]
    assert sorted(keys) == sorted(f"in/Kiwi/{i}.jpg" for i in range(7))
    for block_keys, block_labels, vectors in features:
        assert vectors.dtype == np.float32 and vectors.shape == (len(block_keys), 64)
        assert block_labels == ["Kiwi"] * len(block_keys)
        for key, vector in zip(block_keys, vectors):
            expected = channel_means(SPEC.preprocess(decode_image(objects[key], (224, 224))[None]))[0]
            np.testing.assert_allclose(vector, expected, rtol=1e-6)


def test_a_partition_of_only_bad_images_yields_only_errors():
    refs = [("a/x.jpg", "a"), ("a/y.jpg", "a")]
    records = list(featurize_partition(refs, settings=PartitionSettings(bucket="b"), spec=SPEC,
                                       client=FakeS3({"a/x.jpg": b"", "a/y.jpg": b"\x00" * 10}),
                                       predict=pytest.fail))
    assert [type(r) for r in records] == [ImageFailure, ImageFailure, TaskStats]


def test_wrong_model_output_shape_fails_loudly():
    refs = [("a/x.jpg", "a")]
    with pytest.raises(RuntimeError, match="expected"):
        list(featurize_partition(refs, settings=PartitionSettings(bucket="b"), spec=SPEC,
                                 client=FakeS3({"a/x.jpg": good_image(0)}),
                                 predict=lambda x: np.zeros((len(x), 5))))


class FakeBroadcast:
    def __init__(self, value):
        self.value = value


class CountingSettings:
    """Stands in for S3Settings: counts the clients made."""

    def __init__(self, client):
        self.made = 0
        self._client = client

    def client(self):
        self.made += 1
        return self._client


class Counter:
    def __init__(self):
        self.value = 0

    def add(self, n):
        self.value += n


def test_spark_task_one_client_per_partition_one_model_per_process(monkeypatch):
    monkeypatch.setattr(worker, "_MODELS", {})
    weights = load_weights(SPEC, "random", seed=3)
    objects = {f"in/Lime/{i}.jpg": good_image(i) for i in range(5)}
    settings = CountingSettings(FakeS3(objects))
    builds = Counter()
    outputs = []
    for part in (sorted(objects)[:3], sorted(objects)[3:]):
        plan = PartitionPlan(0, [(k, "Lime", "") for k in part])
        records = spark_task([plan], settings=PartitionSettings(bucket="b", batch_size=2),
                             model_name="tiny", weights_id=weights.sha256,
                             weights_broadcast=FakeBroadcast(weights.arrays), s3_settings=settings,
                             threads=1, builds_counter=builds)
        outputs.extend(records)
    assert settings.made == 2          # one client per partition, not per image
    assert builds.value == 1           # the broadcast was read once; the second task reused the model
    assert sum(len(r.keys) for r in outputs if isinstance(r, FeatureBlock)) == 5


def test_warm_up_builds_the_model_and_the_first_task_only_sets_weights(monkeypatch):
    monkeypatch.setattr(worker, "_MODELS", {})
    [result] = list(worker.warm_up_task(iter([0]), model_name="tiny", threads=1, precision="float32"))
    assert result["pid"] > 0 and result["seconds"] > 0
    assert (result["problem"], result["gpu_addresses"], result["gpu_devices"]) == (None, [], [])  # a CPU task
    warmed = worker._MODELS[("tiny", "float32")]
    assert warmed.weights_id is None      # built and traced, no weights read yet
    weights = load_weights(SPEC, "random", seed=3)
    builds = Counter()
    forward = worker.cached_model(SPEC, weights.sha256, FakeBroadcast(weights.arrays), 1,
                                     on_build=lambda: builds.add(1))
    assert forward is warmed and builds.value == 1
    for got, want in zip(forward.model.get_weights(), weights.arrays):
        np.testing.assert_array_equal(got, want)
