"""The client and dialect layer of the Elasticsearch / OpenSearch backend.

One pooled ``AsyncElasticsearch`` client (elasticsearch-py 8.x, which speaks to
Elasticsearch 8 and 9) serves both products, behind a small dialect layer:

* Requests are sent as plain ``application/json`` / ``application/x-ndjson``.
  The official client asks for ``application/vnd.elasticsearch+json;
  compatible-with=8``, which OpenSearch (and the osmem test server) refuse
  with 406; Elasticsearch accepts both, so plain JSON works everywhere.
  Client-level ``headers=`` cannot do this (the client sets the media type
  again per request), hence a node class that rewrites it just before sending.
* The official client refuses any server that does not send
  ``X-Elastic-Product: Elasticsearch`` (real OpenSearch does not). Ferry does
  its own check instead: the root endpoint (``GET /``) says which product
  answers, and anything that is neither is refused with a clear message.
* :class:`Dialect` holds what differs between the products: the point-in-time
  endpoints (Elasticsearch ``POST /<index>/_pit``, OpenSearch
  ``POST /<index>/_search/point_in_time``).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from elastic_transport import AiohttpHttpNode, ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout, TransportError
from elasticsearch import AsyncElasticsearch
from elasticsearch import exceptions as es_exceptions

from .errors import ConfigurationError, FerryError, PermanentBackendError, TransientBackendError

ELASTICSEARCH = "elasticsearch"
OPENSEARCH = "opensearch"

_PLAIN = {"json": "application/json", "x-ndjson": "application/x-ndjson"}


def _plain_media_type(value: str | None) -> str | None:
    """``application/vnd.elasticsearch+json; compatible-with=8`` -> ``application/json``."""
    if not value or "vnd.elasticsearch+" not in value:
        return value
    subtype = value.split("vnd.elasticsearch+", 1)[1].split(";", 1)[0].strip()
    return _PLAIN.get(subtype, f"application/{subtype}")


class PlainJsonNode(AiohttpHttpNode):
    """An aiohttp node that sends plain JSON / NDJSON media types.

    OpenSearch answers 406 to the official client's vendor media type; this
    node turns ``Accept`` and ``Content-Type`` back into the plain types just
    before a request leaves (the client sets them again on every request).
    """

    async def perform_request(self, method, target, body=None, headers=None, request_timeout=None, **kwargs):  # type: ignore[override]
        if headers is not None:
            headers = headers.copy()
            for name in ("accept", "content-type"):
                if name in headers:
                    headers[name] = _plain_media_type(headers[name])
        if request_timeout is None:
            return await super().perform_request(method, target, body=body, headers=headers, **kwargs)
        return await super().perform_request(
            method, target, body=body, headers=headers, request_timeout=request_timeout, **kwargs
        )


class DialectClient(AsyncElasticsearch):
    """``AsyncElasticsearch`` without the built-in product check.

    Ferry identifies the product itself from the root endpoint (see
    :func:`detect_dialect`) so that OpenSearch, which never sends
    ``X-Elastic-Product``, is served by the same client. ``options()`` copies
    keep this class, so helpers that call it are covered too.
    """

    @property  # type: ignore[override]
    def _verified_elasticsearch(self) -> bool:
        return True

    @_verified_elasticsearch.setter
    def _verified_elasticsearch(self, value: bool) -> None:
        pass


@dataclass(frozen=True)
class Dialect:
    """What differs between Elasticsearch and OpenSearch, detected from ``GET /``."""

    product: str
    version: str

    @property
    def major(self) -> int:
        try:
            return int(self.version.split(".", 1)[0])
        except ValueError:
            return 0

    @property
    def label(self) -> str:
        name = "OpenSearch" if self.product == OPENSEARCH else "Elasticsearch"
        return f"{name} {self.version}"

    async def open_pit(self, client: AsyncElasticsearch, index: str, keep_alive: str) -> str:
        """Open a point in time on ``index``; returns its id."""
        if self.product == OPENSEARCH:
            response = await client.perform_request(
                "POST",
                f"/{_quote(index)}/_search/point_in_time",
                params={"keep_alive": keep_alive},
                headers={"accept": "application/json"},
            )
            return response.body["pit_id"]
        response = await client.open_point_in_time(index=index, keep_alive=keep_alive)
        return response.body["id"]

    async def close_pit(self, client: AsyncElasticsearch, pit_id: str) -> None:
        """Close a point in time (best effort: it expires on its own anyway)."""
        if self.product == OPENSEARCH:
            await client.perform_request(
                "DELETE",
                "/_search/point_in_time",
                body={"pit_id": [pit_id]},
                headers={"accept": "application/json", "content-type": "application/json"},
            )
        else:
            await client.close_point_in_time(id=pit_id)


def _quote(index: str) -> str:
    from urllib.parse import quote

    return quote(index, safe=",*")


async def detect_dialect(client: AsyncElasticsearch, where: str) -> Dialect:
    """Ask the root endpoint which product answers; refuse anything else."""
    response = await client.perform_request("GET", "/", headers={"accept": "application/json"})
    body = response.body if isinstance(response.body, dict) else {}
    version = body.get("version") or {}
    number = str(version.get("number", "0"))
    if version.get("distribution") == OPENSEARCH or "opensearch" in str(body.get("tagline", "")).lower():
        return Dialect(OPENSEARCH, number)
    if response.meta.headers.get("x-elastic-product", "") == "Elasticsearch" or body.get("tagline") == "You Know, for Search":
        return Dialect(ELASTICSEARCH, number)
    raise ConfigurationError(
        f"the server at {where} is neither Elasticsearch nor OpenSearch (its root endpoint says "
        f"{str(body)[:200]!r}); check `hosts`"
    )


def translate_error(exc: BaseException, *, where: str, index: str | None = None) -> FerryError:
    """Map a client error to Ferry's error types, with a message saying what to do."""
    what = f"index {index!r} on {where}" if index else where
    if isinstance(exc, FerryError):
        return exc
    if isinstance(exc, (ConnectionTimeout,)):
        return TransientBackendError(
            f"request to {what} timed out: {exc}; raise `request_timeout_seconds` or check the cluster's load"
        )
    refused = _certificate_failure(exc)
    if refused is not None:  # a setting to fix, not a hiccup: retrying cannot help
        return ConfigurationError(
            f"the TLS certificate of {where} could not be verified ({refused}): set `ca_certs` to the CA file "
            "that signed the cluster's certificate and use a host name the certificate names "
            "(`verify_certs: false` skips the check; not for production)"
        )
    if isinstance(exc, TransportConnectionError):
        return TransientBackendError(
            f"cannot reach {where}: {exc}; check `hosts` (or `cloud_id`) and that the cluster is running"
        )
    if isinstance(exc, es_exceptions.AuthenticationException):
        return PermanentBackendError(
            f"{where} refused the credentials (401): check `api_key` or `username`/`password`"
        )
    if isinstance(exc, es_exceptions.AuthorizationException):
        return PermanentBackendError(
            f"{where} refused the request on {what} (403 {_reason(exc)}): grant the user the index privileges"
        )
    if isinstance(exc, es_exceptions.NotFoundError):
        return ConfigurationError(f"{what} does not exist ({_reason(exc)}); check the dataset name")
    if isinstance(exc, es_exceptions.ApiError):
        status = exc.meta.status if exc.meta is not None else None
        if status in (429, 502, 503, 504):
            return TransientBackendError(f"{what} is overloaded ({status} {_reason(exc)}); the partition is retried")
        return PermanentBackendError(f"{what} refused the request ({status} {_reason(exc)})")
    if isinstance(exc, TransportError):
        return TransientBackendError(f"transport error talking to {what}: {exc}")
    return PermanentBackendError(f"unexpected error talking to {what}: {exc!r}")


def _certificate_failure(exc: BaseException) -> str | None:
    """Why the server's certificate was refused, when that is what ``exc`` is (else None).

    The transport wraps the ssl error in its ``TlsError`` (``errors``), and
    aiohttp in its own certificate error (``certificate_error``).
    """
    pending: list[Any] = [exc]
    for _ in range(20):  # the chains are short; never loop on a cyclic one
        if not pending:
            return None
        error = pending.pop()
        if isinstance(error, ssl.SSLCertVerificationError):
            cause = getattr(error, "certificate_error", error)
            return getattr(cause, "verify_message", None) or str(cause)
        pending.extend(e for e in getattr(error, "errors", ()) or () if isinstance(e, BaseException))
    return None


def _reason(exc: Any) -> str:
    """The most specific reason an API error carries (root cause first)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            causes = error.get("root_cause") or []
            first = causes[0] if causes and isinstance(causes[0], dict) else error
            return f"{first.get('type', 'error')}: {first.get('reason', '')}".strip()
        if error:
            return str(error)
    return str(getattr(exc, "message", exc))
