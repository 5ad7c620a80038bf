"""The run's manifest (manifest.json), built from what the stages returned.

Readers use it to verify a result (every file with its size and SHA-256, added by
``OutputWriter.finish``) and to know how it was made; its keys are the README's.
"""

from __future__ import annotations

import platform
import resource
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata

from extractor import __version__
from extractor.results.scatter import axis_ratios

_LIBRARIES = ("pyspark", "tensorflow", "tensorflow-cpu", "keras", "numpy", "pillow", "boto3", "matplotlib")


def executor_summary(stats: list[dict], collected_at: float | None = None) -> dict:
    """Partition stats -> seconds per activity and counts summed over tasks, S3 retries, first
    forward and last task end (epoch s), collect time, the largest Python worker's peak memory."""
    seconds, counts, retries = Counter(), Counter(), Counter()
    for item in stats:
        seconds.update(item["seconds"])
        counts.update(item.get("counts", {}))
        retries.update(item["retries"])
    firsts = [s["first_forward_at"] for s in stats if s["first_forward_at"]]
    last = max((s["finished_at"] for s in stats), default=None)
    summary = {"task_seconds": {k: round(v, 3) for k, v in sorted(seconds.items())},
               "task_counts": dict(sorted(counts.items())), "retries": dict(retries),
               "first_forward_at": min(firsts) if firsts else None, "last_task_finished_at": last,
               "python_worker_peak_rss_mb": round(max((s["peak_rss_mb"] for s in stats), default=0.0), 1)}
    if collected_at is not None and last is not None:
        # From the last task's end to the vectors being on the driver: the collect itself.
        summary["collect_s"] = round(collected_at - last, 3)
    return summary


def per_fruit_counts(summary, names: dict[str, str], extension: str) -> dict:
    """label -> its file (None for a fruit of failures only), images featurized and failed."""
    counts = {label: {"file": f"{name}{extension}", "featurized": summary.featurized.get(label, 0), "failed": 0}
              for label, name in sorted(names.items())}
    for label, failed in sorted(summary.failed.items()):
        counts.setdefault(label, {"file": None, "featurized": 0, "failed": 0})["failed"] = failed
    return counts


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "extractor": __version__}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def spark_facts(sc, featurizing, warm_up, executors: dict, gpu: dict | None = None) -> dict:
    """How the featurize stage ran: partitions, weight loads, warm-up, Spark, executor figures;
    ``gpu``: the Feeding's facts (GPUs requested, batch and threads), joined here by the GPU
    addresses and devices the warm-up's workers saw."""
    warm = warm_up.as_dict() if warm_up is not None else None
    seen = {"addresses_seen": warm["gpu_addresses"] if warm else None, "devices": warm["gpu_devices"] if warm else None}
    return {"partitions": featurizing.partitions, "weight_loads": featurizing.weight_loads.value,
            "warm_up": warm,
            "spark": {"master": sc.master, "app_id": sc.applicationId,
                      "default_parallelism": sc.defaultParallelism, "task_cpus": featurizing.task_cpus,
                      "gpu": {**(gpu or {}), **seen}},
            "executors": executors}


def model_facts(spec, weights, decode: str = "draft") -> tuple[dict, dict]:
    """(the manifest's "model", its "weights")."""
    model = {"name": spec.name, "output_layer": spec.output_layer, "output_dim": spec.output_dim,
             "input_size": list(spec.input_size), "decode": decode, "preprocessing": spec.preprocess.__name__}
    return model, {"source": weights.source, "kind": weights.kind, "sha256": weights.sha256,
                   "seed": weights.seed, "warning": weights.warning}


def pca_facts(pca_model, cfg, per_fruit: int) -> dict | None:
    """The PCA's figures, and the scatter's: at most ``per_fruit`` points per fruit."""
    if pca_model is None:
        return None
    return {"k": pca_model.k, "explained_variance": round(pca_model.cumulative_ratio, 6),
            "requested_k": cfg.pca_k, "target_variance": cfg.pca_variance,
            "components_available": len(pca_model.explained_variance_ratio),
            "pc_variance_ratio": axis_ratios(pca_model.explained_variance_ratio), "scatter_per_fruit": per_fruit}


def listing_facts(listing, task_counts: dict) -> dict:
    """The manifest's ``listing``: which listing and why (scan.KeyRanges), and the listed keys
    whose object was deleted (an error row each) or replaced (featurized as it is now) before
    its download: an inventory's keys are up to a day old."""
    return {**listing.as_manifest(), "deleted_since_listed": task_counts.get("deleted_since_listed", 0),
            "changed_since_listed": task_counts.get("changed_since_listed", 0)}


def build(run, done, *, names: dict[str, str], per_fruit: int, pca_model) -> dict:
    """The manifest, but for ``files`` (added by ``OutputWriter.finish``), of the run ``run``
    (job.Run: configuration, model, format, stage timings, driver retries, progress, locks)
    whose stages up to the vectors gave ``done`` (job.Featurized: listing, mode, weights,
    incremental state, vectors, counts, Spark facts); ``names``: label -> file name."""
    cfg, spec, fmt, listing, spark = run.cfg, run.spec, run.fmt, done.listing, done.spark_facts
    timings = run.stages.seconds
    model, weights_facts = model_facts(spec, done.weights, cfg.decode)
    return {
        "run_id": run.run_id,
        "status": "succeeded",
        "started_at": run.started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": cfg.input.uri,
        "output": cfg.output.uri,
        "warning": done.weights.warning,
        "counts": {**done.counts, "skipped_non_image_keys": listing.skipped,
                   "per_fruit": per_fruit_counts(done.vectors.summary, names, fmt.extension)},
        "collect": done.mode.as_manifest(),
        "format": fmt.name,
        "incremental": done.incremental.as_manifest() if done.incremental is not None else None,
        "lock": run.locks.as_manifest(),
        "model": model,
        "weights": weights_facts,
        "pca": pca_facts(pca_model, cfg, per_fruit),
        "batch_size": cfg.batch_size,
        "decode_threads": cfg.decode_threads,
        "precision": cfg.precision,
        **spark,
        "timings_s": timings,
        "progress": watch_facts(cfg, run.progress, run.shipper),
        "images_per_second": round(listing.count / timings["featurize"], 3),
        "listing": listing_facts(listing, spark["executors"]["task_counts"]),
        "s3_retries": {"driver": dict(run.retry_log.by_operation), "listing": listing.retries,
                       "executors": spark["executors"]["retries"]},
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "versions": library_versions(),
    }


def watch_facts(cfg, progress, shipper) -> dict:
    """The manifest's ``progress``: how the run was reported while it ran (``shipper``: the
    LogShipper, or None)."""
    return {"interval_s": cfg.progress_interval, "lines": progress.lines, "log_ship_interval_s": cfg.log_ship_interval,
            "log": shipper.as_manifest() if shipper is not None else None}