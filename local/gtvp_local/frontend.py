"""SIMULATION of a Kubernetes Service in front of the operator replicas' webhooks (and, with
several replicas, of the Service in front of their key-release ports).

In a cluster the API server calls the webhooks through a Service, and kube-proxy sends each
new connection to a ready endpoint (a pod whose readiness probe passes). The local pool has
no kube-proxy, so this small TCP front stands in for it: it listens on the pool's webhook
port and forwards each connection, bytes as they are (TLS passthrough: every replica serves
the same certificate), to a replica whose `/readyz` answered 200 at the last poll (every
0.25 s), round robin, trying the next ready one when a connect fails. Like kube-proxy it
never retries a request: a connection whose replica dies mid-request fails, as it would in a
cluster.

Run by `gtvp_local.pool` as `python -m gtvp_local.frontend --listen PORT --backend
PORT:METRICS_PORT ...` (`--address`: where it listens and the replicas' ports are, loopback
by default; the VM bridge's address for key release with real VMs, so guests reach it); it
never runs in a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field

POLL_SECONDS = 0.25
PROBE_TIMEOUT = 0.5
CONNECT_TIMEOUT = 1.0

log = logging.getLogger("gtvp_local.frontend")


@dataclass
class Backend:
    """One replica: where its webhooks (or key release) listen and where its /readyz answers
    (always on loopback)."""

    webhook_port: int
    metrics_port: int
    ready: bool = False
    address: str = "127.0.0.1"

    def __str__(self) -> str:
        return f"{self.address}:{self.webhook_port}"


@dataclass
class Front:
    """The endpoints and the round-robin position."""

    backends: list[Backend]
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    def candidates(self) -> list[Backend]:
        """The ready backends, starting at the next one in turn."""
        ready = [b for b in self.backends if b.ready]
        if not ready:
            return []
        start = next(self._turn) % len(ready)
        return ready[start:] + ready[:start]


async def probe(backend: Backend) -> bool:
    """True when the replica's /readyz answers 200 within PROBE_TIMEOUT."""

    async def ask() -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", backend.metrics_port)
        try:
            writer.write(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            line = await reader.readline()
            return line.split()[1:2] == [b"200"]
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(ask(), PROBE_TIMEOUT)
    except (OSError, TimeoutError, IndexError):
        return False


async def poll(front: Front) -> None:
    """Keep each backend's readiness current, logging every change."""
    while True:
        results = await asyncio.gather(*(probe(b) for b in front.backends))
        for backend, ready in zip(front.backends, results, strict=True):
            if ready != backend.ready:
                log.info("endpoint %s %s", backend, "ready" if ready else "NOT ready")
            backend.ready = ready
        await asyncio.sleep(POLL_SECONDS)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()


async def _connect(
    front: Front,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    for backend in front.candidates():
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(backend.address, backend.webhook_port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            log.info("endpoint %s refused a connection; trying the next", backend)
    return None


async def serve_client(
    front: Front, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Forward one client connection to a ready replica (closed if none is)."""
    upstream = await _connect(front)
    if upstream is None:
        log.warning("no ready endpoint: connection closed")
        writer.close()
        return
    up_reader, up_writer = upstream
    with contextlib.suppress(asyncio.CancelledError):  # the front stopping
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def run(port: int, backends: Sequence[Backend], address: str = "127.0.0.1") -> None:
    for backend in backends:
        backend.address = address
    front = Front(list(backends))
    server = await asyncio.start_server(
        lambda r, w: serve_client(front, r, w), address, port, reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    poller = asyncio.create_task(poll(front))
    log.info("SIMULATION of a Service: %s:%d -> %s", address, port, ", ".join(map(str, backends)))
    async with server:
        await stop.wait()
    poller.cancel()


def parse_backend(text: str) -> Backend:
    webhook, metrics = text.split(":")
    return Backend(int(webhook), int(metrics))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gtvp_local.frontend", description=__doc__)
    p.add_argument("--listen", type=int, required=True, help="the Service's port")
    p.add_argument(
        "--address", default="127.0.0.1", help="where it listens and the backends listen"
    )
    p.add_argument(
        "--backend",
        type=parse_backend,
        action="append",
        required=True,
        help="PORT:METRICS_PORT of one replica (repeat per replica)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    asyncio.run(run(args.listen, args.backend, args.address))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
