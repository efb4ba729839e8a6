"""Event aggregation against the real API server, with the operator's own identity (RBAC).

A repeat of a recent Event increments the existing Event's count and lastTimestamp instead
of adding an Event; a different message is a new Event; an Event that is gone is recreated.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from typing import Any

import pytest

from gtvp import kube
from gtvp.event_recorder import EventRecorder, ObjectRef
from gtvp_local.controlplane import ControlPlane

pytestmark = pytest.mark.controlplane

T0 = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def admin(control_plane: ControlPlane) -> kube.Clients:
    """Clients as the admin, to read and delete Events (the operator may not)."""
    return kube.make_clients(str(control_plane.admin_kubeconfig))


def _box(namespace: str) -> ObjectRef:
    name = f"box-{uuid.uuid4().hex[:8]}"
    return ObjectRef("gtvp.io/v1alpha1", "LazyBox", name, str(uuid.uuid4()), namespace)


def _events(c: kube.Clients, namespace: str, name: str) -> list[Any]:
    got = c.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return sorted(got.items, key=lambda e: e.message)


def _at(seconds: int) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_a_repeated_event_is_one_event_with_a_count(
    operator_clients: kube.Clients, admin: kube.Clients, namespace: str
) -> None:
    rec, obj = EventRecorder("gtvp-test"), _box(namespace)
    for i in range(5):
        rec.record(operator_clients.core, obj, type_="Warning", reason="R", message="m", now=_at(i))
    (ev,) = _events(admin, namespace, obj.name)
    assert ev.count == 5
    assert ev.first_timestamp == T0
    assert ev.last_timestamp == _at(4)
    assert (ev.type, ev.reason, ev.message) == ("Warning", "R", "m")
    assert ev.involved_object.uid == obj.uid
    assert ev.source.component == "gtvp-test"


def test_a_different_message_is_a_second_event(
    operator_clients: kube.Clients, admin: kube.Clients, namespace: str
) -> None:
    rec, obj = EventRecorder("gtvp-test"), _box(namespace)
    for message in ("first", "first", "second", "first"):
        rec.record(operator_clients.core, obj, type_="Normal", reason="R", message=message)
    first, second = _events(admin, namespace, obj.name)
    assert (first.message, first.count) == ("first", 3)
    assert (second.message, second.count) == ("second", 1)


def test_a_repeat_after_the_window_is_a_new_event(
    operator_clients: kube.Clients, admin: kube.Clients, namespace: str
) -> None:
    rec, obj = EventRecorder("gtvp-test"), _box(namespace)
    rec.record(operator_clients.core, obj, type_="Normal", reason="R", message="m", now=T0)
    later = T0 + dt.timedelta(minutes=11)
    rec.record(operator_clients.core, obj, type_="Normal", reason="R", message="m", now=later)
    events = _events(admin, namespace, obj.name)
    assert [e.count for e in events] == [1, 1]


def test_an_event_that_is_gone_is_created_again(
    operator_clients: kube.Clients, admin: kube.Clients, namespace: str
) -> None:
    rec, obj = EventRecorder("gtvp-test"), _box(namespace)
    gone = rec.record(operator_clients.core, obj, type_="Normal", reason="R", message="m")
    rec.record(operator_clients.core, obj, type_="Normal", reason="R", message="m")
    admin.core.delete_namespaced_event(gone.event_name, namespace)
    again = rec.record(operator_clients.core, obj, type_="Normal", reason="R", message="m")
    assert again.event_name != gone.event_name
    (ev,) = _events(admin, namespace, obj.name)
    assert (ev.metadata.name, ev.count) == (again.event_name, 1)
    rec.record(operator_clients.core, obj, type_="Normal", reason="R", message="m")
    assert _events(admin, namespace, obj.name)[0].count == 2


def test_concurrent_repeats_make_one_event(
    operator_clients: kube.Clients, admin: kube.Clients, namespace: str
) -> None:
    rec, obj = EventRecorder("gtvp-test"), _box(namespace)

    def post() -> None:
        rec.record(operator_clients.core, obj, type_="Warning", reason="R", message="m")

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (ev,) = _events(admin, namespace, obj.name)
    assert ev.count == 8


def test_post_event_aggregates_repeats(operator_clients: kube.Clients, admin: kube.Clients) -> None:
    """The operator's entry point, for a cluster-scoped Member (its Events go to default)."""
    name = f"member-{uuid.uuid4().hex[:8]}"
    uid = str(uuid.uuid4())
    for _ in range(5):
        kube.post_event(
            operator_clients,
            kind="Member",
            name=name,
            uid=uid,
            namespace=None,
            type_="Warning",
            reason="PcrMismatch",
            message="PCR 7 (sha256) is 81a4, the golden value is 0000",
        )
    try:
        (ev,) = _events(admin, "default", name)
        assert ev.count == 5
        assert ev.involved_object.kind == "Member"
        assert ev.involved_object.namespace is None
    finally:
        for ev in _events(admin, "default", name):
            admin.core.delete_namespaced_event(ev.metadata.name, "default")
