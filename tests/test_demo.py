"""The README's first command, minus the install: the demo runs the real job end to end."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_runs_the_job_and_downloads_the_outputs(tmp_path):
    out = tmp_path / "demo-output"
    result = subprocess.run(
        [sys.executable, "-m", "extractor.dev.demo", "--model", "tiny", "--per-fruit", "3", "--weights", "auto",
         "--out-dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["listed"] == manifest["counts"]["featurized"] == 15
    assert sorted(p.name for p in (out / "features").iterdir()) == [
        "Apple Red.csv", "Blueberry.csv", "Lemon.csv", "Lime.csv", "Orange.csv"]
    assert (out / "_SUCCESS").exists() and (out / "explained_variance.png").exists()
    assert "=== summary ===" in result.stdout and "images/s" in result.stdout
    assert "Lemon" in result.stdout.split("=== summary ===")[1]
    # No ImageNet file is cached on a fresh machine: the demo must say the features mean nothing.
    if manifest["weights"]["kind"] == "random":
        assert "NOTICE" in result.stdout and "carry no meaning" in result.stdout
