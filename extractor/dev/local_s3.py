"""moto's S3 server on 127.0.0.1, for the demo and the benchmarks: one place that starts it,
makes the bucket and gives the environment a spark-submit of driver.py needs to reach it."""

from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REGION = "eu-west-3"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class LocalS3:
    endpoint: str          # http://127.0.0.1:<port>
    client: object         # a boto3 S3 client on it
    env: dict              # os.environ plus credentials, region, endpoint and PYSPARK_PYTHON

    def create_bucket(self, bucket: str) -> None:
        self.client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})

    def upload(self, bucket: str, prefix: str, images: dict[str, bytes]) -> None:
        for key, body in images.items():
            self.client.put_object(Bucket=bucket, Key=f"{prefix}{key}", Body=body)


def store_in_backend(bucket: str, key: str, body: bytes) -> None:
    """Put an object straight into the backend of a moto server that runs in this process: for
    seeding thousands of objects (PutObject over HTTP goes at ~130/s here, this at ~19,000/s).
    Whatever is measured still lists and reads them over HTTP."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    s3_backends[DEFAULT_ACCOUNT_ID]["aws"].put_object(bucket, key, body)


_PUT_LOCK = threading.Lock()


def atomic_conditional_writes() -> None:
    """Make moto decide each PutObject atomically, as S3 does. moto (5.1.16) checks If-None-Match
    and If-Match, then writes, in two steps, and its server runs each request in a thread of its
    own: two creates of one key that arrive together can both succeed (8 racing lock acquirers
    gave two winners on a loaded 2-core machine). The run lock relies on S3 refusing one of
    them; on moto it is this lock, held around every PutObject, that refuses it. Idempotent;
    for the process (the server's threads and in-process ``mock_aws`` alike)."""
    from moto.s3.responses import S3Response

    original = S3Response.put_object
    if getattr(original, "_atomic", False):
        return

    def put_object(self, *args, **kwargs):
        with _PUT_LOCK:
            return original(self, *args, **kwargs)

    put_object._atomic = True
    S3Response.put_object = put_object


@contextmanager
def moto_server():
    """moto's S3 server on 127.0.0.1 (a free port), deciding each PutObject atomically; yields
    its endpoint ``http://127.0.0.1:<port>`` and stops it on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    atomic_conditional_writes()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextmanager
def local_s3(credential: str = "local"):
    """A running server (stopped on exit) as a ``LocalS3``; nothing leaves the machine."""
    import boto3

    with moto_server() as endpoint:
        env = dict(os.environ, AWS_ACCESS_KEY_ID=credential, AWS_SECRET_ACCESS_KEY=credential,
                   AWS_DEFAULT_REGION=REGION, AWS_ENDPOINT_URL=endpoint, PYSPARK_PYTHON=sys.executable,
                   TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("AWS_PROFILE", None)
        client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=credential,
                              aws_secret_access_key=credential)
        yield LocalS3(endpoint, client, env)


def spark_submit() -> str:
    """The spark-submit beside this interpreter (a venv's pyspark), else the one on PATH."""
    script = Path(sys.executable).parent / "spark-submit"
    return str(script) if script.exists() else "spark-submit"
