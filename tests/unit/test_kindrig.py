"""kind/e2e.sh's rig (gtvp_local.kindrig): its pure parts, and that `up` installs through
`installation.install` exactly as the real-node rig does (chart's default node placement,
the pool's policy, the swtpm TCTIs), without Docker, kind or helm."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from gtvp_local import installation, kindrig, pool, toolchain
from gtvp_local.kindrig import (
    KindRigError,
    RigState,
    ipv4_gateway,
    parse_kind_nodes,
    parse_node_list,
    port_plan,
    tcti,
    tpm_maps,
)


def test_kind_get_nodes_output() -> None:
    out = "gtvp-worker2\ngtvp-control-plane\ngtvp-worker\n\n"
    assert parse_kind_nodes(out) == ["gtvp-control-plane", "gtvp-worker", "gtvp-worker2"]
    assert parse_kind_nodes('No kind nodes found for cluster "gtvp".\n') == []
    assert parse_kind_nodes("") == []


def test_node_list_flag() -> None:
    assert parse_node_list("a, b,,a,c ") == ["a", "b", "c"]
    assert parse_node_list("") == []


def test_gateway_is_the_ipv4_one() -> None:
    assert ipv4_gateway("fc00:f853:ccd:e793::1 172.18.0.1 ") == "172.18.0.1"
    assert ipv4_gateway("172.19.0.1\n") == "172.19.0.1"
    with pytest.raises(KindRigError, match="--host"):
        ipv4_gateway("fc00:f853:ccd:e793::1 ")
    with pytest.raises(KindRigError, match="no IPv4 gateway"):
        ipv4_gateway("")


def test_ports_known_then_base_then_free() -> None:
    nodes = ["cp", "w1", "w2"]
    assert port_plan(nodes, None) == {"cp": None, "w1": None, "w2": None}
    assert port_plan(nodes, 23210) == {"cp": 23210, "w1": 23212, "w2": 23214}
    assert port_plan(nodes, None, {"w1": 25000}) == {"cp": None, "w1": 25000, "w2": None}
    assert port_plan(nodes, 23210, {"cp": 30000})["cp"] == 30000
    with pytest.raises(KindRigError, match="out of range"):
        port_plan(nodes, 65532)


def test_tcti_maps_pods_and_tests() -> None:
    pods, tests = tpm_maps({"cp": 2321, "w1": 2323}, pod_host="172.18.0.1", test_host="10.0.0.5")
    assert pods == {
        "cp": "swtpm:host=172.18.0.1,port=2321",
        "w1": "swtpm:host=172.18.0.1,port=2323",
    }
    assert tests == {"cp": "swtpm:host=10.0.0.5,port=2321", "w1": "swtpm:host=10.0.0.5,port=2323"}
    assert tcti("h", 1) == "swtpm:host=h,port=1"


def test_tcti_is_what_swtpm_gives(tmp_path: Path) -> None:
    from gtvp_local.processes import ProcessTable
    from gtvp_local.swtpm import Swtpm

    tpm = Swtpm("n", tmp_path / "n", ProcessTable(tmp_path), 24000, host="172.18.0.1")
    assert tcti("172.18.0.1", 24000) == tpm.tcti


def test_rig_state_round_trip(tmp_path: Path) -> None:
    assert RigState.load(tmp_path) is None
    RigState("gtvp", "172.18.0.1", {"a": 2321}, "/k").save(tmp_path / "s")
    assert RigState.load(tmp_path / "s") == RigState("gtvp", "172.18.0.1", {"a": 2321}, "/k")
    (tmp_path / "s" / kindrig.RIG_FILE).write_text("{not json")
    assert RigState.load(tmp_path / "s") is None
    (tmp_path / "s" / kindrig.RIG_FILE).write_text(json.dumps({"cluster": "x"}))
    assert RigState.load(tmp_path / "s") is None


def test_policy_timing_is_the_real_node_rigs() -> None:
    """realpool calls pool_policy(ca) with its defaults; kind uses the same timing."""
    params = inspect.signature(pool.pool_policy).parameters
    assert params["interval"].default == kindrig.INTERVAL
    assert params["valid_for"].default == kindrig.VALID_FOR


class FakeCA:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def ensure(self) -> FakeCA:
        return self


class FakeSwtpm:
    started: ClassVar[list[str]] = []
    next_port = 26000

    def __init__(
        self, name: str, state: Path, procs: object, port: int | None = None, *, host: str
    ) -> None:
        self.name, self.host = name, host
        if port is None:
            port, FakeSwtpm.next_port = FakeSwtpm.next_port, FakeSwtpm.next_port + 2
        self.port = port

    @property
    def tcti(self) -> str:
        return f"swtpm:host={self.host},port={self.port}"

    def manufacture(self, ca: object) -> None:
        assert isinstance(ca, FakeCA)

    def start(self) -> None:
        FakeSwtpm.started.append(self.name)


@pytest.fixture
def fake_rig(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    calls: dict[str, Any] = {}
    FakeSwtpm.started = []
    FakeSwtpm.next_port = 26000
    monkeypatch.setattr(kindrig, "SwtpmCA", FakeCA)
    monkeypatch.setattr(kindrig, "Swtpm", FakeSwtpm)

    def policy(ca: object, **kw: Any) -> dict[str, Any]:
        calls["policy"] = kw
        return {"metadata": {"name": "default"}}

    def install(**kw: Any) -> installation.Installation:
        calls["install"] = kw
        return installation.Installation(
            kubeconfig=str(kw["kubeconfig"]), members=dict(kw["test_tpms"]), rig=kw["rig"]
        )

    monkeypatch.setattr(kindrig, "pool_policy", policy)
    monkeypatch.setattr(installation, "install", install)
    return calls


def test_up_installs_through_the_shared_path(tmp_path: Path, fake_rig: dict[str, Any]) -> None:
    said: list[str] = []
    found = kindrig.up(
        state=tmp_path / "rig",
        kubeconfig=tmp_path / "kubeconfig",
        nodes=["gtvp-control-plane", "gtvp-worker", "gtvp-worker2"],
        host="172.18.0.1",
        image_ref="ghcr.io/gtvp/gtvp:0.1.0",
        helm=Path("/h"),
        kubectl=Path("/k"),
        say=said.append,
    )
    kw = fake_rig["install"]
    expected = {
        "gtvp-control-plane": "swtpm:host=172.18.0.1,port=26000",
        "gtvp-worker": "swtpm:host=172.18.0.1,port=26002",
        "gtvp-worker2": "swtpm:host=172.18.0.1,port=26004",
    }
    assert kw["pod_tpms"] == expected
    assert kw["test_tpms"] == expected
    assert kw["node_selector"] is None  # the chart's default: operator on the control plane
    assert kw["state_host_path"] is None
    assert kw["rig"] == "kind"
    assert (kw["helm"], kw["kubectl"]) == (Path("/h"), Path("/k"))
    assert kw["image"] == "ghcr.io/gtvp/gtvp:0.1.0"
    assert kw["identity"] == 3
    assert kw["replicas"] == 2
    assert kw["policy"] == {"metadata": {"name": "default"}}
    assert fake_rig["policy"] == {"interval": "5s", "valid_for": "15s"}
    assert FakeSwtpm.started == list(expected)
    assert found.members == expected
    assert found.rig == "kind"
    assert len([m for m in said if "swtpm on" in m]) == 3
    saved = RigState.load(tmp_path / "rig")
    assert saved is not None
    assert saved.ports == {n: int(t[-5:]) for n, t in expected.items()}

    # a second up on the same host keeps each node's port
    FakeSwtpm.next_port = 28000
    kindrig.up(
        state=tmp_path / "rig",
        kubeconfig=tmp_path / "kubeconfig",
        nodes=["gtvp-control-plane", "gtvp-worker", "gtvp-worker2"],
        host="172.18.0.1",
        image_ref="ghcr.io/gtvp/gtvp:0.1.0",
        helm=Path("/h"),
        kubectl=Path("/k"),
        say=said.append,
    )
    assert fake_rig["install"]["pod_tpms"] == expected


def test_main_up_writes_the_installation(
    tmp_path: Path, fake_rig: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "installation.json"
    rc = kindrig.main(
        [
            "up",
            "--kubeconfig",
            str(tmp_path / "kc"),
            "--state",
            str(tmp_path / "rig"),
            "--out",
            str(out),
            "--nodes",
            "a,b",
            "--host",
            "172.18.0.1",
            "--image",
            "ghcr.io/gtvp/gtvp:0.1.0",
            "--base-port",
            "23210",
        ]
    )
    assert rc == 0
    loaded = installation.Installation.load(out)
    assert loaded.rig == "kind"
    assert loaded.members == {
        "a": "swtpm:host=172.18.0.1,port=23210",
        "b": "swtpm:host=172.18.0.1,port=23212",
    }
    assert installation.ENV in capsys.readouterr().out


def test_main_reports_errors_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_kind(cluster: str) -> list[str]:
        raise KindRigError(f"kind cluster {cluster!r} has no nodes (kind create cluster first)")

    monkeypatch.setattr(kindrig, "kind_nodes", no_kind)
    args = ["up", "--kubeconfig", "k", "--state", str(tmp_path), "--out", str(tmp_path / "o")]
    assert kindrig.main(args) == 1
    assert "kind create cluster first" in capsys.readouterr().err


def test_down_with_nothing_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kindrig.down(tmp_path) == []
    assert kindrig.main(["down", "--state", str(tmp_path)]) == 0
    assert "nothing was running" in capsys.readouterr().out


def test_tools_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Bins:
        kubectl = tmp_path / "kubectl"
        helm = tmp_path / "helm"

    monkeypatch.setattr(toolchain, "binaries", lambda: Bins)
    assert kindrig.main(["tools"]) == 1
    assert "make setup" in capsys.readouterr().err
    Bins.kubectl.write_text("")
    Bins.helm.write_text("")
    assert kindrig.main(["tools"]) == 0
    assert capsys.readouterr().out.split() == [str(Bins.kubectl), str(Bins.helm)]
