"""Fruit-like test images, 100x100 JPEG on white like Fruits-360, made from a seed.

Used by the demo and the tests so that neither depends on a downloaded data set.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageFilter

# name -> (RGB colour, (width, height) of the fruit's ellipse in pixels)
FRUITS = {
    "Apple Red": ((190, 30, 40), (70, 66)),
    "Lemon": ((240, 215, 50), (78, 58)),
    "Lime": ((90, 170, 50), (60, 54)),
    "Blueberry": ((60, 70, 140), (44, 44)),
    "Orange": ((245, 140, 20), (74, 74)),
}


def fruit_image(fruit: str, seed: int, size: int = 100) -> Image.Image:
    """One RGB image of ``fruit`` (a key of FRUITS): jittered position, size, shade and highlight."""
    colour, (width, height) = FRUITS[fruit]
    rng = random.Random(f"{fruit}/{seed}")
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    scale = rng.uniform(0.85, 1.1)
    w, h = width * scale, height * scale
    cx, cy = size / 2 + rng.uniform(-6, 6), size / 2 + rng.uniform(-6, 6)
    shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    draw.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=shade)
    hx, hy = cx - w / 5, cy - h / 5
    draw.ellipse([hx - 6, hy - 4, hx + 6, hy + 4], fill=tuple(min(255, c + 60) for c in shade))
    draw.line([cx, cy - h / 2, cx + rng.uniform(-4, 4), cy - h / 2 - 8], fill=(90, 60, 20), width=2)
    return img.filter(ImageFilter.GaussianBlur(0.8))


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def fruit_dataset(per_fruit: int, fruits=None) -> dict[str, bytes]:
    """``{"<fruit>/<fruit>_<i>.jpg": jpeg bytes}`` for ``per_fruit`` images of each fruit."""
    names = list(fruits or FRUITS)
    return {f"{fruit}/{fruit.lower().replace(' ', '_')}_{i:03d}.jpg": jpeg_bytes(fruit_image(fruit, i))
            for fruit in names for i in range(per_fruit)}


def camera_photos(images: dict[str, bytes], count: int, width: int = 4000, height: int = 3000,
                  quality: int = 90, seed: int = 0) -> dict[str, bytes]:
    """Phone-photo stand-ins made from ``images`` (the first ``count``, same keys): each upscaled
    to ``width`` x ``height`` (bicubic) with sensor-like noise, JPEG at ``quality``, so a file
    holds as many bytes per pixel as a phone photo (~1.4 MB at 12 Mpx, q90) rather than a flat
    gradient's. One noise field, shifted per image, keeps making them cheap."""
    import numpy as np

    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 4, (height, width, 3)).astype(np.int16)
    photos = {}
    for index, (key, body) in enumerate(list(images.items())[:count]):
        base = Image.open(io.BytesIO(body)).convert("RGB")
        photos[key] = noisy_jpeg(base, np.roll(noise, (index * 7919) % height, axis=0), quality)
    return photos


def noisy_jpeg(base: Image.Image, noise, quality: int = 90) -> bytes:
    """``base`` upscaled (bicubic) to ``noise``'s ``(height, width, 3)`` int16 shape, the noise
    added and clipped to 0..255, as a JPEG at ``quality``."""
    import numpy as np

    height, width = noise.shape[:2]
    pixels = np.asarray(base.resize((width, height), Image.BICUBIC), dtype=np.int16) + noise
    return jpeg_bytes(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), quality)
