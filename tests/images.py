"""Images in every mode the job must handle, made in memory by the tests."""

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient_rgb(width=100, height=100) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                      (x + y) * 255 // max(width + height - 2, 1)], axis=-1).astype(np.uint8)
    return Image.fromarray(array)


def bomb_png(width=30000, height=30000) -> bytes:
    """A valid 1x1 PNG whose header claims width x height pixels: tiny file, huge decode."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)
