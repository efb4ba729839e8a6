"""The operator's /readyz, /healthz and /metrics, served over real HTTP on loopback."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from gtvp import http_endpoints
from gtvp.http_endpoints import Probe
from gtvp_local.processes import free_port


@pytest.fixture
def served() -> Iterator[tuple[str, list[Probe]]]:
    registry = CollectorRegistry()
    Counter("gtvp_test_total", "a counter", registry=registry).inc(3)
    state = [Probe(loaded=False, loop_started=False, loop_idle_seconds=0.0)]
    port = free_port()
    server = http_endpoints.serve(port, "127.0.0.1", registry, lambda: state[0])
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.shutdown()
        server.server_close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - http on loopback
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_not_ready_until_the_pool_is_loaded(served: tuple[str, list[Probe]]) -> None:
    base, state = served
    code, text = _get(f"{base}/readyz")
    assert code == 503
    assert "still loading" in text
    state[0] = Probe(loaded=True, loop_started=True, loop_idle_seconds=1.0)
    assert _get(f"{base}/readyz")[0] == 200


def test_healthz_fails_when_the_recheck_loop_stalls(served: tuple[str, list[Probe]]) -> None:
    base, state = served
    assert _get(f"{base}/healthz")[0] == 200  # still starting: not a reason to restart
    state[0] = Probe(loaded=True, loop_started=True, loop_idle_seconds=10.0)
    assert _get(f"{base}/healthz")[0] == 200
    state[0] = Probe(loaded=True, loop_started=True, loop_idle_seconds=300.0)
    code, text = _get(f"{base}/healthz")
    assert code == 503
    assert "has not turned for 300s" in text


def test_a_request_with_headers_beyond_16_kib_is_refused_before_it_is_held(
    served: tuple[str, list[Probe]],
) -> None:
    """http.client alone would hold 100 headers of 64 KiB each (6.5 MB per connection, a
    few hundred connections kill a replica): the line and headers get 16 KiB in all."""
    base, _ = served
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            s.sendall(b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(20)))
            s.sendall(b"\r\n")
            answer = s.recv(200)
        except (BrokenPipeError, ConnectionResetError):
            # the server answered 431 and closed while the rest was still coming in
            answer = b"HTTP/1.0 431 (the connection was reset after it)"
    assert answer.startswith(b"HTTP/1.0 431"), answer  # not served (200 before the budget)
    # a request under the budget is answered as before
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 8000 + b"\r\n\r\n")
        assert s.recv(200).startswith(b"HTTP/1.0 200")


def test_the_metrics_page_is_served_on_its_own_path_only(served: tuple[str, list[Probe]]) -> None:
    base, _ = served
    for path in ("/", "/version", "/metricsx"):
        code, text = _get(f"{base}{path}")
        assert code == 404, path
        assert "gtvp_test_total" not in text


def test_metrics_still_served(served: tuple[str, list[Probe]]) -> None:
    base, _ = served
    code, text = _get(f"{base}/metrics")
    assert code == 200
    assert "gtvp_test_total 3.0" in text


def test_the_probe_port_answers_only_the_probes_and_only_on_loopback() -> None:
    """`--probe-port`: what the chart's exec probes ask, unreachable from outside the pod."""
    state = [Probe(loaded=False, loop_started=False, loop_idle_seconds=0.0)]
    port = free_port()
    server = http_endpoints.serve_probes(port, lambda: state[0])
    try:
        assert server.server_address[0] == "127.0.0.1"
        base = f"http://127.0.0.1:{port}"
        assert _get(f"{base}/readyz")[0] == 503
        state[0] = Probe(loaded=True, loop_started=True, loop_idle_seconds=1.0)
        assert _get(f"{base}/readyz") == (200, "ready: members, VMs, VMIs and migrations loaded\n")
        assert _get(f"{base}/healthz") == (200, "ok\n")
        status, text = _get(f"{base}/metrics")
        assert status == 404
        assert "gtvp_" not in text
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--probe-port", "9090"], "--probe-port 9090 is also the --metrics-port"),
        (["--probe-port", "9443"], "--probe-port 9443 is also the --webhook-port"),
        (["--probe-port", "70000"], "--probe-port 70000: a TCP port (1-65535) is needed"),
    ],
)
def test_a_probe_port_taken_by_another_port_stops_the_operator_with_a_clear_error(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gtvp import operator_main

    assert operator_main.main(argv) == 2
    assert says in capsys.readouterr().err
