"""Lazy Box placements spend their members' verdict uses per batch, never more than are left.

Against the real API server: the box loop spends a batch's placements on one member in one
Member write, and until that write a member is not offered more boxes than it has uses left.
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
from gtvp.core.api_resources import MEMBERS
from gtvp.handlers import box_hosts, lazyboxes
from gtvp.runtime import OperatorSettings, Runtime
from gtvp_local.controlplane import ControlPlane

pytestmark = [pytest.mark.controlplane]


@pytest.fixture
def rt(operator_clients: kube.Clients) -> Runtime:
    runtime = Runtime(settings=OperatorSettings(policy_name="uses"), clients=operator_clients)
    runtime.view.loaded = True
    return runtime


def _trusted_status(uses: int) -> dict[str, Any]:
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    return {
        "phase": "Trusted",
        "level": 2,
        "trust": {"expiresAt": expires.strftime("%Y-%m-%dT%H:%M:%SZ"), "usesLeft": uses},
    }


@pytest.fixture
def member(control_plane: ControlPlane, rt: Runtime) -> Iterator[str]:
    """A Trusted Member with 10 uses on the API server and its Node, in the runtime's view."""
    name = f"uses-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": MEMBERS.api_version,
        "kind": MEMBERS.kind,
        "metadata": {"name": name},
        "spec": {"identity": 2},
    }
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(body))
    try:
        written = kube.patch_status(rt.clients, MEMBERS, name, _trusted_status(10))
        rt.view.remember_member(name, dict(written))
        room = {"cpu": "16", "memory": "64Gi", "pods": "110"}
        node = {"metadata": {"name": name, "resourceVersion": "1"}, "status": {"allocatable": room}}
        rt.view.observe_node(node, "ADDED")
        yield name
    finally:
        control_plane.kubectl("delete", "member", name, "--ignore-not-found", "--wait=false")


def _uses_left(rt: Runtime, name: str) -> int:
    got = kube.get_if_present(rt.clients, MEMBERS, name)
    assert got is not None
    return int(got["status"]["trust"]["usesLeft"])


def test_a_batch_of_placements_on_one_member_spends_all_its_uses(rt: Runtime, member: str) -> None:
    rt.boxes.unspent[member] += 3  # three boxes placed there in this batch
    asyncio.run(lazyboxes._spend_placements(rt))
    assert _uses_left(rt, member) == 7
    assert not rt.boxes.unspent
    assert rt.view.members[member]["status"]["trust"]["usesLeft"] == 7  # the view knows


def test_a_member_is_offered_no_more_boxes_than_it_has_uses_left(rt: Runtime, member: str) -> None:
    now = dt.datetime.now(dt.UTC)
    rt.boxes.unspent[member] = 9  # nine placements not yet written; 10 uses left
    assert [h.usable for h in box_hosts.hosts(rt, now) if h.name == member] == [True]
    rt.boxes.unspent[member] = 10
    assert [h.usable for h in box_hosts.hosts(rt, now) if h.name == member] == [False]
    asyncio.run(lazyboxes._spend_placements(rt))
    assert _uses_left(rt, member) == 0
    assert [h.usable for h in box_hosts.hosts(rt, now) if h.name == member] == [False]
