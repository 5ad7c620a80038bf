"""List the images under an S3 prefix and label each by its parent folder."""

from __future__ import annotations

from dataclasses import dataclass, field

from .s3 import S3Location, list_objects

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class ImageRef:
    key: str
    label: str
    etag: str = ""   # S3's ETag: an incremental run re-featurizes a key whose content changed


@dataclass
class Listing:
    images: list[ImageRef]
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


def is_image_key(key: str) -> bool:
    return key.lower().endswith(IMAGE_EXTENSIONS)


def label_for_key(key: str) -> str:
    """The name of the key's parent folder: ``Test/Apple Braeburn/r_1.jpg`` -> ``Apple Braeburn``.

    A key at the bucket root has no folder and gets the label ''.
    """
    parts = key.split("/")
    return parts[-2] if len(parts) >= 2 else ""


def list_images(client, location: S3Location, page_size: int = 1000) -> Listing:
    """Every image key under ``location`` (all pages, sorted); other keys are counted as skipped."""
    images: list[ImageRef] = []
    skipped: list[str] = []
    for obj in list_objects(client, location.bucket, location.prefix, page_size=page_size):
        key = obj["Key"]
        if is_image_key(key):
            images.append(ImageRef(key, label_for_key(key), obj.get("ETag", "").strip('"')))
        else:
            skipped.append(key)
    images.sort(key=lambda ref: ref.key)
    return Listing(images=images, skipped=len(skipped), skipped_examples=skipped[:10])
