"""Decode image bytes to model-ready arrays; pure numpy/PIL, no TensorFlow.

Resizing follows ``keras.utils.load_img(path, target_size=...)``: convert to RGB, then a
nearest-neighbour resize, so our vectors match what a plain Keras user gets. A JPEG at least
twice the model's input in both dimensions (a phone photo, not a Fruits-360 thumbnail) is first
decoded at a reduced DCT scale (1/2, 1/4 or 1/8: libjpeg's "draft" mode), the smallest that
still covers the input: a 4000x3000 photo decodes to 500x375 at a fraction of the CPU, then
the same nearest resize. ``draft=False`` is the full-size path, exactly as Keras decodes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# A 100x100 fruit is 10 kpx; a phone photo is 12-50 Mpx. Anything past this is refused
# from its header alone, before a single pixel is decoded (decompression bombs).
DEFAULT_MAX_PIXELS = 64_000_000

# Decoders we accept whatever the extension says. PIL knows ~40 formats, some of them exotic
# or (EPS) run external programs; a photo from a phone or camera is one of these.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")  # JPEG covers MPO (multi-picture)

# What --decode accepts: "draft" (reduced DCT scale for large JPEGs) or "full" (Keras' own path).
DECODE_MODES = ("draft", "full")

# Keras' vgg16/resnet "caffe" preprocessing: BGR order, ImageNet channel means, no scaling.
# (MobileNetV2 uses the "tf" mode instead: RGB scaled to [-1, 1], see preprocess_tf.)
CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)


class ImageError(Exception):
    """An image that cannot be featurized; ``str(exc)`` is the short reason for errors.csv."""


def decode_image(data: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: bool = True) -> np.ndarray:
    """Bytes of a JPEG/PNG/... -> ``(height, width, 3) uint8`` RGB at ``size`` = (height, width).

    ``draft``: a JPEG of at least twice ``size`` in both dimensions is decoded at the smallest
    DCT scale still covering ``size``; every other image decodes exactly as with ``False``."""
    if not data:
        raise ImageError("empty object (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(f"not an image (not one of {', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image header: {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"too large: {width}x{height} pixels (limit {max_pixels})")
    if draft:
        shrink_on_decode(img, size)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image data: {exc}") from None
    img = to_rgb(img)
    target = (size[1], size[0])  # PIL wants (width, height)
    if img.size != target:
        img = img.resize(target, Image.NEAREST)
    return np.asarray(img, dtype=np.uint8)


def shrink_on_decode(img: Image.Image, size: tuple[int, int]) -> bool:
    """Ask a not yet decoded JPEG for the smallest DCT scale (1/2, 1/4, 1/8) whose result still
    covers ``size`` = (height, width) in both dimensions; True when it will decode smaller.

    Nothing is asked of an image under twice ``size`` (no scale would apply: it must decode
    as before, bit for bit) nor of other formats, which have no such mode. The colour mode is
    left as the file has it (to_rgb converts afterwards, as for a full-size decode)."""
    if img.format not in ("JPEG", "MPO"):
        return False
    width, height = img.size
    if width < 2 * size[1] or height < 2 * size[0]:
        return False
    return img.draft(None, (size[1], size[0])) is not None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB.

    Transparent pixels are composited on white (Fruits-360 photos are on white); 16/32-bit
    grayscale is scaled to 8 bits rather than clipped.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if mode != "F":
            values = values / 257.0  # 0..65535 -> 0..255
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")  # 2-D uint8 -> mode L
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"unsupported image mode {mode!r}: {exc}") from None


def preprocess_caffe(batch: np.ndarray) -> np.ndarray:
    """``(n, h, w, 3)`` RGB 0..255 -> float32 BGR minus the ImageNet means (= vgg16.preprocess_input)."""
    return _rgb_batch(batch)[..., ::-1] - CAFFE_BGR_MEAN


def preprocess_tf(batch: np.ndarray) -> np.ndarray:
    """``(n, h, w, 3)`` RGB 0..255 -> float32 RGB in [-1, 1] (= mobilenet_v2.preprocess_input)."""
    # float32 scalars, in Keras' order: the result is bit-identical to Keras' (x / 127.5) - 1.
    return _rgb_batch(batch) / np.float32(127.5) - np.float32(1.0)


def _rgb_batch(batch: np.ndarray) -> np.ndarray:
    """``(n, h, w, 3)`` float32; ValueError for any other shape (a grey or RGBA batch would
    otherwise broadcast or be cut silently)."""
    x = np.asarray(batch, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected an (n, h, w, 3) RGB batch, got shape {x.shape}")
    return x

