"""The operator's plain-HTTP endpoints: `/metrics`, `/healthz` (liveness), `/readyz` (readiness).

`/readyz` answers 200 only once the operator has loaded the members' verdicts, VMs, VMIs and
migrations (before that its webhooks are not yet served), and only while its presence Lease
is renewed and it is not shutting down, so a Service sends admission requests only to a
replica that can judge them. `/healthz` answers 200 while the recheck
loop keeps turning (it wakes at least every 30 s); a wedged event loop gets the pod
restarted. Both say why in their body.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

STALL_AFTER = 90.0  # seconds without a turn of the recheck loop before /healthz fails


@dataclass(frozen=True)
class Probe:
    """What the probes read: set by the operator's handlers."""

    loaded: bool
    loop_started: bool
    loop_idle_seconds: float
    unready_because: str | None = None
    """Why this replica must not answer admission although loaded (None: nothing)."""


def answer(path: str, probe: Probe) -> tuple[int, str] | None:
    """(HTTP status, text) for a probe path; None for any other path."""
    if path == "/readyz":
        if not probe.loaded:
            return 503, "not ready: still loading the pool from the API server\n"
        if probe.unready_because is not None:
            return 503, f"not ready: {probe.unready_because}\n"
        return 200, "ready: members, VMs, VMIs and migrations loaded\n"
    if path == "/healthz":
        if probe.loop_started and probe.loop_idle_seconds > STALL_AFTER:
            return 503, (
                f"unhealthy: the recheck loop has not turned for {probe.loop_idle_seconds:.0f}s\n"
            )
        return 200, "ok\n"
    return None


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes come every few seconds: no access log."""


def serve(
    port: int, address: str, registry: CollectorRegistry, read: Callable[[], Probe]
) -> ThreadingWSGIServer:
    """Serve the three endpoints on a daemon thread; returns the server (for tests)."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        got = answer(str(environ.get("PATH_INFO", "")), read())
        if got is None:
            result: Iterable[bytes] = metrics(environ, start)
            return result
        status, text = got
        reason = "OK" if status == 200 else "Service Unavailable"
        start(f"{status} {reason}", [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode()]

    server = make_server(address, port, app, ThreadingWSGIServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="gtvp-http", daemon=True).start()
    return server


def idle_since(heartbeat: float) -> float:
    """Seconds since a monotonic heartbeat (0 when it never beat)."""
    return time.monotonic() - heartbeat if heartbeat else 0.0
