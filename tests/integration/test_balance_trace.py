"""A tiny trace through the balancing benchmark (tests/bench/bench_balance_trace.py): gtvp's
balancer and the real descheduler each relieve one hot member on the real API server, the
stand-in turning the descheduler's evictions into live migrations (so the benchmark cannot
rot: `make bench` runs the full traces)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gtvp_local import toolchain
from gtvp_local.controlplane import ControlPlane, ephemeral_control_plane
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


@pytest.fixture(scope="module")
def own_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane of its own, as `make bench` runs the benchmark: its stand-in acts on
    every VMI, migration and Node there, so nothing another test left may be in its way
    (on the session's control plane a loaded CI run saw no VMI of the trace run in time)."""
    with ephemeral_control_plane(tmp_path_factory.mktemp("balance") / "cp") as cp:
        yield cp


@pytest.fixture
def clients(own_control_plane: ControlPlane, tmp_path: Path) -> Iterator[Clients]:
    c = Clients(own_control_plane)
    webhook, stop = _standin(c, tmp_path)
    yield c
    stop()
    webhook.stop()


@pytest.mark.parametrize("system", ["gtvp", "descheduler"])
def test_a_hot_member_is_relieved_once_without_oscillation(
    own_control_plane: ControlPlane, clients: Clients, tmp_path: Path, system: str
) -> None:
    replay = Replay(clients, TINY, system)
    replay.c_kubeconfig = own_control_plane.admin_kubeconfig
    binary = toolchain.descheduler(verbose=False) if system == "descheduler" else None
    r = replay.run(binary, 5.0, tmp_path)
    assert hindsight(TINY).migrations == 1
    assert r.migrations >= 1, r.moves
    assert r.refused == 0, r.moves
    assert r.moved_twice == 0, r.moves
    assert r.unconverged == 0
    if system == "gtvp":
        assert r.migrations == 1, r.moves
