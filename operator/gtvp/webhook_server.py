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

import logging
import ssl
from collections.abc import Callable, Collection
from typing import Any

import aiohttp.web
import kopf
from kopf._core.reactor.inventory import ResourceMemories

from gtvp.core.webhook_callers import (
    CALLER_NOT_ALLOWED,
    UNKNOWN_WEBHOOK,
    caller_allowed,
    common_names,
)

log = logging.getLogger(__name__)


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
            response = await kopf.WebhookServer._serve(fn, request)
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
