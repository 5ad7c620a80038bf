"""The benchmark runs end to end (a tiny configuration: figures are printed, never asserted).

One invocation exercises every row at the smallest sizes that still run each code path: the
ceiling, the prototype, the job on Fruits-360-size and on camera-size photos (draft and full
decoding), the peer on both, and draft decoding's fidelity, all with the tiny test model (VGG16
is the benchmark's subject, not this test's). The benchmark's real sizes and model are for the
benchmark (README, *Performance*), not for the suite."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_runs_and_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "extractor.dev.bench", "--model", "tiny", "--count", "4", "--repeats", "1",
         "--batch-size", "2", "--prototype-repeats", "1", "--cores", "2", "--peer", "--large", "2", "--csv-rows", "50", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())

    # The ceiling, the prototype and the job on Fruits-360-size images.
    entry = report["float32, 2 task(s) x 1 thread(s)"]
    assert report["images"] == 4 and report["model"] == "tiny" and report["prototype"]["images_per_s"] > 0
    assert entry["ceiling_images_per_s"] > 0 and entry["job"]["images"] == 4
    assert entry["job_over_prototype"] == entry["job"]["images_per_s"] / report["prototype"]["images_per_s"]
    assert set(entry["job"]["stages_s"]) >= {"list", "featurize", "pca", "write"}
    assert set(entry["job"]["task_seconds"]) == {"forward_s", "load_s", "wait_s"}
    assert entry["job"]["startup_s"] > 0 and entry["job"]["worker_peak_rss_mb"] > 0
    assert all(v > 0 for v in report["csv_rows_per_s"].values()) and len(report["csv_rows_per_s"]) == 3

    # The peer and the camera-size photos (draft and full decoding).
    sizes = report["sizes"]
    for size, n in (("small", 4), ("large", 2)):
        row = sizes[size]
        assert row["job"]["images"] == row["peer"]["images"] == n
        assert row["job_over_peer"] == row["job"]["images_per_s"] / row["peer"]["images_per_s"]
        assert row["job"]["running_images_per_s"] > 0 and 0 <= row["job"]["wait_share"]
    assert sizes["large / small: featurize_images_per_s"] > 0
    assert sizes["large, --decode full"]["job"]["images"] == 2
    fidelity = report["draft_fidelity"]
    assert fidelity["images"] == 2 and fidelity["candidate"] == ["float32", "draft"]
    assert 0 < fidelity["cosine_min"] <= fidelity["cosine_median"] <= 1 + 1e-9

    for line in ("ceiling (forward only)", "job / ceiling", "job / prototype", "startup (submit -> first forward)",
                 "peak memory: driver", "CSV formatting", "large peer:", "job / peer", "large / small",
                 "draft decoding fidelity"):
        assert line in result.stdout
