"""The feature model's weights, loaded once on the driver as plain numpy arrays to broadcast.

For a spec with a static ``layout`` (VGG16) every source is read with h5py and numpy alone,
without building a Keras model or importing TensorFlow on the driver:

- legacy ``.h5`` (Keras 2, and Keras' own downloads): one group per layer, by layer name;
- Keras 3 ``.weights.h5``: ``layers/<class>[_<n>]/vars/<i>`` groups, found by the layer name
  the file records on each ``vars`` group, else by the layer's rank among the model's layers
  of its class (how Keras itself matches them);
- ``imagenet``: Keras' legacy download, from Keras' cache folder, fetched and checked against
  Keras' md5 when absent, exactly where Keras would put it;
- ``random``: seeded numpy draws.

A spec without a layout (MobileNetV2, the test models) reads legacy ``.h5`` by name too, and
asks Keras for ``imagenet`` and ``.weights.h5``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.request
from dataclasses import dataclass

import numpy as np

from extractor.executor.models import (
    ImagenetFile,
    ModelSpec,
    feature_model,
    keras_layout,
)

RANDOM_WEIGHTS_WARNING = ("RANDOM WEIGHTS: the features carry no meaning "
                          "(use --weights imagenet or a weights file for real features)")


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
    arrays: list[np.ndarray]   # the feature sub-model's weights, in layer order, float32
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
        digest.update(np.ascontiguousarray(array).data)  # no copy of 537 MB
    return digest.hexdigest()


def load_weights(spec: ModelSpec, source: str, *, seed: int = 0, s3_client=None) -> LoadedWeights:
    """Load the weights once, as numpy arrays ready to broadcast.

    ``source``: 'imagenet' (Keras' file, cached in ~/.keras/models/), 'random' (seeded), a
    local .h5/.weights.h5 file, or an s3:// URI of one (downloaded to a temporary file first).
    """
    kind = weights_kind(source)
    if kind == "imagenet":
        arrays = _imagenet(spec)
    elif kind == "random":
        arrays = random_arrays(*_layout(spec), seed)
    elif kind == "file":
        if not os.path.isfile(source):
            raise FileNotFoundError(f"weights file not found: {source}")
        arrays = read_file(spec, source)
    else:
        from extractor.storage.s3 import parse_s3_uri

        location = parse_s3_uri(source, folder=False)
        suffix = ".weights.h5" if source.endswith(".weights.h5") else ".h5"
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "weights" + suffix)
            s3_client.download_file(location.bucket, location.prefix, local)
            arrays = read_file(spec, local)
    arrays = [np.asarray(w, dtype=np.float32) for w in arrays]
    return LoadedWeights(arrays, source, kind, fingerprint(arrays), seed if kind == "random" else None)


def read_file(spec: ModelSpec, path: str) -> list[np.ndarray]:
    """Arrays from a weights file: legacy .h5 by layer name; .weights.h5 by h5py when the spec
    has a layout, else through Keras."""
    if not path.endswith(".weights.h5"):
        return read_legacy_h5(path, _layout(spec)[0])
    if spec.layout is not None:
        return read_keras3_h5(path, spec.layout())
    return _through_keras(spec, path)


def _imagenet(spec: ModelSpec) -> list[np.ndarray]:
    if spec.imagenet is None or spec.layout is None:
        return _through_keras(spec, "imagenet")
    return read_legacy_h5(imagenet_path(spec.imagenet), spec.layout())


def keras_cache_dir() -> str:
    """Where keras.utils.get_file keeps models: $KERAS_HOME or ~/.keras, /tmp/.keras when that
    cannot be written; then models/."""
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    writable = os.access(base if os.path.exists(base) else os.path.dirname(base), os.W_OK)
    if not writable:
        base = os.path.join("/tmp", ".keras")
    return os.path.join(base, "models")


def imagenet_path(file: ImagenetFile, *, timeout_s: float = 60.0) -> str:
    """The cached file, checked against Keras' md5; downloaded first (to the same place, under
    the same name, as Keras would) when it is absent or does not match."""
    folder = keras_cache_dir()
    path = os.path.join(folder, file.fname)
    if os.path.isfile(path) and file_md5(path) == file.md5:
        return path
    os.makedirs(folder, exist_ok=True)
    partial = f"{path}.part-{os.getpid()}"
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(file.origin, timeout=timeout_s) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        _remove(partial)
        raise OSError(f"{path} is not cached and cannot be downloaded from {file.origin}: {exc}") from None
    if digest.hexdigest() != file.md5:
        _remove(partial)
        raise ValueError(f"downloaded {file.origin} has md5 {digest.hexdigest()}, Keras expects {file.md5}")
    os.replace(partial, path)  # a reader never sees half a file
    return path


def file_md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


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
            value = rng.random(shape, dtype=np.float32)
            value *= 2  # in place, in the order of (x * 2 - 1) * limit: the same bits, no temporaries
            value -= 1
            value *= limit
        arrays.append(value)
    return arrays


def _open_h5(path: str):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"not a readable HDF5 weights file ({exc})") from None


def read_legacy_h5(path: str, layout: list) -> list[np.ndarray]:
    """The arrays of ``layout``'s layers, by name, from a legacy Keras HDF5 weights file (a full
    model's file holds more layers: those are ignored). ValueError when a layer is missing or
    a shape differs, so a wrong file can never leave zeros in the model."""
    with _open_h5(path) as handle:
        group = handle["model_weights"] if "layer_names" not in handle.attrs and "model_weights" in handle else handle
        arrays = []
        for layer, variables in layout:
            if layer not in group:
                raise ValueError(f"weights file has no layer {layer!r} (it has "
                                 f"{sorted(group.keys())[:8]}...): not weights for this model")
            names = [_text(n) for n in group[layer].attrs["weight_names"]]
            arrays.extend(_checked(layer, variables, [group[layer][name] for name in names]))
    return arrays


def write_legacy_h5(path: str, layout: list, arrays: list[np.ndarray]) -> None:
    """``arrays`` (in ``layout``'s order) as a legacy Keras HDF5 weights file, the layout of
    Keras' own downloads: what read_legacy_h5 (and Keras' load_weights) read back."""
    import h5py

    values = iter(arrays)
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [layer.encode() for layer, _ in layout]
        for layer, variables in layout:
            group = handle.create_group(layer)
            names = [f"{layer}/{name}:0" for name, _ in variables]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for name in names:
                group.create_dataset(name, data=next(values))


# Keras 3 names a functional model's layer groups after their class, in snake case, numbered
# in the model's layer order: conv2d, conv2d_1, ... A static layout knows its layers' classes
# by their variables: a 4-d kernel is a Conv2D, a 2-d one a Dense.
_CLASS_BY_KERNEL_RANK = {4: "conv2d", 2: "dense"}


def read_keras3_h5(path: str, layout: list) -> list[np.ndarray]:
    """The arrays of ``layout``'s layers from a Keras 3 ``.weights.h5`` file (``model.save_weights``
    of the full model or of the feature model: a full model's extra layers are ignored).

    Each layer's group is the one whose ``vars`` group records the layer's name (Keras writes
    it there); a file that records no names is read by class order, as Keras' own
    ``load_weights`` does. ValueError when a layer is missing or a shape differs."""
    with _open_h5(path) as handle:
        if "layers" not in handle:
            raise ValueError(f"not a Keras 3 .weights.h5 file: no 'layers' group (it has {sorted(handle.keys())[:8]})")
        groups = handle["layers"]
        named = {_text(g["vars"].attrs["name"]): g for g in groups.values()
                 if "vars" in g and "name" in g["vars"].attrs}
        arrays, seen = [], {}
        for layer, variables in layout:
            group = named.get(layer)
            if group is None:
                kind = _CLASS_BY_KERNEL_RANK.get(len(variables[0][1])) if variables else None
                if kind is None:
                    raise ValueError(f"layer {layer!r}: cannot locate it in a .weights.h5 without its name")
                rank = seen[kind] = seen.get(kind, -1) + 1
                path_ = kind if rank == 0 else f"{kind}_{rank}"
                if path_ not in groups:
                    raise ValueError(f"weights file has no layer {layer!r} (no group layers/{path_}; it has "
                                     f"{sorted(groups.keys(), key=_natural)[:8]}...): not weights for this model")
                group = groups[path_]
            stored = group["vars"] if "vars" in group else {}
            arrays.extend(_checked(layer, variables, [stored[str(i)] for i in range(len(stored))]))
    return arrays


def _checked(layer: str, variables: list, values: list) -> list[np.ndarray]:
    if len(values) != len(variables):
        raise ValueError(f"layer {layer!r}: file has {len(values)} arrays, model expects {len(variables)}")
    arrays = []
    for value, (_, shape) in zip(values, variables):
        value = np.asarray(value, dtype=np.float32)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"layer {layer!r}: file has shape {value.shape}, model expects {tuple(shape)}")
        arrays.append(value)
    return arrays


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
