"""Every API call of the operator is bounded in time (`gtvp.kube.API_TIMEOUT`): a call the
API server never answers fails instead of holding its thread forever."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gtvp import kube


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers (a partitioned API server,
    a half-open connection after a restart)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(sock.getsockname()[1])
    stop.set()
    thread.join()
    for c in held:
        c.close()
    sock.close()


def _kubeconfig(tmp_path: Path, port: int) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
"""
    )
    return str(path)


def test_a_call_the_api_server_never_answers_fails_within_the_timeout(
    silent_server: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube, "API_TIMEOUT", (1.0, 0.3))
    clients = kube.make_clients(_kubeconfig(tmp_path, silent_server))
    started = time.monotonic()
    with pytest.raises(Exception, match=r"(?i)timed? ?out"):
        clients.core.read_namespaced_secret("s", "ns")
    assert time.monotonic() - started < 10  # retried reads included, never forever
    # a call that names its own timeout keeps it
    started = time.monotonic()
    with pytest.raises(Exception, match=r"(?i)timed? ?out"):
        clients.core.list_namespace(_request_timeout=(1.0, 1.5))
    assert time.monotonic() - started >= 1.5
