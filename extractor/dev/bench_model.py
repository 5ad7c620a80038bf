"""The models the benchmark runs: VGG16, its subject, or ``tiny``, the suite's test model (the
same 224x224 input, Caffe preprocessing and fc2 layer), with which every row of the benchmark
runs in seconds: figures that check the benchmark itself and mean nothing else."""

from __future__ import annotations

BENCH_MODELS = ("vgg16", "tiny")


def fc2_model(name: str):
    """The model the prototype and the peer run, weights unset: Keras' VGG16
    (``keras.applications.VGG16(weights=None)``) or tiny, cut at fc2."""
    from extractor.executor.models import feature_model, get_spec

    if name not in BENCH_MODELS:
        raise ValueError(f"the benchmark runs one of {BENCH_MODELS}, got {name!r}")
    return feature_model(get_spec(name))
