"""A tiny HTTP server that answers like real OpenSearch, in front of the osmem test server.

Real OpenSearch differs from the osmem test server in two ways that matter
to the client layer, and this stub restores both:

* it never sends ``X-Elastic-Product: Elasticsearch`` (the official client's
  product check refuses such a server);
* it answers 406 to the official client's vendor media type
  (``application/vnd.elasticsearch+json; compatible-with=N``) in ``Accept``
  or ``Content-Type``.

Everything else is forwarded to the osmem server, so a whole backend round
trip can run through it. ``opensearch_stub`` (session-scoped) yields the
stub's URL; it listens on 127.0.0.1 and a free port and is shut down at the
end of the session.
"""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from .es_server import shared_server

#: Response headers never passed on (hop-by-hop, or what real OpenSearch does not send).
_DROPPED = {"x-elastic-product", "connection", "transfer-encoding", "keep-alive", "content-length"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int] = ("127.0.0.1", 0)
    #: Requests seen, as (method, path, accept, content-type), for assertions.
    seen: list[tuple[str, str, str, str]] = []

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        accept = self.headers.get("Accept", "")
        content_type = self.headers.get("Content-Type", "")
        type(self).seen.append((self.command, self.path, accept, content_type))
        if "vnd.elasticsearch" in accept or "vnd.elasticsearch" in content_type:
            payload = json.dumps(
                {"error": f"Content-Type header [{content_type or accept}] is not supported", "status": 406}
            ).encode()
            self._reply(406, {"Content-Type": "application/json; charset=UTF-8"}, payload)
            return
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            passed = {k: v for k, v in response.getheaders() if k.lower() not in _DROPPED}
            self._reply(response.status, passed, payload)
        finally:
            connection.close()

    def _reply(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle


class OpenSearchStub:
    """The stub server: ``url``, ``seen`` requests, ``close()``."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        handler = type("StubHandler", (_Handler,), {"upstream": (parts.hostname, parts.port), "seen": []})
        self.handler = handler
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="opensearch-stub", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def seen(self) -> list[tuple[str, str, str, str]]:
        return self.handler.seen

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def opensearch_stub() -> Iterator[OpenSearchStub]:
    """An OpenSearch-like stub in front of the session's osmem server."""
    stub = OpenSearchStub(shared_server.start())
    try:
        yield stub
    finally:
        stub.close()
