"""The Elasticsearch block's connection settings against real local HTTPS and auth-checking servers.

``ca_certs``, ``verify_certs``, ``api_key``, ``username``/``password`` and
``cloud_id`` only matter against a cluster with TLS and security on. Here:

* a CA and a server certificate for 127.0.0.1 are generated per test module
  (``cryptography``), plus a second, unrelated CA;
* :class:`TlsForwarder` terminates TLS with that certificate on 127.0.0.1
  and a free port and forwards the plain bytes to an upstream server: the
  osmem test server, or the OpenSearch-like stub
  (``tests/integration/opensearch_stub.py``) set to answer 401 unless the
  ``Authorization`` header is the expected one;
* a cloud id whose host part decodes to ``127.0.0.1:<forwarder port>``
  points the client at the forwarder, so ``cloud_id`` is followed by a real
  request too.

Every test drives Ferry's backend block itself (connect, write, read back).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import ssl
import threading
import traceback
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pytest
from elastic_transport import SecurityWarning

from ferry.backends import get_pool_count
from ferry.backends.elasticsearch import ElasticsearchBackend, OpenSearchBackend
from ferry.backends.errors import ConfigurationError, PermanentBackendError
from tests.integration.es_server import es_server, wipe  # noqa: F401
from tests.integration.opensearch_stub import OpenSearchStub
from tests.integration.test_contract import _read_all, _sorted_rows, _write

pytestmark = pytest.mark.integration

API_KEY = "Zm9vYmFyOnRoZS1hcGkta2V5LXNlY3JldA=="  # base64 of "foobar:the-api-key-secret", the form Elastic issues
WRONG_API_KEY = "d3Jvbmc6bm90LXRoZS1rZXktYXQtYWxs"  # base64 of "wrong:not-the-key-at-all"
PASSWORD = "s3cret-passw0rd"
WRONG_PASSWORD = "not-the-passw0rd"


# -- certificates -----------------------------------------------------------------------------


def _make_ca(name: str):
    """A self-signed CA: (key, certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(ca_key, ca_cert):
    """A server certificate for the address 127.0.0.1 only (not ``localhost``), signed by the CA: (key, certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


class Certificates:
    """Paths of the generated PEM files: ``ca``, ``other_ca``, ``server_cert``, ``server_key``."""

    def __init__(self, folder: Path) -> None:
        from cryptography.hazmat.primitives import serialization

        ca_key, ca_cert = _make_ca("Ferry test CA")
        _, other_ca_cert = _make_ca("Unrelated test CA")
        server_key, server_cert = _make_server_cert(ca_key, ca_cert)
        pem = serialization.Encoding.PEM
        self.ca = folder / "ca.pem"
        self.ca.write_bytes(ca_cert.public_bytes(pem))
        self.other_ca = folder / "other-ca.pem"
        self.other_ca.write_bytes(other_ca_cert.public_bytes(pem))
        self.server_cert = folder / "server.pem"
        self.server_cert.write_bytes(server_cert.public_bytes(pem))
        self.server_key = folder / "server-key.pem"
        self.server_key.write_bytes(
            server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )


# -- the TLS forwarder ------------------------------------------------------------------------


class TlsForwarder:
    """Terminates TLS on 127.0.0.1 and a free port and forwards the plain bytes to ``upstream_url``.

    Runs its own event loop in a thread (asyncio's TLS keeps each connection
    on one thread, which OpenSSL needs). ``handshakes`` counts completed TLS
    handshakes, so a test can tell that its requests really went through TLS
    (and that a refused certificate let none through).
    """

    def __init__(self, upstream_url: str, certfile: Path, keyfile: Path) -> None:
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certfile, keyfile)
        self.handshakes = 0
        self.loop = asyncio.new_event_loop()
        # A client that refuses the certificate aborts the handshake; that is expected here.
        self.loop.set_exception_handler(lambda loop, context: None)
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), name="tls-forwarder", daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise RuntimeError("the TLS forwarder did not start within 10s")

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context, ssl_handshake_timeout=10)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()
        self.server.close()
        self.loop.run_until_complete(self.server.wait_closed())
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1  # start_server calls back only after a completed handshake
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer), return_exceptions=True
        )

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    finally:
        writer.close()


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def es(es_server):  # noqa: F811
    wipe(es_server)
    return es_server


@pytest.fixture
def tls(es, certs) -> Iterator[TlsForwarder]:
    """HTTPS in front of the (wiped) osmem test server."""
    forwarder = TlsForwarder(es, certs.server_cert, certs.server_key)
    try:
        yield forwarder
    finally:
        forwarder.close()


@pytest.fixture
def secured(es, certs) -> Iterator[tuple[TlsForwarder, OpenSearchStub]]:
    """HTTPS in front of an OpenSearch-like stub that checks ``Authorization`` (set by the test)."""
    stub = OpenSearchStub(es)
    forwarder = TlsForwarder(stub.url, certs.server_cert, certs.server_key)
    try:
        yield forwarder, stub
    finally:
        forwarder.close()
        stub.close()


def _table() -> pa.Table:
    return pa.table(
        {
            "id": pa.array([1, 2, 3, 4], pa.int64()),
            "name": pa.array(["ada", "grace", None, "edsger"], pa.string()),
        }
    )


async def _round_trip(backend: ElasticsearchBackend, dataset: str) -> pa.Table:
    async with backend:
        await _write(backend, dataset, _table(), key=("id",))
        return await _read_all(backend, dataset, hint=2)


def _connect(backend: ElasticsearchBackend) -> BaseException:
    """Open ``backend`` and return the error it raises (failing the test if it connects)."""

    async def scenario():
        async with backend:
            pass

    with pytest.raises(Exception) as caught:
        asyncio.run(scenario())
    assert get_pool_count() == 0
    return caught.value


def _full_text(error: BaseException) -> str:
    """The error with its whole cause chain, as a traceback would print it."""
    return "".join(traceback.format_exception(error))


# -- TLS: ca_certs, verify_certs ---------------------------------------------------------------


def test_ca_certs_verifies_the_server_and_a_round_trip_passes_over_tls(tls, certs):
    backend = ElasticsearchBackend(hosts=[tls.url], ca_certs=str(certs.ca))
    back = asyncio.run(_round_trip(backend, "tls-rows"))
    assert _sorted_rows(back) == _sorted_rows(_table())
    assert tls.handshakes >= 1


def test_without_ca_certs_the_certificate_failure_names_the_host_and_the_setting(tls):
    started = tls.handshakes
    error = _connect(ElasticsearchBackend(hosts=[tls.url]))
    message = str(error)
    assert isinstance(error, ConfigurationError), _full_text(error)
    assert tls.url in message and "certificate" in message and "`ca_certs`" in message
    assert tls.handshakes == started  # no request got through


def test_ca_certs_of_another_ca_is_refused_too(tls, certs):
    """The CA file is what decides: an unrelated CA fails the same way."""
    error = _connect(ElasticsearchBackend(hosts=[tls.url], ca_certs=str(certs.other_ca)))
    assert isinstance(error, ConfigurationError) and "`ca_certs`" in str(error)


def test_a_host_name_the_certificate_does_not_name_is_refused(tls, certs):
    """The certificate names only 127.0.0.1: the same server as ``localhost`` fails verification."""
    url = f"https://localhost:{tls.port}"
    error = _connect(ElasticsearchBackend(hosts=[url], ca_certs=str(certs.ca)))
    assert isinstance(error, ConfigurationError) and url in str(error) and "certificate" in str(error)


def test_verify_certs_false_connects_without_the_ca_and_warns(tls):
    with pytest.warns(SecurityWarning, match="verify_certs=False is insecure"):
        back = asyncio.run(_round_trip(ElasticsearchBackend(hosts=[tls.url], verify_certs=False), "unverified"))
    assert _sorted_rows(back) == _sorted_rows(_table())
    assert tls.handshakes >= 1


# -- authentication: api_key, username/password ------------------------------------------------


def test_api_key_is_sent_as_the_apikey_header_and_a_wrong_one_is_a_clear_401(secured, certs):
    forwarder, stub = secured
    stub.handler.authorization = f"ApiKey {API_KEY}"

    back = asyncio.run(_round_trip(OpenSearchBackend(hosts=[forwarder.url], ca_certs=str(certs.ca), api_key=API_KEY), "keyed"))
    assert _sorted_rows(back) == _sorted_rows(_table())

    error = _connect(OpenSearchBackend(hosts=[forwarder.url], ca_certs=str(certs.ca), api_key=WRONG_API_KEY))
    assert isinstance(error, PermanentBackendError)
    assert "refused the credentials (401): check `api_key`" in str(error) and forwarder.url in str(error)
    text = _full_text(error)
    assert WRONG_API_KEY not in text and API_KEY not in text


def test_basic_auth_over_tls_and_a_wrong_password_is_a_clear_401(secured, certs):
    forwarder, stub = secured
    stub.handler.authorization = "Basic " + base64.b64encode(f"ferry:{PASSWORD}".encode()).decode()

    def block(password: str) -> OpenSearchBackend:
        return OpenSearchBackend(hosts=[forwarder.url], ca_certs=str(certs.ca), username="ferry", password=password)

    back = asyncio.run(_round_trip(block(PASSWORD), "basic"))
    assert _sorted_rows(back) == _sorted_rows(_table())

    error = _connect(block(WRONG_PASSWORD))
    assert isinstance(error, PermanentBackendError) and "401" in str(error) and "`username`/`password`" in str(error)
    text = _full_text(error)
    assert WRONG_PASSWORD not in text and PASSWORD not in text
    assert base64.b64encode(f"ferry:{WRONG_PASSWORD}".encode()).decode() not in text


def test_no_credentials_against_a_secured_server_is_the_401_error(secured, certs):
    forwarder, stub = secured
    stub.handler.authorization = f"ApiKey {API_KEY}"
    error = _connect(OpenSearchBackend(hosts=[forwarder.url], ca_certs=str(certs.ca)))
    assert isinstance(error, PermanentBackendError) and "401" in str(error)


# -- cloud_id ---------------------------------------------------------------------------------


def _cloud_id(name: str, port: int) -> str:
    """A cloud id the client decodes to https://127.0.0.1:<port>.

    The client joins ``<es uuid>.<host>`` and takes an explicit ``:port`` from
    the host part; with ``127`` as the uuid and ``0.0.1:<port>`` as the host,
    the Elasticsearch address is 127.0.0.1 on the forwarder's port.
    """
    return f"{name}:" + base64.b64encode(f"0.0.1:{port}$127$kibana".encode()).decode()


def test_cloud_id_targets_the_decoded_https_address_with_the_api_key(secured, certs):
    forwarder, stub = secured
    stub.handler.authorization = f"ApiKey {API_KEY}"
    cloud_id = _cloud_id("ferry-test", forwarder.port)
    backend = ElasticsearchBackend(cloud_id=cloud_id, api_key=API_KEY, ca_certs=str(certs.ca))
    assert backend.where == "cloud ferry-test"

    async def scenario():
        async with backend:
            nodes = [node.base_url for node in backend._conn().client.transport.node_pool.all()]
            await _write(backend, "cloud", _table(), key=("id",))
            return nodes, await _read_all(backend, "cloud", hint=2)

    nodes, back = asyncio.run(scenario())
    assert nodes == [forwarder.url]
    assert _sorted_rows(back) == _sorted_rows(_table())
    assert forwarder.handshakes >= 1

    error = _connect(ElasticsearchBackend(cloud_id=cloud_id, api_key=WRONG_API_KEY, ca_certs=str(certs.ca)))
    assert isinstance(error, PermanentBackendError)
    assert "cloud ferry-test refused the credentials (401)" in str(error)
    assert WRONG_API_KEY not in _full_text(error)


def test_cloud_id_without_the_ca_is_the_certificate_error_naming_the_deployment(tls):
    error = _connect(ElasticsearchBackend(cloud_id=_cloud_id("ferry-test", tls.port)))
    assert isinstance(error, ConfigurationError)
    assert "cloud ferry-test" in str(error) and "`ca_certs`" in str(error)
