"""A component's `maxUses` holds when the operator's view lags behind the API server.

Against the real API server: the operator's view of an OSComponent can be older than the
server's (a watch event delivered after the operator's own write, or a check of a new
component racing the placement that spends it). A decision made on that older body must
neither give back a use already spent nor spend a use that is no longer there.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.core.api_resources import OS_COMPONENTS, ApiResource
from gtvp.core.policy import parse_policy
from gtvp.handlers import components, lazyboxes
from gtvp.runtime import OperatorSettings, Runtime
from gtvp_local.controlplane import ADMIN, ControlPlane
from tests.catalogue import Publisher
from tests.samples import sample_policy_spec

pytestmark = [pytest.mark.controlplane]

PUB = Publisher()


@pytest.fixture
def rt(operator_clients: kube.Clients) -> Runtime:
    """A runtime under the sample policy, trusting the test publisher's key."""
    runtime = Runtime(settings=OperatorSettings(policy_name="uses"), clients=operator_clients)
    policy = parse_policy("uses", sample_policy_spec())
    runtime.view.policy = dataclasses.replace(policy, publisher_keys=PUB.keys)
    runtime.view.loaded = True
    return runtime


@pytest.fixture
def component(control_plane: ControlPlane, rt: Runtime) -> Iterator[str]:
    """A component with one use per verification, on the server and in the view."""
    obj = PUB.component(f"c{uuid.uuid4().hex[:8]}", "1.0.0", max_uses=1)
    name = obj["metadata"]["name"]
    control_plane.kubectl("create", "-f", "-", input_text=json.dumps(obj))
    try:
        _into_view(rt, _server(rt, name))
        yield name
    finally:
        control_plane.kubectl("delete", "osc", name, "--ignore-not-found", "--wait=false")


def _server(rt: Runtime, name: str) -> dict[str, Any]:
    got = kube.get_if_present(rt.clients, OS_COMPONENTS, name)
    assert got is not None
    return got


def _into_view(rt: Runtime, body: dict[str, Any]) -> None:
    """What a watch event carrying `body` leaves in the operator's view."""
    rt.view.observe_component(copy.deepcopy(body), "MODIFIED")


def _use(rt: Runtime, name: str) -> tuple[tuple[str, str]]:
    """A plan's use of `name`: the object the view holds under it."""
    return ((name, str(rt.view.components[name]["metadata"]["uid"])),)


def _verification(rt: Runtime, name: str) -> dict[str, Any]:
    got: dict[str, Any] = _server(rt, name)["status"]["verification"]
    return got


def test_a_check_on_a_body_older_than_a_spent_use_gives_the_use_not_back(
    rt: Runtime, component: str
) -> None:
    created = _server(rt, component)  # as the component's ADDED event carried it
    assert components.verify_component(rt, component).ok
    assert _verification(rt, component)["usesLeft"] == 1
    assert components.spend(rt, _use(rt, component)) == []  # a placement used it
    assert _verification(rt, component)["usesLeft"] == 0
    _into_view(rt, created)  # the ADDED event, handled late: no verification in it
    assert components.verify_component(rt, component).ok
    assert _verification(rt, component)["usesLeft"] == 0


def test_a_use_spent_on_a_stale_view_is_checked_again_not_spent_twice(
    control_plane: ControlPlane, rt: Runtime, component: str
) -> None:
    assert components.verify_component(rt, component).ok
    old = {"verification": {**_verification(rt, component), "verifiedAt": "2020-01-01T00:00:00Z"}}
    control_plane.kubectl(
        "patch", "osc", component, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": old}),
    )  # fmt: skip
    one_left = _server(rt, component)
    _into_view(rt, one_left)
    assert components.spend(rt, _use(rt, component)) == []  # the one use of that verification
    assert _verification(rt, component)["usesLeft"] == 0
    _into_view(rt, one_left)  # a late event: the view says one use is left
    assert components.spend(rt, _use(rt, component)) == []
    again = _verification(rt, component)
    assert again["verifiedAt"] != "2020-01-01T00:00:00Z"  # the second use had a new check
    assert again["usesLeft"] == 0


def test_a_component_deleted_under_a_stale_view_is_not_usable(
    control_plane: ControlPlane, rt: Runtime, component: str
) -> None:
    assert components.verify_component(rt, component).ok
    assert components.spend(rt, _use(rt, component)) == []
    control_plane.kubectl("delete", "osc", component)
    assert components.spend(rt, _use(rt, component)) == [component]
    assert component not in rt.view.components


def test_a_component_whose_publisher_is_revoked_leaves_the_catalogue_boxes_resolve_over(
    rt: Runtime, component: str
) -> None:
    """The security team removes a publisher key: that publisher's components fail their
    check and are no longer resolved into any box (a running box falls back to what still
    verifies, or says nothing is vouched for: tests/unit/test_boxes.py), and every box is
    resolved again; when the key comes back, so do they."""
    assert components.verify_component(rt, component).ok
    assert component in {c.object_name for c in lazyboxes._catalogue(rt)}
    policy = rt.view.policy
    assert policy is not None
    version = rt.boxes.catalogue_version
    rt.view.policy = dataclasses.replace(policy, publisher_keys={})
    components.verify_all(rt)
    check = rt.boxes.checks[component]
    assert (check.ok, check.reason) == (False, "UnknownPublisher")
    assert _verification(rt, component)["state"] == "Failed"
    assert component not in {c.object_name for c in lazyboxes._catalogue(rt)}
    assert rt.boxes.catalogue_version > version
    rt.view.policy = policy
    components.verify_all(rt)
    assert component in {c.object_name for c in lazyboxes._catalogue(rt)}


def test_an_image_a_box_boots_is_vouched_for_only_while_a_component_of_it_verifies(
    control_plane: ControlPlane, rt: Runtime, component: str
) -> None:
    """What a running box boots is judged by its images, whatever OSComponent objects are
    left: one whose component fails its check (a publisher removed) or whose object is
    deleted is no longer vouched for; one not checked yet is (the box waits for its check).
    A deletion the watch never reported (it was away) is found by the periodic listing."""
    spec = _server(rt, component)["spec"]
    part = ("c-" + spec["componentName"], spec["digest"])  # a library's disk, by its name
    assert lazyboxes.unvouched(rt, [part]) == {}  # not checked yet: not taken as revoked
    assert components.verify_component(rt, component).ok
    assert lazyboxes.unvouched(rt, [part]) == {}
    policy = rt.view.policy
    assert policy is not None
    rt.view.policy = dataclasses.replace(policy, publisher_keys={})
    components.verify_all(rt)
    assert "UnknownPublisher" in lazyboxes.unvouched(rt, [part])[part]
    rt.view.policy = policy
    components.verify_all(rt)
    assert lazyboxes.unvouched(rt, [part]) == {}
    since = rt.view.events
    control_plane.kubectl("delete", "osc", component)  # and the watch misses it
    listed = kube.list_all(rt.clients, OS_COMPONENTS)
    assert components.resync(rt, listed, since) == ([component], [])
    assert "deleted" in lazyboxes.unvouched(rt, [part])[part]
    rt.view.loaded = False  # before the pool is listed, an absent object says nothing
    assert lazyboxes.unvouched(rt, [part]) == {}


def test_a_revocation_whose_status_writes_keep_conflicting_still_takes_its_vouching_back(
    control_plane: ControlPlane, rt: Runtime, component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever may patch OSComponents (labels stay editable; the spec does not) patches the
    revoked component's labels before each of gtvp's status writes, so the API server
    answers every one 409: the failure stands all the same (it rests on the immutable spec
    and the policy), and what the component vouched for in running boxes is taken back; a
    check that concluded nothing (`Changing`) would take nothing back."""
    spec = _server(rt, component)["spec"]
    part = ("c-" + spec["componentName"], spec["digest"])
    assert components.verify_component(rt, component).ok
    write = kube.patch_status
    conflicts = [0]

    def labels_patched_first(clients: Any, res: Any, name: str, *args: Any, **kw: Any) -> Any:
        if res is OS_COMPONENTS and name == component:
            conflicts[0] += 1
            control_plane.kubectl("label", "osc", name, f"n={conflicts[0]}", "--overwrite")
        return write(clients, res, name, *args, **kw)

    monkeypatch.setattr(kube, "patch_status", labels_patched_first)
    policy = rt.view.policy
    assert policy is not None
    rt.view.policy = dataclasses.replace(policy, revoked_components=frozenset({spec["digest"]}))
    check = components.verify_component(rt, component)
    assert conflicts[0] == components.WRITE_ATTEMPTS  # every write met a 409
    assert (check.ok, check.reason) == (False, "Revoked")
    assert rt.boxes.checks[component].reason == "Revoked"
    assert "Revoked" in lazyboxes.unvouched(rt, [part])[part]


def test_a_component_the_watch_told_of_after_the_listing_began_is_not_forgotten(
    rt: Runtime, component: str
) -> None:
    since = rt.view.events
    _into_view(rt, _server(rt, component))  # a watch event after the listing was asked
    assert components.resync(rt, [], since) == ([], [])
    assert component in rt.view.components


def test_a_listing_that_fails_forgets_nothing_and_one_that_holds_a_missed_component_adds_it(
    control_plane: ControlPlane, rt: Runtime, component: str
) -> None:
    """gtvp's own kinds are never read as empty when the API server answers 404 (its CRDs
    not synced yet, during a restart): an empty listing would un-vouch every running box.
    A component the view lost, or never saw, is taken in again from the listing and
    checked, not only deleted ones forgotten."""
    missing = ApiResource("gtvp.io", "v1alpha1", "nosuchkinds", "NoSuchKind", False)
    admin = kube.make_clients(str(control_plane.kubeconfig_for(ADMIN)))  # RBAC aside: 404
    assert kube.list_all(admin, missing) == []  # KubeVirt not installed (yet): fine
    with pytest.raises(ApiException) as refused:
        kube.list_all(admin, missing, missing_ok=False)
    assert refused.value.status == 404
    assert components.verify_component(rt, component).ok
    rt.view.observe_component(_server(rt, component), "DELETED")  # lost, unseen
    since = rt.view.events
    listed = kube.list_all(rt.clients, OS_COMPONENTS, missing_ok=False)
    gone, missed = components.resync(rt, listed, since)
    assert (gone, missed) == ([], [component])
    assert component in rt.view.components
    assert components.verify_component(rt, component).ok
