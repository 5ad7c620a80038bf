"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto's server), for tests.

    with FaultyProxy("http://127.0.0.1:5000", seed=1) as proxy:
        proxy.add_rule("slowdown", method="GET", path=r"^/bucket/in/", probability=0.25)
        ... point a client (or driver.py --endpoint-url) at proxy.url ...
        assert proxy.fired_by_action["slowdown"] > 0

Every request is forwarded as it came (method, path and query, headers, body) to the upstream
server and its answer relayed, unless a rule fires. Rules are tried in the order they were
added; the first one that matches the request and fires decides the answer:

    "slowdown"  503 SlowDown            (throttling: botocore retries it)
    "500"       500 InternalError       (transient: botocore retries it)
    "denied"    403 AccessDenied        (not retried)
    "bad-key"   403 InvalidAccessKeyId  (not retried)
    "drop"      the connection is closed without any response (botocore retries it)

``proxy.add_latency(seconds, method=..., path=...)`` delays the forwarded requests that match (a
slow store, for runs that must last long enough to be watched).

A faulted request never reaches the upstream server, so a retried PUT is not applied twice.
Probabilities draw from one seeded ``random.Random`` (under a lock), so a single-threaded
client sees the same faults on every run; with concurrent clients the order of the draws, and
so which requests fail, can vary, hence ``count`` and ``per_path`` to bound the faults.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# action -> (HTTP status, reason phrase, S3 error code, message); "drop" has no response.
ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError",
            "We encountered an internal error. Please try again."),
    "denied": (403, "Forbidden", "AccessDenied", "Access Denied"),
    "bad-key": (403, "Forbidden", "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records."),
}
ACTIONS = tuple(ERRORS) + ("drop",)

# Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded; Content-Length is recomputed.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
               "upgrade", "expect", "content-length"}


def error_body(code: str, message: str, request_id: str = "faulty-s3-proxy") -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?>'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{request_id}</RequestId></Error>").encode("utf-8")


@dataclass
class Rule:
    """Which requests a fault applies to, how often and how many times."""

    action: str
    method: str | None = None          # e.g. "GET"; None: any method
    path: str | None = None            # regex searched in the decoded path + query; None: any
    probability: float = 1.0
    count: int | None = None           # fire at most this many times in all; None: no limit
    per_path: int | None = None        # fire at most this many times per (method, path + query)
    fired: int = 0
    fired_per_path: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; expected one of {ACTIONS}")
        if not 0 <= self.probability <= 1:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        self.method = self.method.upper() if self.method else None
        self._regex = re.compile(self.path) if self.path is not None else None

    def matches(self, method: str, target: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self._regex is not None and not self._regex.search(target):
            return False
        if self.count is not None and self.fired >= self.count:
            return False
        if self.per_path is not None and self.fired_per_path[(method, target)] >= self.per_path:
            return False
        return True


class FaultyProxy:
    """The proxy server, run in a background thread; a context manager that stops it cleanly."""

    def __init__(self, upstream: str, *, seed: int = 0, host: str = "127.0.0.1", port: int = 0,
                 upstream_timeout: float = 60.0):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_timeout = upstream_timeout
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._latency: list[tuple[float, str | None, re.Pattern | None]] = []
        self.fired_by_action: Counter = Counter()
        self.fired_by_request: Counter = Counter()     # (method, path + query) -> faults
        self.fired_by_rule_action_request: Counter = Counter()  # (action, method, path + query) -> faults
        self.requests: list[tuple[str, str, str | int]] = []  # (method, path + query, status or action)
        self._server = _Server((host, port), _Handler)
        self._server.proxy = self
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultyProxy":
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                            name="faulty-s3-proxy", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.close_open_connections()
        self._server.server_close()

    def __enter__(self) -> "FaultyProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- rules ----------------------------------------------------------------------------

    def add_rule(self, action: str, *, method: str | None = None, path: str | None = None,
                 probability: float = 1.0, count: int | None = None, per_path: int | None = None) -> Rule:
        rule = Rule(action, method=method, path=path, probability=probability, count=count, per_path=per_path)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()
            self._latency.clear()

    def add_latency(self, seconds: float, *, method: str | None = None, path: str | None = None) -> None:
        """Every forwarded request matching ``method`` and the ``path`` regex waits ``seconds`` first."""
        with self._lock:
            self._latency.append((seconds, method.upper() if method else None,
                                  re.compile(path) if path is not None else None))

    def latency(self, method: str, target: str) -> float:
        with self._lock:
            return sum(seconds for seconds, m, regex in self._latency
                       if (m is None or m == method) and (regex is None or regex.search(target)))

    def reset_counts(self) -> None:
        with self._lock:
            self.fired_by_action.clear()
            self.fired_by_request.clear()
            self.fired_by_rule_action_request.clear()
            self.requests.clear()

    def faults(self, action: str | None = None, method: str | None = None, path: str | None = None) -> int:
        """How many faults fired, optionally only of ``action``, ``method`` and a path regex."""
        regex = re.compile(path) if path is not None else None
        with self._lock:
            return sum(n for (a, m, target), n in self.fired_by_rule_action_request.items()
                       if (action is None or a == action) and (method is None or m == method)
                       and (regex is None or regex.search(target)))

    def seen(self, method: str | None = None, path: str | None = None) -> list[tuple[str, str, str | int]]:
        """The requests received so far (faulted or forwarded) matching ``method`` and a path regex."""
        regex = re.compile(path) if path is not None else None
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r[0] == method) and (regex is None or regex.search(r[1]))]

    def decide(self, method: str, target: str) -> str | None:
        """The action of the first rule that matches and fires, or None (forward the request)."""
        with self._lock:
            for rule in self._rules:
                if not rule.matches(method, target):
                    continue
                if rule.probability < 1 and self._random.random() >= rule.probability:
                    continue
                rule.fired += 1
                rule.fired_per_path[(method, target)] += 1
                self.fired_by_action[rule.action] += 1
                self.fired_by_request[(method, target)] += 1
                self.fired_by_rule_action_request[(rule.action, method, target)] += 1
                self.requests.append((method, target, rule.action))
                return rule.action
        return None

    def _record(self, method: str, target: str, status: int | str) -> None:
        with self._lock:
            self.requests.append((method, target, status))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False      # keep-alive connections may idle in their threads; don't wait on them
    allow_reuse_address = True
    proxy: FaultyProxy

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_open_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
            self._connections.clear()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def handle_error(self, request, client_address):
        pass  # a client that went away is not the test's business


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, like S3; every response carries Content-Length
    timeout = 120                   # an idle keep-alive connection ends after this
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (ConnectionError, socket.timeout):
            self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _proxy(self):
        proxy = self.server.proxy
        method = self.command
        body = self._read_body()
        target = unquote(self.path)
        action = proxy.decide(method, target)
        if action == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if action is not None:
            status, reason, code, message = ERRORS[action]
            payload = error_body(code, message)
            self.send_response(status, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("x-amz-request-id", "faulty-s3-proxy")
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)
            return
        delay = proxy.latency(method, target)
        if delay:
            time.sleep(delay)
        self._forward(proxy, method, target, body)

    def _forward(self, proxy: FaultyProxy, method: str, target: str, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or method in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                              timeout=proxy.upstream_timeout)
        try:
            upstream.request(method, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            response_headers = response.getheaders()
            status, reason = response.status, response.reason
        except (OSError, http.client.HTTPException):
            proxy._record(method, target, "upstream-failed")
            self.close_connection = True  # the client sees a dropped connection and retries
            return
        finally:
            upstream.close()
        proxy._record(method, target, status)
        self.send_response(status, reason)
        upstream_length = None
        for name, value in response_headers:
            lower = name.lower()
            if lower == "content-length":
                upstream_length = value
            if lower in _HOP_BY_HOP or lower in ("server", "date"):
                continue
            self.send_header(name, value)
        if method == "HEAD":
            # No body; the Content-Length a HEAD answer carries is the object's size.
            if upstream_length is not None:
                self.send_header("Content-Length", upstream_length)
            self.end_headers()
            return
        no_body = status in (204, 304) or 100 <= status < 200
        if not no_body:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload and not no_body:
            self.wfile.write(payload)

    # BaseHTTPRequestHandler dispatches to do_<METHOD>: every method S3 uses goes through _proxy.
    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _proxy
