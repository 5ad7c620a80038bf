"""The CNNs we extract features with: one small spec per model, and weight loading.

TensorFlow/Keras are imported inside the functions: importing this module is cheap, and
nothing is built until a process asks for it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .images import preprocess_caffe, preprocess_tf

RANDOM_WEIGHTS_WARNING = ("RANDOM WEIGHTS: the features carry no meaning "
                          "(use --weights imagenet or a weights file for real features)")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that must stay together for a model: its input, preprocessing and output layer."""

    name: str
    input_size: tuple[int, int]          # (height, width)
    preprocess: Callable[[np.ndarray], np.ndarray]
    output_layer: str
    output_dim: int
    build: Callable[[object], object]    # weights (None | "imagenet" | path) -> full keras.Model
    build_features: Callable[[], object]  # the feature sub-model, zero-initialised: weights come next
    description: str
    # The feature model's weights without building it: [(layer, [(variable, shape), ...]), ...]
    # in get_weights() order, every initial value zero. Lets the driver load VGG16's weights
    # without importing TensorFlow; None: ask Keras (keras_layout).
    layout: Callable[[], list] | None = None


def _build_vgg16(weights):
    import keras

    return keras.applications.VGG16(weights=weights, include_top=True)


# VGG16's convolution blocks: (block, filters, convolutions), as in keras.applications.vgg16.
_VGG16_BLOCKS = ((1, 64, 2), (2, 128, 2), (3, 256, 3), (4, 512, 3), (5, 512, 3))


def _vgg16_features():
    """VGG16 up to fc2 with Keras' layer names and weight order, zero-initialised.

    Keras' own VGG16 draws 138 M random values that set_weights then overwrites: seconds of
    work in every Python worker. Zeros cost nothing; the parity test checks the equivalence.
    """
    import keras
    from keras import layers

    inputs = keras.Input((224, 224, 3), name="input_layer")
    x = inputs
    for block, filters, convolutions in _VGG16_BLOCKS:
        for index in range(1, convolutions + 1):
            x = layers.Conv2D(filters, 3, activation="relu", padding="same", kernel_initializer="zeros",
                              name=f"block{block}_conv{index}")(x)
        x = layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(4096, activation="relu", kernel_initializer="zeros", name="fc1")(x)
    outputs = layers.Dense(4096, activation="relu", kernel_initializer="zeros", name="fc2")(x)
    return keras.Model(inputs, outputs, name="vgg16_features")


def _vgg16_layout() -> list:
    layout, channels = [], 3
    for block, filters, convolutions in _VGG16_BLOCKS:
        for index in range(1, convolutions + 1):
            layout.append((f"block{block}_conv{index}", [("kernel", (3, 3, channels, filters)), ("bias", (filters,))]))
            channels = filters
    for name, inputs in (("fc1", 7 * 7 * 512), ("fc2", 4096)):
        layout.append((name, [("kernel", (inputs, 4096)), ("bias", (4096,))]))
    return layout


def keras_layout(model) -> list:
    """``[(layer, [(variable, shape), ...]), ...]`` of a Keras model's layers with weights."""
    return [(layer.name, [(v.name, tuple(v.shape)) for v in layer.weights]) for layer in model.layers if layer.weights]


def _build_tiny(weights):
    """A three-layer CNN with VGG16's input and preprocessing, for fast smoke tests only."""
    import keras
    from keras import layers

    if weights == "imagenet":
        raise ValueError("the 'tiny' model has no imagenet weights; use --weights random or a file")
    inputs = keras.Input((224, 224, 3), name="input_layer")
    x = layers.Conv2D(8, 7, strides=4, activation="relu", name="block1_conv")(inputs)
    x = layers.MaxPooling2D(4, name="block1_pool")(x)
    x = layers.Conv2D(16, 3, strides=2, activation="relu", name="block2_conv")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return _with_head("tiny", inputs, layers.Dense(64, activation="relu", name="fc2")(x), weights)


def _with_head(name: str, inputs, features, weights):
    """A test model: ``features`` (the fc2 layer's output) under a 10-class head, as a full
    model's weights file would hold it; ``weights`` (a path) loaded when given."""
    import keras
    from keras import layers

    outputs = layers.Dense(10, activation="softmax", name="predictions")(features)
    model = keras.Model(inputs, outputs, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model


def _build_mobilenetv2(weights):
    """Keras' MobileNetV2 base (alpha 1.0, no top, 224x224) + GlobalAveragePooling2D "avg_pool":
    ``(n, 224, 224, 3)`` -> ``(n, 1280)``. ``weights`` goes to Keras, which loads it into the base:
    'imagenet' is its "no_top" file, a path a file of the base (the avg_pool adds no weights)."""
    import keras
    from keras import layers

    base = keras.applications.MobileNetV2(input_shape=(224, 224, 3), alpha=1.0, include_top=False,
                                          weights=weights)
    # Not Keras' pooling="avg": that layer gets an automatic name (global_average_pooling2d_<n>),
    # and the output layer must have one name in every process.
    outputs = layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    return keras.Model(base.input, outputs, name="mobilenetv2")


def _build_probe(weights):
    """VGG16's output width at a thousandth of its cost: an 8x8 thumbnail through one 4096-unit
    ReLU layer named fc2. For scale tests of everything after the CNN; features mean nothing."""
    import keras
    from keras import layers

    if weights == "imagenet":
        raise ValueError("the 'probe4096' model has no imagenet weights; use --weights random or a file")
    inputs = keras.Input((8, 8, 3), name="input_layer")
    x = layers.Flatten(name="flatten")(inputs)
    return _with_head("probe4096", inputs, layers.Dense(4096, activation="relu", name="fc2")(x), weights)


MODELS: dict[str, ModelSpec] = {
    "vgg16": ModelSpec("vgg16", (224, 224), preprocess_caffe, "fc2", 4096, _build_vgg16, _vgg16_features,
                       "VGG16, ImageNet architecture, output of fc2 (4096-d)", _vgg16_layout),
    "tiny": ModelSpec("tiny", (224, 224), preprocess_caffe, "fc2", 64, _build_tiny,
                      lambda: feature_model(MODELS["tiny"], None),
                      "3-layer CNN for smoke tests only (64-d); features carry no meaning"),
    # Keras' own random initialisation of 2.3 M values is cheap: no zero-initialised copy needed.
    "mobilenetv2": ModelSpec("mobilenetv2", (224, 224), preprocess_tf, "avg_pool", 1280, _build_mobilenetv2,
                             lambda: feature_model(MODELS["mobilenetv2"], None),
                             "MobileNetV2 (alpha 1.0), ImageNet architecture, global average pool of its "
                             "last block (avg_pool, 1280-d)"),
    "probe4096": ModelSpec("probe4096", (8, 8), preprocess_caffe, "fc2", 4096, _build_probe,
                           lambda: feature_model(MODELS["probe4096"], None),
                           "scale tests only: 8x8 thumbnail -> one 4096-d ReLU layer; features carry no meaning"),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}") from None


def feature_model(spec: ModelSpec, weights=None):
    """The sub-model from the input to ``spec.output_layer``: ``(n, h, w, 3)`` -> ``(n, output_dim)``."""
    import keras

    full = spec.build(weights)
    return keras.Model(full.input, full.get_layer(spec.output_layer).output, name=f"{spec.name}_features")


def weights_kind(source: str) -> str:
    """'imagenet', 'random', 's3' or 'file'; ValueError for anything else."""
    if source in ("imagenet", "random"):
        return source
    if not source.lower().endswith(".h5"):
        raise ValueError(f"--weights must be 'imagenet', 'random', or a .h5/.weights.h5 file "
                         f"(local path or s3:// URI), got {source!r}")
    return "s3" if source.startswith("s3://") else "file"


@dataclass
class LoadedWeights:
    arrays: list[np.ndarray]   # the feature sub-model's weights, in layer order
    source: str
    kind: str
    sha256: str
    seed: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    @property
    def warning(self) -> str | None:
        return RANDOM_WEIGHTS_WARNING if self.kind == "random" else None


def fingerprint(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def load_weights(spec: ModelSpec, source: str, *, seed: int = 0, s3_client=None) -> LoadedWeights:
    """Load the weights once on the driver, as plain numpy arrays ready to broadcast.

    ``source``: 'imagenet' (Keras' download, cached in ~/.keras), 'random' (seeded), a local
    .h5/.weights.h5 file, or an s3:// URI of one (downloaded to a temporary file first).
    Legacy .h5 files (the layout of Keras' own downloads, e.g. MobileNetV2's "no_top" file) are
    read by layer name; only 'imagenet' and .weights.h5 build Keras' full model, and for a spec
    with a ``layout`` (VGG16) 'random' and legacy .h5 do not even import TensorFlow.
    """
    kind = weights_kind(source)
    if kind == "imagenet":
        arrays = _through_keras(spec, "imagenet")
    elif kind == "random":
        arrays = random_arrays(*_layout(spec), seed)
    elif kind == "file":
        if not os.path.isfile(source):
            raise FileNotFoundError(f"weights file not found: {source}")
        arrays = _load_file(spec, source)
    else:
        from .s3 import parse_s3_uri

        location = parse_s3_uri(source, folder=False)
        suffix = ".weights.h5" if source.endswith(".weights.h5") else ".h5"
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "weights" + suffix)
            s3_client.download_file(location.bucket, location.prefix, local)
            arrays = _load_file(spec, local)
    arrays = [np.asarray(w, dtype=np.float32) for w in arrays]
    return LoadedWeights(arrays, source, kind, fingerprint(arrays), seed if kind == "random" else None)


def _through_keras(spec: ModelSpec, weights) -> list[np.ndarray]:
    import keras

    arrays = feature_model(spec, weights).get_weights()
    keras.backend.clear_session()
    return arrays


def _layout(spec: ModelSpec) -> tuple[list, list[np.ndarray] | None]:
    """(layout, initial values or None for all zeros) of the spec's feature model."""
    if spec.layout is not None:
        return spec.layout(), None
    import keras

    model = spec.build_features()
    layout, initial = keras_layout(model), model.get_weights()
    keras.backend.clear_session()
    return layout, initial


def random_arrays(layout: list, initial: list[np.ndarray] | None, seed: int) -> list[np.ndarray]:
    """Seeded Glorot-uniform kernels (Keras' default; depthwise kernels too, with Keras' fans:
    receptive field x input / output channels) and the initial values for everything else
    (zero biases; batch-norm gamma 1, beta 0, moving mean 0, moving variance 1), in the
    layout's order.

    Drawn with numpy: Keras' initialisers take seconds for VGG16's 134 M values.
    """
    rng = np.random.default_rng(seed)
    variables = [(name, shape) for _, layer_variables in layout for name, shape in layer_variables]
    initial = initial if initial is not None else [np.zeros(shape, np.float32) for _, shape in variables]
    arrays = []
    for (name, shape), value in zip(variables, initial, strict=True):
        if name.endswith("kernel") and len(shape) >= 2:
            receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
            fan_in, fan_out = receptive * shape[-2], receptive * shape[-1]
            limit = np.float32(np.sqrt(6.0 / (fan_in + fan_out)))
            value = (rng.random(shape, dtype=np.float32) * 2 - 1) * limit
        arrays.append(value)
    return arrays


def _load_file(spec: ModelSpec, path: str) -> list[np.ndarray]:
    """Arrays from a weights file: by layer name for legacy .h5, through Keras' full model otherwise."""
    if path.endswith(".weights.h5"):
        return _through_keras(spec, path)
    return read_legacy_h5(path, _layout(spec)[0])


def read_legacy_h5(path: str, layout: list) -> list[np.ndarray]:
    """The arrays of ``layout``'s layers, by name, from a legacy Keras HDF5 weights file (a full
    model's file holds more layers: those are ignored). ValueError when a layer is missing or
    a shape differs, so a wrong file can never leave zeros in the model."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"not a readable HDF5 weights file ({exc})") from None
    with handle:
        group = handle["model_weights"] if "layer_names" not in handle.attrs and "model_weights" in handle else handle
        arrays = []
        for layer, variables in layout:
            if layer not in group:
                raise ValueError(f"weights file has no layer {layer!r} (it has "
                                 f"{sorted(group.keys())[:8]}...): not weights for this model")
            names = [n.decode() if isinstance(n, bytes) else n for n in group[layer].attrs["weight_names"]]
            if len(names) != len(variables):
                raise ValueError(f"layer {layer!r}: file has {len(names)} arrays, model expects {len(variables)}")
            for name, (_, shape) in zip(names, variables):
                value = np.asarray(group[layer][name], dtype=np.float32)
                if tuple(value.shape) != tuple(shape):
                    raise ValueError(f"layer {layer!r}: file has shape {value.shape}, model expects {tuple(shape)}")
                arrays.append(value)
    return arrays
