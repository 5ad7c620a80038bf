"""The CNNs we extract features with: one small spec per model (weights.py loads their weights).

TensorFlow/Keras are imported inside the functions: importing this module is cheap, and
nothing is built until a process asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from extractor.executor.images import preprocess_caffe, preprocess_tf


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
    # in get_weights() order, every initial value zero. Lets the driver load the weights
    # without importing TensorFlow (seconds of a driver's start, and its memory); None: ask
    # Keras (keras_layout).
    layout: Callable[[], list] | None = None
    # Keras' "imagenet" file of the feature model's layers, read without Keras when the spec
    # has a layout (weights.load_weights); None: Keras builds the model with weights="imagenet".
    imagenet: "ImagenetFile | None" = None


@dataclass(frozen=True)
class ImagenetFile:
    """One of Keras' pretrained-weights downloads, as keras.applications fetches it."""

    fname: str      # its name in Keras' cache folder (~/.keras/models/, $KERAS_HOME/models/)
    origin: str     # the URL Keras downloads it from
    md5: str        # Keras' file_hash for it


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


def _tiny_layout() -> list:
    return [("block1_conv", [("kernel", (7, 7, 3, 8)), ("bias", (8,))]),
            ("block2_conv", [("kernel", (3, 3, 8, 16)), ("bias", (16,))]),
            ("fc2", [("kernel", (16, 64)), ("bias", (64,))])]


def _probe_layout() -> list:
    return [("fc2", [("kernel", (8 * 8 * 3, 4096)), ("bias", (4096,))])]


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
                       "VGG16, ImageNet architecture, output of fc2 (4096-d)", _vgg16_layout,
                       # keras.applications.vgg16's WEIGHTS_PATH and file_hash (include_top=True)
                       ImagenetFile("vgg16_weights_tf_dim_ordering_tf_kernels.h5",
                                    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
                                    "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
                                    "64373286793e3c8b2b4e3219cbf3544b")),
    "tiny": ModelSpec("tiny", (224, 224), preprocess_caffe, "fc2", 64, _build_tiny,
                      lambda: feature_model(MODELS["tiny"], None),
                      "3-layer CNN for smoke tests only (64-d); features carry no meaning", _tiny_layout),
    # Keras' own random initialisation of 2.3 M values is cheap: no zero-initialised copy needed.
    "mobilenetv2": ModelSpec("mobilenetv2", (224, 224), preprocess_tf, "avg_pool", 1280, _build_mobilenetv2,
                             lambda: feature_model(MODELS["mobilenetv2"], None),
                             "MobileNetV2 (alpha 1.0), ImageNet architecture, global average pool of its "
                             "last block (avg_pool, 1280-d)"),
    "probe4096": ModelSpec("probe4096", (8, 8), preprocess_caffe, "fc2", 4096, _build_probe,
                           lambda: feature_model(MODELS["probe4096"], None),
                           "scale tests only: 8x8 thumbnail -> one 4096-d ReLU layer; features carry no meaning",
                           _probe_layout),
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
