"""Which components a box resolves to, as the operator's box loop asks (gtvp.handlers.lazyboxes).

Resolution prefers component names the pool's members cache where the choice is free (glibc
or musl for libc). What a member caches is its Node's `status.images`, which root on that
member can write: a placed box must not change its choice, and restart, because of it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from gtvp import kube
from gtvp.core.component_checks import Check
from gtvp.core.components import parse_component
from gtvp.core.compose import BoxRef, compose_vm
from gtvp.core.resolve import BoxRequest, resolve
from gtvp.handlers import components, lazyboxes
from gtvp.runtime import OperatorSettings, Runtime
from tests.catalogue import Publisher

PUB = Publisher()
NOW = dt.datetime(2026, 12, 4, 6, 0, tzinfo=dt.UTC)
SPEC: dict[str, Any] = {
    "application": {"name": "nginx"},
    "dependencies": [{"name": "debian-minimal"}],
    "level": 2,
    "resources": {"cpu": "500m", "memory": "512Mi"},
}
MUSL = PUB.component("musl", "1.2.5", requires=["rootfs"], provides=["libc"], size=1_000_000)


def _runtime(objects: list[dict[str, Any]]) -> Runtime:
    rt = Runtime(settings=OperatorSettings(policy_name="p"), clients=cast(kube.Clients, None))
    for obj in objects:
        rt.view.observe_component(obj, "ADDED")
    return rt


def test_a_members_cache_claim_steers_a_new_box_but_never_a_placed_one() -> None:
    objects = [*PUB.web_catalogue(), MUSL]
    catalogue = [parse_component(o) for o in objects]
    first = resolve(BoxRequest.from_spec(SPEC), catalogue)
    assert "glibc" in {c.name for c in first}  # by name when nothing is cached
    rt = _runtime(objects)
    box = {
        "metadata": {"name": "web", "namespace": "apps", "uid": "u1", "generation": 1},
        "spec": SPEC,
    }
    rt.view.observe_box(box, "ADDED")
    # root on a member lists musl among its Node's images
    rt.boxes.pool_cache = (NOW, frozenset({parse_component(MUSL).digest}))
    new = lazyboxes.box_input(rt, ("apps", "web"), NOW)
    assert "musl" in {c.name for c in new.components or ()}  # a new box: the cache counts
    # the box was placed with glibc: its VM exists and its status says what it resolved to
    vm = compose_vm(BoxRef("web", "apps", "u1"), SPEC, first, None)
    vm["metadata"]["annotations"]["gtvp.io/components"] = ",".join(c.object_name for c in first)
    rt.view.observe_vm(vm, "ADDED")
    resolved = [{"name": c.name, "version": str(c.version), "digest": c.digest} for c in first]
    rt.view.observe_box({**box, "status": {"resolved": resolved}}, "MODIFIED")
    placed = lazyboxes.box_input(rt, ("apps", "web"), NOW)
    assert {c.name for c in placed.components or ()} == {c.name for c in first}


def test_a_signed_copy_under_another_object_name_neither_replaces_nor_restarts_a_placed_box() -> (
    None
):
    """Whoever may create OSComponents applies the box's nginx spec byte for byte as
    `0000-copy` (an object name that sorts first): the placed box keeps the object its VM
    boots, so it is not upgraded (restarted, its credential armed anew) to the same bytes,
    nor again when the copy is deleted. A box not placed yet may take the copy: the bytes
    are the same."""
    objects = PUB.web_catalogue()
    catalogue = [parse_component(o) for o in objects]
    first = resolve(BoxRequest.from_spec(SPEC), catalogue)
    nginx = next(o for o in objects if o["metadata"]["name"] == next(
        c.object_name for c in first if c.name == "nginx"))  # fmt: skip
    copy = {**nginx, "metadata": {**nginx["metadata"], "name": "0000-copy"}}
    rt = _runtime([*objects, copy])
    box = {
        "metadata": {"name": "web", "namespace": "apps", "uid": "u1", "generation": 1},
        "spec": SPEC,
    }
    rt.view.observe_box(box, "ADDED")
    new = lazyboxes.box_input(rt, ("apps", "web"), NOW)
    assert "0000-copy" in {c.object_name for c in new.components or ()}
    vm = compose_vm(BoxRef("web", "apps", "u1"), SPEC, first, None)
    vm["metadata"]["annotations"]["gtvp.io/components"] = ",".join(c.object_name for c in first)
    rt.view.observe_vm(vm, "ADDED")
    resolved = [{"name": c.name, "version": str(c.version), "digest": c.digest,
                 "object": c.object_name} for c in first]  # fmt: skip
    rt.view.observe_box({**box, "status": {"resolved": resolved}}, "MODIFIED")
    placed = lazyboxes.box_input(rt, ("apps", "web"), NOW)
    assert {c.object_name for c in placed.components or ()} == {c.object_name for c in first}
    # the VM's annotation is its editors' to write: naming the copy there steers nothing
    vm["metadata"]["annotations"]["gtvp.io/components"] = ",".join(
        "0000-copy" if c.name == "nginx" else c.object_name for c in first
    )
    rt.view.observe_vm(vm, "MODIFIED")
    steered = lazyboxes.box_input(rt, ("apps", "web"), NOW)
    assert {c.object_name for c in steered.components or ()} == {c.object_name for c in first}


def test_a_component_created_again_under_its_name_is_not_taken_as_checked() -> None:
    """An OSComponent deleted and created again (its deletion missed by the watch, a relist)
    with another spec: the old object's Verified check must not stand for it until it is
    checked; a status change of the same object keeps its check."""
    rt = _runtime([])
    signed = PUB.component("curl", "8.0.0", requires=["libc"])
    signed["metadata"]["uid"] = "first"
    assert components.observe(rt, signed, "ADDED") == "curl-8-0-0"
    rt.boxes.checks["curl-8-0-0"] = Check("Verified", "SignatureValid", "")
    components.observe(rt, {**signed, "status": {"verification": {}}}, "MODIFIED")
    assert rt.boxes.checks["curl-8-0-0"].ok
    other = PUB.component("curl", "8.0.0", requires=["libc"], size=2)
    other["metadata"]["uid"] = "second"
    components.observe(rt, other, "MODIFIED")
    assert "curl-8-0-0" not in rt.boxes.checks
    # a check of the first object, finished in its thread after the second arrived, is not
    # kept for the second
    stale = Check("Verified", "SignatureValid", "")
    assert not components._set_check(rt, "curl-8-0-0", stale, signed)
    assert "curl-8-0-0" not in rt.boxes.checks
