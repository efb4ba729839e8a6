"""kopf's webhook server, closing each connection after its answer once the replica stops,
answering only the webhooks gtvp registers, and keeping nothing of what a review carries.

The API server keeps its connections to a webhook open and sends the next review on the same
one; a Service (kube-proxy) routes only *new* connections to ready replicas. A replica that
is shutting down therefore answers every review it still gets, and asks the client to close
that connection (`Connection: close`), so the next review opens a connection that reaches a
ready replica instead of one that is about to go away.

The port is reachable from the pod network and a review is not authenticated (the API server
presents no client certificate by default), so anyone may post one. kopf keeps a memo per
object uid for every review that is not a CREATE, for the life of the process (it forgets one
only when a watch sees that object deleted): forged reviews with ever new uids (up to 1 MiB
each) would grow every replica until it is killed, and with no replica running verdicts
expire while the Nodes keep their labels. `AdmissionMemories` keeps no memo from a review
(gtvp's handlers keep their state in the Runtime, not in kopf's memos). A review posted to a
path that names no gtvp webhook is refused (kopf would allow it: no handler, no objection).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import aiohttp.web
import kopf
from kopf._core.reactor.inventory import ResourceMemories


class DrainingWebhookServer(kopf.WebhookServer):
    """`kopf.WebhookServer` that force-closes connections while `closing()` is true."""

    def __init__(
        self,
        *args: Any,
        closing: Callable[[], bool],
        webhook_ids: Collection[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.closing = closing
        self.webhook_ids = frozenset(webhook_ids)

    async def _serve(  # type: ignore[override]  # kopf's is a staticmethod
        self, fn: Any, request: aiohttp.web.Request
    ) -> aiohttp.web.Response:
        if self.webhook_ids and request.match_info.get("id", "") not in self.webhook_ids:
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
