"""Shared fixtures: fake credentials, moto S3 (in-process and as a loopback server), one Spark."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest

REPO = Path(__file__).resolve().parent.parent
REGION = "eu-west-3"
FAKE_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SECURITY_TOKEN": "testing", "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION}


@pytest.fixture(scope="session", autouse=True)
def aws_credentials():
    """Fake credentials for the whole suite, so nothing can reach a real account."""
    saved = {k: os.environ.get(k) for k in list(FAKE_ENV) + ["AWS_PROFILE", "AWS_ENDPOINT_URL"]}
    os.environ.update(FAKE_ENV)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def unique_bucket(prefix: str = "fruits") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_mock():
    """An in-process moto S3 client (mock_aws), for tests that need no other process."""
    from moto import mock_aws

    with mock_aws():
        yield boto3.client("s3", region_name=REGION)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port): reachable from Spark workers and subprocesses."""
    from extractor.dev.local_s3 import moto_server

    with moto_server() as endpoint:
        yield endpoint


def store_on_server(bucket: str, key: str, body: bytes) -> None:
    """Put an object straight into the backend of the suite's moto server (in this process):
    local_s3.store_in_backend."""
    from extractor.dev.local_s3 import store_in_backend

    store_in_backend(bucket, key, body)


def keys_under(client, bucket, prefix) -> list[str]:
    """Every key under ``prefix`` (one page: a test's outputs), sorted."""
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def output_bytes(client, bucket, prefix="out/") -> dict[str, bytes]:
    """Every output file's bytes by relative name, except the logs, the manifest and the run lock
    (which carry times)."""
    from extractor.storage.layout import LOCK_FILE, LOG_FOLDER, MANIFEST_FILE

    return {k[len(prefix):]: client.get_object(Bucket=bucket, Key=k)["Body"].read()
            for k in keys_under(client, bucket, prefix)
            if not k.startswith(prefix + LOG_FOLDER) and not k.endswith((MANIFEST_FILE, LOCK_FILE))}


@pytest.fixture
def server_bucket(s3_server):
    """(client, bucket) on the loopback server: a fresh bucket per test."""
    client = boto3.client("s3", endpoint_url=s3_server, region_name=REGION)
    bucket = unique_bucket()
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    return client, bucket


@pytest.fixture(scope="session")
def spark():
    """One local SparkSession (2 cores) for the whole suite; workers run this interpreter."""
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[2]").appName("extractor-tests")
               .config("spark.ui.enabled", "false").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    stop = threading.Event()
    keeper = threading.Thread(target=keep_workers_warm, args=(session.sparkContext, stop), daemon=True,
                              name="keep-workers-warm")
    keeper.start()
    yield session
    stop.set()
    keeper.join(timeout=30)
    session.stop()


KEEP_WARM_GROUP = "keep-workers-warm"
KEEP_WARM_EVERY_S = 20.0


def keep_workers_warm(sc, stop: threading.Event) -> None:
    """Spark stops the Python workers once none has finished a task for a minute (3.5's
    PythonWorkerFactory: fixed, not a setting), and the next test's job then starts new ones
    that import TensorFlow again: ~8 s on 2 cores, paid again after every stretch of tests
    that run no Spark job (measured: a 2-run test took 20 s in the suite, 11.5 + 6 s alone).
    On a cluster the workers are busy; here two no-op tasks every 20 s, when no job is
    running, keep the suite's workers as they would be. Their job group is their own: tests
    that count the jobs of the default group or of the warm-up's see none of them."""
    sc.setJobGroup(KEEP_WARM_GROUP, "keep the suite's Python workers alive between tests")  # this thread only
    while not stop.wait(KEEP_WARM_EVERY_S):
        try:
            if not sc.statusTracker().getActiveJobsIds():
                sc.parallelize([0, 1], 2).foreach(lambda _: None)
        except Exception:  # the context stopping under it at the end of the session
            return


def run_env(endpoint: str) -> dict:
    """Environment for a driver.py / spark-submit subprocess talking to the loopback S3."""
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, AWS_ENDPOINT_URL=endpoint, **FAKE_ENV)
    env.pop("AWS_PROFILE", None)
    return env


def spark_submit() -> str:
    return str(Path(sys.executable).parent / "spark-submit")


def submit_driver(endpoint: str, *args, log_dir, env=None, cwd=REPO, driver=REPO / "driver.py",
                  py_files=None) -> subprocess.CompletedProcess:
    """The real ``driver`` under spark-submit (local[2], ``--py-files py_files`` when given) in
    ``cwd``, against the loopback S3."""
    shipped = ("--py-files", str(py_files)) if py_files is not None else ()
    command = [spark_submit(), "--master", "local[2]", *shipped, str(driver), *args, "--log-dir", str(log_dir)]
    return subprocess.run(command, cwd=cwd, env=env or run_env(endpoint), capture_output=True, text=True,
                          timeout=600)


def outside_the_repository(endpoint: str, folder: Path) -> dict:
    """``run_env(endpoint)`` without PYTHONPATH, after checking that a Python started in
    ``folder`` (as Spark's workers are) cannot import the package by itself there."""
    folder.mkdir(parents=True, exist_ok=True)
    env = run_env(endpoint)
    env.pop("PYTHONPATH", None)
    probe = subprocess.run([sys.executable, "-c", "import extractor"], cwd=folder, env=env, capture_output=True)
    assert probe.returncode != 0, "the package is importable there: the run would prove nothing"
    return env


@pytest.fixture
def driver_here(spark, monkeypatch):
    """``run(endpoint, *args, log_dir) -> exit status``: the real ``driver.main`` (arguments,
    logging, log uploads, job, exit status) in this process, on the suite's SparkContext, which
    it must not stop. For tests whose subject is a run's requests or outputs, not a separate
    process: they skip a JVM start and the workers' TensorFlow import (~15 s a run)."""
    import driver
    from extractor.driver.logs import LOGGER_NAME

    sc = spark.sparkContext
    monkeypatch.setattr(driver, "build_spark_context", lambda: sc)
    monkeypatch.setattr(sc, "stop", lambda: None)

    def run(endpoint, *args, log_dir):
        return driver.main([*args, "--endpoint-url", endpoint, "--log-dir", str(log_dir)])

    yield run
    logger = logging.getLogger(LOGGER_NAME)  # its handlers hold this test's captured stderr
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


@contextmanager
def recorded_requests(path):
    """Every request moto's servers in this process receive meanwhile (moto's recorder is
    process-wide); yields a list filled on exit with dicts: method, url, headers, body (text)."""
    from moto.moto_api import recorder

    saved = recorder._location
    recorder._location = str(path)
    recorder.reset_recording()
    # moto appends each record with two buffered writes and no lock: concurrent requests (the AWS
    # CLI uploads a folder over several connections) interleave their lines. One at a time.
    record, serial = recorder._record_request, threading.Lock()

    def record_one_at_a_time(*args, **kwargs):
        with serial:
            return record(*args, **kwargs)

    recorder._record_request = record_one_at_a_time
    recorder.start_recording()
    entries = []
    try:
        yield entries
    finally:
        recorder.stop_recording()
        del recorder._record_request  # the class's method again
        recorder._location = saved
        for line in Path(path).read_text().splitlines():
            entry = json.loads(line)
            if entry.get("body_encoded"):
                entry["body"] = base64.b64decode(entry["body"]).decode("utf-8", "replace")
            entries.append(entry)


def save_full_model(path, seed=5, legacy=False):
    """Weights of a whole randomly initialised tiny model, as a user's file would hold them;
    returns the feature sub-model's arrays (input to fc2)."""
    import keras
    import numpy as np

    from extractor.executor.models import get_spec

    keras.utils.set_random_seed(seed)
    model = get_spec("tiny").build(None)
    if legacy:  # the HDF5 layout of Keras' own downloads (vgg16_weights_tf_dim_ordering_tf_kernels.h5)
        import h5py
        from keras.src.legacy.saving import legacy_h5_format

        with h5py.File(path, "w") as handle:
            legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    else:
        model.save_weights(path)
    sub = keras.Model(model.input, model.get_layer("fc2").output)
    return [np.asarray(w) for w in sub.get_weights()]


# The fast tier's limit: a unit-level test that takes longer is hung or misfiled (pytest.ini
# gives slow tests their default). Spark's and TensorFlow's first start, paid by whichever test
# comes first, take ~15 s on 2 cores.
FAST_TIMEOUT_S = 120

# What makes a test slow (pytest.ini's marker): a test that starts one of these without the
# mark fails at once, so the fast tier stays fast by construction, not by care. (Building the
# packed environment runs in this process: those tests carry the mark by hand.)
SLOW_COMMANDS = ("spark-submit", "local-cluster", "extractor.dev.bench")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FAST_TIMEOUT_S))


@pytest.fixture(autouse=True)
def slow_processes_need_the_slow_mark(request, monkeypatch):
    """Refuse, in a test not marked slow, a process that only slow tests may start."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    real_init = subprocess.Popen.__init__

    def guarded_init(self, args, *rest, **kwargs):
        text = args if isinstance(args, str) else " ".join(map(str, args))
        # pyspark's own gateway (the session SparkContext) is launched through spark-submit too.
        if "pyspark-shell" not in text and any(word in text for word in SLOW_COMMANDS):
            raise AssertionError(f"{request.node.nodeid} starts {text[:200]!r}: mark it @pytest.mark.slow")
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)
    yield


def save_mobilenetv2_base(path, seed=3, legacy=True):
    """Weights of a randomly initialised MobileNetV2 base (include_top=False, alpha 1.0, 224x224)
    in the legacy HDF5 layout of Keras' imagenet "no_top" download (or as a .weights.h5 if not
    ``legacy``); returns its arrays in ``get_weights()`` order.

    Not Keras' own initialisation: that leaves the 1280 outputs near 1e-11 (Glorot on depthwise
    kernels shrinks every block) and every batch-norm array at 0 or 1, where a swapped array
    would not show. Kernels are He-normal on their real fan-in, batch-norm arrays distinct."""
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    base = keras.applications.MobileNetV2(input_shape=(224, 224, 3), alpha=1.0, include_top=False, weights=None)
    for layer in base.layers:
        for variable in layer.weights:
            shape = tuple(variable.shape)
            if variable.name in ("gamma", "moving_variance"):
                value = rng.uniform(0.5, 1.5, shape)
            elif variable.name in ("beta", "moving_mean"):
                value = rng.normal(0.0, 0.2, shape)
            else:  # a depthwise kernel's output sees kh x kw inputs, a convolution's kh x kw x channels
                depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
                fan_in = np.prod(shape[:2] if depthwise else shape[:-1])
                value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
            variable.assign(value.astype(np.float32))
    if legacy:
        import h5py
        from keras.src.legacy.saving import legacy_h5_format

        with h5py.File(path, "w") as handle:
            legacy_h5_format.save_weights_to_hdf5_group(handle, base)
    else:
        base.save_weights(path)
    return [np.asarray(w) for w in base.get_weights()]
