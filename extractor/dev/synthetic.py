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
