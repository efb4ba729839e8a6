"""kopf's webhook server, closing each connection after its answer once the replica stops,
answering only the webhooks gtvp registers and, when told to, only the API server's client
certificate, and keeping nothing of what a review carries.

The API server keeps its connections to a webhook open and sends the next review on the same
one; a Service (kube-proxy) routes only *new* connections to ready replicas. A replica that
is shutting down therefore answers every review it still gets, and asks the client to close
that connection (`Connection: close`), so the next review opens a connection that reaches a
ready replica instead of one that is about to go away.

The port is reachable from the pod network. By default a review is not authenticated (the API
server presents no client certificate unless its admission configuration names one), so anyone
who reaches the port may post one: a forged review makes gtvp read the VMI it names, in any
namespace, and answer with its level, its node and its members' states. With `client_ca`
(`--webhook-client-ca`) the TLS handshake requires a certificate that CA signed, and with
`client_names` (`--webhook-client-name`) a review whose certificate's common name is not one
of them is refused (403) before anything reads it; docs/chart.md shows how to give the API
server that certificate. The CA file is watched as kopf watches the serving certificate: a
new one restarts the listener, no restart of the replica.

Whether or not the caller is authenticated, kopf keeps a memo per
object uid for every review that is not a CREATE, for the life of the process (it forgets one
only when a watch sees that object deleted): forged reviews with ever new uids (up to 1 MiB
each) would grow every replica until it is killed, and with no replica running verdicts
expire while the Nodes keep their labels. `AdmissionMemories` keeps no memo from a review
(gtvp's handlers keep their state in the Runtime, not in kopf's memos). A review posted to a
path that names no gtvp webhook is refused (kopf would allow it: no handler, no objection).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import errno
import logging
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import kopf
from kopf._cogs.structs import reviews
from kopf._core.reactor.inventory import ResourceMemories

from gtvp.core.webhook_callers import (
    CALLER_NOT_ALLOWED,
    UNKNOWN_WEBHOOK,
    caller_allowed,
    common_names,
)
from gtvp.listen_address import listening_socket

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a connection has to finish its TLS handshake (asyncio's default, 60 s, let idle
sockets each hold a TLS buffer of 256 KiB that long: a flood of them filled the replica's
memory before any certificate was asked for)."""
KEEPALIVE_TIMEOUT = 95.0
"""Seconds an idle connection between reviews is kept: longer than client-go keeps one
(90 s), so that the API server, not gtvp, closes it (a review Go writes onto a connection
gtvp is closing fails, and a POST is not sent again)."""
REVIEW_DEADLINE = 30.0
"""Seconds from a review's headers to its answer (its body read included): the API server
gives up on a webhook after at most 30 s, so a body that trickles in is cut off then."""
MAX_HANDSHAKING_PER_CLIENT = 16
MAX_HANDSHAKING = 128
"""Connections still in their TLS handshake, per address and in all: cheap to open and to
hold, so they get slots of their own and never take those of the connections that
finished it (the API server's)."""
MAX_PER_CLIENT = 128
"""Connections past their handshake one address may hold at once (the API server opens one
per review in flight; through a Service every client may look like one node address)."""
MAX_CONNECTIONS = 512
"""Connections past their handshake the listener holds at once, every address together."""
TOO_MANY = "too many connections"
ACCEPT_RETRY = 0.1
"""Seconds before accepting again after accept ran out of descriptors or memory: the loop
never ends on its own, or the port would listen and answer nobody."""
_OUT_OF = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN})
"""accept errors of one connection (aborted before it was taken, refused by a firewall
rule): the next accept is tried at once. Any other error (EBADF, EINVAL, ENOTSOCK: the
socket itself is unusable) ends the loop, which the probes then report, instead of a loop
that spins and answers nobody (found by a review)."""


def _listen(addr: str | None, port: int) -> socket.socket:
    """A non-blocking listening socket on `addr` (None or `*`: every address, IPv6 too
    where the host has it; `listen_address`)."""
    sock = listening_socket(addr, port)
    sock.setblocking(False)
    return sock


@dataclass
class _Accepted:
    """A connection accepted and counted, handed to `_connect` (`started` once it runs)."""

    conn: socket.socket
    host: str
    started: bool = False


class _Held:
    """The connections each address holds, in their handshake and past it: a slot is taken
    at accept (`shake`), moved when the handshake ends (`open`), given back when the
    connection ends (`give`, once, whichever path sees it end first)."""

    def __init__(self) -> None:
        self.shaking: collections.Counter[str] = collections.Counter()
        self.opened: collections.Counter[str] = collections.Counter()
        self.state: dict[object, tuple[str, bool]] = {}  # connection -> (address, opened)

    def shake(self, host: str) -> bool:
        if (
            self.shaking[host] >= MAX_HANDSHAKING_PER_CLIENT
            or self.shaking.total() >= MAX_HANDSHAKING
        ):
            return False
        self.shaking[host] += 1
        return True

    def track(self, conn: object, host: str) -> None:
        self.state[conn] = (host, False)

    def open(self, conn: object) -> bool:
        """The connection finished its handshake; False: no room past it (to close)."""
        got = self.state.get(conn)
        if got is None:
            return False
        host = got[0]
        _drop(self.shaking, host)
        if self.opened[host] >= MAX_PER_CLIENT or self.opened.total() >= MAX_CONNECTIONS:
            del self.state[conn]
            return False
        self.opened[host] += 1
        self.state[conn] = (host, True)
        return True

    def give(self, conn: object) -> None:
        got = self.state.pop(conn, None)
        if got is not None:
            host, opened = got
            _drop(self.opened if opened else self.shaking, host)

    def untracked(self, host: str) -> None:
        """A slot taken by `shake` whose connection was never tracked."""
        _drop(self.shaking, host)


async def _retire(runner: aiohttp.web.AppRunner) -> None:
    """Clean up a runner whose certificate was replaced (or the server stopped): its open
    connections end once their reviews are answered; a failure is said, not raised."""
    try:
        await runner.cleanup()
    except Exception as exc:  # noqa: BLE001 - the listener goes on; said
        log.warning("cleaning up a webhook listener failed: %r", exc)


def _drop(counter: collections.Counter[str], host: str) -> None:
    counter[host] -= 1
    if counter[host] <= 0:
        del counter[host]


class DrainingWebhookServer(kopf.WebhookServer):
    """`kopf.WebhookServer` that force-closes connections while `closing()` is true."""

    def __init__(
        self,
        *args: Any,
        closing: Callable[[], bool],
        webhook_ids: Collection[str] = (),
        client_ca: str | None = None,
        client_names: Collection[str] = (),
        refused: Callable[[str], None] = lambda _reason: None,
        **kwargs: Any,
    ) -> None:
        if client_names and not client_ca:
            raise ValueError("client names are checked only on certificates a client CA verified")
        if client_ca:
            # CERT_REQUIRED: kopf's verify_cafile alone only asks (CERT_OPTIONAL), and a client
            # without a certificate would be served. `cafile` is kopf's caBundle for managed
            # webhook configurations (gtvp manages none); given here so that kopf watches the
            # file and restarts the listener when the CA changes.
            kwargs.update(verify_mode=ssl.CERT_REQUIRED, verify_cafile=client_ca, cafile=client_ca)
        super().__init__(*args, **kwargs)
        self.closing = closing
        self.webhook_ids = frozenset(webhook_ids)
        self.client_names = frozenset(client_names)
        self.refused = refused
        self.held = _Held()
        self.failed: str | None = None
        """Why the accept loop ended on its own (None: it has not): the probes read it."""

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The accept loop of a certificate ended: said and kept for the probes, unless on
        purpose (cancelled). The port would listen and answer nobody: /readyz takes the
        replica out of the Service, /healthz gets it restarted."""
        if task.cancelled() or task.exception() is None:
            return
        self.failed = f"the webhook accept loop ended: {task.exception()!r}"
        log.error("%s; no review is answered until a restart", self.failed)

    async def __call__(self, fn: reviews.WebhookFn) -> AsyncIterator[reviews.WebhookClientConfig]:
        """kopf's listener loop (a new runner when the certificate files change) on one
        socket of gtvp's own, with gtvp's accept loop instead of aiohttp's site:
        connections counted per address and in all, in their TLS handshake
        (`MAX_HANDSHAKING_PER_CLIENT`, `MAX_HANDSHAKING`) and past it (`MAX_PER_CLIENT`,
        `MAX_CONNECTIONS`; one more is closed at once), handshakes cut after
        `HANDSHAKE_TIMEOUT`, idle connections after `KEEPALIVE_TIMEOUT`, no access log
        line per request (anyone on the pod network may post to this port)."""

        async def serve_fn(request: aiohttp.web.Request) -> aiohttp.web.Response:
            return await self._serve(fn, request)

        addr = self.addr or None
        port = self.port or self._allocate_free_port()
        listener = _listen(addr, port)  # one socket for the life of the server: no gap
        listeners = self._listeners(listener, port, serve_fn)
        try:
            async for config in listeners:
                yield config
        finally:
            try:
                await listeners.aclose()  # its runner cleaned up (`async for` would not)
            finally:
                listener.close()

    async def _listeners(
        self,
        listener: socket.socket,
        port: int,
        serve_fn: Callable[[aiohttp.web.Request], Any],
    ) -> AsyncGenerator[reviews.WebhookClientConfig, None]:
        """kopf's loop on one socket: an aiohttp runner and an accept loop per certificate.
        A renewed certificate's runner accepts before the old one is cleaned up: the old
        runner's cleanup waits for the reviews in flight on its connections (up to
        REVIEW_DEADLINE), and nothing accepting meanwhile failed every gated VM start that
        came then (found by a review; kopf's own loop has that gap)."""
        retiring: set[asyncio.Task[None]] = set()
        runner: aiohttp.web.AppRunner | None = None
        accepting: asyncio.Task[None] | None = None
        try:
            while True:
                cadata, context = self._build_ssl()
                path = self.path.rstrip("/") if self.path else ""
                app = aiohttp.web.Application()
                app.add_routes([aiohttp.web.post(f"{path}/{{id:.*}}", serve_fn)])
                fresh = aiohttp.web.AppRunner(
                    app,
                    handle_signals=False,
                    keepalive_timeout=KEEPALIVE_TIMEOUT,
                    lingering_time=1.0,  # reading a refused body's rest (aiohttp's: 10 s)
                    access_log=None,
                )
                try:
                    await fresh.setup()
                    server = fresh.server
                    if server is None:
                        raise RuntimeError("aiohttp's runner made no server")
                    if accepting is not None:  # one accept loop on the socket at a time
                        accepting.cancel()
                        await asyncio.gather(accepting, return_exceptions=True)
                except BaseException:
                    await fresh.cleanup()
                    raise
                if runner is not None:  # its connections end with it, in the background
                    retiring.add(asyncio.create_task(_retire(runner)))
                runner = fresh
                accepting = asyncio.create_task(self._accept(listener, server, context))
                accepting.add_done_callback(self._ended)
                schema = "http" if context is None else "https"
                host = self.host or self.DEFAULT_HOST or self._get_accessible_addr(self.addr)
                url = self._build_url(schema, host, port, self.path or "")
                log.debug("listening for webhooks at %s", url)
                client_config = reviews.WebhookClientConfig(url=url)
                if cadata is not None:
                    client_config["caBundle"] = base64.b64encode(cadata).decode("ascii")
                yield client_config
                await self._WebhookServer__sleep_forever_or_until_ssl_files_change()  # type: ignore[attr-defined]
                log.debug("restarting the webhook listener with renewed certificate files")
                retiring = {t for t in retiring if not t.done()}
        finally:
            ending = list(retiring)
            if accepting is not None:
                accepting.cancel()
                ending.append(accepting)  # done before the caller closes the socket
            if runner is not None:
                ending.append(asyncio.create_task(_retire(runner)))
            await asyncio.gather(*ending, return_exceptions=True)

    async def _accept(
        self, listener: socket.socket, server: aiohttp.web.Server, context: ssl.SSLContext | None
    ) -> None:
        """Accept connections while this certificate lasts; one past the limits is closed
        at once, the others handed to aiohttp after their handshake."""
        loop = asyncio.get_running_loop()
        held, made, lost = self.held, server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            if not held.open(handler):
                self.refused(TOO_MANY)
                transport.abort()  # at once: no TLS close to wait 30 s for, no request read
            made(handler, transport)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            held.give(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]
        pending: dict[asyncio.Task[None], _Accepted] = {}
        try:
            while True:
                try:
                    conn, peer = await loop.sock_accept(listener)
                except OSError as exc:
                    if exc.errno in _OUT_OF:  # out of descriptors or memory: wait a little
                        log.warning("accepting a webhook connection failed: %s; going on", exc)
                        await asyncio.sleep(ACCEPT_RETRY)
                    elif exc.errno not in _GONE:
                        raise
                    await asyncio.sleep(0)  # a connection aborted before it was accepted
                    continue
                host = str(peer[0]) if isinstance(peer, tuple) else ""
                if not held.shake(host):
                    conn.close()
                    self.refused(TOO_MANY)
                    continue
                accepted = _Accepted(conn, host)
                task = asyncio.create_task(self._connect(accepted, server, context))
                pending[task] = accepted
                task.add_done_callback(lambda t: pending.pop(t, None))
        finally:
            # handshakes still running when the certificate is renewed or the server stops
            # are cut (their connections closed, slots given back); one cancelled before it
            # began would skip `_connect`'s own cleanup, so it is done here (found by a
            # review: its socket and slot were kept)
            for task, accepted in list(pending.items()):
                task.cancel()
                if not accepted.started:
                    self.held.untracked(accepted.host)
                    accepted.conn.close()

    async def _connect(
        self,
        accepted: _Accepted,
        server: aiohttp.web.Server,
        context: ssl.SSLContext | None,
    ) -> None:
        """One accepted connection through its handshake to aiohttp (whose handler gives
        its slot back when it ends); a failed or slow handshake gives it back here, with a
        line at debug level only (anyone may open one)."""
        accepted.started = True
        conn, host = accepted.conn, accepted.host
        loop = asyncio.get_running_loop()
        made: list[Any] = []

        def handler() -> Any:
            made.append(server())
            self.held.track(made[0], host)
            return made[0]

        try:
            await loop.connect_accepted_socket(
                handler,
                conn,
                ssl=context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if context is not None else None,
            )
        except BaseException as exc:
            if made:  # its transport owns the socket and closes it
                self.held.give(made[0])
            else:
                self.held.untracked(host)
                conn.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.debug("a webhook connection from %s ended in its handshake: %r", host, exc)

    async def _serve(  # type: ignore[override]  # kopf's is a staticmethod
        self, fn: Any, request: aiohttp.web.Request
    ) -> aiohttp.web.Response:
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        if not caller_allowed(peercert, self.client_names):
            self.refused(CALLER_NOT_ALLOWED)
            log.debug("refused a webhook request from %s", common_names(peercert) or "no name")
            response = aiohttp.web.json_response(
                {"error": "this certificate may not call gtvp's webhooks"},
                status=403,
                reason="Caller Not Allowed",
            )
        elif self.webhook_ids and request.match_info.get("id", "") not in self.webhook_ids:
            self.refused(UNKNOWN_WEBHOOK)
            response = aiohttp.web.json_response(
                {"error": "no such gtvp webhook"}, status=404, reason="No Such Webhook"
            )
        else:
            try:
                response = await asyncio.wait_for(
                    kopf.WebhookServer._serve(fn, request), REVIEW_DEADLINE
                )
            except TimeoutError:
                response = aiohttp.web.json_response(
                    {"error": "the review was not read and answered in time"},
                    status=408,
                    reason="Request Timeout",
                )
                response.force_close()
        if self.closing():
            response.force_close()
        return response


class AdmissionMemories(ResourceMemories):
    """kopf's per-object memories, minus the ones a review would add: an admission review
    gets a fresh copy of the operator's memo and leaves nothing behind (module docstring)."""

    async def recall_memo(
        self, raw_body: Any, *, memobase: Any = None, ephemeral: bool = False
    ) -> Any:
        del ephemeral  # every review's memo is ephemeral
        return await super().recall_memo(raw_body, memobase=memobase, ephemeral=True)
