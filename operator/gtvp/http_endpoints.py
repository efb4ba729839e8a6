"""The operator's HTTP endpoints: `/metrics`, `/healthz` (liveness), `/readyz` (readiness).

Plain HTTP by default (on loopback: a local pool, or a proxy sidecar in a pod). Given a TLS
context and a guard (`gtvp.metrics_auth.Guard`), served over HTTPS and every path but the
two probes (which the kubelet asks for without credentials, and which tell nothing about
the pool) answered only to a caller the guard lets through.

`/readyz` answers 200 only once the operator has loaded the members' verdicts, VMs, VMIs and
migrations (before that its webhooks are not yet served), and only while its presence Lease
is renewed and it is not shutting down, so a Service sends admission requests only to a
replica that can judge them. `/healthz` answers 200 while the recheck
loop keeps turning (it wakes at least every 30 s); a wedged event loop gets the pod
restarted. Both fail when a part that does not recover on its own has stopped (the
webhook accept loop: the port would listen and answer nobody). Both say why in their body.

Public documents (`public`, see `gtvp.verdict_keys` and docs/tokens.md): the verdict tokens'
JWKS at `/.well-known/jwks.json` and a member's current token at `/ear/members/<name>`,
answered like the probes without credentials (both are signed or public material that a
box VM, which holds no Kubernetes credentials, fetches to check its host).

Key release (`release`, see `gtvp.key_release` and docs/keyrelease.md): `POST
/keyrelease/v1/release`, answered without Kubernetes credentials (a box VM authenticates
with its one-time credential and its host's token) and only ever over TLS. With
`only_public`, a server answers the key-release path and the public documents and nothing
else (no metrics, no probes: 404): the operator's own key-release port.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from gtvp.core import keyrelease
from gtvp.listen_address import unbound_socket

STALL_AFTER = 90.0  # seconds without a turn of the recheck loop before /healthz fails
METRICS_PATH = "/metrics"


@dataclass(frozen=True)
class Probe:
    """What the probes read: set by the operator's handlers."""

    loaded: bool
    loop_started: bool
    loop_idle_seconds: float
    unready_because: str | None = None
    """Why this replica must not answer admission although loaded (None: nothing)."""
    broken: str | None = None
    """What stopped working for good in this process (None: nothing): unready and
    unhealthy, so that the kubelet restarts it."""


def answer(path: str, probe: Probe) -> tuple[int, str] | None:
    """(HTTP status, text) for a probe path; None for any other path."""
    if path not in ("/readyz", "/healthz"):
        return None
    if probe.broken is not None:
        return 503, f"unhealthy: {probe.broken}\n"
    return _ready(probe) if path == "/readyz" else _healthy(probe)


def _ready(probe: Probe) -> tuple[int, str]:
    if not probe.loaded:
        return 503, "not ready: still loading the pool from the API server\n"
    if probe.unready_because is not None:
        return 503, f"not ready: {probe.unready_because}\n"
    return 200, "ready: members, VMs, VMIs and migrations loaded\n"


def _healthy(probe: Probe) -> tuple[int, str]:
    if probe.loop_started and probe.loop_idle_seconds > STALL_AFTER:
        return 503, (
            f"unhealthy: the recheck loop has not turned for {probe.loop_idle_seconds:.0f}s\n"
        )
    return 200, "ok\n"


_CONNECTION_ERROR = re.compile(
    r"(ssl\.SSL\w*Error|\w*(Connection|Pipe|Timeout)\w*Error|OSError|socket\.timeout)\b"
)


class _ErrorsInOneLine(io.StringIO):
    """Where wsgiref prints the traceback of a request that failed: an answer that could
    not be written (the client hung up, or was cut off at its deadline) is one line in
    gtvp's log; anything else is an error (its traceback at debug level)."""

    def flush(self) -> None:
        text = self.getvalue()
        self.seek(0)
        self.truncate()
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            return
        if _CONNECTION_ERROR.match(lines[-1]):
            log.info("an answer could not be written: %s", lines[-1][:200])
            return
        log.error("a request failed: %s", lines[-1][:200])
        log.debug("%s", text)


MAX_HEADER_BYTES = 16384
"""Bytes a request's line and headers may take together; beyond, 431 (http.client alone
reads up to 100 headers of 64 KiB each: 6.5 MB held by every connection, enough for a few
hundred unauthenticated connections to get a replica killed for memory)."""


class _HeaderBudget:
    """A request's reader while its line and headers are read: `left` bytes in all."""

    def __init__(self, raw: Any, left: int) -> None:
        self.raw, self.left = raw, left

    def readline(self, size: int | None = -1) -> bytes:
        if self.left <= 0:
            raise http.client.LineTooLong(f"request line and headers over {MAX_HEADER_BYTES} bytes")
        limit = self.left if size is None or size < 0 else min(size, self.left)
        line: bytes = self.raw.readline(limit)
        self.left -= len(line)
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class _Quiet(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        self.rfile = _HeaderBudget(self.rfile, MAX_HEADER_BYTES)  # type: ignore[assignment]

    def parse_request(self) -> bool:
        try:
            return super().parse_request()
        finally:  # the body is read unbudgeted (each endpoint bounds its own)
            if isinstance(self.rfile, _HeaderBudget):
                self.rfile = self.rfile.raw

    def log_message(self, format: str, *args: Any) -> None:
        """Probes come every few seconds: no access log."""

    def get_stderr(self) -> io.StringIO:
        return _ErrorsInOneLine()


class _Server(ThreadingWSGIServer):
    """A connection that fails outside a request (a malformed one, a client that hangs up
    mid-way) is one line in the log, not socketserver's traceback on stderr."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        host = client_address[0] if isinstance(client_address, tuple) else client_address
        log.info("a connection from %s ended: %s", host, error_line(exc) if exc else "?")


class Refused(Protocol):
    """An answer instead of the page (`gtvp.metrics_auth.Refusal`)."""

    @property
    def status(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def reason(self) -> str: ...


Guard = Callable[[str | None, str, str], Refused | None]
"""(Authorization header, path, method) -> None to serve, else the refusal to answer."""

Public = Callable[[str], tuple[int, str, bytes] | None]
"""path -> (HTTP status, content type, body) for a public document; None for other paths."""

Release = Callable[[str, bytes], tuple[int, str, bytes]]
"""(method, request body) -> (HTTP status, content type, body) of the key-release path."""
RELEASE_PATH = keyrelease.PATH
BoxAttest = Callable[[str, str, str | None, bytes], tuple[int, str, bytes]]
"""(path, method, Authorization header, request body) -> (HTTP status, content type, body)
of the box attestation paths (`gtvp.box_attestation.Endpoint`, docs/boxattest.md)."""
BOX_ATTEST_PREFIX = "/boxattest/"
RELEASE_MAX_BYTES = keyrelease.MAX_REQUEST_BYTES
log = logging.getLogger("gtvp.http")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    428: "Precondition Required",
    503: "Service Unavailable",
}


_TEXT = "text/plain; charset=utf-8"
_TOO_SLOW = (408, _TEXT, b"the request took too long to arrive: not served, send it again\n")


def _body(environ: dict[str, Any]) -> bytes | tuple[int, str, bytes]:
    """The request body, or the answer to give instead: 413 longer than RELEASE_MAX_BYTES
    (or no valid length), 408 cut off at the connection's deadline, 400 shorter than its
    Content-Length (the client hung up)."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = -1
    if length < 0 or length > RELEASE_MAX_BYTES:
        return 413, _TEXT, b"request body too large\n"
    data: bytes = environ["wsgi.input"].read(length) if length else b""
    if not _read_all():
        return _TOO_SLOW
    if len(data) != length:
        return 400, _TEXT, b"request body shorter than its Content-Length\n"
    return data


def _request_body(environ: dict[str, Any], method: str) -> bytes | tuple[int, str, bytes]:
    """A POST's body (`_body`); for another method none is read, only the deadline ends
    (408 when it cut the request off first), and the handler answers the method."""
    if method == "POST":
        return _body(environ)
    return b"" if _read_all() else _TOO_SLOW


def _posted(
    environ: dict[str, Any], path: str, release: Release | None, box_attest: BoxAttest | None
) -> tuple[int, str, bytes] | None:
    """The answer of the key-release or a box attestation path (None: another path, whose
    request is still within its deadline). Only a POST's body is read (within the
    connection's deadline); another method gets the handler's 405 with no body read."""
    method = str(environ.get("REQUEST_METHOD", "GET"))
    if release is not None and path == RELEASE_PATH:
        raw = _request_body(environ, method)
        if not isinstance(raw, bytes):
            return raw
        return _unavailable_on_error(path, release, method, raw)
    if box_attest is not None and path.startswith(BOX_ATTEST_PREFIX):
        raw = _request_body(environ, method)
        if not isinstance(raw, bytes):
            return raw
        auth = environ.get("HTTP_AUTHORIZATION")
        return _unavailable_on_error(path, box_attest, path, method, auth, raw)
    return None


def _unavailable_on_error(
    path: str, handler: Callable[..., tuple[int, str, bytes]], *args: Any
) -> tuple[int, str, bytes]:
    """`handler`'s answer; a 503 that says to ask again when it fails (the API server
    unreachable or timing out), logged in one line without the request."""
    try:
        return handler(*args)
    except Exception as exc:
        log.warning("%s: answered 503 (%s: %s)", path, type(exc).__name__, error_line(exc))
        log.debug("%s: what failed", path, exc_info=True)  # a bug, not only the API server
        why = "gtvp could not answer now (the API server did not): ask again"
        said = {"reason": "Unavailable", "message": why, "error": why}
        return 503, "application/json", json.dumps(said, sort_keys=True).encode()


def error_line(exc: BaseException) -> str:
    """What went wrong in a line (an API error's status and reason, never its body)."""
    status = getattr(exc, "status", None)
    if status is not None:
        return f"{status} {getattr(exc, 'reason', '')}"
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0
"""Seconds a TLS connection may sit without sending or taking data (its thread is freed)."""
CONNECTION_DEADLINE = 30.0
"""Seconds a TLS connection may take, from its first byte until its request has been read
(TLS handshake included; one request each): a client that trickles a byte at a time, each
within IDLE_TIMEOUT, is cut off then. The server's own work on the request is not
counted (a credential consumed is never followed by a cut answer)."""
MAX_PER_CLIENT = 16
"""Connections one client address may hold at once; one more is closed unanswered (a
single slow client cannot take every thread, nor starve the kubelet's probes)."""
MAX_CONNECTIONS = 1024
"""Connections the server holds at once, from every address together."""


_S = TypeVar("_S", bound=_Server)


class _TlsServer(_Server):
    """TLS on each connection's own thread (a slow handshake holds up no other client),
    with the context asked for again on every connection (a renewed certificate is used);
    each connection bounded in time (CONNECTION_DEADLINE) and in number (MAX_PER_CLIENT,
    MAX_CONNECTIONS)."""

    tls: Callable[[], ssl.SSLContext]

    def server_activate(self) -> None:
        super().server_activate()
        self._held: dict[str, int] = {}
        self._held_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0]) if isinstance(client_address, tuple) else ""
        with self._held_lock:
            every = sum(self._held.values())
            if self._held.get(host, 0) >= MAX_PER_CLIENT or every >= MAX_CONNECTIONS:
                self.shutdown_request(request)  # too many at once: closed, unanswered
                return
            self._held[host] = self._held.get(host, 0) + 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(host)
            raise

    def _release(self, host: str) -> None:
        with self._held_lock:
            left = self._held.get(host, 0) - 1
            if left > 0:
                self._held[host] = left
            else:
                self._held.pop(host, None)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        _connection.held = str(client_address[0]) if isinstance(client_address, tuple) else ""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._let_go()

    def _let_go(self) -> None:
        """This thread's connection no longer counts (once, whichever comes first: before
        its socket is closed, so a client that sees the close may connect again at once)."""
        host: str | None = getattr(_connection, "held", None)
        if host is not None:
            _connection.held = None
            self._release(host)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:  # the handshake after the wrap: the TLS socket holds the fd the timer cuts
            wrapped = self.tls().wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
        except (OSError, ssl.SSLError):
            return
        deadline = _Deadline(wrapped, CONNECTION_DEADLINE)
        _connection.deadline = deadline
        try:
            try:
                wrapped.do_handshake()
            except (OSError, ssl.SSLError):
                return  # a client that does not speak TLS (or hangs up): nothing to answer
            wrapped.settimeout(IDLE_TIMEOUT)
            super().finish_request(wrapped, client_address)
        finally:
            deadline.cancel()
            _connection.deadline = None
            self._let_go()
            wrapped.close()


class _Deadline:
    """A connection's deadline until its request has been read. When it passes first, the
    connection's reading is shut (its blocked read returns, its thread ends, lets the
    connection go and only then closes it: the client sees the close after that); once the
    request is read it never cuts, and a request cut off is never served. Reading is shut
    on the socket itself, under the TLS layer, which stays in place: every answer is still
    encrypted (an SSLSocket's own shutdown() drops its TLS object, after which a write
    would go out in clear)."""

    def __init__(self, sock: ssl.SSLSocket, seconds: float) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._state = "armed"
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def _cut(self) -> None:
        with self._lock:
            if self._state != "armed":
                return
            self._state = "cut"
            with contextlib.suppress(OSError):  # under the lock: never after cancel()
                socket.socket.shutdown(self._sock, socket.SHUT_RD)

    def read(self) -> bool:
        """The request has been read: True when it may be served (it was not cut off)."""
        with self._lock:
            if self._state == "cut":
                return False
            self._state = "read"
        self._timer.cancel()
        return True

    def cancel(self) -> None:
        """The connection ends: no cut after this (its socket is about to be closed)."""
        with self._lock:
            if self._state == "armed":
                self._state = "ended"
        self._timer.cancel()


_connection = threading.local()
"""The deadline of the connection a handler thread serves (None: none, or read)."""


def _read_all() -> bool:
    """The request has been read: the connection's deadline no longer applies. False when
    the deadline cut it off first (it must not be served)."""
    deadline: _Deadline | None = getattr(_connection, "deadline", None)
    return deadline is None or deadline.read()


def serve(
    port: int,
    address: str,
    registry: CollectorRegistry,
    read: Callable[[], Probe],
    *,
    tls: Callable[[], ssl.SSLContext] | None = None,
    guard: Guard | None = None,
    public: Public | None = None,
    release: Release | None = None,
    only_public: bool = False,
    box_attest: BoxAttest | None = None,
) -> ThreadingWSGIServer:
    """Serve the three endpoints on a daemon thread; returns the server (for tests).
    `tls`: serve HTTPS with the context it returns; `guard`: who may read past the probes;
    `public`: documents served to anyone, like the probes; `release`: the key-release
    endpoint (only with `tls`: ValueError otherwise); `only_public`: answer nothing but
    `release` and `public` (404 for the metrics and the probes); `box_attest`: the box
    attestation paths, next to `release` (only with `tls` too)."""
    if (release is not None or box_attest is not None) and tls is None:
        raise ValueError("the key-release endpoint is served only over TLS")
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = str(environ.get("PATH_INFO", ""))
        posted = _posted(environ, path, release, box_attest)
        if posted is None and not _read_all():
            # no body to wait for: what follows is the server's own work, unless the
            # request was cut off at its deadline meanwhile (then it is not served)
            posted = _TOO_SLOW
        if posted is not None:
            code, content_type, body = posted
            start(f"{code} {_REASONS.get(code, 'Error')}", [("Content-Type", content_type)])
            return [body]
        document = public(path) if public is not None else None
        if document is not None:
            code, content_type, body = document
            start(f"{code} {_REASONS.get(code, 'Error')}", [("Content-Type", content_type)])
            return [body]
        got = None if only_public else answer(path, read())
        if only_public or (got is None and path != METRICS_PATH):
            # prometheus_client serves its page on any path: only /metrics is reviewed as
            # /metrics (a token allowed some other path, /version say, would read it)
            start("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [
                b"not served on this port: only key release and the public documents\n"
                if only_public
                else b"not found: /metrics, /healthz, /readyz and the public documents\n"
            ]
        if got is None and guard is not None:
            refused = guard(
                environ.get("HTTP_AUTHORIZATION"), path, str(environ.get("REQUEST_METHOD", "GET"))
            )
            if refused is not None:
                headers = [("Content-Type", "text/plain; charset=utf-8")]
                if refused.status == 401:
                    headers.append(("WWW-Authenticate", 'Bearer realm="gtvp-operator"'))
                start(f"{refused.status} {refused.reason}", headers)
                return [refused.text.encode()]
        if got is None:
            result: Iterable[bytes] = metrics(environ, start)
            return result
        status, text = got
        reason = "OK" if status == 200 else "Service Unavailable"
        start(f"{status} {reason}", [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode()]

    if tls is None:
        server = _make_server(_Server, address, port, app)
    else:
        tls()  # a certificate that cannot be loaded fails now, not at the first scrape
        secure = _make_server(_TlsServer, address, port, app)
        secure.tls = tls
        server = secure
    threading.Thread(target=server.serve_forever, name="gtvp-http", daemon=True).start()
    return server


def _make_server(cls: type[_S], address: str, port: int, app: Callable[..., Iterable[bytes]]) -> _S:
    """wsgiref's `make_server` on a socket of `address`'s family (`listen_address`: an IPv6
    address, a name, or `*` for every address; wsgiref's servers are IPv4 sockets)."""
    server = cls(("", port), _Quiet, bind_and_activate=False)
    server.socket.close()
    server.socket, (host, _) = unbound_socket(address)
    server.server_address = (host, port)
    try:
        server.server_bind()
        server.server_activate()
    except BaseException:
        server.server_close()
        raise
    server.set_app(app)
    return server


PROBES_ADDRESS = "127.0.0.1"
"""Where `serve_probes` listens: only processes of the pod itself reach it."""


def serve_probes(port: int, read: Callable[[], Probe]) -> ThreadingWSGIServer:
    """/healthz and /readyz, nothing else, in plain HTTP on PROBES_ADDRESS:`port`, on a
    daemon thread (the chart's exec probes ask it from inside the container). Nothing outside
    the pod can reach it, so no client of the HTTPS port (a VM attesting, a scraper, a flood
    of slow connections) can take the probes' connections and get a replica restarted or
    unready."""

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        got = answer(str(environ.get("PATH_INFO", "")), read())
        if got is None:
            start("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"only /healthz and /readyz are served on this port\n"]
        status, text = got
        reason = "OK" if status == 200 else "Service Unavailable"
        start(f"{status} {reason}", [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode()]

    server = _make_server(_Server, PROBES_ADDRESS, port, app)
    threading.Thread(target=server.serve_forever, name="gtvp-probes", daemon=True).start()
    return server


def idle_since(heartbeat: float) -> float:
    """Seconds since a monotonic heartbeat (0 when it never beat)."""
    return time.monotonic() - heartbeat if heartbeat else 0.0
