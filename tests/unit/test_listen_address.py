"""gtvp's listeners on IPv6: the chart's `0.0.0.0` took no IPv6 connection, so in a cluster
whose pods and Services are IPv6 the API server reached no webhook (every gated VM start
refused, fail closed) and no guest reached key release, while the pod stayed Ready; an
IPv6 address could not be given at all (the servers were IPv4 sockets). `*` now listens
on every address, IPv6 and IPv4, on real sockets here."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from gtvp import http_endpoints
from gtvp.listen_address import bind_for
from gtvp.webhook_config import WEBHOOK_IDS
from gtvp.webhook_server import DrainingWebhookServer
from gtvp_local import pki
from gtvp_local.processes import free_port

needs_ipv6 = pytest.mark.skipif(
    not socket.has_dualstack_ipv6(), reason="this host has no dual-stack IPv6 sockets"
)


def _probe() -> http_endpoints.Probe:
    return http_endpoints.Probe(loaded=True, loop_started=False, loop_idle_seconds=0)


def _answers(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=3) as got:
            return bool(got.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def test_an_address_says_which_family_and_every_address_is_both() -> None:
    assert bind_for("127.0.0.1").family == socket.AF_INET
    assert bind_for("::1").family == socket.AF_INET6
    assert bind_for("[::1]").host == "::1"
    assert bind_for("localhost").host == "127.0.0.1"
    if socket.has_dualstack_ipv6():
        assert bind_for("*") == bind_for(None) == bind_for("::")
        assert bind_for("*").dualstack


def test_a_name_binds_its_ipv4_address_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod's /etc/hosts lists ::1 for localhost first: `--metrics-address=localhost` with a
    proxy sidecar talking to 127.0.0.1 must keep binding 127.0.0.1 (found by a review)."""
    answers = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
    ]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *_a, **_k: answers)
    assert bind_for("localhost") == bind_for("127.0.0.1")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *_a, **_k: answers[:1])
    assert bind_for("ip6-only.example").host == "::1"


@needs_ipv6
def test_the_http_endpoints_listen_on_ipv6_and_on_every_address() -> None:
    for address, v4, v6 in (("*", True, True), ("::1", False, True), ("127.0.0.1", True, False)):
        server = http_endpoints.serve(0, address, CollectorRegistry(), _probe)
        try:
            port = server.server_address[1]
            assert (_answers("127.0.0.1", port), _answers("[::1]", port)) == (v4, v6), address
        finally:
            server.shutdown()
            server.server_close()


@needs_ipv6
def test_the_webhooks_answer_over_ipv6_and_ipv4_on_every_address(tmp_path: Path) -> None:
    ca = pki.ensure_ca(tmp_path / "serving", "serving-ca")
    cert = pki.issue(ca, tmp_path / "serving", "webhook", common_name="gtvp",
                     server_ips=("127.0.0.1", "::1"))  # fmt: skip
    port = free_port()
    server = DrainingWebhookServer(
        addr="*",
        port=port,
        certfile=str(cert.cert),
        pkeyfile=str(cert.key),
        closing=lambda: False,
        webhook_ids=WEBHOOK_IDS,
        refused=lambda _why: None,
    )
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}

    async def allow(data: dict[str, object], **_: object) -> dict[str, object]:
        return {"response": {"uid": "u", "allowed": True}}

    async def run() -> list[int]:
        context = ssl.create_default_context(cafile=str(ca.cert))
        out = []
        async with server:
            await server(allow).__anext__()
            async with aiohttp.ClientSession() as session:
                for host in ("127.0.0.1", "[::1]"):
                    body = json.dumps({**review, "request": {"uid": "u"}})
                    url = f"https://{host}:{port}/gtvp-validate-vm"
                    async with session.post(url, data=body, ssl=context) as response:
                        await response.read()
                        out.append(response.status)
        return out

    assert asyncio.run(run()) == [200, 200]
