import io
import re

import numpy as np
import pytest
from PIL import Image

from extractor.images import ImageError, decode_image, preprocess_caffe, preprocess_tf

from images import bomb_png, encode, gradient_rgb

SIZE = (224, 224)


def test_resize_matches_keras_load_img(tmp_path):
    import keras

    data = encode(gradient_rgb(100, 100), "JPEG", quality=90)
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    expected = np.asarray(keras.utils.load_img(path, target_size=SIZE), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(data, SIZE), expected)


def test_non_square_target_is_height_width():
    out = decode_image(encode(gradient_rgb(50, 80), "PNG"), (30, 60))
    assert out.shape == (30, 60, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1"])
def test_every_mode_becomes_rgb(mode):
    img = gradient_rgb().convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    out = decode_image(encode(img, fmt), SIZE)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out.std() > 0  # not a blank image


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = decode_image(encode(img, "PNG"), (10, 10))
    assert tuple(out[5, 5]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 0, 255)


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.putpixel((1, 1), 1)
    out = decode_image(encode(img, "PNG", transparency=0), (4, 4))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (200, 10, 10)


def test_16_bit_grayscale_is_scaled_not_clipped():
    array = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(array)  # uint16 -> I;16
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, (1, 3))
    assert [int(v) for v in out[0, :, 0]] == [0, 128, 255]


@pytest.mark.parametrize("data,reason", [
    (b"", "empty object"),
    (b"this is a text file, not a JPEG", "not an image"),
    (encode(gradient_rgb(), "JPEG")[:600], "truncated"),          # cut inside the header
    (encode(gradient_rgb(400, 400), "JPEG")[:-2000], "truncated"),  # cut inside the pixels
    (bomb_png(), "too large"),
])
def test_bad_bytes_give_a_specific_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data, SIZE)


def test_exotic_decoders_are_not_tried():
    # A valid image in a format no camera writes (and whose PIL plugin could be a liability).
    with pytest.raises(ImageError, match="not an image"):
        decode_image(encode(gradient_rgb(8, 8), "PCX"), SIZE)
    assert decode_image(encode(gradient_rgb(8, 8), "WEBP"), SIZE).shape == (224, 224, 3)


def test_pixel_limit_is_checked_from_the_header():
    data = encode(gradient_rgb(300, 200), "PNG")
    with pytest.raises(ImageError, match="300x200 pixels"):
        decode_image(data, SIZE, max_pixels=300 * 200 - 1)
    assert decode_image(data, SIZE, max_pixels=300 * 200).shape == (224, 224, 3)


def test_caffe_preprocessing_equals_keras_vgg16():
    from keras.applications import vgg16

    batch = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
    expected = vgg16.preprocess_input(batch.astype(np.float32).copy())
    np.testing.assert_allclose(preprocess_caffe(batch), expected, rtol=0, atol=1e-5)


def test_tf_preprocessing_equals_keras_mobilenet_v2():
    from keras.applications import mobilenet_v2

    batch = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3)).astype(np.float32)
    batch[0, 0, 0], batch[0, 0, 1] = (0, 0, 0), (255, 255, 255)
    original = batch.copy()
    expected = mobilenet_v2.preprocess_input(batch.copy())  # Keras works in place on numpy arrays
    got = preprocess_tf(batch)
    assert got.dtype == np.float32 and got.min() == -1 and got.max() == 1
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(preprocess_tf(batch.astype(np.uint8)), expected)  # decode_image's dtype
    np.testing.assert_array_equal(batch, original)  # unlike Keras, the input is left alone


@pytest.mark.parametrize("preprocess", [preprocess_caffe, preprocess_tf])
@pytest.mark.parametrize("shape", [(8, 8, 3), (1, 8, 8, 4), (1, 8, 8)])
def test_preprocessing_refuses_what_is_not_an_rgb_batch(preprocess, shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        preprocess(np.zeros(shape, np.uint8))
