"""A stand-in S3 client that serves ListObjectsV2 pages of a synthetic, key-only bucket: the
listing's own cost (driver memory, requests, time) measured at millions of keys without storing
a million objects. Picklable as a factory, so the executors' listing tasks use it too.

Keys: ``<folder>/<nnnnnnnn>_100.jpg`` in ``folders`` folders of ``per_folder`` keys each, plus
one ``<folder>/notes-<n>.txt`` every ``text_every`` keys (counted as skipped by the job).
``put_object`` keeps nothing but counts (the listing snapshot's pieces, at this scale).
``latency_s``: how long each request takes (a page served, an object put), to stand for S3's
per-call latency in a benchmark.
"""

from __future__ import annotations

import hashlib
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass


@dataclass(frozen=True)
class SyntheticBucket:
    """The factory: ``SyntheticBucket(...)()`` is a new client (one per task, as S3Settings.client)."""

    folders: int
    per_folder: int
    text_every: int = 0
    latency_s: float = 0.0

    def __call__(self) -> "PagedClient":
        return PagedClient(self)

    @property
    def images(self) -> int:
        return self.folders * self.per_folder

    def folder(self, i: int) -> str:
        return f"fruit-{i:05d}/"

    def folder_keys(self, i: int, start_after: str = ""):
        """The folder's keys in S3's order (zero-padded numbers sort as strings), after ``start_after``."""
        folder = self.folder(i)
        first = bisect_right(range(self.per_folder), start_after, key=lambda j: f"{folder}{j:08d}_100.jpg")
        for j in range(first, self.per_folder):
            yield f"{folder}{j:08d}_100.jpg"
        if self.text_every:
            for j in range(self.per_folder // self.text_every):
                if f"{folder}notes-{j:06d}.txt" > start_after:
                    yield f"{folder}notes-{j:06d}.txt"   # 'n' > digits: after the images


class PagedClient:
    """What the listing calls: ``get_paginator('list_objects_v2').paginate(...)`` and ``put_object``."""

    def __init__(self, bucket: SyntheticBucket):
        self.bucket = bucket
        self.requests = 0
        self.put_bytes = 0
        self._lock = threading.Lock()   # the snapshot's pieces are put from several threads

    def get_paginator(self, name: str) -> "PagedClient":
        if name != "list_objects_v2":
            raise ValueError(f"only list_objects_v2 is served, got {name!r}")
        return self

    def paginate(self, Bucket: str, Prefix: str = "", Delimiter: str | None = None,  # noqa: N803 (boto3's names)
                 PaginationConfig: dict | None = None, StartAfter: str = ""):
        size = (PaginationConfig or {}).get("PageSize", 1000)
        if Prefix == "" and Delimiter == "/":
            entries = [("prefix", self.bucket.folder(i)) for i in range(self.bucket.folders)]
        else:  # the folders' keys (no folder has sub-folders: a delimiter changes nothing below the root)
            folders = [i for i in range(self.bucket.folders)
                       if Prefix.startswith(self.bucket.folder(i)) or self.bucket.folder(i).startswith(Prefix)]
            entries = (("key", key) for i in folders for key in self.bucket.folder_keys(i, StartAfter)
                       if key.startswith(Prefix))
        page: list = []
        served = False
        for entry in entries:
            page.append(entry)
            if len(page) == size:
                yield self._page(page)
                page, served = [], True
        if page or not served:   # S3 answers an empty listing with one empty page
            yield self._page(page)

    def _page(self, entries: list) -> dict:
        self.requests += 1
        if self.bucket.latency_s:
            time.sleep(self.bucket.latency_s)
        return {"Contents": [{"Key": key, "ETag": '"' + hashlib.md5(key.encode()).hexdigest() + '"'}
                             for kind, key in entries if kind == "key"],
                "CommonPrefixes": [{"Prefix": prefix} for kind, prefix in entries if kind == "prefix"]}

    def put_object(self, Body: bytes = b"", **_) -> dict:  # noqa: N803
        with self._lock:
            self.put_bytes += len(Body)
        if self.bucket.latency_s:
            time.sleep(self.bucket.latency_s)
        return {}
