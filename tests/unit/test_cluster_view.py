"""The cluster view's bookkeeping: the EK index, VMIs by node, the room they take, box echoes."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gtvp.cluster_view import ClusterView


def _member(name: str, ek: str | None) -> dict[str, Any]:
    trust = {"ekSHA256": ek} if ek else {}
    return {"metadata": {"name": name}, "status": {"trust": trust}}


def _vmi(name: str, node: str | None, cpu: str = "1") -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": name},
        "spec": {"domain": {"resources": {"requests": {"cpu": cpu, "memory": "1Gi"}}}},
        "status": {"nodeName": node} if node else {},
    }


def test_a_second_member_with_the_same_ek_sees_the_first() -> None:
    view = ClusterView()
    view.observe_member(_member("a", "ek1"), "ADDED")
    view.observe_member(_member("b", "ek1"), "ADDED")
    assert dict(view.other_ek_holders("b")) == {"ek1": "a"}
    assert dict(view.other_ek_holders("a")) == {"ek1": "b"}
    view.observe_member(_member("a", "ek2"), "MODIFIED")  # a re-enrolled with another TPM
    assert "ek1" not in view.other_ek_holders("b")
    assert view.other_ek_holders("b")["ek2"] == "a"
    view.observe_member(_member("a", None), "DELETED")
    assert view.ek_holders == {"ek1": {"b"}}
    assert "a" not in view.members


def test_a_verdict_that_could_not_be_stored_holds_until_one_is() -> None:
    """The operator's write of an Untrusted verdict was refused (an agent grew its Member
    past what the API server stores): admission, moves and the Node follow that verdict,
    not the stored Trusted one, whatever the agent writes meanwhile; until the operator
    (any replica) stores a verdict."""
    import datetime as dt

    from gtvp.core.timestamps import format_ts

    now = dt.datetime.now(dt.UTC)
    trust = {"verdict": "Trusted", "usesLeft": 5, "expiresAt": format_ts(now + dt.timedelta(1))}
    stored = {"metadata": {"name": "m"}, "status": {"phase": "Trusted", "level": 2, "trust": trust}}
    view = ClusterView()
    view.observe_member(stored, "ADDED")
    assert view.member_views()[0].usable(now, 2)
    lost = {"phase": "Untrusted", "level": 0, "trust": {"verdict": "Untrusted", "reason": "X"}}
    view.hold_to("m", stored["status"], lost)
    assert view.verdict_of("m") == lost
    spend = {**stored, "status": {**stored["status"], "trust": {**trust, "usesLeft": 4}}}
    view.observe_member(spend, "MODIFIED")  # a spend is stored, the verdict was not
    assert view.verdict_of("m") == lost
    assert not view.member_views()[0].usable(now, 1)
    agent = {**spend, "status": {**spend["status"], "agent": {"evidence": {"nonce": "ab"}}}}
    view.observe_member(agent, "MODIFIED")  # the agent's writes change no verdict
    assert view.verdict_of("m") == lost
    assert view.held_body("m", agent) == {**agent, "status": lost}
    written = {**stored, "status": {**lost, "trust": {**lost["trust"], "verifiedAt": "t"}}}
    view.observe_member(written, "MODIFIED")  # a verdict stored: the hold ends
    assert view.verdict_of("m") == written["status"]
    view.hold_to("m", written["status"], lost)
    view.observe_member(written, "DELETED")
    assert "m" not in view.unwritten


def test_a_replica_that_never_saw_a_held_verdict_goes_by_the_nodes_labels() -> None:
    """Only the replica holding the member reached the verdict the API server would not
    store; it took the Node's trust labels off. Another replica's new placements (its
    admission, the boxes it places) go by what those labels say once they have had a
    moment to follow the stored verdict, as the scheduler does; what moves or stops VMs
    does not (labels lag for ordinary reasons too: a Maintenance ended, a Node write that
    failed; found by a review); a spent verdict's bare Node changes nothing."""
    import datetime as dt

    from gtvp.core.timestamps import format_ts
    from gtvp.core.trust import desired_labels

    now = dt.datetime.now(dt.UTC)
    trust = {
        "verdict": "Trusted",
        "usesLeft": 5,
        "expiresAt": format_ts(now + dt.timedelta(hours=1)),
        "verifiedAt": format_ts(now - dt.timedelta(seconds=30)),
    }
    member = {"metadata": {"name": "m"}, "status": {"phase": "Trusted", "level": 3, "trust": trust}}
    labelled = {k: v for k, v in desired_labels("Trusted", 3).items() if v is not None}
    other = ClusterView()
    other.observe_member(member, "ADDED")
    other.observe_node({"metadata": {"name": "m", "labels": labelled}}, "ADDED")
    assert other.member_views()[0].usable(now, 3)
    # the holder could not store its Untrusted verdict and took the labels off
    other.observe_node({"metadata": {"name": "m", "labels": {}}}, "MODIFIED")
    assert not other.member_views()[0].usable(now, 1)
    assert other.verdict_of("m", by_labels=True)["phase"] == "Untrusted"
    assert other.verdict_of("m")["phase"] == "Trusted"  # nothing moved or stopped for it
    lowered = {k: v for k, v in desired_labels("Trusted", 1).items() if v is not None}
    other.observe_node({"metadata": {"name": "m", "labels": lowered}}, "MODIFIED")
    assert other.member_views()[0].usable(now, 1)
    assert not other.member_views()[0].usable(now, 2)
    # the Node's own writer goes by the verdict, not by the labels it writes
    assert (other.member_body("m") or {})["status"]["level"] == 3
    # a verdict stored a moment ago: its labels may not have followed yet
    fresh = {**trust, "verifiedAt": format_ts(now)}
    other.observe_member({**member, "status": {**member["status"], "trust": fresh}}, "MODIFIED")
    assert other.member_views()[0].usable(now, 3)
    # a spent verdict takes the labels off by itself: it stays what it is (no evacuation)
    spent = {**trust, "usesLeft": 0}
    other.observe_member({**member, "status": {**member["status"], "trust": spent}}, "MODIFIED")
    other.observe_node({"metadata": {"name": "m", "labels": {}}}, "MODIFIED")
    assert other.verdict_of("m", by_labels=True)["phase"] == "Trusted"


def test_vmis_are_indexed_by_the_node_they_run_on() -> None:
    view = ClusterView()
    view.observe_vmi(_vmi("x", None), "ADDED")
    assert view.on_node == {}
    view.observe_vmi(_vmi("x", "n1"), "MODIFIED")
    view.observe_vmi(_vmi("y", "n1"), "ADDED")
    assert view.on_node["n1"] == {("ns", "x"), ("ns", "y")}
    view.observe_vmi(_vmi("x", "n2"), "MODIFIED")  # migrated
    assert view.on_node["n1"] == {("ns", "y")}
    assert view.node_of[("ns", "x")] == "n2"
    view.observe_vmi(_vmi("y", "n1"), "DELETED")
    assert "n1" not in view.on_node  # no empty sets left behind by every node ever used
    assert ("ns", "y") not in view.vmis


def test_the_room_vmis_take_is_summed_again_only_after_a_change() -> None:
    view = ClusterView()
    view.observe_vmi(_vmi("x", "n1", cpu="2"), "ADDED")
    first = view.vmi_usage()
    assert view.vmi_usage() is first  # cached
    view.observe_vmi(_vmi("x", "n1", cpu="2"), "MODIFIED")  # same footprint: still cached
    assert view.vmi_usage() is first
    view.observe_vmi(_vmi("x", "n1", cpu="3"), "MODIFIED")
    assert view.vmi_usage() is not first


def test_a_sum_of_room_cached_from_an_older_view_is_not_served() -> None:
    """A worker thread sums the room while the event loop records a VMI: the sum it
    caches belongs to the view it began with and is not served after the change."""
    view = ClusterView()
    view.observe_vmi(_vmi("x", "n1", cpu="2"), "ADDED")
    version = view.placed_version
    view.observe_vmi(_vmi("y", "n1", cpu="1"), "ADDED")  # recorded while the thread sums
    view.placed_usage = (version, {"n1": (2000, 0)})  # the thread's late write
    assert view.vmi_usage()["n1"][0] == 3000


def test_a_box_status_echo_is_not_a_change() -> None:
    view = ClusterView()
    box = {"metadata": {"namespace": "ns", "name": "b", "resourceVersion": "1"}}
    assert view.observe_box(box, "ADDED")
    assert not view.observe_box(dict(box), "MODIFIED")  # the echo of our own write
    assert view.observe_box({"metadata": {**box["metadata"], "resourceVersion": "2"}}, "MODIFIED")
    assert view.observe_box(box, "DELETED")
    assert not view.observe_box(box, "DELETED")  # already gone


def test_nodes_keep_their_labels_until_deleted() -> None:
    view = ClusterView()
    node = {"metadata": {"name": "n1", "labels": {"a": "b"}}}
    assert view.observe_node(node, "ADDED")
    assert view.node_labels["n1"] == {"a": "b"}
    assert not view.observe_node(node, "DELETED")
    assert "n1" not in view.nodes
    assert "n1" not in view.node_labels


def test_the_view_keeps_no_managed_fields_and_leaves_the_event_body_alone() -> None:
    view = ClusterView()
    managed = [{"manager": "gtvp-agent", "fieldsV1": {"f:status": {"f:agent": {}}}}]
    member = _member("a", "ek1")
    member["metadata"]["managedFields"] = managed
    vmi = _vmi("x", "a")
    vmi["metadata"]["managedFields"] = managed
    view.observe_member(member, "ADDED")
    view.observe_vmi(vmi, "ADDED")
    assert "managedFields" not in view.members["a"]["metadata"]
    assert "managedFields" not in view.vmis[("ns", "x")]["metadata"]
    assert view.members["a"]["status"] == member["status"]  # everything else is kept
    assert member["metadata"]["managedFields"] is managed  # the watch's body is not changed


def test_the_view_keeps_its_own_copy_with_repeated_strings_shared() -> None:
    """10,000 members repeat the same field names, phases and messages: the view holds one
    copy of each (its memory per member), and a caller changing its body later changes
    nothing in the view."""
    view = ClusterView()
    one, two = _member("a", "ek1"), _member("b", "ek2")
    for m in (one, two):
        m["status"]["phase"] = "".join(["Trus", "ted"])  # equal strings, distinct objects
    assert one["status"]["phase"] is not two["status"]["phase"]
    view.observe_member(one, "ADDED")
    view.observe_member(two, "ADDED")
    assert view.members["a"]["status"]["phase"] is view.members["b"]["status"]["phase"]
    one["status"]["phase"] = "Untrusted"
    assert view.members["a"]["status"]["phase"] == "Trusted"


def test_a_planned_migration_never_replaces_the_servers_copy() -> None:
    """gtvp records a migration it created as planned (no uid, no resourceVersion) so that
    its next plan counts it at once; when the watch delivered the server's copy first, that
    copy stays: a later cancel deletes only with its uid and resourceVersion, and with the
    planned copy in the view it could never cancel (a pin to a cordoned node stayed)."""
    view = ClusterView()
    planned = {"metadata": {"namespace": "ns", "name": "m"}, "spec": {"vmiName": "db"}}
    server = {"metadata": {**planned["metadata"], "uid": "u1", "resourceVersion": "7"},
              "spec": {"vmiName": "db"}}  # fmt: skip
    view.observe_migration(server, "ADDED")  # the watch was first
    view.observe_migration(planned, "ADDED")
    assert view.migrations[("ns", "m")]["metadata"]["resourceVersion"] == "7"
    fresh = ClusterView()  # the watch comes second: the planned copy counts meanwhile
    fresh.observe_migration(planned, "ADDED")
    assert ("ns", "m") in fresh.migrations
    fresh.observe_migration(server, "ADDED")
    assert fresh.migrations[("ns", "m")]["metadata"]["uid"] == "u1"
    fresh.observe_migration(planned, "DELETED")
    assert ("ns", "m") not in fresh.migrations


def test_blanking_where_a_running_vmi_is_does_not_hide_it() -> None:
    """Root on a host can update the VMIs of that host with its virt-handler's token and
    blank status.nodeName: the VMI keeps running there, and gtvp must still see it there, or
    it would neither evacuate it nor stop it past its level's bound."""

    def vmi(node: str | None, phase: str, uid: str = "u1") -> dict[str, Any]:
        body = _vmi("x", node)
        body["metadata"]["uid"] = uid
        body["status"] = {**body["status"], "phase": phase}
        return body

    view = ClusterView()
    view.observe_vmi(vmi("bad", "Running"), "ADDED")
    view.observe_vmi(vmi(None, "Running"), "MODIFIED")
    assert view.on_node["bad"] == {("ns", "x")}
    # a VMI made anew under that name (its deletion not seen) is not held to the old node
    view.observe_vmi(vmi(None, "Pending", uid="u2"), "MODIFIED")
    assert ("ns", "x") not in view.node_of
    view.observe_vmi(vmi("bad", "Running", uid="u2"), "MODIFIED")
    # KubeVirt's own label names the node too (an operator restarted after the blanking)
    fresh = ClusterView()
    labelled = {**_vmi("x", None), "status": {"phase": "Running"}}
    labelled["metadata"]["labels"] = {"kubevirt.io/nodeName": "bad"}
    fresh.observe_vmi(labelled, "ADDED")
    assert fresh.node_of[("ns", "x")] == "bad"
    # a VMI that ended runs nowhere
    view.observe_vmi({**_vmi("x", None), "status": {"phase": "Failed"}}, "MODIFIED")
    assert ("ns", "x") not in view.node_of


def _pod(
    name: str,
    node: str | None,
    *,
    vmi_uid: str = "u1",
    created: str = "2026-12-03T10:00:00Z",
    phase: str = "Running",
    controller: bool = True,
    label: str | None = "virt-launcher",
) -> dict[str, Any]:
    owner = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "name": "x",
             "uid": vmi_uid, "controller": controller}  # fmt: skip
    return {
        "metadata": {
            "namespace": "ns",
            "name": name,
            "creationTimestamp": created,
            "labels": {} if label is None else {"kubevirt.io": label},
            "ownerReferences": [owner],
        },
        "spec": {"nodeName": node} if node else {},
        "status": {"phase": phase},
    }


def _running(node: str | None, uid: str = "u1") -> dict[str, Any]:
    body = _vmi("x", node)
    body["metadata"]["uid"] = uid
    body["status"]["phase"] = "Running"
    return body


def test_a_vmi_whose_status_names_another_node_is_still_on_its_launcher_pods_node() -> None:
    """Root on a host can rewrite a VMI's status.nodeName with its virt-handler's token and
    name a trusted node; its launcher pod stays bound where the VM runs."""
    view = ClusterView()
    view.observe_vmi(_running("bad"), "ADDED")
    assert view.observe_pod(_pod("launcher-a", "bad"), "ADDED") == frozenset()  # known there
    view.observe_vmi(_running("good"), "MODIFIED")  # the rewrite
    assert ("ns", "x") in view.on_node["bad"]
    assert ("ns", "x") in view.on_node["good"]  # never less than the status says
    assert view.node_of[("ns", "x")] == "good"  # what KubeVirt records (migration budgets)
    # an operator started after the rewrite: the pod comes after the VMI, and says where
    fresh = ClusterView()
    fresh.observe_vmi(_running("good"), "ADDED")
    assert fresh.observe_pod(_pod("launcher-a", "bad"), "ADDED") == {"bad"}
    assert ("ns", "x") in fresh.on_node["bad"]
    # the VMI gone: nowhere, whatever pods linger
    fresh.observe_vmi(_running("good"), "DELETED")
    assert ("ns", "x") not in fresh.on_node.get("bad", ())


def test_a_launcher_pod_marked_ended_by_its_host_still_holds_the_vmi_there() -> None:
    """The kubelet on the host (root there too) can write its pod Succeeded: while no pod of
    the VMI runs, every one of its pods holds it."""
    view = ClusterView()
    view.observe_vmi(_running("good"), "ADDED")
    view.observe_pod(_pod("launcher-a", "bad"), "ADDED")
    view.observe_pod(_pod("launcher-a", "bad", phase="Succeeded"), "MODIFIED")
    assert ("ns", "x") in view.on_node["bad"]
    # a failed migration's target pod, ended, does not free the source
    view.observe_pod(_pod("target", "good", phase="Failed"), "ADDED")
    assert ("ns", "x") in view.on_node["bad"]
    view.observe_pod(_pod("target", "good"), "DELETED")
    view.observe_pod(_pod("launcher-a", "bad"), "DELETED")
    assert ("ns", "x") not in view.on_node.get("bad", ())


def test_every_running_launcher_pod_holds_the_vmi() -> None:
    """While gtvp's own evacuation runs, the target's pod is the newer one and the host's
    virt-handler token can write the status to name the target: the source pod, running,
    still holds the VMI on the host. An ended pod beside a running one holds nothing."""
    view = ClusterView()
    view.observe_vmi(_running("bad"), "ADDED")
    view.observe_pod(_pod("source", "bad"), "ADDED")
    view.observe_pod(_pod("target", "good", created="2026-12-03T10:05:00Z"), "ADDED")
    view.observe_vmi(_running("good"), "MODIFIED")  # rewritten (or landed)
    assert view.nodes_of[("ns", "x")] == {"bad", "good"}
    view.observe_pod(_pod("source", "bad", phase="Succeeded"), "MODIFIED")  # it left
    assert view.nodes_of[("ns", "x")] == {"good"}
    # a failed migration's ended target pod holds nothing while a pod runs
    view.observe_pod(_pod("t2", "c", phase="Failed"), "ADDED")
    assert view.nodes_of[("ns", "x")] == {"good"}
    assert view.launcher_vmi.keys() == {("ns", "source"), ("ns", "target"), ("ns", "t2")}


def test_a_pod_seen_before_its_vmi_places_it_when_the_vmi_comes() -> None:
    view = ClusterView()
    assert view.observe_pod(_pod("p", "bad"), "ADDED") == frozenset()  # no VMI yet
    assert view.observe_vmi(_running("good"), "ADDED") == {"bad", "good"}
    assert view.observe_vmi(_running("good"), "MODIFIED") == frozenset()


def test_a_resync_forgets_pods_deleted_while_the_watch_was_away() -> None:
    view = ClusterView()
    view.observe_vmi(_running("good"), "ADDED")
    view.observe_pod(_pod("gone", "bad"), "ADDED")
    since = view.events  # the listing starts
    view.observe_pod(_pod("new", "third"), "ADDED")  # the watch, while it runs
    assert view.resync_pods([_pod("kept", "other")], since) == {"other"}
    assert view.nodes_of[("ns", "x")] == {"good", "other", "third"}  # the watch's pod stays
    assert ("ns", "gone") not in view.launcher_vmi
    # a pod the watch deleted while the listing ran is not brought back
    since = view.events
    view.observe_pod(_pod("kept", "other"), "DELETED")
    view.resync_pods([_pod("kept", "other"), _pod("new", "third")], since)
    assert ("ns", "kept") not in view.launcher_vmi


def test_while_a_migration_is_unfinished_an_ended_source_pod_still_holds_the_vmi() -> None:
    """The source host writes its own pod ended once gtvp's evacuation started the target's
    pod, and the VMI's status names the target: until the migration ends, every pod of the
    VMI counts."""
    view = ClusterView()
    view.observe_vmi(_running("bad"), "ADDED")
    view.observe_pod(_pod("source", "bad"), "ADDED")
    migration = {"metadata": {"namespace": "ns", "name": "evac", "resourceVersion": "1"},
                 "spec": {"vmiName": "x"}, "status": {"phase": "Running"}}  # fmt: skip
    view.observe_migration(migration, "ADDED")
    view.observe_pod(_pod("target", "good"), "ADDED")
    view.observe_pod(_pod("source", "bad", phase="Failed"), "MODIFIED")
    view.observe_vmi(_running("good"), "MODIFIED")
    assert view.nodes_of[("ns", "x")] == {"bad", "good"}
    view.observe_migration({**migration, "status": {"phase": "Succeeded"}}, "MODIFIED")
    assert view.nodes_of[("ns", "x")] == {"good"}  # KubeVirt says it moved


def test_a_pod_that_ended_before_a_migration_began_holds_nothing_during_it() -> None:
    """KubeVirt keeps a VMI's Completed source pods and Failed target pods: they do not
    bring the VMI back to every node it ever ran on while it migrates again."""
    view = ClusterView()
    view.observe_vmi(_running("b"), "ADDED")
    view.observe_pod(_pod("old", "bad", phase="Succeeded"), "ADDED")  # left bad long ago
    view.observe_pod(_pod("cur", "b"), "ADDED")
    migration = {"metadata": {"namespace": "ns", "name": "bal", "resourceVersion": "1"},
                 "spec": {"vmiName": "x"}, "status": {"phase": "Running"}}  # fmt: skip
    assert view.observe_migration(migration, "ADDED") == frozenset()
    view.observe_pod(_pod("target", "c"), "ADDED")
    assert view.nodes_of[("ns", "x")] == {"b", "c"}
    # the source ends during the migration: it still counts until the migration ends
    assert view.observe_migration(migration, "MODIFIED") == frozenset()  # no change: no-op
    view.observe_pod(_pod("cur", "b", phase="Succeeded"), "MODIFIED")
    assert view.nodes_of[("ns", "x")] == {"b", "c"}
    # a migration of an earlier VMI under this name does not count as this one's
    fresh = ClusterView()
    made = "2026-12-03T09:00:00Z"
    older = {**migration, "metadata": {**migration["metadata"], "creationTimestamp": made}}
    vmi = _running("b")
    vmi["metadata"]["creationTimestamp"] = "2026-12-03T10:00:00Z"
    fresh.observe_vmi(vmi, "ADDED")
    fresh.observe_pod(_pod("cur", "b"), "ADDED")
    fresh.observe_migration(older, "ADDED")
    fresh.observe_pod(_pod("target", "c"), "ADDED")
    fresh.observe_pod(_pod("cur", "b", phase="Failed"), "MODIFIED")
    assert fresh.nodes_of[("ns", "x")] == {"b", "c"}  # b through its status only
    fresh.observe_vmi({**vmi, "status": {**vmi["status"], "nodeName": "c"}}, "MODIFIED")
    assert fresh.nodes_of[("ns", "x")] == {"c"}


def test_only_a_vmis_own_bound_launcher_pods_count() -> None:
    """Pods of another VMI under the same name (another uid), pods without KubeVirt's label,
    pods without the VMI as controller and pods not bound place nothing."""
    view = ClusterView()
    view.observe_vmi(_running("good"), "ADDED")
    for pod in (
        _pod("old", "bad", vmi_uid="u0"),
        _pod("tenant", "bad", label=None),
        _pod("owned", "bad", controller=False),
        _pod("pending", None),
    ):
        assert view.observe_pod(pod, "ADDED") == frozenset()
    assert ("ns", "x") not in view.on_node.get("bad", set())
    assert view.nodes_of[("ns", "x")] == {"good"}
    # a launcher whose label value changed is still KubeVirt's (it takes the key alone) ...
    view.observe_pod(_pod("p", "bad"), "ADDED")
    view.observe_pod(_pod("p", "bad", label="hidden"), "MODIFIED")
    assert view.nodes_of[("ns", "x")] == {"good", "bad"}
    # ... one whose label was taken off no longer counts
    view.observe_pod(_pod("p", "bad", label=None), "MODIFIED")
    assert view.nodes_of[("ns", "x")] == {"good"}


def test_a_resync_forgets_migrations_deleted_while_the_watch_was_away() -> None:
    """A migration deleted during a watch gap would keep its VMI busy (never evacuated) and
    migrating for ever; one the watch delivered while the listing ran stays."""
    view = ClusterView()
    view.observe_vmi(_running("b"), "ADDED")
    lost = {"metadata": {"namespace": "ns", "name": "lost", "resourceVersion": "1"},
            "spec": {"vmiName": "x"}, "status": {"phase": "Running"}}  # fmt: skip
    view.observe_migration(lost, "ADDED")
    assert ("ns", "x") in view.migrating
    since = view.events  # the listing starts
    new = {**lost, "metadata": {**lost["metadata"], "name": "new"}}
    view.observe_migration(new, "ADDED")  # the watch, while it runs
    view.resync_migrations([], since)
    assert set(view.migrations) == {("ns", "new")}
    assert set(view.migrating[("ns", "x")]) == {("ns", "new")}
    view.observe_migration({**new, "status": {"phase": "Failed"}}, "MODIFIED")
    view.resync_migrations([new], view.events)
    assert ("ns", "x") not in view.migrating


@settings(max_examples=300, deadline=None)
@given(
    verified=st.integers(-20, 20),
    expires=st.integers(-20, 40),
    level=st.integers(1, 3),
    labelled=st.integers(0, 3),
    steps=st.lists(st.integers(-2, 9), min_size=1, max_size=12),
    relabel_at=st.integers(0, 12),
)
def test_the_labelled_verdict_is_remembered_only_while_it_cannot_change(
    verified: int, expires: int, level: int, labelled: int, steps: list[int], relabel_at: int
) -> None:
    """Admission and every box placement ask each member's verdict as its Node's labels
    hold it (`trust.as_labelled`); the view remembers the answer per Member status, Node
    labels and boot until it may turn (the label lag's end, the verdict's expiry): at every
    instant it is what `as_labelled` says then, through relabelling, reboots and a clock
    that steps back."""
    import datetime as dt

    from gtvp.core.timestamps import format_ts
    from gtvp.core.trust import LEVEL_LABEL, TRUSTED_LABEL, as_labelled

    t0 = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.UTC)
    view = ClusterView()
    status = {
        "phase": "Trusted",
        "level": level,
        "trust": {
            "verdict": "Trusted",
            "verifiedAt": format_ts(t0 + dt.timedelta(seconds=verified)),
            "expiresAt": format_ts(t0 + dt.timedelta(seconds=expires)),
            "usesLeft": 3,
            "nodeBootID": "boot-1",
        },
    }
    view.observe_member({"metadata": {"name": "m"}, "status": status}, "ADDED")

    def node(n: int, boot: str) -> dict[str, Any]:
        labels = {TRUSTED_LABEL: "true", **{f"{LEVEL_LABEL}{i}": "true" for i in range(1, n + 1)}}
        return {
            "metadata": {"name": "m", "labels": labels if n else {}},
            "status": {"nodeInfo": {"bootID": boot}},
        }

    view.observe_node(node(labelled, "boot-1"), "ADDED")
    now = t0
    for i, step in enumerate(steps):
        now += dt.timedelta(seconds=step)
        if i == relabel_at:
            view.observe_node(node(level - 1, "boot-2"), "MODIFIED")
        stored = view.members["m"]["status"]
        want = as_labelled(stored, view.node_labels["m"], view.node_boot_id("m"), now)
        assert view._as_labelled("m", stored, now) == want, (i, now)
