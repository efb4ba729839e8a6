"""The webhook port's own limits, on a real TLS socket.

Attacker: anyone on the pod network reaches the webhook port (client certificates are
checked only inside the TLS handshake, and by default not at all). Every gated VM start
waits for this listener (fail closed), so holding it is a denial of service of the whole
pool. Found by a review: aiohttp's site kept a connection that never handshakes for 60 s
with a 256 KiB TLS buffer each, an idle one for an hour, a review whose body trickled in for
good, and had no cap on connections. Now: handshakes are cut after HANDSHAKE_TIMEOUT,
connections are counted per address and in all, and a review must be read and answered
within REVIEW_DEADLINE.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gtvp import http_endpoints, webhook_server
from gtvp.webhook_config import WEBHOOK_IDS
from gtvp.webhook_server import TOO_MANY, DrainingWebhookServer
from gtvp_local import pki
from gtvp_local.processes import free_port

REVIEW = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "1"}}


class Served:
    def __init__(
        self,
        url: str,
        port: int,
        context: ssl.SSLContext,
        refused: list[str],
        server: DrainingWebhookServer,
    ) -> None:
        self.url, self.port, self.context, self.refused = url, port, context, refused
        self.server = server

    async def review(self) -> int:
        return await _post(self.url, self.context)

    async def raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection that has sent nothing (no handshake)."""
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def tls(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection past its TLS handshake that has sent nothing yet."""
        return await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.context, server_hostname="127.0.0.1"
        )


async def _post(url: str, context: ssl.SSLContext, uid: str = "1") -> int:
    """The status of a review (request `uid`) posted to the VM webhook."""
    body = json.dumps({**REVIEW, "request": {"uid": uid}})
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/gtvp-validate-vm", data=body, ssl=context) as response,
    ):
        await response.read()
        return response.status


def _serve(tmp_path: Path, test: Callable[[Served], Awaitable[None]]) -> None:
    ca = pki.ensure_ca(tmp_path / "serving", "serving-ca")
    cert = pki.issue(ca, tmp_path / "serving", "webhook", common_name="gtvp",
                     server_ips=("127.0.0.1",))  # fmt: skip
    refused: list[str] = []
    server = DrainingWebhookServer(
        addr="127.0.0.1",
        port=free_port(),
        certfile=str(cert.cert),
        pkeyfile=str(cert.key),
        closing=lambda: False,
        webhook_ids=WEBHOOK_IDS,
        refused=refused.append,
    )

    async def fn(data: Any, **_: Any) -> Any:
        return {"response": {"uid": data["request"]["uid"], "allowed": True}}

    async def run() -> None:
        async with server:
            config = await server(fn).__anext__()
            context = ssl.create_default_context(cafile=str(ca.cert))
            await test(Served(config["url"], server.port or 0, context, refused, server))

    asyncio.run(run())


async def _closed(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closes the connection within `within` seconds."""
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_a_connection_that_never_handshakes_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_server, "HANDSHAKE_TIMEOUT", 0.5)

    async def test(s: Served) -> None:
        reader, writer = await s.raw()
        assert await _closed(reader, 5)
        writer.close()
        assert await s.review() == 200  # its count was given back; reviews go on

    _serve(tmp_path, test)


def test_connections_past_the_limit_are_closed_and_counted_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections that never finish their handshake have slots of their own: past them
    one more is closed at once, and they never take a finished connection's slot."""
    monkeypatch.setattr(webhook_server, "MAX_HANDSHAKING_PER_CLIENT", 3)

    async def test(s: Served) -> None:
        held = [await s.raw() for _ in range(3)]
        await asyncio.sleep(0.2)
        reader, _writer = await s.raw()
        assert await _closed(reader, 2)  # the fourth from one address: closed at once
        assert s.refused == [TOO_MANY]
        for _r, w in held:
            w.close()
        await asyncio.sleep(0.3)
        assert await s.review() == 200  # the three given back: answered again

    _serve(tmp_path, test)


def test_finished_connections_past_their_limit_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_server, "MAX_PER_CLIENT", 1)

    async def test(s: Served) -> None:
        _r1, first = await s.tls()
        second, w2 = await s.tls()
        assert await _closed(second, 2)
        assert s.refused == [TOO_MANY]
        w2.close()
        first.close()
        await asyncio.sleep(0.3)
        assert await s.review() == 200  # the first one's slot given back

    _serve(tmp_path, test)


def test_a_review_whose_body_trickles_in_is_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_server, "REVIEW_DEADLINE", 0.5)

    async def test(s: Served) -> None:
        reader, writer = await s.tls()
        writer.write(
            b"POST /gtvp-validate-vm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"apiVersion"'
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 408")
        writer.close()

    _serve(tmp_path, test)


def test_the_listener_takes_a_socket_of_its_own(tmp_path: Path) -> None:
    """gtvp's accept loop listens where kopf's site did (the port answers a plain TCP
    connect) and stops listening when the server stops."""
    port = free_port()

    async def run() -> None:
        ca = pki.ensure_ca(tmp_path / "s", "serving-ca")
        cert = pki.issue(ca, tmp_path / "s", "w", common_name="gtvp", server_ips=("127.0.0.1",))
        server = DrainingWebhookServer(addr="127.0.0.1", port=port, certfile=str(cert.cert),
                                       pkeyfile=str(cert.key), closing=lambda: False)  # fmt: skip

        async def fn(data: Any, **_: Any) -> Any:
            return {}

        async with server:  # kopf's way of closing a server's generators
            await server(fn).__anext__()
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()

    asyncio.run(run())


def test_an_accept_that_fails_does_not_end_the_listener(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of file descriptors (EMFILE), accept fails: the port must not stay listening
    with nobody accepting (every gated VM start would time out until a restart)."""
    monkeypatch.setattr(webhook_server, "ACCEPT_RETRY", 0.05)

    async def test(s: Served) -> None:
        assert await s.review() == 200
        loop = asyncio.get_running_loop()
        original, failed = loop.sock_accept, []

        async def flaky(sock: socket.socket) -> Any:
            if not failed:
                failed.append(True)
                raise OSError(24, "Too many open files")
            return await original(sock)

        monkeypatch.setattr(loop, "sock_accept", flaky)
        assert await s.review() == 200  # accepted by the call already waiting
        assert await s.review() == 200  # accepted after the failure
        assert failed == [True]

    _serve(tmp_path, test)


def test_a_renewed_certificate_is_served_while_the_old_reviews_finish(tmp_path: Path) -> None:
    """A renewed serving certificate starts a new runner; the old one's cleanup waits for
    its reviews in flight (up to REVIEW_DEADLINE). Found by a review: nothing accepted
    meanwhile, so every gated VM start then waited in the backlog and failed (fail closed).
    Now the new certificate's runner accepts first, and the old review is still answered."""
    ca = pki.ensure_ca(tmp_path / "s", "serving-ca")
    cert = pki.issue(ca, tmp_path / "s", "w", common_name="gtvp", server_ips=("127.0.0.1",))
    server = DrainingWebhookServer(addr="127.0.0.1", port=free_port(), certfile=str(cert.cert),
                                   pkeyfile=str(cert.key), closing=lambda: False,
                                   file_check_interval=0.05)  # fmt: skip
    held, reviewed = asyncio.Event(), asyncio.Event()

    async def fn(data: Any, **_: Any) -> Any:
        if data["request"]["uid"] == "held":
            reviewed.set()
            await held.wait()
        return {"response": {"uid": data["request"]["uid"], "allowed": True}}

    async def run() -> None:
        async with server:
            listeners = server(fn)
            url = (await listeners.__anext__())["url"]
            context = ssl.create_default_context(cafile=str(ca.cert))
            first = asyncio.create_task(_post(url, context, "held"))
            await asyncio.wait_for(reviewed.wait(), 5)
            renewal = asyncio.create_task(listeners.__anext__())  # kopf waits for the next
            await asyncio.sleep(0.2)  # its watch has read the files as they were
            renewed = pki.issue(ca, tmp_path / "s", "w2", common_name="gtvp",
                                server_ips=("127.0.0.1",))  # fmt: skip
            cert.cert.write_bytes(renewed.cert.read_bytes())
            cert.key.write_bytes(renewed.key.read_bytes())
            await asyncio.wait_for(renewal, 5)  # the renewed runner
            assert await asyncio.wait_for(_post(url, context, "fresh"), 5) == 200
            assert not first.done()  # the old review still in flight, on the old runner
            held.set()
            assert await asyncio.wait_for(first, 5) == 200

    asyncio.run(run())


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (RuntimeError("the loop's selector is gone"), "selector is gone"),
        (OSError(errno.EBADF, "Bad file descriptor"), "Bad file descriptor"),
    ],
)
def test_an_accept_loop_that_ends_makes_the_replica_unready_and_unhealthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, says: str
) -> None:
    """An accept loop that ended on an error it does not survive left the port listening
    with nobody answering while the probes said ready (every gated VM start then failed
    closed on this replica until someone restarted it); an unusable socket (EBADF) made it
    spin for good, answering nobody. Now the server says why, and the probes fail on it
    (`Probe.broken`: out of the Service, then restarted). The connection it had accepted
    but not yet begun to serve is closed and its slot given back (found by a review)."""
    seen: list[str | None] = []

    async def test(s: Served) -> None:
        await asyncio.sleep(0.05)  # the accept loop waits in the real accept
        loop = asyncio.get_running_loop()

        async def broken(sock: socket.socket) -> Any:
            raise error

        monkeypatch.setattr(loop, "sock_accept", broken)
        # accepted by the call already waiting; the loop ends at its next accept
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(s.review(), 5)
        for _ in range(50):
            await asyncio.sleep(0.02)
            if s.server.failed:
                break
        seen.append(s.server.failed)
        assert not s.server.held.shaking
        assert not s.server.held.opened

    _serve(tmp_path, test)
    assert seen[0] is not None
    assert says in seen[0]
    probe = http_endpoints.Probe(loaded=True, loop_started=True, loop_idle_seconds=1.0,
                                 broken=seen[0])  # fmt: skip
    for path in ("/readyz", "/healthz"):
        assert http_endpoints.answer(path, probe) == (503, f"unhealthy: {seen[0]}\n")
