"""Only the API server's webhook client certificate gets a review answered.

Attacker: anyone who reaches the webhook port (a pod, root on a host holding a kubelet's or an
agent's client certificate of the cluster CA) posts a review to learn what gtvp knows about
any VMI. With --webhook-client-ca and --webhook-client-name the operator's webhook server, on
a real TLS socket here, refuses a caller without a certificate or with one of another CA in
the handshake, and one of the right CA with another name with 403, before any handler runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gtvp import operator_main
from gtvp.core.webhook_callers import CALLER_NOT_ALLOWED, caller_allowed, common_names
from gtvp.webhook_config import WEBHOOK_IDS
from gtvp.webhook_server import DrainingWebhookServer
from gtvp_local import pki
from gtvp_local.processes import free_port

API_SERVER = "kube-apiserver-webhook-client"
CA, NAME = "--webhook-client-ca", "--webhook-client-name"
REVIEW = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "1"}}


class Certs:
    def __init__(self, root: Path) -> None:
        self.serving_ca = pki.ensure_ca(root / "serving", "serving-ca")
        self.serving = pki.issue(
            self.serving_ca,
            root / "serving",
            "webhook",
            common_name="gtvp",
            server_ips=("127.0.0.1",),
        )
        self.client_ca = pki.ensure_ca(root / "client", "webhook-client-ca")
        self.cluster_ca = pki.ensure_ca(root / "cluster", "cluster-ca")
        self.root = root

    def client(self, ca: pki.KeyPair, name: str, **kw: Any) -> pki.KeyPair:
        stem = f"{name}-{ca.cert.parent.name}{'-server' if kw else ''}"
        return pki.issue(ca, self.root / "clients", stem, common_name=name, **kw)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def _ask(
    certs: Certs,
    client: pki.KeyPair | None,
    *,
    names: tuple[str, ...] = (API_SERVER,),
    path: str = "gtvp-validate-vm",
) -> tuple[int | str, list[Any], list[str]]:
    """Serve the webhooks with client authentication on a real socket, post one review as
    `client`; (HTTP status or the client's error, the handler's calls, refusals counted)."""
    called: list[Any] = []
    refused: list[str] = []

    async def fn(data: Any, **kwargs: Any) -> Any:
        called.append(kwargs.get("sslpeer"))
        return {"response": {"uid": "1", "allowed": True}}

    server = DrainingWebhookServer(
        addr="127.0.0.1",
        port=free_port(),
        certfile=str(certs.serving.cert),
        pkeyfile=str(certs.serving.key),
        closing=lambda: False,
        webhook_ids=WEBHOOK_IDS,
        client_ca=str(certs.client_ca.cert),
        client_names=names,
        refused=refused.append,
    )
    context = ssl.create_default_context(cafile=str(certs.serving_ca.cert))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))

    async def run() -> int | str:
        serving = server(fn)
        config = await serving.__anext__()
        try:
            async with aiohttp.ClientSession() as session:
                try:
                    async with session.post(
                        f"{config['url']}/{path}", data=json.dumps(REVIEW), ssl=context
                    ) as response:
                        await response.read()
                        return response.status
                except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
                    return type(exc).__name__
        finally:
            await serving.aclose()

    return asyncio.run(run()), called, refused


def test_the_api_servers_certificate_is_answered(certs: Certs) -> None:
    status, called, refused = _ask(certs, certs.client(certs.client_ca, API_SERVER))
    assert status == 200
    assert len(called) == 1
    assert common_names(called[0]) == (API_SERVER,)
    assert refused == []


def test_a_caller_without_a_certificate_is_refused_in_the_handshake(certs: Certs) -> None:
    status, called, _ = _ask(certs, None)
    assert status != 200
    assert isinstance(status, str)
    assert called == []


def test_a_certificate_of_the_cluster_ca_is_refused_in_the_handshake(certs: Certs) -> None:
    """Root on a host holds its kubelet's and agent's certificates of the cluster CA: even
    one with the API server's own name is not of the webhook client CA."""
    status, called, _ = _ask(certs, certs.client(certs.cluster_ca, API_SERVER))
    assert status != 200
    assert isinstance(status, str)
    assert called == []


def test_another_name_of_the_right_ca_is_refused_before_any_handler(certs: Certs) -> None:
    status, called, refused = _ask(certs, certs.client(certs.client_ca, "someone-else"))
    assert status == 403
    assert called == []
    assert refused == [CALLER_NOT_ALLOWED]


def test_without_names_any_certificate_of_the_ca_is_answered(certs: Certs) -> None:
    status, called, _ = _ask(certs, certs.client(certs.client_ca, "another-api-server"), names=())
    assert status == 200
    assert len(called) == 1


def test_a_second_allowed_name_is_answered(certs: Certs) -> None:
    names = (API_SERVER, "kube-apiserver-b")
    status, called, _ = _ask(certs, certs.client(certs.client_ca, "kube-apiserver-b"), names=names)
    assert status == 200
    assert len(called) == 1


def test_a_server_certificate_of_the_ca_with_the_right_name_is_answered_only_for_clients(
    certs: Certs,
) -> None:
    """A certificate the CA issued for serving (extendedKeyUsage serverAuth) is no client
    certificate: OpenSSL refuses it in the handshake."""
    server_only = certs.client(certs.client_ca, API_SERVER, server_ips=("127.0.0.1",))
    status, called, _ = _ask(certs, server_only)
    assert status != 200
    assert called == []


def test_names_are_read_from_the_verified_subject_only() -> None:
    one = {"subject": ((("organizationName", "system:masters"),), (("commonName", "a"),))}
    two = {"subject": ((("commonName", "a"),), (("commonName", "b"),))}
    assert common_names(one) == ("a",)
    assert caller_allowed(one, {"a"})
    assert not caller_allowed(one, {"b"})
    assert not caller_allowed(two, {"a", "b"})  # which name counts is not the signer's choice
    assert not caller_allowed({}, {"a"})
    assert not caller_allowed(None, {"a"})
    assert caller_allowed(None, ())  # no names asked: the CA alone decides


def test_names_need_a_ca() -> None:
    with pytest.raises(ValueError, match="client CA"):
        DrainingWebhookServer(port=0, closing=lambda: False, client_names=(API_SERVER,))


# ----- the operator's flags ---------------------------------------------------------------------
def _args(*argv: str) -> argparse.Namespace:
    return operator_main.parser().parse_args(list(argv))


@pytest.fixture
def ca_file(certs: Certs) -> str:
    return str(certs.client_ca.cert)


def test_the_flags_give_the_server_its_ca_and_names(ca_file: str) -> None:
    args = _args(CA, ca_file, NAME, API_SERVER)
    operator_main.check_webhook_clients(args)
    settings = operator_main.settings_from(args)
    assert settings.webhook_client_ca == ca_file
    assert settings.webhook_client_names == (API_SERVER,)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([NAME, API_SERVER], "needs --webhook-client-ca"),
        ([CA, "{ca}"], "needs --webhook-client-name"),
        ([CA, "/nonexistent/ca.crt", NAME, "x"], "cannot read"),
        ([CA, "{leaf}", NAME, "x"], "is not a CA certificate"),
        ([CA, "{key}", NAME, "x"], "holds PRIVATE KEY besides certificates"),
        ([CA, "{both}", NAME, "x"], "holds PRIVATE KEY besides certificates"),
        ([CA, "{garbage}", NAME, "x"], "holds no PEM certificate"),
        ([CA, "{ca}", NAME, " x"], "a certificate common name"),
        ([CA, "{ca}", NAME, "x", "--webhook-port", "0"], "--webhook-port 0"),
    ],
)  # fmt: skip
def test_flags_that_cannot_authenticate_the_api_server_stop_the_operator(
    certs: Certs, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = certs.client(certs.client_ca, API_SERVER)
    both = certs.root / "ca-and-key.pem"  # a CA file that also holds the CA's key
    both.write_bytes(certs.client_ca.cert.read_bytes() + certs.client_ca.key.read_bytes())
    garbage = certs.root / "garbage.pem"
    garbage.write_text("not a certificate\n")
    files = {
        "ca": str(certs.client_ca.cert),
        "leaf": str(leaf.cert),
        "key": str(leaf.key),
        "both": str(both),
        "garbage": str(garbage),
    }
    argv = [a.format(**files) for a in argv]
    with pytest.raises(ValueError, match=message):
        operator_main.check_webhook_clients(_args(*argv))
    assert operator_main.main(argv) == 2
    assert message.strip("-") in capsys.readouterr().err
