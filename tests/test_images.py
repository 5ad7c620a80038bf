import io
import re

import numpy as np
import pytest
from PIL import Image

from extractor.executor.images import ImageError, decode_image, preprocess_caffe, preprocess_tf

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


# --- draft decoding (--decode draft): large JPEGs at a reduced DCT scale --------------------------

def _two_halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue, a green band on top: orientation and colours both show."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (220, 30, 30)
    array[:, width // 2:] = (30, 30, 220)
    array[: height // 5] = (30, 200, 30)
    return Image.fromarray(array)


@pytest.mark.parametrize("data", [
    encode(gradient_rgb(100, 100), "JPEG", quality=90),                # Fruits-360 size
    encode(gradient_rgb(447, 600), "JPEG"),                            # under twice 224 in one dimension
    encode(gradient_rgb(100, 100).convert("L"), "JPEG"),
    encode(gradient_rgb(100, 100).convert("CMYK"), "JPEG"),
    encode(gradient_rgb(100, 100), "JPEG", progressive=True),
    encode(gradient_rgb(1200, 900), "PNG"),                            # large, but PNG has no draft mode
    encode(gradient_rgb(1200, 900).convert("RGBA"), "WEBP"),
])
def test_images_that_cannot_shrink_decode_byte_for_byte_as_before(data):
    np.testing.assert_array_equal(decode_image(data, SIZE), decode_image(data, SIZE, draft=False))


def test_fruits_360_images_decode_byte_for_byte_as_before():
    from extractor.dev.synthetic import fruit_dataset

    for body in fruit_dataset(2).values():
        np.testing.assert_array_equal(decode_image(body, SIZE), decode_image(body, SIZE, draft=False))


@pytest.mark.parametrize("mode,options", [("RGB", {}), ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {})])
def test_a_large_jpeg_decodes_at_a_reduced_scale_with_the_same_orientation_and_colours(mode, options):
    from extractor.executor.images import shrink_on_decode

    data = encode(_two_halves(1800, 1000).convert(mode), "JPEG", quality=90, **options)
    img = Image.open(io.BytesIO(data))
    assert shrink_on_decode(img, SIZE) and img.size == (450, 250)  # 1/4: 1/8 would be under 224 high
    draft, full = decode_image(data, SIZE), decode_image(data, SIZE, draft=False)
    assert draft.shape == full.shape == (224, 224, 3) and draft.dtype == np.uint8
    # Same picture: each region's mean colour within a few levels (JPEG's DCT scaling only).
    for rows, cols in ((slice(60, 224), slice(0, 100)), (slice(60, 224), slice(124, 224)), (slice(0, 30), slice(None))):
        np.testing.assert_allclose(draft[rows, cols].mean((0, 1)), full[rows, cols].mean((0, 1)), atol=3)
    assert draft[150, 20, 0] > 150 if mode != "L" else draft[150, 20, 0] > 0


def test_exif_orientation_is_ignored_by_both_paths_as_keras_does():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": Keras' load_img does not apply it, nor do we
    data = encode(_two_halves(1800, 1000), "JPEG", exif=exif.tobytes())
    draft, full = decode_image(data, SIZE), decode_image(data, SIZE, draft=False)
    assert draft[150, 20].argmax() == full[150, 20].argmax() == 0    # red still on the left
    assert draft[150, 200].argmax() == full[150, 200].argmax() == 2  # blue on the right


def test_a_camera_size_photo_decodes_to_the_model_input_at_one_eighth():
    from extractor.executor.images import shrink_on_decode

    data = encode(_two_halves(4000, 3000), "JPEG", quality=90)
    img = Image.open(io.BytesIO(data))
    assert shrink_on_decode(img, SIZE) and img.size == (500, 375)
    assert decode_image(data, SIZE).shape == (224, 224, 3)
    assert decode_image(data, (100, 120)).shape == (100, 120, 3)


@pytest.mark.parametrize("data,reason", [
    (encode(gradient_rgb(1600, 1200), "JPEG")[:600], "truncated"),
    (encode(gradient_rgb(1600, 1200), "JPEG")[:-20000], "truncated"),
])
def test_a_broken_large_jpeg_still_gives_its_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data, SIZE)


def test_the_pixel_limit_applies_to_the_file_not_to_the_reduced_decode():
    data = encode(gradient_rgb(1600, 1200), "JPEG")
    with pytest.raises(ImageError, match="1600x1200 pixels"):
        decode_image(data, SIZE, max_pixels=1600 * 1200 - 1)
