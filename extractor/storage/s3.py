"""S3 plumbing shared by every stage: URIs, clients, encrypted writes, readable errors."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from extractor.errors import JobError

MAX_POOL_CONNECTIONS = 32   # HTTP connections per client: a featurize task's download threads share one


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix; ``prefix`` is '' or ends with '/'."""

    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def key(self, relative: str) -> str:
        return self.prefix + relative

    def contains(self, other: "S3Location") -> bool:
        return self.bucket == other.bucket and other.prefix.startswith(self.prefix)


def parse_s3_uri(uri: str, *, folder: bool = True) -> S3Location:
    """Split ``s3://bucket/prefix``; a folder prefix always gets a trailing '/'.

    Raises ValueError naming what was received.
    """
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"expected an s3://bucket/prefix URI, got {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket or "/" in bucket:
        raise ValueError(f"no bucket name in {uri!r}")
    if folder and prefix and not prefix.endswith("/"):
        # Without the slash, s3://b/Test would also match s3://b/Test2/...
        prefix += "/"
    return S3Location(bucket, prefix)


_LOADER = None
_LOADER_LOCK = threading.Lock()


def _botocore_session():
    """A new botocore session (credentials and settings read anew) that shares this process's
    data loader: parsing S3's service model is most of what a client costs (~210 ms a client
    here, ~26 ms with the loader shared), and every partition of every stage builds one."""
    global _LOADER
    import botocore.session

    session = botocore.session.Session()
    with _LOADER_LOCK:
        if _LOADER is None:
            _LOADER = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _LOADER)
    return session


@dataclass(frozen=True)
class S3Settings:
    """What every process needs to build its own client: plain values, picklable. The command
    lines that make one (driver.py, extractor.forget) take ``add_s3_options``' options."""

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 10
    sse_kms_key_id: str | None = None

    def client(self):
        """A new S3 client; build one per process or per partition, never per object."""
        import boto3
        from botocore.config import Config

        config = Config(
            # botocore's own retry with backoff: throttling (503 SlowDown) and
            # transient 5xx/connection errors are retried before we see them.
            # total_max_attempts counts the first try too ("max_attempts" would mean retries).
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            max_pool_connections=MAX_POOL_CONNECTIONS,
            connect_timeout=10,
            read_timeout=120,
        )
        # A fresh Session per client: boto3's default session is not thread-safe.
        session = boto3.session.Session(botocore_session=_botocore_session())
        return session.client(
            "s3", endpoint_url=self.endpoint_url or None, region_name=self.region, config=config
        )

    def encryption_args(self) -> dict:
        """Server-side encryption for every object we write: SSE-S3, or SSE-KMS if a key is set."""
        if self.sse_kms_key_id:
            return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.sse_kms_key_id}
        return {"ServerSideEncryption": "AES256"}


class RetryLog:
    """Counts the retries botocore made, per operation, on the clients it is attached to.

    botocore retries quietly; this makes them visible in the log and the manifest. Each
    response (success or error) reports its RetryAttempts; a connection failure that exhausts
    every attempt has no response and surfaces as the call's exception instead.
    """

    def __init__(self, on_retry=None):
        self.by_operation: Counter = Counter()
        self.calls = 0                       # calls that got a response (what a request count needs)
        self._lock = threading.Lock()
        self._on_retry = on_retry  # called with (operation, attempts, status) for each retried call

    def attach(self, client) -> "RetryLog":
        client.meta.events.register("after-call.s3", self._after_call)
        return self

    @classmethod
    def of_task(cls, client) -> "RetryLog | None":
        """A new log attached to a task's client; None for a fake client without botocore's events."""
        return cls().attach(client) if hasattr(client, "meta") else None

    def detach(self, client) -> None:
        client.meta.events.unregister("after-call.s3", self._after_call)

    def _after_call(self, http_response=None, parsed=None, model=None, **_):
        retries = (parsed or {}).get("ResponseMetadata", {}).get("RetryAttempts", 0)
        with self._lock:
            self.calls += 1
        if retries:
            with self._lock:
                self.by_operation[model.name] += retries
            if self._on_retry is not None:
                self._on_retry(model.name, retries, getattr(http_response, "status_code", None))

    @property
    def total(self) -> int:
        return sum(self.by_operation.values())


def add_s3_options(parser, writes: str) -> None:
    """The S3 client's options, the same for every command that talks to S3 (``writes``: what
    the command writes, for --sse-kms-key-id's help); ``settings_from_args`` reads them."""
    import os

    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--region", default=None, help="AWS region (default: boto3's own resolution)")
    parser.add_argument("--s3-max-attempts", type=int, default=S3Settings.max_attempts,
                        help="attempts per S3 call, with botocore's backoff (throttling, 5xx, resets)")
    parser.add_argument("--sse-kms-key-id", default=None,
                        help=f"encrypt {writes} with this KMS key (default: SSE-S3, AES256)")


def settings_from_args(args) -> S3Settings:
    """The S3Settings of ``add_s3_options``' options; ValueError on attempts below 1."""
    if args.s3_max_attempts < 1:
        raise ValueError(f"--s3-max-attempts must be >= 1, got {args.s3_max_attempts}")
    return S3Settings(endpoint_url=args.endpoint_url or None, region=args.region, max_attempts=args.s3_max_attempts,
                      sse_kms_key_id=args.sse_kms_key_id)


def put_bytes(client, settings: S3Settings, bucket: str, key: str, body: bytes,
              content_type: str = "application/octet-stream") -> None:
    client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type,
                      **settings.encryption_args())


def list_objects(client, bucket: str, prefix: str, page_size: int = 1000, delimiter: str | None = None,
                 start_after: str | None = None):
    """Yield ListObjectsV2's entry (``Key``, ``ETag``, ``Size``, ...) for every object under ``prefix``
    (with ``delimiter``: only those not below a further ``delimiter``, i.e. directly in the folder;
    with ``start_after``: only keys after it, in S3's UTF-8 byte order)."""
    paginator = client.get_paginator("list_objects_v2")
    extra = {} if delimiter is None else {"Delimiter": delimiter}
    if start_after is not None:
        extra["StartAfter"] = start_after
    pages = paginator.paginate(Bucket=bucket, Prefix=prefix,
                               PaginationConfig={"PageSize": page_size}, **extra)
    for page in pages:
        yield from page.get("Contents", ())


def list_keys(client, bucket: str, prefix: str, page_size: int = 1000):
    """Yield every key under ``prefix`` (all pages)."""
    for obj in list_objects(client, bucket, prefix, page_size):
        yield obj["Key"]


def delete_keys(client, bucket: str, keys: list[str]) -> None:
    delete_objects(client, bucket, [{"Key": key} for key in keys])


def delete_objects(client, bucket: str, objects: list[dict]) -> None:
    """Delete ``{"Key": ..., ["VersionId": ...]}`` in batches of 1000 (the DeleteObjects limit);
    fail on any per-object error."""
    for start in range(0, len(objects), 1000):
        batch = objects[start:start + 1000]
        response = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        failed = response.get("Errors") or []
        if failed:
            first = failed[0]
            raise JobError(f"could not delete s3://{bucket}/{first.get('Key')}: "
                           f"{first.get('Code')} {first.get('Message')}")


def describe_s3_error(exc: Exception, what: str) -> str:
    """One line for a boto3/botocore failure while doing ``what``."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return (f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                f"AWS_PROFILE, or run with an instance profile)")
    if isinstance(exc, EndpointConnectionError):
        return f"{what}: cannot reach the S3 endpoint ({exc})"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "?")
        bucket = error.get("BucketName")
        if code == "NoSuchBucket":
            return f"{what}: bucket {bucket!r} does not exist" if bucket else f"{what}: bucket does not exist"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"{what}: access denied ({code}); check the credentials and the IAM policy"
        return f"{what}: S3 error {code}: {error.get('Message', exc)}"
    return f"{what}: {type(exc).__name__}: {exc}"
