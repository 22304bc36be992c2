"""A tiny HTTP server that answers like real OpenSearch, in front of the osmem test server.

Real OpenSearch differs from the osmem test server in two ways that matter
to the client layer, and this stub restores both:

* it never sends ``X-Elastic-Product: Elasticsearch`` (the official client's
  product check refuses such a server);
* it answers 406 to the official client's vendor media type
  (``application/vnd.elasticsearch+json; compatible-with=N``) in ``Accept``
  or ``Content-Type``.

Everything else is forwarded to the osmem server, so a whole backend round
trip can run through it. With ``flavor="elasticsearch"`` it answers like
Elasticsearch 8 instead (root endpoint, product header, only the ``_pit``
point-in-time endpoints), to exercise the other dialect. Gzip-compressed
request bodies (``Content-Encoding: gzip``, which the client sends when it
connects by ``cloud_id``) are accepted, as real servers do. ``opensearch_stub`` (session-scoped) yields the
stub's URL; it listens on 127.0.0.1 and a free port and is shut down at the
end of the session.
"""

from __future__ import annotations

import gzip
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
    #: When set, the ``Authorization`` header every request must carry (401 otherwise).
    authorization: str | None = None
    #: How many upcoming bulk responses mark every second item 429 (cluster busy).
    busy_bulk_responses: int = 0
    #: Document ids of every bulk request forwarded, one list per request.
    bulk_ids: list[list[str]] = []
    #: "opensearch" (default), or "elasticsearch": answer like Elasticsearch 8 instead (root
    #: endpoint, product header, vendor media type accepted, only the ``_pit`` endpoints).
    flavor: str = "opensearch"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        compressed = bool(body) and self.headers.get("Content-Encoding", "").lower() == "gzip"
        if compressed:
            body = gzip.decompress(body)
        accept = self.headers.get("Accept", "")
        content_type = self.headers.get("Content-Type", "")
        type(self).seen.append((self.command, self.path, accept, content_type))
        if self.authorization is not None and self.headers.get("Authorization") != self.authorization:
            payload = json.dumps(
                {"error": {"type": "security_exception", "reason": "authentication failed"}, "status": 401}
            ).encode()
            self._reply(401, {"Content-Type": "application/json; charset=UTF-8"}, payload)
            return
        method, path = self.command, self.path
        bare = path.split("?")[0]
        if self.flavor == "elasticsearch":
            if bare.endswith("/_search/point_in_time"):
                self._reply(404, {"Content-Type": "application/json"}, b'{"error":"no handler","status":404}')
                return
            # Elasticsearch's point-in-time API, served by the upstream's OpenSearch one.
            if method == "POST" and bare.endswith("/_pit"):
                path = path.replace("/_pit", "/_search/point_in_time", 1)
            elif method == "DELETE" and bare == "/_pit":
                path, body = "/_search/point_in_time", json.dumps({"pit_id": [json.loads(body)["id"]]}).encode()
        elif "vnd.elasticsearch" in accept or "vnd.elasticsearch" in content_type:
            payload = json.dumps(
                {"error": f"Content-Type header [{content_type or accept}] is not supported", "status": 406}
            ).encode()
            self._reply(406, {"Content-Type": "application/json; charset=UTF-8"}, payload)
            return
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            dropped = ("host", "connection") + (("content-encoding", "content-length") if compressed else ())
            headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
            for name in ("Accept", "Content-Type"):  # the upstream refuses the vendor media type
                if "vnd.elasticsearch+" in headers.get(name, ""):
                    headers[name] = headers[name].replace("vnd.elasticsearch+", "").split(";")[0]
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            passed = {k: v for k, v in response.getheaders() if k.lower() not in _DROPPED}
            if bare.endswith("/_bulk") and body:
                payload = self._bulk(body, payload)
            if self.flavor == "elasticsearch":
                passed["X-Elastic-Product"] = "Elasticsearch"
                payload = self._as_elasticsearch(method, bare, payload)
            self._reply(response.status, passed, payload)
        finally:
            connection.close()

    def _as_elasticsearch(self, method: str, bare: str, payload: bytes) -> bytes:
        if method == "GET" and bare == "/":
            body = json.loads(payload)
            body["version"] = {"number": "8.19.0", "build_flavor": "default"}
            body["tagline"] = "You Know, for Search"
            return json.dumps(body).encode()
        if method == "POST" and bare.endswith("/_pit"):
            body = json.loads(payload)
            return json.dumps({"id": body["pit_id"]}).encode()
        return payload

    def _bulk(self, body: bytes, payload: bytes) -> bytes:
        """Record the ids of a bulk request; while busy, mark every second item 429 (as a busy cluster does)."""
        actions = [json.loads(line) for line in body.splitlines() if line.strip()]
        ids = [next(iter(a.values())).get("_id") for a in actions if set(a) & {"index", "create", "delete", "update"}]
        type(self).bulk_ids.append(ids)
        if type(self).busy_bulk_responses <= 0:
            return payload
        type(self).busy_bulk_responses -= 1
        result = json.loads(payload)
        for item in result["items"][1::2]:
            outcome = next(iter(item.values()))
            outcome.update(
                status=429,
                error={"type": "es_rejected_execution_exception", "reason": "rejected execution (queue full)"},
            )
        result["errors"] = True
        return json.dumps(result).encode()

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

    def __init__(self, upstream_url: str, *, flavor: str = "opensearch") -> None:
        parts = urlsplit(upstream_url)
        handler = type(
            "StubHandler",
            (_Handler,),
            {"upstream": (parts.hostname, parts.port), "seen": [], "bulk_ids": [], "flavor": flavor},
        )
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
