"""Key release on its own HTTPS port (`--key-release-port`): which flags fit together, and
what that port answers (key release and the public documents, never metrics or probes)."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter

from gtvp import http_endpoints, operator_main
from gtvp.core.keyrelease import Settings as KeyReleaseSettings
from gtvp_local import pki

URL = "https://10.77.0.1:9444"
CERTS = ["--webhook-cert", "/c/tls.crt", "--webhook-key", "/c/tls.key"]


def _flags(
    *argv: str,
) -> tuple[KeyReleaseSettings | None, operator_main.KeyReleaseServing | None]:
    args = operator_main.parser().parse_args(list(argv))
    serving = operator_main.metrics_serving_from(args)
    return (
        operator_main.key_release_from(args, serving),
        operator_main.key_release_serving_from(args),
    )


def test_its_own_port_serves_key_release_without_secure_metrics() -> None:
    settings, own = _flags("--key-release-url", URL, "--key-release-port", "9444", *CERTS)
    assert settings is not None
    assert settings.url == URL
    assert own == operator_main.KeyReleaseServing(9444, "127.0.0.1", "/c/tls.crt", "/c/tls.key")
    args = operator_main.parser().parse_args(["--key-release-port", "9444", *CERTS])
    assert operator_main.metrics_serving_from(args).secure is False  # metrics stay as they were


def test_its_own_certificate_and_address_are_used_when_given() -> None:
    _, own = _flags(
        "--key-release-url",
        URL,
        "--key-release-port",
        "9444",
        "--key-release-address",
        "10.77.0.1",
        "--key-release-cert",
        "/k/c",
        "--key-release-key",
        "/k/k",
        "--webhook-port",
        "0",
    )
    assert own == operator_main.KeyReleaseServing(9444, "10.77.0.1", "/k/c", "/k/k")


def test_without_a_port_nothing_changes() -> None:
    assert _flags() == (None, None)
    secure = ["--metrics-secure", *CERTS]
    settings, own = _flags(*secure, "--key-release-url", URL)
    assert settings is not None
    assert own is None  # on the secure metrics port, as before


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--key-release-url", URL], "needs --metrics-secure .* or\n?.*--key-release-port"),
        (["--key-release-port", "9444", *CERTS], "needs --key-release-url"),
        (
            ["--key-release-url", URL, "--key-release-port", "9444", "--webhook-port", "0"],
            "needs a serving certificate",
        ),
        (
            ["--key-release-url", URL, "--key-release-port", "9090", *CERTS],
            "also the --metrics-port",
        ),
        (
            ["--key-release-url", URL, "--key-release-port", "9444", "--webhook-port", "9444"],
            "also the --webhook-port",
        ),
        (["--key-release-url", URL, "--key-release-port", "70000", *CERTS], "TCP port"),
        (
            ["--key-release-url", URL, "--key-release-port", "9444", "--key-release-cert", "/c"],
            "go together",
        ),
        (
            ["--metrics-secure", *CERTS, "--key-release-url", URL, "--key-release-cert", "/c"],
            "are for --key-release-port",
        ),
        (["--key-release-url", "http://x:1", "--key-release-port", "9444", *CERTS], "https://"),
    ],
)
def test_flags_that_do_not_fit_stop_the_operator_with_a_clear_error(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=error):
        _flags(*argv)
    assert operator_main.main(argv) == 2
    assert "gtvp-operator: " in capsys.readouterr().err


def _answers_428(_method: str, _body: bytes) -> tuple[int, str, bytes]:
    return 428, "application/json", b'{"member": "a"}'


def _tls_server(
    tmp_path: Path,
    release: http_endpoints.Release = _answers_428,
    box_attest: http_endpoints.BoxAttest | None = None,
) -> tuple[int, ssl.SSLContext]:
    ca = pki.ensure_ca(tmp_path, "test-ca")
    leaf = pki.issue(ca, tmp_path, "kr", common_name="kr", server_ips=("127.0.0.1",))
    registry = CollectorRegistry()
    Counter("gtvp_secret_total", "must not show here", registry=registry).inc()

    def tls() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
        return ctx

    def public(path: str) -> tuple[int, str, bytes] | None:
        if path == "/.well-known/jwks.json":
            return 200, "application/json", b'{"keys": []}'
        return None

    server = http_endpoints.serve(
        0,
        "127.0.0.1",
        registry,
        lambda: http_endpoints.Probe(loaded=True, loop_started=False, loop_idle_seconds=0),
        tls=tls,
        public=public,
        release=release,
        only_public=True,
        box_attest=box_attest,
    )
    client = ssl.create_default_context(cafile=str(ca.cert))
    return int(server.server_port), client


def _open(
    request: urllib.request.Request | str, context: ssl.SSLContext | None = None
) -> http.client.HTTPResponse:
    """urllib on the test's own https:// or http:// URLs only."""
    got: http.client.HTTPResponse = urllib.request.urlopen(request, context=context, timeout=5)  # noqa: S310
    return got


def test_its_port_answers_key_release_and_public_documents_and_nothing_else(
    tmp_path: Path,
) -> None:
    port, client = _tls_server(tmp_path)
    base = f"https://127.0.0.1:{port}"
    with _open(f"{base}/.well-known/jwks.json", client) as r:
        assert json.load(r) == {"keys": []}
    post = urllib.request.Request(  # noqa: S310 (https, the test's own server)
        f"{base}/keyrelease/v1/release", data=b"{}", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as got:
        _open(post, client)
    assert got.value.code == 428
    for path in ("/metrics", "/readyz", "/healthz", "/"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            _open(f"{base}{path}", client)
        assert refused.value.code == 404
        assert b"gtvp_secret_total" not in refused.value.read()
    plain = urllib.request.Request(f"http://127.0.0.1:{port}/.well-known/jwks.json")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _open(plain)  # never answered in plain HTTP


def _trickle(port: int, client: ssl.SSLContext) -> ssl.SSLSocket:
    """A TLS connection that has sent part of a request and goes on slowly."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn = client.wrap_socket(raw, server_hostname="127.0.0.1")
    conn.sendall(b"POST /keyrelease/v1/release HTTP/1.1\r\nHost: x\r\n")
    return conn


def _closed_by_server(conn: socket.socket, within: float) -> bool:
    """Whether the server ends `conn` within `within` s while it sends a byte now and then."""
    end = time.monotonic() + within
    conn.settimeout(0.2)
    while time.monotonic() < end:
        try:
            conn.sendall(b"\0")
            if conn.recv(1) == b"":
                return True
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            return True
    return False


def test_a_slow_client_is_cut_off_and_cannot_take_every_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that trickles a byte at a time (each within the idle timeout) is cut off
    at the connection deadline; one client address holds at most MAX_PER_CLIENT
    connections, so it cannot take every thread: the server still answers."""
    monkeypatch.setattr(http_endpoints, "CONNECTION_DEADLINE", 1.0)
    monkeypatch.setattr(http_endpoints, "MAX_PER_CLIENT", 3)
    port, client = _tls_server(tmp_path)
    slow = _trickle(port, client)
    assert _closed_by_server(slow, within=5.0)
    # the same during the TLS handshake: a record header announcing 16 KiB, then a trickle
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    raw.sendall(b"\x16\x03\x01\x40\x00")
    assert _closed_by_server(raw, within=5.0)
    held = [_trickle(port, client) for _ in range(3)]
    extra = socket.create_connection(("127.0.0.1", port), timeout=5)
    extra.settimeout(2)
    assert extra.recv(1) == b""  # the fourth at once: closed unanswered
    for conn in held:
        conn.close()
    deadline = time.monotonic() + 5  # their threads end, and the server answers again
    while True:
        try:
            with _open(f"https://127.0.0.1:{port}/.well-known/jwks.json", client) as resp:
                assert resp.status == 200
            break
        except (OSError, urllib.error.URLError):
            assert time.monotonic() < deadline
            time.sleep(0.1)


def _tls_by_hand(
    port: int, context: ssl.SSLContext
) -> tuple[socket.socket, ssl.SSLObject, ssl.MemoryBIO]:
    """A TLS client over memory buffers (its socket, its TLS object and the buffer of what
    it has to send): what the server sends stays visible as raw bytes."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            incoming.write(raw.recv(65536))
    raw.sendall(outgoing.read())
    return raw, tls, outgoing


def _records(data: bytes) -> list[int]:
    """The content types of the TLS records `data` holds (AssertionError on bytes that are
    not TLS records: an answer written in clear)."""
    types = []
    while data:
        assert len(data) >= 5, data
        assert data[0] in (20, 21, 22, 23), f"not a TLS record: {data[:40]!r}"
        length = int.from_bytes(data[3:5], "big")
        types.append(data[0])
        data = data[5 + length :]
    return types


def test_a_request_cut_off_at_its_deadline_is_never_served_nor_answered_in_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key-release request whose body is still arriving at the connection's deadline is
    cut off: the release handler never sees it (no credential is consumed for an answer
    that cannot be sent), and every byte the server sends after the cut is a TLS record,
    never an answer in clear."""
    monkeypatch.setattr(http_endpoints, "CONNECTION_DEADLINE", 1.0)
    served: list[bytes] = []

    def release(_method: str, body: bytes) -> tuple[int, str, bytes]:
        served.append(body)
        return 200, "application/json", b'{"secrets": {"disk": "the key"}}'

    port, client = _tls_server(tmp_path, release=release)
    raw, tls, outgoing = _tls_by_hand(port, client)
    tls.write(
        b"POST /keyrelease/v1/release HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        + b"{" * 10
    )  # 90 bytes still to come when the deadline passes
    raw.sendall(outgoing.read())
    sent = b""
    with contextlib.suppress(ConnectionError, TimeoutError):
        while chunk := raw.recv(65536):
            sent += chunk
    _records(sent)  # whatever came (an alert, a 408), all of it TLS
    assert served == []
    raw.close()


def test_another_method_on_the_key_release_path_is_refused_without_waiting_for_a_body(
    tmp_path: Path,
) -> None:
    """A GET announcing a body it then trickles must not hold a thread past the deadline:
    only a POST's body is read (within the deadline); anything else gets its 405 at once."""
    asked: list[tuple[str, bytes]] = []

    def release(method: str, body: bytes) -> tuple[int, str, bytes]:
        asked.append((method, body))
        return 405, "application/json", b'{"error": "POST a JSON request"}'

    port, client = _tls_server(tmp_path, release=release)
    conn = client.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="127.0.0.1"
    )
    conn.sendall(
        b"GET /keyrelease/v1/release HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"{" * 10
    )
    conn.settimeout(5)
    assert conn.recv(4096).startswith(b"HTTP/1.0 405")  # at once, not after 90 more bytes
    assert asked == [("GET", b"")]  # no body read for it
    conn.close()


def test_a_request_gtvp_cannot_answer_now_gets_a_503_to_ask_again_and_the_server_lives_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The API server timed out or failed under a key-release or box-attestation request:
    the guest gets a 503 saying to ask again (its script does), not a 500 with a traceback,
    and the log line names the path and the error, never the request."""
    calls: list[str] = []

    def failing(*args: object) -> tuple[int, str, bytes]:
        calls.append(str(args[0]))
        raise ApiException(status=504, reason="Gateway Timeout")

    port, client = _tls_server(tmp_path, release=failing, box_attest=failing)
    base = f"https://127.0.0.1:{port}"
    for path in ("/keyrelease/v1/release", "/boxattest/v1/quote"):
        post = urllib.request.Request(  # noqa: S310 (https, the test's own server)
            f"{base}{path}", data=b'{"credential": "SECRET-IN-REQUEST"}', method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as got:
            _open(post, client)
        assert got.value.code == 503
        body = json.loads(got.value.read())
        assert body["reason"] == "Unavailable"
        assert "ask again" in body["message"]
    assert len(calls) == 2
    said = caplog.text
    assert "answered 503 (ApiException: 504 Gateway Timeout)" in said
    assert "SECRET-IN-REQUEST" not in said
    with _open(f"{base}/.well-known/jwks.json", client) as r:  # still serving
        assert json.load(r) == {"keys": []}


def test_a_ca_file_holding_no_certificate_stops_the_operator(tmp_path: Path) -> None:
    """An empty or wrong --key-release-ca (a Secret whose ca.crt was never filled) would
    hand every guest no CA to check the port with: refused at start, saying so. Found by a
    review."""
    empty = tmp_path / "ca.crt"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        _flags("--key-release-url", URL, "--key-release-port", "9444", *CERTS,
               "--key-release-ca", str(empty))  # fmt: skip
    ca = pki.ensure_ca(tmp_path / "pki", "test CA")
    settings, _ = _flags("--key-release-url", URL, "--key-release-port", "9444", *CERTS,
                         "--key-release-ca", str(ca.cert))  # fmt: skip
    assert settings is not None
    assert settings.ca_pem is not None
