"""One end-to-end run of each contender the benchmark compares, timed from outside: this job
(driver.py), the prototype it replaced, and the peer (what a Spark user would write instead)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from extractor.dev.local_s3 import REPO, spark_submit

BUCKET = "fruits-bench"


def timed_submit(command: list[str], env: dict, log_path: Path) -> tuple[float, float]:
    """(submit epoch, wall seconds) of one spark-submit; raises if it fails."""
    submitted = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - submitted
    if code != 0:
        raise SystemExit(f"bench: {command[3] if len(command) > 3 else command} failed (exit {code}); see {log_path}")
    return submitted, wall


def run_job(env, master: str, task_cpus: int, precision: str, batch_size: int, output: str, log_dir: Path,
            s3, extra: tuple[str, ...] = (), source: str = "in/", model: str = "vgg16") -> dict:
    command = [spark_submit(), "--master", master, "--conf", f"spark.task.cpus={task_cpus}",
               str(REPO / "driver.py"), "--input", f"s3://{BUCKET}/{source}", "--output", f"s3://{BUCKET}/{output}/",
               "--model", model, "--weights", "random", "--precision", precision, "--batch-size", str(batch_size),
               "--log-dir", str(log_dir), *extra]
    cpu = time.process_time()
    submitted, wall = timed_submit(command, env, log_dir / f"{output}.log")
    # The local S3 server's threads are this process's only work while spark-submit runs: its
    # CPU, taken from the same cores as the job's (on AWS, S3 costs the job's cores nothing).
    server_cpu = time.process_time() - cpu
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{output}/manifest.json")["Body"].read())
    executors = manifest["executors"]
    n = manifest["counts"]["listed"]
    seconds = executors["task_seconds"]
    return {"images": n, "wall_s": wall, "images_per_s": n / wall,
            # forwarded images over first forward -> last task end: the stage once running
            "running_images_per_s": manifest["counts"]["forwarded"] / (executors["last_task_finished_at"]
                                                                      - executors["first_forward_at"]),
            "wait_share": seconds.get("wait_s", 0.0) / seconds["forward_s"],
            "startup_s": executors["first_forward_at"] - submitted,
            # the last task's end -> spark-submit's exit: collect, PCA, files, manifest, shutdown
            "tail_s": submitted + wall - executors["last_task_finished_at"],
            "warm_up_s": (manifest.get("warm_up") or {}).get("seconds"),
            "local_s3_cpu_s": server_cpu,
            "stages_s": manifest["timings_s"], "task_seconds": seconds,
            "featurize_images_per_s": manifest["images_per_second"], "progress": manifest.get("progress"),
            "collect_s": executors.get("collect_s"), "driver_peak_rss_mb": manifest["driver_peak_rss_mb"],
            "worker_peak_rss_mb": executors["python_worker_peak_rss_mb"]}


def run_prototype(env, master: str, output: str, log_dir: Path, n: int, model: str = "vgg16") -> dict:
    command = [spark_submit(), "--master", master, str(REPO / "extractor" / "dev" / "prototype.py"),
               "--input", f"s3://{BUCKET}/in/", "--output", f"s3://{BUCKET}/{output}/", "--model", model]
    _, wall = timed_submit(command, dict(env, PYTHONPATH=str(REPO)), log_dir / f"{output}.log")
    return {"images": n, "wall_s": wall, "images_per_s": n / wall}


def run_peer(master: str, image_dir: Path, output: str, log_dir: Path, n: int, model: str = "vgg16") -> dict:
    command = [spark_submit(), "--master", master, str(REPO / "extractor" / "dev" / "peer.py"),
               "--input", str(image_dir), "--output", str(log_dir / output), "--model", model]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYSPARK_PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2")
    _, wall = timed_submit(command, env, log_dir / f"{output}.log")
    return {"images": n, "wall_s": wall, "images_per_s": n / wall}


def write_folder(images: dict[str, bytes], folder: Path) -> Path:
    """``{"<fruit>/<file>": bytes}`` as files under ``folder`` (the peer reads local files)."""
    for key, body in images.items():
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return folder
