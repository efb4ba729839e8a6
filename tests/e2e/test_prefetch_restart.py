"""Pre-fetch requests against the real API server: they survive a restart of the operator,
never start a migration twice, and past the bound the migration goes anyway and says so.

The evacuation handler (`handlers.evacuation._start`, what `evacuate` calls for each planned
migration) is driven in-process with the operator's own identity and RBAC, as in
tests/integration/test_handlers_inprocess.py; the Node, its `status.images` (what a kubelet
would report), the migration and the Events are real API objects. A fresh `Runtime` whose
view is read back from the API server stands in for a restarted operator.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from gtvp import kube
from gtvp.core.component_checks import Check
from gtvp.core.components import parse_component
from gtvp.core.evacuation import HOSTNAME_LABEL, Vmi, plan_evacuation
from gtvp.core.policy import MigrationLimits
from gtvp.core.prefetch import ANNOTATION, parse_requests
from gtvp.handlers import evacuation, prefetch
from gtvp.metrics import METRICS
from gtvp.runtime import OperatorSettings, Runtime
from gtvp_local.controlplane import ControlPlane
from tests.catalogue import Publisher

pytestmark = [pytest.mark.controlplane]
LIMITS = MigrationLimits(max_parallel=5, max_outbound_per_node=2, max_inbound_per_node=2)
CATALOGUE = Publisher().web_catalogue()[:3]
COMPONENTS = [parse_component(o) for o in CATALOGUE]


@pytest.fixture
def cold(control_plane: ControlPlane) -> Iterator[str]:
    """A Node whose image cache is empty (no kubelet: the test reports its images)."""
    name = f"cold-{uuid.uuid4().hex[:8]}"
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(node))
    yield name
    control_plane.kubectl("delete", "node", name, "--wait=false", check=False)


def _node(cp: ControlPlane, name: str) -> dict[str, Any]:
    node: dict[str, Any] = json.loads(cp.kubectl("get", "node", name, "-o", "json").stdout)
    return node


def _runtime(clients: kube.Clients, cp: ControlPlane, ns: str, node: str) -> Runtime:
    """An operator's view as its watches would fill it after a (re)start: the target's Node
    read from the API server, a running box's VMI and LazyBox, the verified catalogue."""
    rt = Runtime(settings=OperatorSettings(), clients=clients)
    rt.view.loaded = True
    rt.view.observe_node(_node(cp, node), "ADDED")
    labels = {"gtvp.io/level": "2", "gtvp.io/lazybox": "web"}
    rt.view.vmis[(ns, "web")] = {"metadata": {"namespace": ns, "name": "web", "labels": labels}}
    resolved = [{"digest": c.digest, "sizeBytes": c.size} for c in COMPONENTS]
    rt.view.boxes[(ns, "web")] = {
        "metadata": {"namespace": ns, "name": "web"},
        "status": {"resolved": resolved},
    }
    for obj, c in zip(CATALOGUE, COMPONENTS, strict=True):
        rt.view.components[c.object_name] = obj
        rt.boxes.checks[c.object_name] = Check("Verified", "SignatureValid", "")
    return rt


def _planned(ns: str, target: str) -> dict[str, Any]:
    parts = tuple((c.digest, c.size) for c in COMPONENTS)
    [obj] = plan_evacuation(
        member="bad",
        incident="x",
        vmis=[Vmi(ns, "web", "bad", 2, parts)],
        migrations=[],
        limits=LIMITS,
        targets=[(target, 3)],
    )
    assert obj["spec"]["addedNodeSelector"][HOSTNAME_LABEL] == target
    return obj


def _migrations(cp: ControlPlane, ns: str) -> list[dict[str, Any]]:
    out = cp.kubectl("get", "vmim", "-n", ns, "-o", "json")
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


def _report_images(cp: ControlPlane, node: str, images: list[str]) -> None:
    """What the node's kubelet does once it pulled them: list them in status.images."""
    status = {"status": {"images": [{"names": [i], "sizeBytes": 1} for i in images]}}
    cp.kubectl("patch", "node", node, "--subresource=status", "--type=merge", "-p",
               json.dumps(status))  # fmt: skip


def _sample(name: str) -> float:
    return METRICS.registry.get_sample_value(name, {"reason": "evacuation"}) or 0.0


def test_a_restarted_operator_goes_on_waiting_and_starts_the_migration_once(
    operator_clients: kube.Clients, control_plane: ControlPlane, namespace: str, cold: str
) -> None:
    cp, ns = control_plane, namespace
    obj = _planned(ns, cold)
    bytes_before = _sample("gtvp_prefetch_bytes_total")
    waits_before = _sample("gtvp_prefetch_wait_seconds_count")

    rt = _runtime(operator_clients, cp, ns, cold)
    asyncio.run(evacuation._start(rt, "bad", obj))
    assert _migrations(cp, ns) == []  # asked first, no migration yet
    requests = parse_requests(_node(cp, cold)["metadata"]["annotations"][ANNOTATION])
    asked = requests[f"{ns}/web"]
    assert sorted(asked.images) == sorted(c.image for c in COMPONENTS)
    assert asked.bytes == sum(c.size for c in COMPONENTS)
    assert asked.reason == "evacuation"

    restarted = _runtime(operator_clients, cp, ns, cold)  # a new process, the same cluster
    asyncio.run(evacuation._start(restarted, "bad", obj))
    assert _migrations(cp, ns) == []  # still waiting, from the time first recorded
    again = parse_requests(_node(cp, cold)["metadata"]["annotations"][ANNOTATION])
    assert again == requests  # not asked twice

    _report_images(cp, cold, [c.image for c in COMPONENTS])
    restarted = _runtime(operator_clients, cp, ns, cold)
    asyncio.run(evacuation._start(restarted, "bad", obj))
    [mig] = _migrations(cp, ns)
    assert mig["metadata"]["name"] == obj["metadata"]["name"]
    assert ANNOTATION not in (_node(cp, cold)["metadata"].get("annotations") or {})
    assert _sample("gtvp_prefetch_bytes_total") - bytes_before == asked.bytes
    assert _sample("gtvp_prefetch_wait_seconds_count") - waits_before == 1

    # the same plan once more (another restart): the migration exists, none is added
    asyncio.run(evacuation._start(_runtime(operator_clients, cp, ns, cold), "bad", obj))
    assert [m["metadata"]["name"] for m in _migrations(cp, ns)] == [mig["metadata"]["name"]]


def test_past_the_bound_the_migration_goes_anyway_with_an_event(
    operator_clients: kube.Clients,
    control_plane: ControlPlane,
    namespace: str,
    cold: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cp, ns = control_plane, namespace
    monkeypatch.setenv(prefetch.TIMEOUT_ENV, "2")
    obj = _planned(ns, cold)
    timeouts_before = _sample("gtvp_prefetch_timeouts_total")
    rt = _runtime(operator_clients, cp, ns, cold)
    asyncio.run(evacuation._start(rt, "bad", obj))
    assert _migrations(cp, ns) == []
    # the node never reports the images (its pull is stuck); the bound passes
    asked = parse_requests(_node(cp, cold)["metadata"]["annotations"][ANNOTATION])[f"{ns}/web"]
    while dt.datetime.now(dt.UTC) - asked.requested_at < dt.timedelta(seconds=2):
        asyncio.run(asyncio.sleep(0.2))
    rt = _runtime(operator_clients, cp, ns, cold)
    asyncio.run(evacuation._start(rt, "bad", obj))
    assert len(_migrations(cp, ns)) == 1
    assert _sample("gtvp_prefetch_timeouts_total") - timeouts_before == 1
    events = json.loads(
        cp.kubectl(
            "get", "events", "-n", ns, "--field-selector", "reason=PrefetchTimedOut", "-o", "json"
        ).stdout
    )["items"]
    kinds = sorted(e["involvedObject"]["kind"] for e in events)
    assert kinds == ["LazyBox", "VirtualMachineInstance"]
    assert all("migrating anyway" in e["message"] and cold in e["message"] for e in events)
    assert ANNOTATION not in (_node(cp, cold)["metadata"].get("annotations") or {})


def test_a_gated_vmi_that_is_not_a_box_is_migrated_without_a_request(
    operator_clients: kube.Clients, control_plane: ControlPlane, namespace: str, cold: str
) -> None:
    cp, ns = control_plane, namespace
    rt = _runtime(operator_clients, cp, ns, cold)
    rt.view.vmis[(ns, "web")]["metadata"]["labels"].pop("gtvp.io/lazybox")
    asyncio.run(evacuation._start(rt, "bad", _planned(ns, cold)))
    assert len(_migrations(cp, ns)) == 1
    assert ANNOTATION not in (_node(cp, cold)["metadata"].get("annotations") or {})
