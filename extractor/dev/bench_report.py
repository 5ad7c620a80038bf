"""The benchmark's printed figures (``extractor.dev.bench``)."""

from __future__ import annotations

# The camera-size photos' rows: name -> (the runs' output prefix, the job's extra options).
LARGE_ROWS = {"large": ("large", ()), "large, --decode full": ("large-full", ("--decode", "full"))}


def print_sizes(rows: dict, ceiling: float) -> None:
    print(f"\n== image sizes, float32 (ceiling {ceiling:.2f} images/s)")
    for size in ("small", *LARGE_ROWS):
        if size not in rows:
            continue
        row, job = rows[size], rows[size]["job"]
        print(f"  {size} job: end to end {job['images_per_s']:6.2f} images/s (runs "
              f"{', '.join(f'{r:.2f}' for r in sorted(x['images_per_s'] for x in row['job_runs']))}), featurize stage "
              f"{job['featurize_images_per_s']:.2f}, once running {job['running_images_per_s']:.2f}, model waited "
              f"{job['wait_share']:.1%} of its forward time; job / ceiling {row['job_over_ceiling']:.3f}; local S3 "
              f"server CPU {job['local_s3_cpu_s']:.1f} s")
        if "peer" in row:
            print(f"  {size} peer: end to end {row['peer']['images_per_s']:6.2f} images/s (runs "
                  f"{', '.join(f'{r:.2f}' for r in sorted(x['images_per_s'] for x in row['peer_runs']))}); "
                  f"job / peer {row['job_over_peer']:.3f}")
    for size in LARGE_ROWS:
        if size in rows:
            print(f"  {size} / small: featurize stage {rows[f'{size} / small: featurize_images_per_s']:.3f}, once "
                  f"running {rows[f'{size} / small: running_images_per_s']:.3f}", flush=True)


def print_entry(name: str, entry: dict) -> None:
    job = entry["job"]
    print(f"\n== {name}")
    print(f"  ceiling (forward only)   {entry['ceiling_images_per_s']:7.2f} images/s")
    print(f"  job, end to end          {job['images_per_s']:7.2f} images/s  ({job['images']} images in "
          f"{job['wall_s']:.1f} s; runs: {', '.join(f'{r:.2f}' for r in sorted(x['images_per_s'] for x in entry['job_runs']))})")
    print(f"  job / ceiling            {entry['job_over_ceiling']:7.1%}")
    if "job_over_prototype" in entry:
        print(f"  job / prototype          {entry['job_over_prototype']:7.1f}x")
    print(f"  startup (submit -> first forward) {job['startup_s']:.1f} s (of which warm-up {job['warm_up_s']} s); "
          f"after the last task {job['tail_s']:.1f} s; collect {job['collect_s']} s")
    print("  driver stages (s): " + ", ".join(f"{k} {v}" for k, v in job["stages_s"].items()))
    print("  task time summed over tasks (s): " + ", ".join(f"{k} {v}" for k, v in job["task_seconds"].items()))
    print(f"  peak memory: driver {job['driver_peak_rss_mb']} MB, Python worker {job['worker_peak_rss_mb']} MB")
    print(f"  the local S3 server's CPU: {job['local_s3_cpu_s']:.1f} s, on the job's cores")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
