"""Stream one S3 object of any size from bounded memory: the distributed mode's assembled files."""

from __future__ import annotations

import hashlib

from extractor.storage.s3 import S3Settings, put_bytes


class MultipartWriter:
    """A binary file-like sink that streams into one S3 object (e.g. formats' ``assemble`` sink).

    Writes are buffered; every ``part_size`` bytes go up as one part of a multipart upload, so
    memory stays near ``part_size`` whatever the object's size. A payload that stays under
    ``part_size`` is sent by one put_object on close. Use it as a context manager: a normal exit
    completes the object; an exception aborts the upload, leaving neither object nor pending
    upload. After close, ``nbytes`` and ``sha256`` (hex) describe everything written.
    """

    MIN_PART_SIZE = 5 * 2**20  # S3's minimum for every part but the last
    MAX_PART_SIZE = 5 * 2**30
    MAX_PARTS = 10_000

    def __init__(self, client, settings: S3Settings, bucket: str, key: str,
                 content_type: str = "application/octet-stream", part_size: int = 8 * 2**20):
        if isinstance(part_size, bool) or not isinstance(part_size, int) or not (
                self.MIN_PART_SIZE <= part_size <= self.MAX_PART_SIZE):
            raise ValueError(f"part_size must be an int from {self.MIN_PART_SIZE} (5 MiB, S3's minimum) "
                             f"to {self.MAX_PART_SIZE} bytes, got {part_size!r}")
        for name, value in (("bucket", bucket), ("key", key), ("content_type", content_type)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        self.client = client
        self.settings = settings
        self.bucket = bucket
        self.key = key
        self.content_type = content_type
        self.part_size = part_size
        self.nbytes = 0
        self.sha256: str | None = None  # set by close()
        self.closed = False
        self.upload_id: str | None = None  # None until the first full part
        self._parts: list[dict] = []
        self._buffer = bytearray()
        self._hash = hashlib.sha256()

    def __enter__(self) -> "MultipartWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is None:
            self.close()
        else:
            self._abort_noting(exc)
        return False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        """Bytes written so far."""
        return self.nbytes

    def flush(self) -> None:
        # Nothing to do: S3 takes no part under 5 MiB but the last, so bytes wait for a full part or close().
        self._check_open()

    def write(self, data) -> int:
        """Buffer ``data`` (bytes-like); uploads a part each time ``part_size`` bytes are waiting."""
        self._check_open()
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._buffer += view
        self.nbytes += view.nbytes
        try:
            while len(self._buffer) >= self.part_size:
                self._upload_part(bytes(self._buffer[:self.part_size]))
                del self._buffer[:self.part_size]
        except BaseException as error:
            # A lost part cannot be made good: give up now rather than complete a corrupt object later.
            self._abort_noting(error)
            raise
        return view.nbytes

    def close(self) -> None:
        """Make the object: one put_object, or the last part and CompleteMultipartUpload.

        Idempotent. If completing fails, the upload is aborted and the error raised.
        """
        if self.closed:
            return
        if self.upload_id is None:
            put_bytes(self.client, self.settings, self.bucket, self.key, bytes(self._buffer), self.content_type)
        else:
            try:
                if self._buffer:
                    self._upload_part(bytes(self._buffer))
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                                      MultipartUpload={"Parts": self._parts})
            except BaseException as error:
                self._abort_noting(error)
                raise
        self._buffer = bytearray()
        self.sha256 = self._hash.hexdigest()
        self.closed = True

    def abort(self) -> None:
        """Drop everything: abort the multipart upload if one was started; nothing is written."""
        self.closed = True
        self._buffer = bytearray()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=upload_id)

    def _abort_noting(self, error: BaseException) -> None:
        """abort(); if that fails too, say so in a note on ``error`` rather than hide it."""
        upload_id = self.upload_id
        try:
            self.abort()
        except Exception as abort_error:
            error.add_note(f"aborting the multipart upload {upload_id} of s3://{self.bucket}/{self.key} failed too "
                           f"({abort_error!r}); its parts stay stored until a lifecycle rule removes them")

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on a closed MultipartWriter (s3://{self.bucket}/{self.key})")

    def _upload_part(self, body: bytes) -> None:
        if self.upload_id is None:
            # Encryption is chosen when the upload is created; the parts inherit it.
            response = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key,
                                                           ContentType=self.content_type,
                                                           **self.settings.encryption_args())
            self.upload_id = response["UploadId"]
        number = len(self._parts) + 1
        if number > self.MAX_PARTS:
            raise ValueError(f"s3://{self.bucket}/{self.key} needs more than {self.MAX_PARTS} parts of "
                             f"{self.part_size} bytes; use a larger part_size")
        response = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                           PartNumber=number, Body=body)
        self._parts.append({"PartNumber": number, "ETag": response["ETag"]})
