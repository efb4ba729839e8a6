"""A tiny trace through the balancing benchmark (tests/bench/bench_balance_trace.py): gtvp's
balancer and the real descheduler each relieve one hot member on the real API server, the
stand-in turning the descheduler's evictions into live migrations (so the benchmark cannot
rot: `make bench` runs the full traces)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gtvp_local import toolchain
from gtvp_local.controlplane import ControlPlane
from gtvp_local.trace import GI, Event, Trace, hindsight
from tests.bench.bench_balance_trace import Clients, Replay, _standin

pytestmark = pytest.mark.controlplane

TINY = Trace(
    "tiny",
    ("m1", "m2"),
    8000,
    32 * GI,
    tuple(Event(0, "create", f"v{i}", "m1", 1000, 2 * GI) for i in range(7)),  # m1 at 87.5 %
    18.0,
)


@pytest.fixture
def clients(control_plane: ControlPlane, tmp_path: Path) -> Iterator[Clients]:
    c = Clients(control_plane)
    webhook, stop = _standin(c, tmp_path)
    yield c
    stop()
    webhook.stop()


@pytest.mark.parametrize("system", ["gtvp", "descheduler"])
def test_a_hot_member_is_relieved_once_without_oscillation(
    control_plane: ControlPlane, clients: Clients, tmp_path: Path, system: str
) -> None:
    replay = Replay(clients, TINY, system)
    replay.c_kubeconfig = control_plane.admin_kubeconfig
    binary = toolchain.descheduler(verbose=False) if system == "descheduler" else None
    r = replay.run(binary, 5.0, tmp_path)
    assert hindsight(TINY).migrations == 1
    assert r.migrations >= 1, r.moves
    assert r.refused == 0, r.moves
    assert r.moved_twice == 0, r.moves
    assert r.unconverged == 0
    if system == "gtvp":
        assert r.migrations == 1, r.moves
