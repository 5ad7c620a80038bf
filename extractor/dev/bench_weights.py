"""Benchmark: the driver's weight loading, per weights format, each in a fresh process.

    python -m extractor.dev.bench --weights-load [--repeats 3]

Writes VGG16 weights (seeded random values) as a legacy .h5 and as a Keras 3 .weights.h5 of
the full model, then times ``weights.load_weights`` on each, and on the .weights.h5 through
Keras' full model (the path used before: build VGG16 with weights=file, then get_weights), in
a new Python process each time: seconds, and whether TensorFlow was imported. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from extractor.dev.local_s3 import REPO

TIMED = ("import json, sys, time; from extractor.executor.models import get_spec; from extractor import weights; "
         "spec = get_spec('vgg16'); start = time.perf_counter(); "
         "arrays = weights._through_keras(spec, sys.argv[1]) if sys.argv[2] == 'keras' "
         "else weights.load_weights(spec, sys.argv[1]).arrays; "
         "print(json.dumps({'seconds': time.perf_counter() - start, 'arrays': len(arrays), "
         "'tensorflow': 'tensorflow' in sys.modules}))")


def save_vgg16_files(folder: Path, arrays) -> tuple[Path, Path]:
    """VGG16's feature-model ``arrays`` as (a legacy .h5, a Keras 3 .weights.h5 of the full model
    saved by Keras itself, its head left random) under ``folder``."""
    import keras

    from extractor.driver.weights import write_legacy_h5
    from extractor.executor.models import get_spec

    layout = get_spec("vgg16").layout()
    legacy, keras3 = folder / "vgg16.h5", folder / "vgg16.weights.h5"
    write_legacy_h5(legacy, layout, arrays)
    full = keras.applications.VGG16(weights=None, include_top=True)
    values = iter(arrays)
    for layer, _ in layout:
        full.get_layer(layer).set_weights([next(values), next(values)])
    full.save_weights(keras3)
    keras.backend.clear_session()
    return legacy, keras3


def write_files(folder: Path) -> dict[str, Path]:
    from extractor.driver.weights import random_arrays
    from extractor.executor.models import get_spec

    legacy, keras3 = save_vgg16_files(folder, random_arrays(get_spec("vgg16").layout(), None, seed=1))
    return {"legacy .h5 (h5py)": legacy, "Keras 3 .weights.h5 (h5py)": keras3,
            "Keras 3 .weights.h5 through Keras' full model (before)": keras3}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m extractor.dev.bench --weights-load",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before write_files imports TensorFlow
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in write_files(Path(tmp)).items():
            how = "keras" if "before" in name else "ours"
            runs = [json.loads(subprocess.run([sys.executable, "-c", TIMED, str(path), how], cwd=REPO, check=True,
                                              capture_output=True, text=True,
                                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")).stdout.splitlines()[-1])
                    for _ in range(args.repeats)]
            report[name] = {"seconds": round(statistics.median(r["seconds"] for r in runs), 2),
                            "runs": [round(r["seconds"], 2) for r in runs], "tensorflow": runs[0]["tensorflow"]}
            print(f"{name}: {report[name]['seconds']:.2f} s (runs {report[name]['runs']}), "
                  f"TensorFlow imported: {report[name]['tensorflow']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0
