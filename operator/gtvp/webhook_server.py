"""kopf's webhook server, closing each connection after its answer once the replica stops.

The API server keeps its connections to a webhook open and sends the next review on the same
one; a Service (kube-proxy) routes only *new* connections to ready replicas. A replica that
is shutting down therefore answers every review it still gets, and asks the client to close
that connection (`Connection: close`), so the next review opens a connection that reaches a
ready replica instead of one that is about to go away.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp.web
import kopf


class DrainingWebhookServer(kopf.WebhookServer):
    """`kopf.WebhookServer` that force-closes connections while `closing()` is true."""

    def __init__(self, *args: Any, closing: Callable[[], bool], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closing = closing

    async def _serve(  # type: ignore[override]  # kopf's is a staticmethod
        self, fn: Any, request: aiohttp.web.Request
    ) -> aiohttp.web.Response:
        response = await kopf.WebhookServer._serve(fn, request)
        if self.closing():
            response.force_close()
        return response
