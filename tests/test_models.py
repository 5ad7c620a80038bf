import os

import numpy as np
import pytest

from extractor.executor.images import decode_image, preprocess_tf
from extractor.executor.models import feature_model, get_spec
from extractor.driver.weights import load_weights, weights_kind, write_legacy_h5
from extractor.dev.synthetic import fruit_dataset

from conftest import REGION, save_full_model, save_mobilenetv2_base, unique_bucket
from images import encode, gradient_rgb
from rounding import assert_within_rounding

TINY = get_spec("tiny")
MOBILENETV2 = get_spec("mobilenetv2")


@pytest.mark.parametrize("source,kind", [("imagenet", "imagenet"), ("random", "random"),
                                         ("w.h5", "file"), ("/x/w.weights.h5", "file"),
                                         ("s3://b/m/w.h5", "s3")])
def test_weights_kinds(source, kind):
    assert weights_kind(source) == kind


@pytest.mark.parametrize("source", ["imagenet21k", "model.keras", "weights.bin", ""])
def test_unknown_weights_are_refused_with_what_was_received(source):
    with pytest.raises(ValueError, match=repr(source)):
        weights_kind(source)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="'vgg19'"):
        get_spec("vgg19")


def test_random_weights_are_seeded():
    a, b, c = (load_weights(TINY, "random", seed=s) for s in (1, 1, 2))
    assert a.sha256 == b.sha256 != c.sha256
    assert a.kind == "random" and "carry no meaning" in a.warning


@pytest.mark.parametrize("name,legacy", [("w.weights.h5", False), ("w.h5", True)])
def test_weights_file_is_loaded_into_the_feature_model(tmp_path, name, legacy):
    path = tmp_path / name
    expected = save_full_model(str(path), legacy=legacy)
    loaded = load_weights(TINY, str(path))
    assert loaded.kind == "file" and loaded.warning is None
    assert len(loaded.arrays) == len(expected)
    for got, want in zip(loaded.arrays, expected):
        np.testing.assert_array_equal(got, want)


def test_weights_from_s3(tmp_path, s3_mock):
    path = tmp_path / "w.weights.h5"
    expected = save_full_model(str(path))
    bucket = unique_bucket()
    s3_mock.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3_mock.upload_file(str(path), bucket, "models/w.weights.h5")
    loaded = load_weights(TINY, f"s3://{bucket}/models/w.weights.h5", s3_client=s3_mock)
    assert loaded.kind == "s3"
    np.testing.assert_array_equal(loaded.arrays[0], expected[0])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not-there.h5"):
        load_weights(TINY, str(tmp_path / "not-there.h5"))


def test_tiny_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="no imagenet"):
        load_weights(TINY, "imagenet")


@pytest.mark.parametrize("name", ["vgg16", "tiny", "mobilenetv2"])
def test_workers_zero_initialised_model_has_keras_layout(name):
    """The workers' cheap build must take the weights of Keras' own model, in the same order."""
    spec = get_spec(name)
    reference = feature_model(spec)
    cheap = spec.build_features()
    assert [layer.name for layer in cheap.layers][1:] == [layer.name for layer in reference.layers][1:]
    assert [w.shape for w in cheap.get_weights()] == [w.shape for w in reference.get_weights()]
    cheap.set_weights(reference.get_weights())
    x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32) * 50
    assert_within_rounding(cheap.predict(x, verbose=0), reference.predict(x, verbose=0), name)


def test_feature_model_ends_at_the_named_layer():
    model = feature_model(get_spec("vgg16"))
    assert model.output_shape == (None, 4096)
    assert model.layers[-1].name == "fc2"
    assert model.input_shape == (None, 224, 224, 3)


def test_random_weights_follow_keras_defaults():
    """Glorot-uniform kernels within Keras' limit, zero biases, in the feature model's order."""
    weights = load_weights(TINY, "random", seed=4)
    shapes = [w.shape for w in TINY.build_features().get_weights()]
    assert [a.shape for a in weights.arrays] == shapes
    kernel, bias = weights.arrays[0], weights.arrays[1]          # block1_conv: (7, 7, 3, 8), (8,)
    limit = np.sqrt(6 / (7 * 7 * 3 + 7 * 7 * 8))
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit
    assert abs(kernel.std() - limit / np.sqrt(3)) < 0.1 * limit   # uniform(-l, l) has std l/sqrt(3)
    assert not bias.any()


def test_legacy_file_for_another_model_is_refused(tmp_path):
    path = tmp_path / "tiny.h5"
    save_full_model(str(path), legacy=True)
    with pytest.raises(ValueError, match="no layer 'block1_conv1'"):
        load_weights(get_spec("vgg16"), str(path))


def test_legacy_file_with_a_wrong_shape_is_refused(tmp_path):
    import h5py

    path = tmp_path / "w.h5"
    save_full_model(str(path), legacy=True)
    with h5py.File(path, "r+") as handle:
        del handle["fc2/fc2/kernel"]
        handle["fc2/fc2/kernel"] = np.zeros((16, 32), np.float32)
    with pytest.raises(ValueError, match=r"layer 'fc2': file has shape \(16, 32\), model expects \(16, 64\)"):
        load_weights(TINY, str(path))


# --- MobileNetV2 ---------------------------------------------------------------------------

def test_mobilenetv2_is_keras_no_top_base_with_a_named_average_pool():
    assert MOBILENETV2.input_size == (224, 224) and MOBILENETV2.preprocess is preprocess_tf
    model = feature_model(MOBILENETV2)
    assert model.input_shape == (None, 224, 224, 3) and model.output_shape == (None, 1280)
    assert [layer.name for layer in model.layers[-2:]] == ["out_relu", "avg_pool"]
    assert MOBILENETV2.output_layer == "avg_pool" and MOBILENETV2.output_dim == 1280
    assert model.count_params() == 2_257_984  # Keras' MobileNetV2 (alpha 1.0) without its top


def test_model_option_accepts_mobilenetv2():
    from extractor.driver.config import parse_args

    cfg = parse_args(["--input", "s3://b/in/", "--output", "s3://b/out/", "--model", "mobilenetv2",
                      "--weights", "random"])
    assert cfg.model == "mobilenetv2" and get_spec(cfg.model) is MOBILENETV2


def test_mobilenetv2_random_weights_are_seeded_glorot_with_batch_norm_at_its_init():
    a, b, c = (load_weights(MOBILENETV2, "random", seed=s) for s in (1, 1, 2))
    assert a.sha256 == b.sha256 != c.sha256
    model = MOBILENETV2.build_features()
    paths = [variable.path for variable in model.weights]
    assert [x.shape for x in a.arrays] == [tuple(v.shape) for v in model.weights]
    init = {"gamma": 1.0, "beta": 0.0, "moving_mean": 0.0, "moving_variance": 1.0}
    depthwise = 0
    for path, value in zip(paths, a.arrays):
        layer, name = path.rsplit("/", 1)
        if name == "kernel":  # Keras' fans for (kh, kw, in, out), depthwise (kh, kw, channels, 1) too
            receptive = value.shape[0] * value.shape[1]
            limit = np.sqrt(6 / (receptive * (value.shape[2] + value.shape[3])))
            assert 0.5 * limit < np.abs(value).max() <= limit, path
            depthwise += layer.endswith("depthwise")
        else:
            assert np.all(value == init[name]), path
    assert depthwise == 17

    # Keras' own Glorot draw of the widest depthwise kernel has the same spread as ours.
    kernel = a.arrays[paths.index("block_16_depthwise/kernel")]
    keras_kernel = model.get_weights()[paths.index("block_16_depthwise/kernel")]
    assert kernel.shape == (3, 3, 960, 1)
    limit = np.sqrt(6 / (9 * 960 + 9 * 1))
    assert abs(kernel.std() - limit / np.sqrt(3)) < 0.05 * limit / np.sqrt(3)
    assert abs(keras_kernel.std() - kernel.std()) < 0.05 * kernel.std()


@pytest.mark.parametrize("name,legacy", [("mobilenet_v2_no_top.h5", True), ("mobilenet_v2.weights.h5", False)])
def test_mobilenetv2_weights_file_is_loaded_array_for_array(tmp_path, name, legacy):
    """A legacy .h5 (Keras' "no_top" layout, read by layer name) or a .weights.h5 of the base."""
    path = tmp_path / name
    expected = save_mobilenetv2_base(str(path), legacy=legacy)
    loaded = load_weights(MOBILENETV2, str(path))
    assert loaded.kind == "file" and loaded.warning is None
    assert len(loaded.arrays) == len(expected) == len(MOBILENETV2.build_features().weights)
    for got, want in zip(loaded.arrays, expected):
        np.testing.assert_array_equal(got, want)


def test_mobilenetv2_imagenet_asks_keras_for_its_no_top_file(monkeypatch):
    """The kind is accepted and goes to Keras; the download itself is not tried here."""
    from keras.src.utils import file_utils

    class Stop(Exception):
        pass

    requested = []

    def get_file(fname, origin, **kwargs):
        requested.append((fname, origin))
        raise Stop

    monkeypatch.setattr(file_utils, "get_file", get_file)
    with pytest.raises(Stop):
        load_weights(MOBILENETV2, "imagenet")
    fname = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    assert [name for name, _ in requested] == [fname] and requested[0][1].endswith("/" + fname)


def _photos() -> dict[str, bytes]:
    return {"k1.jpg": encode(gradient_rgb(100, 100), "JPEG"),
            "lime.jpg": fruit_dataset(1, ["Lime"])["Lime/lime_000.jpg"],
            "p1.png": encode(gradient_rgb(100, 64).rotate(30), "PNG")}


def test_mobilenetv2_vectors_equal_single_process_keras(tmp_path):
    """Parity: decode_image + the spec's preprocessing + the workers' model with the weights read
    from a legacy file == keras load_img + mobilenet_v2.preprocess_input + Keras' own
    MobileNetV2(pooling="avg") loading that file, one image at a time."""
    import keras
    from keras.applications import mobilenet_v2

    weights_file = tmp_path / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    save_mobilenetv2_base(str(weights_file), seed=7)
    arrays = load_weights(MOBILENETV2, str(weights_file)).arrays
    photos = _photos()

    model = MOBILENETV2.build_features()
    model.set_weights(arrays)
    batch = np.stack([decode_image(body, MOBILENETV2.input_size) for body in photos.values()])
    got = model.predict(MOBILENETV2.preprocess(batch), verbose=0)

    reference = mobilenet_v2.MobileNetV2(input_shape=(224, 224, 3), include_top=False, pooling="avg",
                                         weights=str(weights_file))
    for row, (name, body) in zip(got, photos.items()):
        (tmp_path / name).write_bytes(body)
        img = keras.utils.load_img(tmp_path / name, target_size=(224, 224))
        x = mobilenet_v2.preprocess_input(np.expand_dims(keras.utils.img_to_array(img), 0))
        expected = reference.predict(x, verbose=0)[0]
        assert expected.shape == (1280,) and np.abs(expected).max() > 1
        assert_within_rounding(row, expected, name)
    assert np.abs(got[0] - got[1]).max() > 0.1  # different photos, different vectors


def test_mobilenetv2_worker_forward_equals_keras_predict(tmp_path, monkeypatch):
    """The executors' path: compiled_model, then set_weights with the driver's arrays (as cached_model)."""
    from extractor.executor import worker

    monkeypatch.setattr(worker, "_MODELS", {})
    save_mobilenetv2_base(str(tmp_path / "w.h5"), seed=11)
    arrays = load_weights(MOBILENETV2, str(tmp_path / "w.h5")).arrays
    forward = worker.compiled_model(MOBILENETV2, threads=2)
    forward.model.set_weights(arrays)

    photos = list(_photos().values())[:2]
    x = MOBILENETV2.preprocess(np.stack([decode_image(body, MOBILENETV2.input_size) for body in photos]))
    out = forward(x)
    assert out.shape == (2, 1280) and out.dtype == np.float32

    reference = feature_model(MOBILENETV2)
    reference.set_weights(arrays)
    expected = reference.predict(x, verbose=0)
    assert np.abs(expected).max() > 1 and np.abs(expected[0] - expected[1]).max() > 0.1
    assert_within_rounding(out, expected, "worker forward vs predict")


@pytest.mark.parametrize("name", ["vgg16", "tiny", "probe4096"])
def test_layout_is_keras_own_and_gives_the_same_weights(name):
    """The driver loads these models' weights from their layout without importing TensorFlow."""
    from extractor.executor.models import keras_layout
    from extractor.driver.weights import _layout, random_arrays

    spec = get_spec(name)
    model = spec.build_features()
    assert spec.layout() == keras_layout(model)
    layout, initial = _layout(spec)
    assert initial is None and not any(w.any() for w in model.get_weights()[1::2])  # Keras' biases: zeros too
    ours = random_arrays(layout, None, seed=2)
    theirs = random_arrays(keras_layout(model), model.get_weights(), seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_weights_load_without_tensorflow(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys; from extractor.executor.models import get_spec; from extractor.driver.weights import load_weights; "
            "print(*(len(load_weights(get_spec(m), 'random', seed=1).arrays) for m in ('vgg16', 'tiny', 'probe4096')), "
            "'tensorflow' in sys.modules, 'keras' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["30", "6", "2", "False", "False"], result.stderr[-2000:]


# --- every weights format, read without Keras ------------------------------------------------------

def _small_functional(seed: int):
    """Conv2D, Conv2D, Dense, Dense (+ a head) named as VGG16 names its layers."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="input_layer")
    x = layers.Conv2D(4, 3, name="block1_conv1")(inputs)
    x = layers.Conv2D(5, 3, name="block1_conv2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(6, name="fc1")(x)
    x = layers.Dense(7, name="fc2")(x)
    head = layers.Dense(3, name="predictions")(x)
    model = keras.Model(inputs, head)
    for variable in model.weights:  # distinct non-zero biases: a swapped array shows
        variable.assign(np.random.default_rng(seed).normal(size=variable.shape).astype(np.float32))
    return model


def test_a_keras3_weights_file_is_read_by_class_order_as_keras_reads_it(tmp_path):
    from extractor.executor.models import keras_layout
    from extractor.driver.weights import read_keras3_h5

    import h5py

    full = _small_functional(seed=11)
    path = tmp_path / "full.weights.h5"
    full.save_weights(path)
    with h5py.File(path, "r+") as handle:  # a file that does not record its layers' names
        for group in handle["layers"].values():
            if "vars" in group:
                group["vars"].attrs.pop("name", None)
    layout = keras_layout(full)[:-1]  # the feature model: the head's layer ignored
    expected = full.get_weights()[:-2]
    got = read_keras3_h5(str(path), layout)
    assert len(got) == len(expected) == 8
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_keras3_weights_file_with_layer_names_is_read_by_name(tmp_path):
    import h5py

    from extractor.executor.models import keras_layout
    from extractor.driver.weights import read_keras3_h5

    full = _small_functional(seed=12)
    path = tmp_path / "named.weights.h5"
    full.save_weights(path)
    # Keras records each layer's name on its vars group: swap two groups, names and all, so
    # that class order would now give the wrong arrays and only the names give the right ones.
    with h5py.File(path, "r+") as handle:
        layers = handle["layers"]
        assert layers["conv2d/vars"].attrs["name"] == "block1_conv1"
        layers.move("conv2d", "first")
        layers.move("conv2d_1", "conv2d")
        layers.move("first", "conv2d_1")
    got = read_keras3_h5(str(path), keras_layout(full)[:-1])
    assert all(np.array_equal(a, b) for a, b in zip(got, full.get_weights()[:-2], strict=True))


def test_a_keras3_weights_file_of_another_model_is_refused(tmp_path):
    path = tmp_path / "tiny.weights.h5"
    save_full_model(str(path))
    with pytest.raises(ValueError, match="no layer 'block1_conv2'|layer 'block1_conv1': file has shape"):
        load_weights(get_spec("vgg16"), str(path))


def test_vgg16_loads_every_weights_format_to_the_same_arrays_without_tensorflow(tmp_path):
    """Legacy .h5, Keras 3 .weights.h5 of the full model, and imagenet from Keras' cache: the same
    arrays, read in a process that never imports TensorFlow or Keras."""
    import subprocess
    import sys

    from conftest import REPO
    from extractor.dev.bench_weights import save_vgg16_files
    from extractor.driver.weights import file_md5, fingerprint, random_arrays

    spec = get_spec("vgg16")
    arrays = random_arrays(spec.layout(), None, seed=21)
    for i in range(1, len(arrays), 2):
        arrays[i] = arrays[i] + np.float32(i)  # non-zero biases
    legacy, keras3 = save_vgg16_files(tmp_path, arrays)  # the .weights.h5 written by Keras itself
    cache = tmp_path / "keras-home" / "models"
    cache.mkdir(parents=True)
    (cache / spec.imagenet.fname).symlink_to(legacy)
    code = ("import dataclasses, sys; from extractor.executor.models import get_spec; from extractor.driver.weights import load_weights; "
            "spec = get_spec('vgg16'); "
            f"spec = dataclasses.replace(spec, imagenet=dataclasses.replace(spec.imagenet, md5={file_md5(legacy)!r})); "
            f"print(*[load_weights(spec, s).sha256 for s in ({str(legacy)!r}, {str(keras3)!r}, 'imagenet')], "
            "'tensorflow' in sys.modules, 'keras' in sys.modules)")
    env = dict(os.environ, KERAS_HOME=str(tmp_path / "keras-home"))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.stdout.split() == [fingerprint(arrays)] * 3 + ["False", "False"], result.stderr[-2000:]


SMALL_LAYOUT = [("fc2", [("kernel", (4, 3)), ("bias", (3,))])]


def _imagenet_spec(tmp_path, md5: str, origin: str):
    import dataclasses

    from extractor.executor.models import ImagenetFile

    return dataclasses.replace(get_spec("vgg16"), layout=lambda: SMALL_LAYOUT,
                               imagenet=ImagenetFile("small_imagenet.h5", origin, md5))


@pytest.fixture
def weights_server(tmp_path):
    """A loopback HTTP server for one weights file; yields (its URL, the list of paths asked)."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    asked = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            asked.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/small_imagenet.h5", asked
    server.shutdown()


def test_imagenet_is_downloaded_once_into_keras_cache_and_checked(tmp_path, monkeypatch, weights_server):
    from extractor.driver.weights import file_md5, fingerprint

    served, url, asked = weights_server
    arrays = [np.arange(12, dtype=np.float32).reshape(4, 3), np.ones(3, np.float32)]
    write_legacy_h5(served / "small_imagenet.h5", SMALL_LAYOUT, arrays)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    spec = _imagenet_spec(tmp_path, file_md5(served / "small_imagenet.h5"), url)
    first = load_weights(spec, "imagenet")
    assert first.sha256 == fingerprint(arrays) and first.kind == "imagenet"
    assert (tmp_path / "home" / "models" / "small_imagenet.h5").is_file()
    assert load_weights(spec, "imagenet").sha256 == first.sha256
    assert len(asked) == 1  # the second load read the cache


def test_imagenet_with_a_wrong_md5_is_refused_and_nothing_cached(tmp_path, monkeypatch, weights_server):
    served, url, _ = weights_server
    write_legacy_h5(served / "small_imagenet.h5", SMALL_LAYOUT, [np.zeros((4, 3), np.float32), np.zeros(3, np.float32)])
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    with pytest.raises(ValueError, match="has md5 .*, Keras expects 0123"):
        load_weights(_imagenet_spec(tmp_path, "0123" + "0" * 28, url), "imagenet")
    assert list((tmp_path / "home" / "models").iterdir()) == []


def test_imagenet_not_cached_and_unreachable_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    spec = _imagenet_spec(tmp_path, "0" * 32, "http://127.0.0.1:9/small_imagenet.h5")  # discard port: refused
    with pytest.raises(OSError, match="small_imagenet.h5 is not cached and cannot be downloaded"):
        load_weights(spec, "imagenet")
