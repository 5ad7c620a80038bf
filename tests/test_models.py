import numpy as np
import pytest

from extractor.models import feature_model, get_spec, load_weights, weights_kind

from conftest import REGION, save_full_model, unique_bucket

TINY = get_spec("tiny")


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


@pytest.mark.parametrize("name", ["vgg16", "tiny"])
def test_workers_zero_initialised_model_has_keras_layout(name):
    """The workers' cheap build must take the weights of Keras' own model, in the same order."""
    spec = get_spec(name)
    reference = feature_model(spec)
    cheap = spec.build_features()
    assert [layer.name for layer in cheap.layers][1:] == [layer.name for layer in reference.layers][1:]
    assert [w.shape for w in cheap.get_weights()] == [w.shape for w in reference.get_weights()]
    cheap.set_weights(reference.get_weights())
    x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32) * 50
    np.testing.assert_allclose(cheap.predict(x, verbose=0), reference.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


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
