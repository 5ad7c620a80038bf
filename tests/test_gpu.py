"""GPUs under Spark's GPU-aware scheduling, proven without a GPU.

Spark itself (spark-submit on local-cluster, a discovery script reporting fake addresses)
shows that it gives each concurrently running task its own address and that the device
selection turns that address into CUDA_VISIBLE_DEVICES; the real driver.py on such a cluster,
with this machine's TensorFlow (which sees no GPU), ends in seconds with one line. The
decisions (selection, re-pinning, precision checks, pool sizing) are pure functions, tested
directly; the checks that need TensorFlow run the real one.

Run as a script, this file is the Spark application of the scheduling test.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from extractor.executor import feeding, gpu

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
# Every worker of local-cluster reports these; Spark hands them to its executor.
DISCOVERY = "#!/usr/bin/env bash\necho '{\"name\": \"gpu\", \"addresses\": [%s]}'\n"


def write_discovery(folder: Path, addresses: list[str]) -> Path:
    script = folder / "gpus.sh"
    script.write_text(DISCOVERY % ", ".join(f'"{a}"' for a in addresses))
    script.chmod(0o755)
    return script


def gpu_conf(script: Path, worker: int, executor: int, task: float) -> list[str]:
    """spark-submit options for standalone GPU scheduling: each worker discovers ``worker``
    GPUs with ``script``, each executor takes ``executor`` of them, each task ``task``."""
    conf = {"spark.worker.resource.gpu.amount": worker, "spark.worker.resource.gpu.discoveryScript": script,
            "spark.executor.resource.gpu.amount": executor, "spark.task.resource.gpu.amount": task}
    return [arg for key, value in conf.items() for arg in ("--conf", f"{key}={value}")]


@pytest.fixture
def fresh_process(monkeypatch):
    """This test process as a new Python worker: not pinned to any GPU, no model built, and
    CUDA_VISIBLE_DEVICES restored afterwards."""
    from extractor.executor import worker

    monkeypatch.setattr(gpu._Process, "pinned", None)
    monkeypatch.setattr(gpu._Process, "devices", [])
    monkeypatch.setattr(worker, "_MODELS", {})
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.setenv(name, "")  # records the value to restore
        monkeypatch.delenv(name)
    return worker


# --- device selection ------------------------------------------------------------------------------

@pytest.mark.parametrize("addresses,environ,changes", [
    (["0"], {}, {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),
    (("1", "3"), {}, {"CUDA_VISIBLE_DEVICES": "1,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),
    (["2"], {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, {"CUDA_VISIBLE_DEVICES": "2"}),
    (["GPU-8f6c1c2e-77b5-4d0e"], {}, {"CUDA_VISIBLE_DEVICES": "GPU-8f6c1c2e-77b5-4d0e",
                                      "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),
    ([], {"CUDA_VISIBLE_DEVICES": "1"}, {}),  # no GPU scheduling: the environment as it was
])
def test_the_task_gpu_becomes_the_only_one_cuda_sees(addresses, environ, changes):
    before = dict(environ)
    assert gpu.visible_devices_env(addresses, environ) == changes
    assert environ == before  # a pure function: the caller applies the changes


@pytest.mark.parametrize("address", ["0,1", "", " 0", "gpu0", 0])
def test_an_address_cuda_cannot_take_is_refused_with_what_was_received(address):
    with pytest.raises(ValueError, match=re.escape(f"got {address!r}")):
        gpu.visible_devices_env([address], {})


def test_a_process_is_pinned_once_and_refuses_a_task_holding_another_gpu(fresh_process):
    environ = {}
    gpu.select_process_gpus(("0",), environ)
    assert environ == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    gpu.select_process_gpus(["0"], environ)  # the next task of the same executor: same GPU
    with pytest.raises(gpu.GpuError) as refused:
        gpu.select_process_gpus(("1",), environ)
    assert str(refused.value) == (
        "this Python worker's TensorFlow runs on GPU 0 but Spark gave this task GPU 1: TensorFlow cannot change "
        "GPUs once started; give each executor one GPU (spark.executor.resource.gpu.amount=1) or set "
        "spark.python.worker.reuse=false")
    assert environ["CUDA_VISIBLE_DEVICES"] == "0"  # never re-pinned
    assert gpu.repin_problem(("0", "1"), ["1", "0"]) is None
    assert "runs on GPU none but Spark gave this task GPU 0" in gpu.repin_problem((), ("0",))


def test_several_gpus_per_executor_with_reused_workers_are_refused_on_the_driver():
    conf = {"spark.executor.resource.gpu.amount": "2", "spark.task.resource.gpu.amount": "1"}
    with pytest.raises(ValueError, match=r"^spark.executor.resource.gpu.amount=2 with "
                                         r"spark.task.resource.gpu.amount=1: a reused Python worker's TensorFlow "
                                         r"stays on the first GPU"):
        feeding.plan_feeding(conf, None, None)
    # Fine: new workers per task, one GPU per executor (shared or not), every GPU to each task.
    feeding.plan_feeding({**conf, "spark.python.worker.reuse": "false"}, None, None)
    for executor, task in (("1", "1"), ("1", "0.25"), ("2", "2")):
        feeding.plan_feeding({"spark.executor.resource.gpu.amount": executor,
                              "spark.task.resource.gpu.amount": task}, None, None)


def test_requested_gpus_are_read_from_the_conf():
    assert gpu.requested_gpus({"spark.task.cpus": "1"}) is None
    assert gpu.requested_gpus({"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "0.5"}) \
        == {"executor": 1.0, "task": 0.5}
    for text in ("one", "0", "-1"):
        with pytest.raises(ValueError, match=f"spark.task.resource.gpu.amount must be .*got '{text}'"):
            gpu.requested_gpus({"spark.task.resource.gpu.amount": text})


# --- what TensorFlow sees: the real one (no GPU on this machine), or a fake with GPU details ------

def test_a_task_given_a_gpu_tensorflow_cannot_see_fails_at_the_import_in_one_line(fresh_process):
    import tensorflow as tf

    from extractor.executor.models import get_spec

    with pytest.raises(gpu.GpuError) as refused:
        fresh_process.compiled_model(get_spec("tiny"), 1, "float32", ("0",))
    message = str(refused.value)
    assert message == (
        f"GPU requested but TensorFlow sees none: Spark gave this task GPU 0, and TensorFlow {tf.__version__} here is "
        f"a CPU-only build (tensorflow-cpu); install the CUDA build, tensorflow[and-cuda]=={tf.__version__}, on the "
        f"GPU nodes in its place")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and fresh_process._MODELS == {}  # pinned, nothing built


def test_featurize_tasks_refuse_too_when_there_is_no_warm_up(fresh_process, monkeypatch):
    from extractor.executor import featurize
    from extractor.executor.models import get_spec
    from extractor.driver.weights import load_weights
    from extractor.storage.state import PartitionPlan

    from test_featurize import CountingSettings, FakeBroadcast, FakeS3, good_image

    monkeypatch.setattr(featurize, "task_gpu_addresses", lambda: ("3",))  # what Spark would give the task
    weights = load_weights(get_spec("tiny"), "random", seed=1)
    records = featurize.spark_task([PartitionPlan(0, [("in/Lime/0.jpg", "Lime", "")])],
                                   settings=featurize.PartitionSettings(bucket="b"), model_name="tiny",
                                   weights_id=weights.sha256, weights_broadcast=FakeBroadcast(weights.arrays),
                                   s3_settings=CountingSettings(FakeS3({"in/Lime/0.jpg": good_image(0)})), threads=1)
    with pytest.raises(gpu.GpuError, match=r"^GPU requested but TensorFlow sees none: Spark gave this task GPU 3, "):
        list(records)


def test_float16_without_a_gpu_is_refused_in_one_line(fresh_process):
    import tensorflow as tf

    from extractor.executor.models import get_spec

    with pytest.raises(gpu.GpuError) as refused:
        fresh_process.compiled_model(get_spec("tiny"), 1, "float16")
    assert str(refused.value) == (
        f"--precision float16 needs a GPU and TensorFlow {tf.__version__} sees none in this task: float16 on a CPU is "
        f"emulated, many times slower than float32; use --precision float32 (or bfloat16 on CPUs with "
        f"AVX512-BF16/AMX), or give each task a GPU (spark.executor.resource.gpu.amount=1, "
        f"spark.task.resource.gpu.amount=1)")


class FakeTensorFlow:
    """What configure_tensorflow asks of TensorFlow, for GPUs this machine does not have."""

    __version__ = "2.20.0"

    def __init__(self, details: list[dict]):
        self.grown = []
        gpus = [f"PhysicalDevice(GPU:{i})" for i in range(len(details))]
        experimental = type("Experimental", (), {
            "set_memory_growth": staticmethod(lambda device, on: self.grown.append((device, on))),
            "get_device_details": staticmethod(lambda device: details[gpus.index(device)])})
        self.config = type("Config", (), {"list_physical_devices": staticmethod(lambda kind: list(gpus)),
                                          "experimental": experimental})
        self.test = type("Test", (), {"is_built_with_cuda": staticmethod(lambda: True)})
        self.sysconfig = type("Sysconfig", (), {"get_build_info": staticmethod(lambda: {"cuda_version": "12.5.1"})})


T4 = {"device_name": "Tesla T4", "compute_capability": (7, 5)}
A10G = {"device_name": "NVIDIA A10G", "compute_capability": (8, 6)}


def test_bfloat16_on_a_gpu_older_than_compute_capability_8_is_refused_with_float16_suggested(fresh_process):
    with pytest.raises(gpu.GpuError) as refused:
        gpu.configure_tensorflow(FakeTensorFlow([T4]), ("0",), "bfloat16")
    assert str(refused.value) == ("--precision bfloat16 needs a GPU of compute capability 8.0 or newer, and this "
                                  "task's GPU 0 is Tesla T4 (7.5): use --precision float16")
    tf = FakeTensorFlow([T4])
    assert gpu.configure_tensorflow(tf, ("0",), "float16") == [{"name": "Tesla T4", "compute_capability": [7, 5]}]
    assert tf.grown == [("PhysicalDevice(GPU:0)", True)]  # memory growth on: workers may share the GPU
    assert gpu.process_devices() == [{"name": "Tesla T4", "compute_capability": [7, 5]}]
    assert gpu.configure_tensorflow(FakeTensorFlow([A10G]), ("1",), "bfloat16")[0]["name"] == "NVIDIA A10G"


def test_a_cuda_build_that_sees_no_gpu_or_too_many_says_so(fresh_process):
    with pytest.raises(gpu.GpuError, match=r"TensorFlow 2.20.0 \(built for CUDA 12.5.1\) found no GPU at "
                                           r"CUDA_VISIBLE_DEVICES=0; check the NVIDIA driver \(nvidia-smi\) and "
                                           r"install the CUDA libraries with tensorflow\[and-cuda\]==2.20.0$"):
        gpu.configure_tensorflow(FakeTensorFlow([]), ("0",), "float32")
    with pytest.raises(gpu.GpuError, match="Spark gave this task GPU 1 but TensorFlow sees 2 GPUs: it started before"):
        gpu.configure_tensorflow(FakeTensorFlow([A10G, A10G]), ("1",), "float32")


# --- feeding the GPU -------------------------------------------------------------------------------

def test_decode_pool_size_follows_the_formula():
    # The documented defaults: the GIL of one Python worker bounds a task at ~390 images/s.
    pool = feeding.size_decode_pool(1500, 2500, 4, 0.030)
    gil = 1 / (0.0022 + 0.9 / 2500)
    assert pool == feeding.PoolSize(math.ceil(gil * (0.030 + 0.0022 + 1 / 2500) * 1.25), round(gil, 1), "gil")
    assert pool.threads == 16
    # A target the pool can reach: Little's law, threads > cores (S3 latency is a wait).
    assert feeding.size_decode_pool(100, 2500, 2, 0.030) == feeding.PoolSize(5, 100, "gpu")
    # Camera-size JPEGs, whose decodes overlap: the cores bound it.
    camera = feeding.size_decode_pool(1500, 22, 4, 0.030, serial_share=0.1)
    assert camera == feeding.PoolSize(9, round(4 / (0.0022 + 1 / 22), 1), "cores")
    # Slow S3 wants more threads than the client has connections.
    assert feeding.size_decode_pool(300, 2500, 4, 0.5) == feeding.PoolSize(32, round(32 / (0.5 + 0.0022 + 1 / 2500), 1),
                                                                          "threads")
    for bad in ({"cores": 0}, {"target_images_per_s": -1}, {"s3_latency_s": float("nan")}):
        args = {"target_images_per_s": 1500, "decode_images_per_s_per_core": 2500, "cores": 4, "s3_latency_s": 0.03,
                **bad}
        with pytest.raises(ValueError, match=re.escape(repr(next(iter(bad.values()))))):
            feeding.size_decode_pool(**args)


def test_auto_keeps_the_cpu_figures_and_sizes_for_gpus():
    cpu = feeding.plan_feeding({"spark.task.cpus": "2"}, None, None)
    assert (cpu.batch_size, cpu.decode_threads, cpu.gpus, cpu.pool) == (32, 4, None, None)
    assert (feeding.plan_feeding({}, 8, 6).batch_size, feeding.plan_feeding({}, 8, 6).decode_threads) == (8, 6)
    one = {"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1",
           "spark.executor.cores": "4"}
    whole = feeding.plan_feeding(one, None, None)
    rate = feeding.GPU_IMAGES_PER_S  # the cost table's g5.xlarge float16 estimate
    assert (whole.batch_size, whole.decode_threads, whole.cores, whole.target_images_per_s) == (256, 16, 4.0, rate)
    assert whole.as_dict()["feed_limit"] == "gil" and whole.as_dict()["auto"] == ["batch size", "decode threads"]
    # Four tasks share the GPU: each takes a quarter of its batch and of its rate, on 4 of 16 vCPUs.
    quarter = feeding.plan_feeding({**one, "spark.task.resource.gpu.amount": "0.25", "spark.executor.cores": "16"},
                                   None, None)
    assert (quarter.batch_size, quarter.cores, quarter.target_images_per_s) == (64, 4.0, rate / 4)
    assert quarter.decode_threads == feeding.size_decode_pool(rate / 4, 2500, 4, 0.03).threads
    explicit = feeding.plan_feeding(one, 128, 7)
    assert (explicit.batch_size, explicit.decode_threads, explicit.as_dict()["auto"]) == (128, 7, [])


def test_the_manifest_tells_the_gpus_asked_seen_and_the_feeding():
    from types import SimpleNamespace

    from extractor.results.manifest import spark_facts

    plan = feeding.plan_feeding({"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "1"},
                                None, 24)
    warm_up = SimpleNamespace(as_dict=lambda: {"enabled": True, "slots": 2, "workers": 2, "seconds": 9.5,
                                               "gpu_addresses": ["0"], "gpu_devices": ["NVIDIA A10G"]})
    sc = SimpleNamespace(master="yarn", applicationId="application_1", defaultParallelism=8)
    featurizing = SimpleNamespace(partitions=40, weight_loads=SimpleNamespace(value=2), task_cpus=1)
    facts = spark_facts(sc, featurizing, warm_up, {}, plan.as_dict())
    assert facts["spark"]["gpu"] == {
        "requested": {"executor": 1.0, "task": 1.0}, "batch_size": 256, "decode_threads": 24, "auto": ["batch size"],
        "target_images_per_s": feeding.GPU_IMAGES_PER_S, "cores_per_task": 1.0, "estimated_feed_images_per_s": plan.pool.images_per_s,
        "feed_limit": "cores", "addresses_seen": ["0"], "devices": ["NVIDIA A10G"]}


def test_precision_and_auto_options():
    from extractor.driver.config import parse_args

    base = ["--input", "s3://b/in/", "--output", "s3://b/out/"]
    cfg = parse_args(base)
    assert (cfg.batch_size, cfg.decode_threads, cfg.precision) == (None, None, "float32")
    cfg = parse_args(base + ["--precision", "float16", "--batch-size", "64", "--decode-threads", "12"])
    assert (cfg.batch_size, cfg.decode_threads, cfg.precision) == (64, 12, "float16")


# --- Spark: GPU-aware scheduling on local-cluster ---------------------------------------------------

def executor_id() -> str:
    """The executor this Python worker serves: its ancestor CoarseGrainedExecutorBackend's id."""
    pid = os.getppid()
    while pid > 1:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"org.apache.spark.executor.CoarseGrainedExecutorBackend" in cmdline:
            return cmdline[cmdline.index(b"--executor-id") + 1].decode()
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    raise RuntimeError("no executor among this process's ancestors")


def scheduling_task(partition):
    """What a task sees of its GPUs: no TensorFlow, only Spark's addresses and the selection."""
    from pyspark import TaskContext

    list(partition)
    addresses = gpu.task_gpu_addresses()
    start = time.time()
    time.sleep(0.4)  # long enough for the scheduler to run tasks side by side
    yield {"partition": TaskContext.get().partitionId(), "addresses": list(addresses), "start": start,
           "end": time.time(), "executor": executor_id(), "pid": os.getpid(),
           "env": gpu.visible_devices_env(addresses, {})}


def scheduling_app(out: str) -> None:
    from pyspark import SparkContext

    sc = SparkContext.getOrCreate()
    records = sc.parallelize(range(24), 24).mapPartitions(scheduling_task).collect()
    conf = {key: sc.getConf().get(key)
            for key in ("spark.executor.resource.gpu.amount", "spark.task.resource.gpu.amount")}
    Path(out).write_text(json.dumps({"records": records, "conf": conf}))
    sc.stop()


def spark_home(tmp_path: Path) -> dict:
    from test_executor_loss import make_spark_home  # executors' work folders in tmp_path, not in the venv

    from conftest import FAKE_ENV

    return dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_HOME=str(make_spark_home(tmp_path / "spark_home")),
                **FAKE_ENV)


@pytest.mark.slow
def test_spark_gives_each_running_task_its_own_gpu_and_the_selection_pins_it(tmp_path):
    from extractor.driver.package import build_zip

    from conftest import spark_submit

    # Two executors of 3 cores and 2 GPUs each: the GPUs, not the cores, bound the tasks at 2 per executor.
    script = write_discovery(tmp_path, ["0", "1"])
    out = tmp_path / "records.json"
    command = [spark_submit(), "--master", "local-cluster[2,3,1024]", "--py-files", str(build_zip(tmp_path / "dist")),
               "--conf", "spark.ui.enabled=false", *gpu_conf(script, worker=2, executor=2, task=1), str(HERE), str(out)]
    result = subprocess.run(command, cwd=REPO, env=spark_home(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(out.read_text())
    records = report["records"]
    assert report["conf"] == {"spark.executor.resource.gpu.amount": "2", "spark.task.resource.gpu.amount": "1"}
    assert sorted(r["partition"] for r in records) == list(range(24))
    for r in records:  # each task: one address of its executor's, pinned by the selection
        assert len(r["addresses"]) == 1 and r["addresses"][0] in ("0", "1"), r
        assert r["env"] == {"CUDA_VISIBLE_DEVICES": r["addresses"][0], "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, r
    executors = {r["executor"] for r in records}
    assert len(executors) == 2, executors
    overlapping = 0
    for a in records:
        for b in records:
            if a is not b and a["executor"] == b["executor"] and a["start"] < b["end"] and b["start"] < a["end"]:
                overlapping += 1
                assert a["addresses"] != b["addresses"], (a, b)  # never one address for two running tasks
    # Ran side by side (else the check above proved nothing), but never 3 at once on an executor.
    assert overlapping > 0
    for executor in executors:
        mine = [r for r in records if r["executor"] == executor]
        most = max(sum(1 for r in mine if r["start"] <= t["start"] < r["end"]) for t in mine)
        assert most <= 2, mine
    # Why a reused worker pinned to one GPU must refuse a task holding the other (select_process_gpus).
    by_pid = {}
    for r in records:
        by_pid.setdefault((r["executor"], r["pid"]), set()).update(r["addresses"])
    print(f"\nPython workers and the GPU addresses their tasks held: {by_pid}")


# --- the real driver: GPUs requested, TensorFlow sees none ------------------------------------------

@pytest.mark.slow
def test_gpus_requested_where_tensorflow_sees_none_end_the_run_in_seconds_with_one_line(
        s3_server, server_bucket, tmp_path):
    import tensorflow as tf

    from extractor.dev.synthetic import fruit_dataset

    from conftest import run_env, spark_submit

    client, bucket = server_bucket
    for key, body in fruit_dataset(2, ["Lemon", "Lime"]).items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=body)
    script = write_discovery(tmp_path, ["0"])
    command = [spark_submit(), "--master", "local-cluster[2,1,1024]", "--conf", "spark.ui.enabled=false",
               *gpu_conf(script, worker=1, executor=1, task=1), str(REPO / "driver.py"),
               "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/", "--model", "tiny",
               "--weights", "random", "--log-dir", str(tmp_path / "logs")]
    env = dict(run_env(s3_server), SPARK_HOME=spark_home(tmp_path)["SPARK_HOME"])
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    print(f"\nspark-submit exited {result.returncode} after {seconds:.1f} s")
    message = (f"GPU requested but TensorFlow sees none: Spark gave this task GPU 0, and TensorFlow {tf.__version__} "
               f"here is a CPU-only build (tensorflow-cpu); install the CUDA build, "
               f"tensorflow[and-cuda]=={tf.__version__}, on the GPU nodes in its place")
    # spark-submit runs the Python driver with its stderr merged into its stdout (PythonRunner).
    assert result.returncode == 1, result.stdout[-5000:]
    assert re.fullmatch(rf".* ERROR extractor: run \S+ failed: {re.escape(message)}",
                        result.stdout.strip().splitlines()[-1]), result.stdout[-5000:]
    output = result.stdout + result.stderr
    assert [line for line in output.splitlines() if " ERROR " in line] == [result.stdout.strip().splitlines()[-1]]
    assert "Traceback" not in output
    # The run logged what it was asked for, and never reached the featurize tasks.
    log = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "GPUs requested: 1 per executor, 1 per task" in log and "batch 256" in log
    assert "Spark job failed" not in log and not [o for o in client.list_objects_v2(
        Bucket=bucket, Prefix="out/").get("Contents", []) if not o["Key"].startswith("out/logs/")
        and o["Key"] != "out/_lock.json"]  # the run lock, released


if __name__ == "__main__":
    scheduling_app(sys.argv[1])
